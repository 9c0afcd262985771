-- When the latest reaction event applied for each user and line happened (the platform's
-- event time in integer microseconds; Slack's event_ts). Slack may redeliver an older event
-- after a newer one (a reaction_added lost on a dropped socket, retried after the user's
-- reaction_removed): the older one is ignored. Platforms without event times (Discord) add
-- no rows.
-- dialect: sqlite
CREATE TABLE vote_clock (
    line_id     INTEGER NOT NULL REFERENCES lines(id) ON DELETE CASCADE,
    user_id     TEXT    NOT NULL,
    event_us    INTEGER NOT NULL,
    PRIMARY KEY (user_id, line_id)
);
-- dialect: postgresql
CREATE TABLE vote_clock (
    line_id     BIGINT  NOT NULL REFERENCES lines(id) ON DELETE CASCADE,
    user_id     TEXT    NOT NULL,
    event_us    BIGINT  NOT NULL,
    PRIMARY KEY (user_id, line_id)
);
-- dialect: all
