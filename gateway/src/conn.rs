//! A connection's outbound side: a bounded queue of ready-made text frames
//! and one writer that drains it in batches (many frames, one flush). A
//! full queue closes the connection as a slow consumer; it never stalls a
//! room or other connections.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use chat_protocol::frames::close;
use chat_protocol::ServerFrame;
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::{FrameKind, METRICS};
use crate::ws::{Outbound, Payload, Writer};

/// Frames the writer takes from the queue before one flush.
const WRITE_BATCH: usize = 64;
/// The writer's batch capacity before the connection ever had a burst.
const INITIAL_BATCH: usize = 4;

/// Shared close request: the first code set wins.
#[derive(Debug, Default)]
struct Closer {
    token: CancellationToken,
    code: AtomicU16,
    /// The latest ping's payload when the queue was too full for its pong:
    /// RFC 6455 lets a server skip pongs for older pings, never for the
    /// most recent one. The writer sends it after its current batch.
    late_pong: Mutex<Option<Bytes>>,
}

/// A handle to send frames to one connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnTx {
    /// The connection's id within this gateway.
    pub id: u64,
    frames: mpsc::Sender<Outbound>,
    closer: Arc<Closer>,
}

/// The receiving side, owned by the writer.
#[derive(Debug)]
pub struct ConnRx {
    frames: mpsc::Receiver<Outbound>,
    closer: Arc<Closer>,
}

/// A new queue of `capacity` frames for connection `id`.
pub fn channel(id: u64, capacity: usize) -> (ConnTx, ConnRx) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let closer = Arc::new(Closer::default());
    (
        ConnTx {
            id,
            frames: tx,
            closer: closer.clone(),
        },
        ConnRx { frames: rx, closer },
    )
}

