-- The same table as on Postgres; created_at holds milliseconds since the
-- Unix epoch.
CREATE TABLE IF NOT EXISTS messages (
    room        TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    id          TEXT    NOT NULL,
    user_id     TEXT    NOT NULL,
    body        TEXT    NOT NULL,
    client_id   TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;

CREATE UNIQUE INDEX IF NOT EXISTS messages_room_user_client
    ON messages (room, user_id, client_id);
