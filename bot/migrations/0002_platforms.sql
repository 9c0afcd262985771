-- Every row is keyed by platform ('discord', 'slack', 'console') with string ids: Slack's
-- are like T0123 / C0123 / U0123, Discord's are snowflakes (digits). Existing rows move
-- over: guild 0 / channel 0 was the local console, everything else Discord.
-- Tables are rebuilt children-last and renamed into place, so no foreign-key action fires
-- on the old rows (dropping old `scenes` finds no `lines` pointing at it any more).

-- dialect: sqlite
CREATE TABLE channel_settings_new (
    platform           TEXT    NOT NULL,
    channel_id         TEXT    NOT NULL,
    guild_id           TEXT    NOT NULL,
    max_new_tokens     INTEGER NOT NULL,
    repetition_penalty REAL    NOT NULL,
    temperature        REAL    NOT NULL,
    top_p              REAL    NOT NULL,
    top_k              INTEGER NOT NULL,
    updated_by         TEXT    NOT NULL,
    updated_at         TEXT    NOT NULL DEFAULT (datetime('now')),
    PRIMARY KEY (platform, channel_id)
);
INSERT INTO channel_settings_new
SELECT CASE WHEN guild_id = 0 AND channel_id = 0 THEN 'console' ELSE 'discord' END,
       CAST(channel_id AS TEXT), CAST(guild_id AS TEXT), max_new_tokens, repetition_penalty,
       temperature, top_p, top_k, CAST(updated_by AS TEXT), updated_at
FROM channel_settings;

-- posted_at: set once every message of the scene is out; NULL = stored but not (fully)
-- posted yet, which `/scene #ID` finishes.
CREATE TABLE scenes_new (
    id          INTEGER PRIMARY KEY,
    platform    TEXT    NOT NULL,
    guild_id    TEXT    NOT NULL,
    channel_id  TEXT    NOT NULL,
    user_id     TEXT    NOT NULL,
    prompt      TEXT    NOT NULL,
    model_name  TEXT    NOT NULL,
    new_tokens  INTEGER NOT NULL,
    seconds     REAL    NOT NULL,
    note        TEXT,
    created_at  TEXT    NOT NULL DEFAULT (datetime('now')),
    posted_at   TEXT
);
INSERT INTO scenes_new (id, platform, guild_id, channel_id, user_id, prompt, model_name,
                        new_tokens, seconds, created_at, posted_at)
SELECT s.id, CASE WHEN s.guild_id = 0 AND s.channel_id = 0 THEN 'console' ELSE 'discord' END,
       CAST(s.guild_id AS TEXT), CAST(s.channel_id AS TEXT), CAST(s.user_id AS TEXT), s.prompt,
       s.model_name, s.new_tokens, s.seconds, s.created_at,
       CASE WHEN (s.guild_id = 0 AND s.channel_id = 0)
                 OR NOT EXISTS (SELECT 1 FROM lines l
                                WHERE l.scene_id = s.id AND l.message_id IS NULL)
            THEN s.created_at END
FROM scenes s;

-- from_prompt: the user's own opening lines; shown, never votable, never in /best.
-- message_id: the platform's message reference (Discord: the message id; Slack:
-- "CHANNEL/ts", because a ts is unique only within its channel); slot: its keycap.
CREATE TABLE lines_new (
    id          INTEGER PRIMARY KEY,
    scene_id    INTEGER NOT NULL REFERENCES scenes_new(id) ON DELETE CASCADE,
    line_no     INTEGER NOT NULL,
    text        TEXT    NOT NULL,
    from_prompt INTEGER NOT NULL DEFAULT 0,
    message_id  TEXT,
    slot        INTEGER CHECK (slot BETWEEN 1 AND 10),
    UNIQUE (scene_id, line_no),
    UNIQUE (message_id, slot)
);
-- Old rows: the prompt's lines came first, one per non-blank prompt line; counting the
-- newlines of the trimmed prompt is exact unless a prompt held blank lines.
INSERT INTO lines_new (id, scene_id, line_no, text, from_prompt, message_id, slot)
SELECT l.id, l.scene_id, l.line_no, l.text,
       l.line_no <= 1 + length(trim(s.prompt)) - length(replace(trim(s.prompt), char(10), '')),
       CAST(l.message_id AS TEXT), l.slot