impl ConnTx {
    /// Queues a frame without waiting. A full queue closes the connection
    /// with 4008 (slow consumer). Returns whether the frame was queued.
    pub fn try_deliver(&self, frame: Payload, kind: FrameKind) -> bool {
        match self.frames.try_send(Outbound::Text(frame)) {
            Ok(()) => {
                METRICS.frames_out.of(kind).inc();
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.closer.token.is_cancelled() {
                    METRICS.slow_consumers.inc();
                    tracing::info!(conn.id = self.id, "slow consumer: closing");
                }
                self.close(close::SLOW_CONSUMER);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues a frame, waiting for room in the queue (for replies and
    /// backlogs, where the connection's own pace is the right pace).
    /// Returns false when the connection is gone.
    pub async fn deliver(&self, frame: Payload, kind: FrameKind) -> bool {
        tokio::select! {
            r = self.frames.send(Outbound::Text(frame)) => {
                if r.is_ok() {
                    METRICS.frames_out.of(kind).inc();
                }
                r.is_ok()
            }
            _ = self.closer.token.cancelled() => false,
        }
    }

    /// Queues a WebSocket ping unless the queue is full (a full queue
    /// already means the peer is not reading).
    pub fn ping(&self) {
        // A full or closed queue makes the ping pointless, not wrong.
        let _ = self.frames.try_send(Outbound::Ping);
    }

    /// Queues the answer to a client's ping. When the queue is full, the
    /// pong waits in a one-slot place instead, the latest ping's replacing
    /// an older one's.
    pub fn pong(&self, payload: Bytes) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self
            .frames
            .try_send(Outbound::Pong(Box::new(payload.clone())))
        {
            // A full queue means the writer is busy: it sends this (the
            // most recent ping's answer) after its batch.
            *self.closer.late_pong.lock().expect("pong slot") = Some(payload);
        }
    }

    /// Queues a server frame built by the gateway itself.
    pub async fn reply(&self, frame: &ServerFrame) -> bool {
        match Payload::from_utf8(frame.to_bytes()) {
            Some(t) => self.deliver(t, FrameKind::Reply).await,
            None => false,
        }
    }

    /// Asks the writer to close the connection with `code` (first wins).
    pub fn close(&self, code: u16) {
        // Only the first close code is kept.
        let _ = self
            .closer
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.closer.token.cancel();
    }

    /// Whether a close was requested.
    pub fn is_closed(&self) -> bool {
        self.closer.token.is_cancelled()
    }

    /// Resolves when a close is requested.
    pub async fn closed(&self) {
        self.closer.token.cancelled().await;
    }

    /// The close code requested, if any.
    pub fn close_code(&self) -> Option<u16> {
        match self.closer.code.load(Ordering::Acquire) {
            0 => None,
            c => Some(c),
        }
    }
}

/// Why the writer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterEnd {
    /// A close was requested and sent with this code.
    Closed(u16),
    /// Every sender is gone.
    Done,
    /// The socket failed.
    Failed,
}

impl ConnRx {
    /// Drains the queue into `writer` until a close is requested, every
    /// sender is gone, or the socket fails. Frames still queued when a
    /// close arrives are written first (except for slow consumers, whose
    /// queue is the problem).
    pub async fn run<W>(mut self, mut writer: Writer<W>) -> WriterEnd
    where
        W: AsyncWrite + Unpin,
    {
        // Small at first: an idle connection never needs more, and a busy
        // one grows it to WRITE_BATCH once and keeps it (3 KiB at 64 slots
        // was a fifth of an idle connection's memory).
        let mut batch = Vec::with_capacity(INITIAL_BATCH);
        loop {
            tokio::select! {
                biased;
                n = self.frames.recv_many(&mut batch, WRITE_BATCH) => {
                    if n == 0 {
                        // Every sender is gone; a requested close still goes out.
                        if self.closer.token.is_cancelled() {
                            return self.send_close(&mut writer, &mut batch).await;
                        }
                        return WriterEnd::Done;
                    }
                    if write_batch(&mut writer, &mut batch).await.is_err() {
                        return WriterEnd::Failed;
                    }
                    let late = self.closer.late_pong.lock().expect("pong slot").take();
                    if let Some(p) = late {
                        batch.push(Outbound::Pong(Box::new(p)));
                        if write_batch(&mut writer, &mut batch).await.is_err() {
                            return WriterEnd::Failed;
                        }
                    }
                    if self.frames.is_empty() {
                        writer.trim();
                    }
                }
                _ = self.closer.token.cancelled() => {
                    return self.send_close(&mut writer, &mut batch).await;
                }
            }
        }
    }

    /// Writes what is still queued (unless the queue is the problem), then
    /// the close frame with the requested code.
    async fn send_close<W>(
        &mut self,
        writer: &mut Writer<W>,
        batch: &mut Vec<Outbound>,
    ) -> WriterEnd
    where
        W: AsyncWrite + Unpin,
    {
        let code = match self.closer.code.load(Ordering::Acquire) {
            0 => close::INTERNAL,
            c => c,
        };
        if code != close::SLOW_CONSUMER {
            while let Ok(f) = self.frames.try_recv() {
                batch.push(f);
            }
        } else {
            batch.clear();
        }
        batch.push(Outbound::Close(code));
        // The peer may be gone; the close is best effort.
        let _ = write_batch(writer, batch).await;
        writer.shutdown().await;
        WriterEnd::Closed(code)
    }
}

async fn write_batch<W>(writer: &mut Writer<W>, batch: &mut Vec<Outbound>) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut bytes = 0u64;
    for m in batch.drain(..) {
        bytes += writer.push(&m) as u64;
    }
    writer.flush().await?;
    METRICS.bytes_out.inc_by(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    #[tokio::test]
    async fn writes_in_order_then_closes_with_code() {
        let (tx, rx) = channel(1, 8);
        let (server, client) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(rx.run(Writer::new(server, None)));
        // An independent client implementation reads what the writer wrote.
        let mut out = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        assert!(tx.try_deliver(Payload::from_static("a"), FrameKind::Message));
        assert!(
            tx.deliver(Payload::from_static("b"), FrameKind::Reply)
                .await
        );
        assert_eq!(
            out.next().await.unwrap().unwrap(),
            Message::Text("a".into())
        );
        assert_eq!(
            out.next().await.unwrap().unwrap(),
            Message::Text("b".into())
        );
        tx.close(close::RESTART);
        assert_eq!(writer.await.unwrap(), WriterEnd::Closed(close::RESTART));
        match out.next().await {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), close::RESTART),
            other => panic!("expected close, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_latest_ping_is_answered_even_when_the_queue_was_full() {
        let (tx, rx) = channel(1, 2);
        // Fill the queue before the writer runs: the pongs do not fit.
        assert!(tx.try_deliver(Payload::from_static("1"), FrameKind::Message));
        assert!(tx.try_deliver(Payload::from_static("2"), FrameKind::Message));
        tx.pong(Bytes::from_static(b"old"));
        tx.pong(Bytes::from_static(b"last"));
        let (server, client) = tokio::io::duplex(1 << 16);
        let _writer = tokio::spawn(rx.run(Writer::new(server, None)));
        let mut out = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(out.next().await.unwrap().unwrap());
        }
        assert_eq!(got[2], Message::Pong("last".into()));
    }

    #[tokio::test]
    async fn full_queue_closes_as_slow_consumer() {
        let (tx, _rx) = channel(1, 2);
        assert!(tx.try_deliver(Payload::from_static("1"), FrameKind::Message));
        assert!(tx.try_deliver(Payload::from_static("2"), FrameKind::Message));
        assert!(!tx.try_deliver(Payload::from_static("3"), FrameKind::Message));
        assert!(tx.is_closed());
        assert_eq!(tx.close_code(), Some(close::SLOW_CONSUMER));
    }
}
