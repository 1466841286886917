//! The transport between gateways and room nodes, behind a narrow trait:
//! what the chat code needs (publish, request/reply, subscribe, a heartbeat
//! bucket), not a copy of the NATS API. [`nats::NatsBus`] runs the cluster;
//! [`memory::MemoryBus`] joins a gateway and a room node in one process.

pub mod memory;
pub mod nats;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

/// Why a bus operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// Nobody listens on the subject (the node is gone).
    #[error("no responders")]
    NoResponders,
    /// The request got no reply in time.
    #[error("request timed out")]
    TimedOut,
    /// The server is too old or lacks JetStream.
    #[error("{0}")]
    Unsupported(String),
    /// Anything else (connection lost, server error).
    #[error("bus error: {0}")]
    Other(String),
}

/// A message received from a subscription.
#[derive(Debug, Clone)]
pub struct BusMessage {
    /// Where to send the reply, for requests.
    pub reply: Option<String>,
    /// The payload.
    pub payload: Bytes,
}

/// A change in a key-value bucket.
#[derive(Debug, Clone)]
pub struct KvChange {
    /// The key.
    pub key: String,
    /// The new value, or `None` when the key was deleted.
    pub value: Option<Bytes>,
}

/// The transport. Implementations are cheap to share behind an `Arc`.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes `payload` on `subject` (fire and forget, at most once).
    ///
    /// # Errors
    /// When the connection cannot take the message.
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), BusError>;

    /// Sends a request and waits up to `timeout` for one reply.
    ///
    /// # Errors
    /// [`BusError::NoResponders`] at once when nobody listens,
    /// [`BusError::TimedOut`] after `timeout`.
    async fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, BusError>;

    /// Subscribes to `subject`; the stream ends when the bus closes.
    ///
    /// # Errors
    /// When the subscription cannot be made.
    async fn subscribe(&self, subject: String) -> Result<BoxStream<'static, BusMessage>, BusError>;

    /// Creates the bucket if needed; values older than `max_age` expire.
    ///
    /// # Errors
    /// When the server cannot hold buckets.
    async fn kv_ensure(&self, bucket: &str, max_age: Duration) -> Result<(), BusError>;

    /// Writes `value` under `key` in `bucket`.
    ///
    /// # Errors
    /// When the write fails.
    async fn kv_put(&self, bucket: &str, key: &str, value: Bytes) -> Result<(), BusError>;

    /// Reads `key` from `bucket`.
    ///
    /// # Errors
    /// When the read fails.
    async fn kv_get(&self, bucket: &str, key: &str) -> Result<Option<Bytes>, BusError>;

    /// Deletes `key` from `bucket`.
    ///
    /// # Errors
    /// When the delete fails.
    async fn kv_delete(&self, bucket: &str, key: &str) -> Result<(), BusError>;

    /// Streams every current value of `bucket`, then every change.
    ///
    /// # Errors
    /// When the watch cannot start.
    async fn kv_watch(&self, bucket: &str) -> Result<BoxStream<'static, KvChange>, BusError>;

    /// Flushes what was published and closes, bounded by the caller.
    async fn drain(&self);

    /// Counts reconnections to the server: it changes after each reconnect,
    /// when messages may have been missed and soft state may need
    /// re-registering. An in-process bus never reconnects.
    fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::channel(0).1
    }
}
