-- dialect: sqlite
-- Per-channel decoding settings; a channel without a row uses SceneSettings() defaults.
CREATE TABLE channel_settings (
    channel_id         INTEGER PRIMARY KEY,
    guild_id           INTEGER NOT NULL,
    max_new_tokens     INTEGER NOT NULL,
    repetition_penalty REAL    NOT NULL,
    temperature        REAL    NOT NULL,
    top_p              REAL    NOT NULL,
    top_k              INTEGER NOT NULL,
    updated_by         INTEGER NOT NULL,
    updated_at         TEXT    NOT NULL DEFAULT (datetime('now'))
);

-- guild_id / channel_id 0 = the local console.
CREATE TABLE scenes (
    id          INTEGER PRIMARY KEY,
    guild_id    INTEGER NOT NULL,
    channel_id  INTEGER NOT NULL,
    user_id     INTEGER NOT NULL,
    prompt      TEXT    NOT NULL,
    model_name  TEXT    NOT NULL,
    new_tokens  INTEGER NOT NULL,
    seconds     REAL    NOT NULL,
    created_at  TEXT    NOT NULL DEFAULT (datetime('now'))
);

-- One row per script line; message_id/slot say which Discord message and keycap show it.
CREATE TABLE lines (
    id          INTEGER PRIMARY KEY,
    scene_id    INTEGER NOT NULL REFERENCES scenes(id) ON DELETE CASCADE,
    line_no     INTEGER NOT NULL,
    text        TEXT    NOT NULL,
    message_id  INTEGER,
    slot        INTEGER CHECK (slot BETWEEN 1 AND 10),
    UNIQUE (scene_id, line_no),
    UNIQUE (message_id, slot)
);

CREATE TABLE votes (
    id          INTEGER PRIMARY KEY,
    line_id     INTEGER NOT NULL REFERENCES lines(id) ON DELETE CASCADE,
    user_id     INTEGER NOT NULL,
    created_at  TEXT    NOT NULL DEFAULT (datetime('now')),
    UNIQUE (user_id, line_id)
);
CREATE INDEX votes_line ON votes(line_id);
CREATE INDEX scenes_place ON scenes(guild_id, channel_id);

-- dialect: postgresql
-- PostgreSQL support began at schema 5, so no PostgreSQL database ever held the tables
-- of this first layout: 0002 creates them there directly in their platform-keyed form.
-- SQLite's datetime('now'[, modifier]) for PostgreSQL: the same 'YYYY-MM-DD HH:MM:SS' UTC
-- text, so the queries and the stored timestamps are the same on both.
CREATE FUNCTION datetime(moment TEXT, modifier TEXT DEFAULT '0 seconds') RETURNS TEXT
    LANGUAGE sql STABLE
    AS $$ SELECT to_char(CASE WHEN moment = 'now' THEN now() AT TIME ZONE 'UTC'
                              ELSE CAST(moment AS timestamp) END + CAST(modifier AS interval),
                         'YYYY-MM-DD HH24:MI:SS') $$;
-- dialect: all
-- Small key/value state, e.g. the active checkpoint.
CREATE TABLE bot_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
