-- One decoding setting: longer_lines (0 = off; b > 0 = b nats off every token that would
-- end a line, sitcom.decoding.guards.LongerLines). NULL = the current default of
-- sitcom.settings.SceneSettings, as for 0004.
-- dialect: sqlite
ALTER TABLE channel_settings ADD COLUMN longer_lines REAL;
-- dialect: postgresql
ALTER TABLE channel_settings ADD COLUMN longer_lines DOUBLE PRECISION;
-- dialect: all
