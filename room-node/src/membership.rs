//! Who is alive: room nodes heartbeat into a key-value bucket, and every
//! process (node or gateway) watches it and computes liveness itself from
//! heartbeat timestamps, then builds the same placement ring. Expiry events
//! are not relied on (servers before 2.11 send none to watchers).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chat_protocol::bus::NodeHeartbeat;
use chat_protocol::placement::Placement;
use chat_protocol::subjects::Subjects;
use chat_protocol::NodeId;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::{Bus, BusError};

/// How often a node writes its heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the live set is recomputed.
const RECHECK: Duration = Duration::from_millis(250);

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Seen {
    hb: NodeHeartbeat,
    at: Instant,
}

/// Tracks heartbeats and says which nodes are live.
struct Liveness {
    ttl: Duration,
    nodes: HashMap<String, Seen>,
}

impl Liveness {
    fn observe(&mut self, key: String, value: Option<Bytes>, now: Instant) {
        let Some(value) = value else {
            self.nodes.remove(&key);
            return;
        };
        let Ok(hb) = serde_json::from_slice::<NodeHeartbeat>(&value) else {
            tracing::warn!(key, "ignoring malformed heartbeat");
            return;
        };
        let at = match self.nodes.get(&key) {
            // A new timestamp from the sender: the node is alive now.
            Some(prev) if prev.hb.ts_ms != hb.ts_ms => now,
            Some(prev) => prev.at,
            // First sight (possibly an old value replayed by the watch):
            // trust its age by the wall clock, never its future.
            None => {
                let age = u64::try_from(now_ms().saturating_sub(hb.ts_ms)).unwrap_or(0);
                now.checked_sub(Duration::from_millis(age)).unwrap_or(now)
            }
        };
        self.nodes.insert(key, Seen { hb, at });
    }

    fn live(&self, now: Instant) -> Live {
        let mut live = Live::default();
        for s in self.nodes.values() {
            if !s.hb.draining && now.duration_since(s.at) < self.ttl {
                live.ids.push(s.hb.node.clone());
                if !s.hb.batches {
                    live.unbatched.push(s.hb.node.clone());
                }
                if !s.hb.presence_marks {
                    live.unmarked.push(s.hb.node.clone());
                }
            }
        }
        live.ids.sort();
        live.unbatched.sort();
        live.unmarked.sort();
        live
    }
}

/// The live, non-draining processes of one heartbeat bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    /// Their ids, sorted.
    pub ids: Vec<NodeId>,
    /// Those of a release without batches (see [`NodeHeartbeat::batches`]),
    /// sorted: peers send them single requests and events.
    pub unbatched: Vec<NodeId>,
    /// Those of a release before presence marks (see
    /// [`NodeHeartbeat::presence_marks`]), sorted: room nodes send them
    /// unmarked presence.
    pub unmarked: Vec<NodeId>,
}

/// Watches the nodes bucket and keeps a [`Placement`] of the live,
/// non-draining nodes up to date until `cancel` fires. Survives lost
/// watches (NATS restarts) by watching again.
///
/// # Errors
/// When the bucket cannot be created at all (for example a server without
/// JetStream).
pub async fn watch_placement(
    bus: Arc<dyn Bus>,
    subjects: &Subjects,
    ttl: Duration,
    cancel: CancellationToken,
) -> Result<watch::Receiver<Placement>, BusError> {
    let mut live = watch_live(bus, subjects.nodes_bucket(), ttl, cancel.clone()).await?;
    let ring = |l: &Live| Placement::new(l.ids.clone()).with_unbatched(l.unbatched.clone());
    let (tx, rx) = watch::channel(ring(&live.borrow_and_update()));
    tokio::spawn(
        async move {
            loop {
                tokio::select! {
                    r = live.changed() => if r.is_err() { return },
                    _ = cancel.cancelled() => return,
                }
                let p = ring(&live.borrow_and_update());
                tracing::info!(nodes = ?p.nodes(), "placement ring changed");
                tx.send_replace(p);
            }
        }
        // Log lines name the node (or gateway) that watches.
        .in_current_span(),
    );
    Ok(rx)
}

/// Watches heartbeats in `bucket` and keeps the sorted set of live,
/// non-draining ids up to date until `cancel` fires. Used for room nodes
/// (placement) and for gateways (room nodes drop the members of a gateway
/// that died).
///
/// # Errors
/// When the bucket cannot be created at all.
pub async fn watch_live(
    bus: Arc<dyn Bus>,
    bucket: String,
    ttl: Duration,
    cancel: CancellationToken,
) -> Result<watch::Receiver<Live>, BusError> {
    bus.kv_ensure(&bucket, ttl * 4).await?;
    let (tx, rx) = watch::channel(Live::default());
    tokio::spawn(async move {
        let mut live = Liveness {
            ttl,
            nodes: HashMap::new(),
        };
        let mut tick = tokio::time::interval(RECHECK);
        while !cancel.is_cancelled() {
            let mut stream = match bus.kv_watch(&bucket).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, bucket, "cannot watch heartbeats; retrying");
                    // The bucket may have been lost with a NATS restart; the
                    // next try recreates it or fails the same way.
                    let _ = bus.kv_ensure(&bucket, ttl * 4).await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        _ = cancel.cancelled() => break,
                    }
                }
            };
            loop {
                tokio::select! {
                    change = stream.next() => match change {
                        Some(c) => live.observe(c.key, c.value, Instant::now()),
                        None => break,
                    },
                    _ = tick.tick() => {}
                    _ = cancel.cancelled() => return,
                }
                let now = live.live(Instant::now());
                if *tx.borrow() != now {
                    tx.send_replace(now);
                }
            }
        }
    });
    Ok(rx)
}

