-- Fenced room ownership. A node takes a room's lease (bumping the epoch)
-- before it serves the room, and every batch it commits updates the lease
-- row WHERE owner = me AND epoch = mine, holding its row lock until commit:
-- an old owner can never commit after a new owner read last_seq.
CREATE TABLE IF NOT EXISTS room_leases (
    room        text        PRIMARY KEY,
    owner       text        NOT NULL,
    epoch       bigint      NOT NULL,
    expires_at  timestamptz NOT NULL
);
