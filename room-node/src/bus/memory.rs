//! [`Bus`] inside one process, for the embedded mode and tests: exact-match
//! subjects, bounded subscriber queues, request/reply through private inbox
//! subjects, and buckets as plain maps. Like core NATS it is at-most-once:
//! a subscriber whose queue is full misses the message (and the gateway's
//! gap repair fetches it again).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream_shim::ReceiverStream;

use super::{Bus, BusError, BusMessage, KvChange};

/// Messages a subscriber may have queued before new ones are dropped.
const SUBSCRIBER_QUEUE: usize = 65_536;

#[derive(Default)]
struct Inner {
    subs: HashMap<String, Vec<mpsc::Sender<BusMessage>>>,
    buckets: HashMap<String, Bucket>,
}

#[derive(Default)]
struct Bucket {
    values: HashMap<String, Bytes>,
    watchers: Vec<mpsc::Sender<KvChange>>,
}

/// An in-process bus. Clones share the same subjects.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Mutex<Inner>>,
    next_inbox: Arc<AtomicU64>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus").finish_non_exhaustive()
    }
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn deliver(&self, subject: &str, msg: BusMessage) -> usize {
        let mut inner = self.inner.lock().expect("bus lock poisoned");
        let Some(subs) = inner.subs.get_mut(subject) else {
            return 0;
        };
        subs.retain(|s| !s.is_closed());
        let mut delivered = 0;
        for s in subs.iter() {
            // A full queue drops the message, as a slow NATS subscriber would.
            if s.try_send(msg.clone()).is_ok() {
                delivered += 1;
            }
        }
        if subs.is_empty() {
            inner.subs.remove(subject);
        }
        delivered
    }

    fn has_subscribers(&self, subject: &str) -> bool {
        let inner = self.inner.lock().expect("bus lock poisoned");
        inner
            .subs
            .get(subject)
            .is_some_and(|s| s.iter().any(|s| !s.is_closed()))
    }

    fn add_sub(&self, subject: String, cap: usize) -> mpsc::Receiver<BusMessage> {
        let (tx, rx) = mpsc::channel(cap);
        self.inner
            .lock()
            .expect("bus lock poisoned")
            .subs
            .entry(subject)
            .or_default()
            .push(tx);
        rx
    }
}

/// Removes a request's reply inbox when dropped.
struct InboxGuard<'a> {
    bus: &'a MemoryBus,
    subject: String,
}

impl Drop for InboxGuard<'_> {
    fn drop(&mut self) {
        // A poisoned lock means another thread panicked holding it; the
        // entry then leaks, which is the least of the process's problems.
        if let Ok(mut inner) = self.bus.inner.lock() {
            inner.subs.remove(&self.subject);
        }
    }
}

