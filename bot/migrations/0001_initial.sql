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

-- Small key/value state, e.g. the active checkpoint.
CREATE TABLE bot_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
