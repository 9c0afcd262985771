-- Two decoding settings: min_p (sampling) and best_of (candidates written together, the
-- best-ranked one posted). NULL = the current default of sitcom.settings.SceneSettings, so a
-- channel saved before keeps following the default until someone sets them.
-- dialect: sqlite
ALTER TABLE channel_settings ADD COLUMN min_p REAL;
ALTER TABLE channel_settings ADD COLUMN best_of INTEGER;
-- dialect: postgresql
ALTER TABLE channel_settings ADD COLUMN min_p DOUBLE PRECISION;
ALTER TABLE channel_settings ADD COLUMN best_of INTEGER;
-- dialect: all