/// Minimal stream adapter over a tokio receiver.
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::sync::mpsc;

    pub(super) struct ReceiverStream<T>(pub(super) mpsc::Receiver<T>);

    impl<T> futures::Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), BusError> {
        self.deliver(
            &subject,
            BusMessage {
                reply: None,
                payload,
            },
        );
        Ok(())
    }

    async fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        if !self.has_subscribers(&subject) {
            return Err(BusError::NoResponders);
        }
        let inbox = format!("_INBOX.{}", self.next_inbox.fetch_add(1, Ordering::Relaxed));
        let mut rx = self.add_sub(inbox.clone(), 1);
        // The inbox is removed however the request ends (answer, timeout,
        // no responders, or the caller dropping this future): left behind,
        // every request leaked its subscription for the life of the process.
        let _inbox = InboxGuard {
            bus: self,
            subject: inbox.clone(),
        };
        if self.deliver(
            &subject,
            BusMessage {
                reply: Some(inbox),
                payload,
            },
        ) == 0
        {
            return Err(BusError::NoResponders);
        }
        match tokio::time::timeout(timeout, rx.recv()).await {
            Ok(Some(m)) => Ok(m.payload),
            Ok(None) => Err(BusError::Other("bus closed".into())),
            Err(_) => Err(BusError::TimedOut),
        }
    }

    async fn subscribe(&self, subject: String) -> Result<BoxStream<'static, BusMessage>, BusError> {
        Ok(ReceiverStream(self.add_sub(subject, SUBSCRIBER_QUEUE)).boxed())
    }

    async fn kv_ensure(&self, bucket: &str, _max_age: Duration) -> Result<(), BusError> {
        self.inner
            .lock()
            .expect("bus lock poisoned")
            .buckets
            .entry(bucket.to_owned())
            .or_default();
        Ok(())
    }

    async fn kv_put(&self, bucket: &str, key: &str, value: Bytes) -> Result<(), BusError> {
        let mut inner = self.inner.lock().expect("bus lock poisoned");
        let b = inner.buckets.entry(bucket.to_owned()).or_default();
        b.values.insert(key.to_owned(), value.clone());
        b.watchers.retain(|w| {
            // A watcher that cannot keep up misses a heartbeat; the next one
            // carries the same information.
            !matches!(
                w.try_send(KvChange {
                    key: key.to_owned(),
                    value: Some(value.clone())
                }),
                Err(mpsc::error::TrySendError::Closed(_))
            )
        });
        Ok(())
    }

    async fn kv_get(&self, bucket: &str, key: &str) -> Result<Option<Bytes>, BusError> {
        let inner = self.inner.lock().expect("bus lock poisoned");
        Ok(inner
            .buckets
            .get(bucket)
            .and_then(|b| b.values.get(key).cloned()))
    }

    async fn kv_delete(&self, bucket: &str, key: &str) -> Result<(), BusError> {
        let mut inner = self.inner.lock().expect("bus lock poisoned");
        let b = inner.buckets.entry(bucket.to_owned()).or_default();
        b.values.remove(key);
        b.watchers.retain(|w| {
            !matches!(
                w.try_send(KvChange {
                    key: key.to_owned(),
                    value: None
                }),
                Err(mpsc::error::TrySendError::Closed(_))
            )
        });
        Ok(())
    }

    async fn kv_watch(&self, bucket: &str) -> Result<BoxStream<'static, KvChange>, BusError> {
        let (tx, rx) = mpsc::channel(1024);
        let mut inner = self.inner.lock().expect("bus lock poisoned");
        let b = inner.buckets.entry(bucket.to_owned()).or_default();
        for (k, v) in &b.values {
            // The channel is new and larger than any bucket we keep.
            let _ = tx.try_send(KvChange {
                key: k.clone(),
                value: Some(v.clone()),
            });
        }
        b.watchers.push(tx);
        Ok(ReceiverStream(rx).boxed())
    }

    async fn drain(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_reply_and_no_responders() {
        let bus = MemoryBus::new();
        assert!(matches!(
            bus.request("x".into(), Bytes::new(), Duration::from_secs(1))
                .await,
            Err(BusError::NoResponders)
        ));
        let mut sub = bus.subscribe("x".into()).await.unwrap();
        let b2 = bus.clone();
        tokio::spawn(async move {
            let m = sub.next().await.unwrap();
            b2.publish(m.reply.unwrap(), Bytes::from_static(b"pong"))
                .await
                .unwrap();
        });
        let r = bus
            .request(
                "x".into(),
                Bytes::from_static(b"ping"),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(r.unwrap(), Bytes::from_static(b"pong"));
    }

    #[tokio::test]
    async fn requests_leave_no_subscription_behind() {
        let bus = MemoryBus::new();
        let mut sub = bus.subscribe("echo".into()).await.unwrap();
        let b2 = bus.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(m) = sub.next().await {
                n += 1;
                // Every third request goes unanswered and times out.
                if n % 3 != 0 {
                    b2.publish(m.reply.unwrap(), m.payload).await.unwrap();
                }
            }
        });
        for _ in 0..30 {
            let _ = bus
                .request(
                    "echo".into(),
                    Bytes::from_static(b"x"),
                    Duration::from_millis(50),
                )
                .await;
        }
        let subjects: Vec<String> = bus.inner.lock().unwrap().subs.keys().cloned().collect();
        assert_eq!(subjects, vec!["echo".to_string()]);
    }

    #[tokio::test]
    async fn kv_watch_sees_current_then_changes() {
        let bus = MemoryBus::new();
        bus.kv_put("b", "k1", Bytes::from_static(b"1"))
            .await
            .unwrap();
        let mut w = bus.kv_watch("b").await.unwrap();
        assert_eq!(w.next().await.unwrap().key, "k1");
        bus.kv_delete("b", "k1").await.unwrap();
        let c = w.next().await.unwrap();
        assert!(c.value.is_none());
    }
}
