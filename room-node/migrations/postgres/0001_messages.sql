-- Messages, one row each. Additive migrations only (expand/contract), so
-- old and new room nodes can run side by side during a rolling upgrade.
CREATE TABLE IF NOT EXISTS messages (
    room        text        NOT NULL,
    seq         bigint      NOT NULL,
    id          text        NOT NULL,
    user_id     text        NOT NULL,
    body        text        NOT NULL,
    client_id   text        NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (room, seq)
);

CREATE UNIQUE INDEX IF NOT EXISTS messages_room_user_client
    ON messages (room, user_id, client_id);
