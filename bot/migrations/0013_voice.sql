-- One decoding setting: voice (0 = off; v > 0 = contrast with the scene's other speaker
-- inside each line, sitcom.decoding.voice). NULL = the current default of
-- sitcom.settings.SceneSettings, as for 0004.
-- dialect: sqlite
ALTER TABLE channel_settings ADD COLUMN voice REAL;
-- dialect: postgresql
ALTER TABLE channel_settings ADD COLUMN voice DOUBLE PRECISION;
-- dialect: all
