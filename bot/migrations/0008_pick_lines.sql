-- One decoding setting: pick_lines (1 = a best-of-n scene's candidates are compared after
-- every line and all go on from the best one; sitcom.decoding.batcher). NULL = the current
-- default of sitcom.settings.SceneSettings, as for 0004.
-- dialect: sqlite
ALTER TABLE channel_settings ADD COLUMN pick_lines INTEGER;
-- dialect: postgresql
ALTER TABLE channel_settings ADD COLUMN pick_lines INTEGER;
-- dialect: all