/// Refuses to start a node whose id is already heartbeating from another
/// live process. A stale entry (a crashed predecessor) is waited out.
///
/// # Errors
/// [`BusError::Unsupported`] naming the duplicate.
pub async fn ensure_unique(
    bus: &Arc<dyn Bus>,
    subjects: &Subjects,
    node: &NodeId,
    instance: &str,
    ttl: Duration,
) -> Result<(), BusError> {
    let bucket = subjects.nodes_bucket();
    bus.kv_ensure(&bucket, ttl * 4).await?;
    let parse = |v: Option<Bytes>| v.and_then(|v| serde_json::from_slice::<NodeHeartbeat>(&v).ok());
    let Some(first) = parse(bus.kv_get(&bucket, node.as_str()).await?) else {
        return Ok(());
    };
    let stale = now_ms().saturating_sub(first.ts_ms) > ttl.as_millis() as i64;
    if first.instance == instance || first.draining || stale {
        return Ok(());
    }
    // A fresh heartbeat from another process: a crashed predecessor stops
    // updating it, a live duplicate keeps going. Watch long enough to tell.
    tracing::info!(%node, "a recent heartbeat uses this id; checking whether it is live");
    let deadline = tokio::time::Instant::now() + ttl + HEARTBEAT_INTERVAL * 2;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(HEARTBEAT_INTERVAL / 2).await;
        match parse(bus.kv_get(&bucket, node.as_str()).await?) {
            Some(hb)
                if hb.instance == first.instance && hb.ts_ms != first.ts_ms && !hb.draining =>
            {
                return Err(BusError::Unsupported(format!(
                    "another live room node already uses the id {node}; give each node its own CHAT_NODE_ID"
                )));
            }
            Some(hb) if hb.instance == first.instance => {}
            // Deleted, draining, or replaced: the id is free.
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// Writes a heartbeat for `node` into `bucket` every
/// [`HEARTBEAT_INTERVAL`] until `cancel`, then deletes it. `draining`
/// flips the flag earlier, so peers stop routing here while buffers flush.
pub async fn heartbeat(
    bus: Arc<dyn Bus>,
    bucket: String,
    node: NodeId,
    instance: String,
    ttl: Duration,
    mut draining: watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut flag_open = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // Announce draining at once, not at the next tick.
            res = draining.changed(), if flag_open => flag_open = res.is_ok(),
            _ = cancel.cancelled() => break,
        }
        let hb = NodeHeartbeat {
            node: node.clone(),
            instance: instance.clone(),
            draining: *draining.borrow(),
            ts_ms: now_ms(),
            batches: true,
            presence_marks: true,
        };
        let payload = Bytes::from(serde_json::to_vec(&hb).expect("heartbeats serialise"));
        if let Err(e) = bus.kv_put(&bucket, node.as_str(), payload).await {
            tracing::warn!(error = %e, "heartbeat failed; recreating bucket");
            // Best effort: the next tick tries the put again either way.
            let _ = bus.kv_ensure(&bucket, ttl * 4).await;
        }
    }
    if let Err(e) = bus.kv_delete(&bucket, node.as_str()).await {
        tracing::warn!(error = %e, "could not delete heartbeat; peers drop it after the TTL");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(node: &str, ts: i64, draining: bool) -> Bytes {
        Bytes::from(
            serde_json::to_vec(&NodeHeartbeat {
                node: NodeId::new(node).unwrap(),
                instance: "i".into(),
                draining,
                ts_ms: ts,
                batches: node != "legacy",
                presence_marks: node != "legacy",
            })
            .unwrap(),
        )
    }

    #[test]
    fn a_heartbeat_without_batches_is_noted() {
        let mut l = Liveness {
            ttl: Duration::from_secs(5),
            nodes: HashMap::new(),
        };
        let t0 = Instant::now();
        l.observe("a".into(), Some(hb("a", now_ms(), false)), t0);
        l.observe("legacy".into(), Some(hb("legacy", now_ms(), false)), t0);
        // As a release before batches writes it: no `batches` field.
        let old = br#"{"node":"b","instance":"i","draining":false,"ts_ms":0}"#;
        let old = serde_json::from_slice::<NodeHeartbeat>(old).unwrap();
        assert!(!old.batches && !old.presence_marks);
        let live = l.live(t0);
        assert_eq!(live.ids.len(), 2);
        assert_eq!(live.unbatched, vec![NodeId::new("legacy").unwrap()]);
        assert_eq!(live.unmarked, vec![NodeId::new("legacy").unwrap()]);
    }

    #[test]
    fn liveness_from_timestamps() {
        let ttl = Duration::from_secs(5);
        let mut l = Liveness {
            ttl,
            nodes: HashMap::new(),
        };
        let t0 = Instant::now();
        l.observe("a".into(), Some(hb("a", now_ms(), false)), t0);
        l.observe("old".into(), Some(hb("old", now_ms() - 60_000, false)), t0);
        l.observe("d".into(), Some(hb("d", now_ms(), true)), t0);
        assert_eq!(l.live(t0).ids, vec![NodeId::new("a").unwrap()]);
        // No new heartbeat for longer than the TTL: gone.
        assert!(l.live(t0 + ttl + Duration::from_millis(1)).ids.is_empty());
        // A fresh heartbeat from the old node brings it back.
        l.observe("old".into(), Some(hb("old", now_ms() + 1, false)), t0 + ttl);
        assert_eq!(l.live(t0 + ttl).ids.len(), 1);
        l.observe("old".into(), None, t0 + ttl);
        assert!(l.live(t0 + ttl).ids.is_empty());
    }
}
