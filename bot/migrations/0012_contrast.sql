-- One decoding setting: contrast (0 = off; beta > 0 = contrast with the untuned base,
-- sitcom.decoding.contrast). NULL = the current default of sitcom.settings.SceneSettings,
-- as for 0004.
-- dialect: sqlite
ALTER TABLE channel_settings ADD COLUMN contrast REAL;
-- dialect: postgresql
ALTER TABLE channel_settings ADD COLUMN contrast DOUBLE PRECISION;
-- dialect: all
