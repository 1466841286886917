//! [`Store`] on Postgres: group commits insert every row of every room in
//! one statement with array parameters (`UNNEST`), so a commit is one round
//! trip whatever its size and never nears the 65535-parameter limit.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use chat_protocol::{Message, NodeId, RoomId, UserId};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row as _};

use super::{finish_page, to_message, to_seq, Page, Result, RoomRows, Snapshot, Store, StoreError};

const PAGE_FORWARD: &str = "SELECT seq, id, user_id, body, client_id, \
    (extract(epoch FROM created_at) * 1000)::int8 FROM messages \
    WHERE room = $1 AND seq > $2 AND seq < $3 ORDER BY seq ASC LIMIT $4";
const PAGE_BACKWARD: &str = "SELECT seq, id, user_id, body, client_id, \
    (extract(epoch FROM created_at) * 1000)::int8 FROM messages \
    WHERE room = $1 AND seq > $2 AND seq < $3 ORDER BY seq DESC LIMIT $4";

/// Postgres storage.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

/// Sorts sqlx errors into retryable and not. Data and constraint errors
/// (SQLSTATE classes 22 and 23) are the rows' fault; everything else
/// (connections, pool, shutdown, resources, serialization) may pass.
pub(crate) fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if code.starts_with("22") || code.starts_with("23") {
                StoreError::Rejected(e.to_string())
            } else {
                StoreError::Unavailable(e.to_string())
            }
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

