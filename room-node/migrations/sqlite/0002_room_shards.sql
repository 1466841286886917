-- The same table as on Postgres; changed_at holds milliseconds since the
-- Unix epoch. The embedded mode has one node, so no lease fences it.
CREATE TABLE IF NOT EXISTS room_shards (
    room        TEXT    NOT NULL PRIMARY KEY,
    shards      INTEGER NOT NULL CHECK (shards >= 1),
    changed_at  INTEGER NOT NULL
) WITHOUT ROWID;
