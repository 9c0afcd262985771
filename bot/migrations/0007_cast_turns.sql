-- One decoding setting: cast_turns (1 = each line's speaker is drawn from the scene's cast,
-- never the one who just spoke; sitcom.decoding.guards.CastTurns). NULL = the current default
-- of sitcom.settings.SceneSettings, as for 0004.
-- dialect: sqlite
ALTER TABLE channel_settings ADD COLUMN cast_turns INTEGER;
-- dialect: postgresql
ALTER TABLE channel_settings ADD COLUMN cast_turns INTEGER;
-- dialect: all
