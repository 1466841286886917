//! [`Store`] on SQLite, for the embedded single-process mode: the same
//! table (with `created_at` in milliseconds), WAL journal so history reads
//! do not wait for commits.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chat_protocol::{Message, NodeId, RoomId, UserId};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlitePool};

use super::{finish_page, to_message, to_seq, Page, Result, RoomRows, Snapshot, Store, StoreError};

/// Rows per INSERT statement: 7 parameters each stays far below SQLite's
/// 32766-parameter limit.
const ROWS_PER_STATEMENT: usize = 500;

const PAGE_FORWARD: &str = "SELECT seq, id, user_id, body, client_id, created_at FROM messages \
    WHERE room = ? AND seq > ? AND seq < ? ORDER BY seq ASC LIMIT ?";
const PAGE_BACKWARD: &str = "SELECT seq, id, user_id, body, client_id, created_at FROM messages \
    WHERE room = ? AND seq > ? AND seq < ? ORDER BY seq DESC LIMIT ?";

/// SQLite storage.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db)
            if db.is_unique_violation()
                || db.is_check_violation()
                || db.is_foreign_key_violation() =>
        {
            StoreError::Rejected(e.to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/chat.db` and runs the migrations.
    ///
    /// # Errors
    /// When the directory or file cannot be created or migrated.
    pub async fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join("chat.db");
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations failed: {e}")))?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl Store for SqliteStore {
    // The embedded mode has exactly one room node, so leases are always
    // granted and never fence anything.
    async fn acquire_lease(
        &self,
        _key: &str,
        _owner: &NodeId,
        _ttl: Duration,
    ) -> Result<Option<u64>> {
        Ok(Some(1))
    }

    async fn renew_leases(
        &self,
        _owner: &NodeId,
        leases: &[(String, u64)],
        _ttl: Duration,
    ) -> Result<Vec<String>> {
        Ok(leases.iter().map(|l| l.0.clone()).collect())
    }

    async fn release_lease(&self, _key: &str, _owner: &NodeId, _epoch: u64) -> Result<()> {
        Ok(())
    }

    async fn set_shards(
        &self,
        room: &RoomId,
        _owner: &NodeId,
        _epoch: u64,
        shards: u32,
    ) -> Result<bool> {
        sqlx::query(
            "INSERT INTO room_shards (room, shards, changed_at) VALUES (?, ?, ?) \
             ON CONFLICT (room) DO UPDATE SET shards = excluded.shards, changed_at = excluded.changed_at",
        )
        .bind(room.as_str())
        .bind(i64::from(shards.max(1)))
        .bind(crate::membership::now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(true)
    }

    async fn commit(
        &self,
        _owner: &NodeId,
        batches: &[RoomRows<'_>],
        _ttl: Duration,
        ts_ms: i64,
    ) -> Result<Vec<usize>> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let all: Vec<(&RoomId, &super::Row)> = batches
            .iter()
            .flat_map(|b| b.rows.iter().map(move |r| (b.room, r)))
            .collect();
        for chunk in all.chunks(ROWS_PER_STATEMENT) {
            let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO messages (room, seq, id, user_id, body, client_id, created_at) ",
            );
            qb.push_values(chunk, |mut b, (room, r)| {
                b.push_bind(room.as_str())
                    .push_bind(r.seq as i64)
                    .push_bind(r.id.as_str())
                    .push_bind(r.user.as_str())
                    .push_bind(r.text.as_str())
                    .push_bind(r.client_id.as_str())
                    .push_bind(ts_ms);
            });
            qb.build().execute(&mut *tx).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(Vec::new())
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
            sqlx::query_scalar("SELECT max(seq) FROM messages WHERE room = ?")
                .bind(room.as_str())
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?;
        let rows = sqlx::query(
            "SELECT user_id, client_id, seq, id FROM messages WHERE room = ? ORDER BY seq DESC LIMIT ?",
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
        let shards: Option<i64> =
            sqlx::query_scalar("SELECT shards FROM room_shards WHERE room = ?")
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
        let mut out = Vec::new();
        for (user, cid) in keys {
            let row = sqlx::query(
                "SELECT seq, id FROM messages WHERE room = ? AND user_id = ? AND client_id = ?",
            )
            .bind(room.as_str())
            .bind(user.as_str())
            .bind(cid.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
            if let Some(r) = row {
                out.push((user.clone(), cid.clone(), to_seq(r.get(0)), r.get(1)));
            }
        }
        Ok(out)
    }

    async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shard_counts_are_stored_and_loaded() {
        let dir = std::env::temp_dir().join(format!(
            "chat-sqlite-shards-{}-{}",
            std::process::id(),
            crate::membership::now_ms()
        ));
        let store = SqliteStore::open(&dir).await.unwrap();
        let room = RoomId::new("big").unwrap();
        let node = NodeId::new("embedded").unwrap();
        assert_eq!(store.load_room(&room, 10, 10).await.unwrap().shards, 1);
        assert!(store.set_shards(&room, &node, 1, 4).await.unwrap());
        assert_eq!(store.load_room(&room, 10, 10).await.unwrap().shards, 4);
        assert!(store.set_shards(&room, &node, 1, 6).await.unwrap());
        assert_eq!(store.load_room(&room, 10, 10).await.unwrap().shards, 6);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
