-- Member shards of big rooms (DESIGN, "Big rooms"). A room has a row once
-- its sequencer first splits it; no row means one shard (unsplit). The
-- sequencer writes it under its lease, so a stale owner cannot change it,
-- and every gateway learns the count from the sequencer.
CREATE TABLE IF NOT EXISTS room_shards (
    room        text        PRIMARY KEY,
    shards      integer     NOT NULL CHECK (shards >= 1),
    changed_at  timestamptz NOT NULL
);