impl PgStore {
    /// Connects (retrying with a logged error while the database is down)
    /// and runs the migrations.
    ///
    /// # Errors
    /// When the URL is malformed or the migrations fail.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let opts: PgConnectOptions = url
            .parse()
            .map_err(|e| StoreError::Rejected(format!("bad database URL: {e}")))?;
        let mut delay = Duration::from_millis(200);
        let pool = loop {
            match PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(opts.clone())
                .await
            {
                Ok(p) => break p,
                Err(e) => {
                    tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot reach Postgres; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        // Rolling upgrades: a newer node may already have applied
        // migrations this binary does not know. They are additive
        // (expand/contract), so an older node restarting mid-upgrade must
        // still start instead of refusing an unknown version.
        migrator.set_ignore_missing(true);
        migrator
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations failed: {e}")))?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl Store for PgStore {
    async fn commit(
        &self,
        owner: &NodeId,
        batches: &[RoomRows<'_>],
        ttl: Duration,
        ts_ms: i64,
    ) -> Result<Vec<usize>> {
        let n: usize = batches.iter().map(|b| b.rows.len()).sum();
        let mut rooms = Vec::with_capacity(n);
        let mut epochs = Vec::with_capacity(n);
        let mut seqs = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut users = Vec::with_capacity(n);
        let mut bodies = Vec::with_capacity(n);
        let mut cids = Vec::with_capacity(n);
        for b in batches {
            for r in b.rows {
                rooms.push(b.room.as_str());
                epochs.push(b.epoch as i64);
                seqs.push(r.seq as i64);
                ids.push(r.id.as_str());
                users.push(r.user.as_str());
                bodies.push(r.text.as_str());
                cids.push(r.client_id.as_str());
            }
        }
        let lease_rooms: Vec<&str> = batches.iter().map(|b| b.room.as_str()).collect();
        let lease_epochs: Vec<i64> = batches.iter().map(|b| b.epoch as i64).collect();
        // The matched lease rows stay locked until commit, so a new
        // owner's acquire waits for this commit and then reads its rows.
        // They are locked in room order, as the renewal locks them: in any
        // other order the two deadlock. Rows are fenced by room *and*
        // epoch: one group can carry batches of the same room from an
        // actor that just lost the lease and from the one that took it
        // (both on this node), and only the current epoch's may be written.
        // The statement answers the (room, epoch) pairs that held; a data-
        // modifying WITH runs whether or not the answer reads it.
        let held: Vec<(String, i64)> = sqlx::query_as(
            "WITH locked AS ( \
                 SELECT l.room FROM room_leases l \
                 JOIN UNNEST($8::text[], $9::int8[]) AS f(room, epoch) \
                   ON l.room = f.room AND l.epoch = f.epoch \
                 WHERE l.owner = $11 ORDER BY l.room FOR UPDATE OF l), \
             fence AS ( \
                 UPDATE room_leases l SET expires_at = now() + make_interval(secs => $10::float8 / 1000) \
                 FROM locked WHERE l.room = locked.room \
                 RETURNING l.room, l.epoch), \
             written AS ( \
                 INSERT INTO messages (room, seq, id, user_id, body, client_id, created_at) \
                 SELECT r, s, i, u, b, c, to_timestamp($7::float8 / 1000) \
                 FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $12::int8[]) \
                 AS t(r, s, i, u, b, c, e) \
                 WHERE (t.r, t.e) IN (SELECT room, epoch FROM fence)) \
             SELECT room, epoch FROM fence",
        )
        .bind(&rooms)
        .bind(&seqs)
        .bind(&ids)
        .bind(&users)
        .bind(&bodies)
        .bind(&cids)
        .bind(ts_ms)
        .bind(&lease_rooms)
        .bind(&lease_epochs)
        .bind(ttl.as_millis() as i64)
        .bind(owner.as_str())
        .bind(&epochs)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let held: HashSet<(&str, i64)> = held.iter().map(|(r, e)| (r.as_str(), *e)).collect();
        Ok(batches
            .iter()
            .enumerate()
            .filter(|(_, b)| !held.contains(&(b.room.as_str(), b.epoch as i64)))
            .map(|(i, _)| i)
            .collect())
    }

    async fn acquire_lease(&self, key: &str, owner: &NodeId, ttl: Duration) -> Result<Option<u64>> {
        let epoch: Option<i64> = sqlx::query_scalar(
            "INSERT INTO room_leases (room, owner, epoch, expires_at) \
             VALUES ($1, $2, 1, now() + make_interval(secs => $3::float8 / 1000)) \
             ON CONFLICT (room) DO UPDATE SET owner = EXCLUDED.owner, \
                 epoch = room_leases.epoch + 1, expires_at = EXCLUDED.expires_at \
             WHERE room_leases.owner = EXCLUDED.owner OR room_leases.expires_at < now() \
             RETURNING epoch",
        )
        .bind(key)
        .bind(owner.as_str())
        .bind(ttl.as_millis() as i64)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(epoch.map(to_seq))
    }

    async fn renew_leases(
        &self,
        owner: &NodeId,
        leases: &[(String, u64)],
        ttl: Duration,
    ) -> Result<Vec<String>> {
        let rooms: Vec<&str> = leases.iter().map(|l| l.0.as_str()).collect();
        let epochs: Vec<i64> = leases.iter().map(|l| l.1 as i64).collect();
        // Locked in room order, as a group commit locks them (see there).
        let held: Vec<String> = sqlx::query_scalar(
            "WITH locked AS ( \
                 SELECT l.room FROM room_leases l \
                 JOIN UNNEST($2::text[], $3::int8[]) AS f(room, epoch) \
                   ON l.room = f.room AND l.epoch = f.epoch \
                 WHERE l.owner = $1 ORDER BY l.room FOR UPDATE OF l) \
             UPDATE room_leases l SET expires_at = now() + make_interval(secs => $4::float8 / 1000) \
             FROM locked WHERE l.room = locked.room \
             RETURNING l.room",
        )
        .bind(owner.as_str())
        .bind(&rooms)
        .bind(&epochs)
        .bind(ttl.as_millis() as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(held)
    }

    async fn set_shards(
        &self,
        room: &RoomId,
        owner: &NodeId,
        epoch: u64,
        shards: u32,
    ) -> Result<bool> {
        let shards = i32::try_from(shards.max(1))
            .map_err(|_| StoreError::Rejected(format!("{shards} shards is too many")))?;
        // The lease row is share-locked, so a takeover waits for this write
        // and then loads the new count.
        let written: Option<i32> = sqlx::query_scalar(
            "WITH fence AS ( \
                 SELECT room FROM room_leases \
                 WHERE room = $1 AND owner = $2 AND epoch = $3 FOR SHARE) \
             INSERT INTO room_shards (room, shards, changed_at) \
             SELECT room, $4, now() FROM fence \
             ON CONFLICT (room) DO UPDATE SET shards = EXCLUDED.shards, changed_at = EXCLUDED.changed_at \
             RETURNING shards",
        )
        .bind(room.as_str())
        .bind(owner.as_str())
        .bind(epoch as i64)
        .bind(shards)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(written.is_some())
    }

    async fn release_lease(&self, key: &str, owner: &NodeId, epoch: u64) -> Result<()> {
        sqlx::query(
            "UPDATE room_leases SET expires_at = 'epoch' \
             WHERE room = $1 AND owner = $2 AND epoch = $3",
        )
        .bind(key)
        .bind(owner.as_str())
        .bind(epoch as i64)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn load_room(&self, room: &RoomId, recent: u32, dedup: u32) -> Result<Snapshot> {
        let (recent, _) = self
            .history(
                room,
                Page {
                    before: None,
                    after: None,
                    limit: recent,
                },
            )
            .await?;
        let last_seq: Option<i64> =
            sqlx::query_scalar("SELECT max(seq) FROM messages WHERE room = $1")
                .bind(room.as_str())
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?;
        let rows = sqlx::query(
            "SELECT user_id, client_id, seq, id FROM messages WHERE room = $1 \
             ORDER BY seq DESC LIMIT $2",
        )
        .bind(room.as_str())
        .bind(i64::from(dedup))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let mut keys = Vec::with_capacity(rows.len());
        for r in rows.into_iter().rev() {
            let user: String = r.get(0);
            if let Ok(user) = UserId::new(&user) {
                keys.push((user, r.get(1), to_seq(r.get(2)), r.get(3)));
            }
        }
        let shards: Option<i32> =
            sqlx::query_scalar("SELECT shards FROM room_shards WHERE room = $1")
                .bind(room.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?;
        Ok(Snapshot {
            last_seq: to_seq(last_seq.unwrap_or(0)),
            recent,
            dedup: keys,
            shards: shards.map_or(1, |n| u32::try_from(n).unwrap_or(1).max(1)),
        })
    }

    async fn history(&self, room: &RoomId, page: Page) -> Result<(Vec<Message>, bool)> {
        let upper = page.before.map_or(i64::MAX, |b| b as i64);
        let (sql, lower) = match page.after {
            Some(a) => (PAGE_FORWARD, a as i64),
            None => (PAGE_BACKWARD, 0),
        };
        let rows = sqlx::query(sql)
            .bind(room.as_str())
            .bind(lower)
            .bind(upper)
            .bind(i64::from(page.limit) + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let msgs = rows
            .into_iter()
            .map(|r| {
                to_message(
                    room,
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                    r.get(5),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(finish_page(msgs, page))
    }

    async fn find_client_ids(
        &self,
        room: &RoomId,
        keys: &[(UserId, String)],
    ) -> Result<Vec<(UserId, String, u64, String)>> {
        let users: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let cids: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        let rows = sqlx::query(
            "SELECT m.user_id, m.client_id, m.seq, m.id FROM messages m \
             JOIN UNNEST($2::text[], $3::text[]) AS k(u, c) \
               ON m.user_id = k.u AND m.client_id = k.c \
             WHERE m.room = $1",
        )
        .bind(room.as_str())
        .bind(&users)
        .bind(&cids)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let user: String = r.get(0);
                Some((
                    UserId::new(&user).ok()?,
                    r.get(1),
                    to_seq(r.get(2)),
                    r.get(3),
                ))
            })
            .collect())
    }

    async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}
