-- One decoding setting: max_lines (a scene stops after this many new lines;
-- sitcom.decoding.guards.SceneStop). NULL = the current default of
-- sitcom.settings.SceneSettings, as for 0004.
-- dialect: sqlite
ALTER TABLE channel_settings ADD COLUMN max_lines INTEGER;
-- dialect: postgresql
ALTER TABLE channel_settings ADD COLUMN max_lines INTEGER;
-- dialect: all
