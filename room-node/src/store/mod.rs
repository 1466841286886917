//! Storage behind a narrow trait: what the room actor and the writer need.
//! [`postgres::PgStore`] in the cluster, [`sqlite::SqliteStore`] in the
//! embedded mode; both keep the contract's `messages` table.

pub mod postgres;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use chat_protocol::{Message, NodeId, RoomId, UserId};

/// Why a storage call failed. The split decides what the writer does.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable, restarting, or out of resources: retry
    /// the same rows later, never drop them.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database refused these rows (a constraint or a value): retrying
    /// the same rows cannot help, so the room must reconcile first.
    #[error("database rejected the rows: {0}")]
    Rejected(String),
}

/// Result of storage calls.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One message to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Position in the room.
    pub seq: u64,
    /// Cluster-unique id.
    pub id: String,
    /// The sender.
    pub user: UserId,
    /// The text.
    pub text: String,
    /// The sender's id for the message.
    pub client_id: String,
}

/// One room's rows in a group commit.
#[derive(Debug, Clone, Copy)]
pub struct RoomRows<'a> {
    /// The room.
    pub room: &'a RoomId,
    /// The lease epoch the writing node holds for the room.
    pub epoch: u64,
    /// Its rows, in seq order.
    pub rows: &'a [Row],
}

/// What a room needs from storage when it starts.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Highest committed seq (0 for a new room).
    pub last_seq: u64,
    /// The newest messages, oldest first.
    pub recent: Vec<Message>,
    /// `(user, client_id) → (seq, id)` of the newest messages, oldest first,
    /// for the dedup window.
    pub dedup: Vec<(UserId, String, u64, String)>,
    /// Member shards the room is split into (1: not split).
    pub shards: u32,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            last_seq: 0,
            recent: Vec::new(),
            dedup: Vec::new(),
            shards: 1,
        }
    }
}

/// A page request: `after < seq < before`; the newest `limit` when only
/// `before` bounds it, the oldest `limit` after `after` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Exclusive upper bound.
    pub before: Option<u64>,
    /// Exclusive lower bound.
    pub after: Option<u64>,
    /// Most rows.
    pub limit: u32,
}

/// The storage the room node needs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Commits every room's rows in one transaction, `created_at = ts_ms`,
    /// fenced by the rooms' leases: rows of a room whose lease `owner` no
    /// longer holds at the batch's epoch are not written. Extends the
    /// leases it matched by `ttl`. Returns the indexes of fenced batches.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] (retry later) or
    /// [`StoreError::Rejected`] (some row cannot be stored as it is).
    async fn commit(
        &self,
        owner: &NodeId,
        batches: &[RoomRows<'_>],
        ttl: Duration,
        ts_ms: i64,
    ) -> Result<Vec<usize>>;

    /// Takes the lease on `key` (a room name, or a member shard's
    /// `room#k`) for `owner` when it is free, expired, or already
    /// `owner`'s, bumping the epoch. `None` while another owner holds it.
    ///
    /// # Errors
    /// When the database cannot answer.
    async fn acquire_lease(&self, key: &str, owner: &NodeId, ttl: Duration) -> Result<Option<u64>>;

    /// Extends the leases `owner` still holds at the given epochs; returns
    /// the keys it still holds (the others were taken over).
    ///
    /// # Errors
    /// When the database cannot answer.
    async fn renew_leases(
        &self,
        owner: &NodeId,
        leases: &[(String, u64)],
        ttl: Duration,
    ) -> Result<Vec<String>>;

    /// Gives a lease up (after the room flushed), so the next owner need
    /// not wait for it to expire.
    ///
    /// # Errors
    /// When the database cannot answer.
    async fn release_lease(&self, key: &str, owner: &NodeId, epoch: u64) -> Result<()>;

    /// Records that `room` is now split into `shards` member shards, if
    /// `owner` still holds its lease at `epoch`; `false` when fenced (a new
    /// owner decides from then on).
    ///
    /// # Errors
    /// When the database cannot answer.
    async fn set_shards(
        &self,
        room: &RoomId,
        owner: &NodeId,
        epoch: u64,
        shards: u32,
    ) -> Result<bool>;

    /// Loads what a room actor needs to take a room over.
    ///
    /// # Errors
    /// When the database cannot answer.
    async fn load_room(&self, room: &RoomId, recent: u32, dedup: u32) -> Result<Snapshot>;

    /// A page of a room's messages in seq order, and whether more exist in
    /// the direction asked for.
    ///
    /// # Errors
    /// When the database cannot answer.
    async fn history(&self, room: &RoomId, page: Page) -> Result<(Vec<Message>, bool)>;

    /// The stored `(seq, id)` of each `(user, client_id)` that exists.
    ///
    /// # Errors
    /// When the database cannot answer.
    async fn find_client_ids(
        &self,
        room: &RoomId,
        keys: &[(UserId, String)],
    ) -> Result<Vec<(UserId, String, u64, String)>>;

    /// Whether the database answers, for readiness.
    async fn ping(&self) -> bool;
}

/// Converts a stored integer to a seq; rows never hold negative seqs.
pub(crate) fn to_seq(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Builds a [`Message`] from stored columns; rows were validated on the way
/// in, so a failure here means someone else wrote the table.
pub(crate) fn to_message(
    room: &RoomId,
    seq: i64,
    id: String,
    user: String,
    text: String,
    client_id: String,
    ts: i64,
) -> Result<Message> {
    let user = UserId::new(&user)
        .map_err(|_| StoreError::Rejected(format!("stored user id {user:?} is invalid")))?;
    Ok(Message {
        room: room.clone(),
        seq: to_seq(seq),
        id,
        user,
        text,
        ts,
        client_id,
    })
}

/// Orders a page's rows oldest first and says whether more exist.
pub(crate) fn finish_page(mut rows: Vec<Message>, page: Page) -> (Vec<Message>, bool) {
    let has_more = rows.len() > page.limit as usize;
    rows.truncate(page.limit as usize);
    if page.after.is_none() {
        rows.reverse();
    }
    (rows, has_more)
}
