-- One decoding setting: guidance (1 = off; g > 1 = classifier-free guidance on the opening,
-- sitcom.decoding.guidance). NULL = the current default of sitcom.settings.SceneSettings,
-- as for 0004.
-- dialect: sqlite
ALTER TABLE channel_settings ADD COLUMN guidance REAL;
-- dialect: postgresql
ALTER TABLE channel_settings ADD COLUMN guidance DOUBLE PRECISION;
-- dialect: all
