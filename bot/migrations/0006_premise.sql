-- One decoding setting: premise (nats added to the opening's own words while writing, so
-- the scene keeps to its situation; sitcom.decoding.guards.PremiseBias). NULL = the current
-- default of sitcom.settings.SceneSettings, as for 0004.
-- dialect: sqlite
ALTER TABLE channel_settings ADD COLUMN premise REAL;
-- dialect: postgresql
ALTER TABLE channel_settings ADD COLUMN premise DOUBLE PRECISION;
-- dialect: all