FROM lines l JOIN scenes s ON s.id = l.scene_id;

CREATE TABLE votes_new (
    id          INTEGER PRIMARY KEY,
    line_id     INTEGER NOT NULL REFERENCES lines_new(id) ON DELETE CASCADE,
    user_id     TEXT    NOT NULL,
    created_at  TEXT    NOT NULL DEFAULT (datetime('now')),
    UNIQUE (user_id, line_id)
);
INSERT INTO votes_new (id, line_id, user_id, created_at)
SELECT id, line_id, CAST(user_id AS TEXT), created_at FROM votes;

DROP TABLE votes;
DROP TABLE lines;
DROP TABLE scenes;
DROP TABLE channel_settings;
ALTER TABLE scenes_new RENAME TO scenes;
ALTER TABLE lines_new RENAME TO lines;
ALTER TABLE votes_new RENAME TO votes;
ALTER TABLE channel_settings_new RENAME TO channel_settings;
-- dialect: postgresql
-- (No 0001-layout rows to convert on PostgreSQL: see 0001.) Integer ids are identity
-- columns (BY DEFAULT, so `python -m bot migrate-db` can copy a SQLite bot's ids), REAL is
-- DOUBLE PRECISION (PostgreSQL's REAL is 4 bytes) and from_prompt is a BOOLEAN.
CREATE TABLE channel_settings (
    platform           TEXT    NOT NULL,
    channel_id         TEXT    NOT NULL,
    guild_id           TEXT    NOT NULL,
    max_new_tokens     INTEGER NOT NULL,
    repetition_penalty DOUBLE PRECISION NOT NULL,
    temperature        DOUBLE PRECISION NOT NULL,
    top_p              DOUBLE PRECISION NOT NULL,
    top_k              INTEGER NOT NULL,
    updated_by         TEXT    NOT NULL,
    updated_at         TEXT    NOT NULL DEFAULT datetime('now'),
    PRIMARY KEY (platform, channel_id)
);
CREATE TABLE scenes (
    id          BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    platform    TEXT    NOT NULL,
    guild_id    TEXT    NOT NULL,
    channel_id  TEXT    NOT NULL,
    user_id     TEXT    NOT NULL,
    prompt      TEXT    NOT NULL,
    model_name  TEXT    NOT NULL,
    new_tokens  INTEGER NOT NULL,
    seconds     DOUBLE PRECISION NOT NULL,
    note        TEXT,
    created_at  TEXT    NOT NULL DEFAULT datetime('now'),
    posted_at   TEXT
);
CREATE TABLE lines (
    id          BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    scene_id    BIGINT  NOT NULL REFERENCES scenes(id) ON DELETE CASCADE,
    line_no     INTEGER NOT NULL,
    text        TEXT    NOT NULL,
    from_prompt BOOLEAN NOT NULL DEFAULT FALSE,
    message_id  TEXT,
    slot        INTEGER CHECK (slot BETWEEN 1 AND 10),
    UNIQUE (scene_id, line_no),
    UNIQUE (message_id, slot)
);
CREATE TABLE votes (
    id          BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    line_id     BIGINT  NOT NULL REFERENCES lines(id) ON DELETE CASCADE,
    user_id     TEXT    NOT NULL,
    created_at  TEXT    NOT NULL DEFAULT datetime('now'),
    UNIQUE (user_id, line_id)
);
-- dialect: all
CREATE INDEX votes_line ON votes(line_id);
CREATE INDEX scenes_place ON scenes(platform, guild_id, channel_id);
CREATE INDEX scenes_unposted ON scenes(platform, channel_id) WHERE posted_at IS NULL;

-- Events already applied (Slack redelivers after a reconnect or a slow ack with the same
-- event_id), so a vote is never counted twice; rows older than a day are pruned.
CREATE TABLE seen_events (
    platform    TEXT    NOT NULL,
    event_id    TEXT    NOT NULL,
    seen_at     TEXT    NOT NULL DEFAULT (datetime('now')),
    PRIMARY KEY (platform, event_id)
);
