-- claimed_at: a process is posting this scene right now (set when it is stored, and by
-- `/scene #ID`); cleared when the posting ends. Two `/scene #ID` at once: one claims it in
-- one transaction, the other is told it is being posted. A claim older than 10 minutes
-- (its process died mid-post) can be taken over.
ALTER TABLE scenes ADD COLUMN claimed_at TEXT;

-- One row per running chat connection (e.g. Discord application 123, shard 0 of 1), so a
-- second process on the same token and shards is refused instead of answering every command
-- twice. The holder renews expires_at (unix seconds) while it runs and deletes the row when
-- it stops; a row past expires_at belongs to a process that died.
-- dialect: sqlite
CREATE TABLE leases (
    scope       TEXT    NOT NULL,
    shard_id    INTEGER NOT NULL,
    shard_count INTEGER NOT NULL,
    host        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    expires_at  REAL    NOT NULL,
    PRIMARY KEY (scope, shard_id, shard_count)
);
-- dialect: postgresql
CREATE TABLE leases (
    scope       TEXT    NOT NULL,
    shard_id    INTEGER NOT NULL,
    shard_count INTEGER NOT NULL,
    host        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, shard_id, shard_count)
);
-- dialect: all
