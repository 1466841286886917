//! The leases this node holds, renewed in bulk. Each room actor and member
//! shard actor takes its lease before serving (see `room.rs`, `shard.rs`)
//! and registers it here under its key (the room, or `room#k`); one task
//! renews them all in one statement every third of the TTL and tells the
//! actors whose lease another node took.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_protocol::NodeId;
use tokio_util::sync::CancellationToken;

use crate::metrics::METRICS;
use crate::store::Store;

/// Leases held by this node: key → (epoch, fires when the lease is lost).
#[derive(Debug, Default)]
pub struct LeaseTable {
    inner: Mutex<HashMap<String, (u64, CancellationToken)>>,
}

impl LeaseTable {
    /// Records a lease just taken; the token fires if it is lost.
    pub fn insert(&self, room: String, epoch: u64) -> CancellationToken {
        let token = CancellationToken::new();
        let old = self
            .inner
            .lock()
            .expect("lease lock")
            .insert(room, (epoch, token.clone()));
        if old.is_none() {
            METRICS.leases_held.inc();
        }
        token
    }

    /// Forgets a lease (released, or lost), if it is still at `epoch`.
    pub fn remove(&self, room: &str, epoch: u64) {
        let mut inner = self.inner.lock().expect("lease lock");
        if inner.get(room).is_some_and(|(e, _)| *e == epoch) {
            inner.remove(room);
            METRICS.leases_held.dec();
        }
    }

    /// Every lease, for renewal.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.inner
            .lock()
            .expect("lease lock")
            .iter()
            .map(|(r, (e, _))| (r.clone(), *e))
            .collect()
    }

    /// After a renewal of `renewed` found only `held` still ours: signal
    /// the rooms that lost theirs.
    fn mark_lost(&self, renewed: &[(String, u64)], held: &[String]) {
        let inner = self.inner.lock().expect("lease lock");
        for (room, epoch) in renewed {
            if held.contains(room) {
                continue;
            }
            if let Some((e, token)) = inner.get(room) {
                if e == epoch {
                    tracing::warn!(%room, epoch, "lease lost to another node");
                    token.cancel();
                }
            }
        }
    }
}

/// Takes the lease `key` for `owner` and records it in `table`, waiting out
/// another holder's (a crashed node's lease expires after its TTL; a
/// draining one releases it after its flush), with backoff from 25 ms to
/// 500 ms. Gives the epoch and the token that fires if the lease is lost;
/// `None` once `abandoned()` holds (nobody waits for the actor any more) or
/// `cancel` fires.
pub async fn take(
    store: &dyn Store,
    table: &LeaseTable,
    key: &str,
    owner: &NodeId,
    ttl: Duration,
    cancel: &CancellationToken,
    abandoned: impl Fn() -> bool,
) -> Option<(u64, CancellationToken)> {
    let mut delay = Duration::from_millis(25);
    loop {
        if abandoned() || cancel.is_cancelled() {
            return None;
        }
        match store.acquire_lease(key, owner, ttl).await {
            Ok(Some(epoch)) => {
                tracing::debug!(%key, epoch, "lease taken");
                return Some((epoch, table.insert(key.to_owned(), epoch)));
            }
            Ok(None) => tracing::debug!(%key, "lease held by another node; waiting"),
            Err(e) => tracing::warn!(%key, error = %e, "cannot take the lease; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Renews every lease in `table` every `ttl / 3` until `cancel`.
pub async fn renew_loop(
    store: Arc<dyn Store>,
    owner: NodeId,
    table: Arc<LeaseTable>,
    ttl: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(ttl / 3);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        let leases = table.snapshot();
        if leases.is_empty() {
            continue;
        }
        match store.renew_leases(&owner, &leases, ttl).await {
            Ok(held) => table.mark_lost(&leases, &held),
            // Commits stay fenced either way; the next tick tries again.
            Err(e) => tracing::warn!(error = %e, leases = leases.len(), "lease renewal failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_leases_fire_their_token_only() {
        let t = LeaseTable::default();
        let a = "a".to_owned();
        let b = "b#1".to_owned();
        let ta = t.insert(a.clone(), 3);
        let tb = t.insert(b.clone(), 1);
        let snap = t.snapshot();
        t.mark_lost(&snap, std::slice::from_ref(&a));
        assert!(!ta.is_cancelled());
        assert!(tb.is_cancelled());
        t.remove(&b, 2); // another epoch: kept
        assert_eq!(t.snapshot().len(), 2);
        t.remove(&b, 1);
        assert_eq!(t.snapshot().len(), 1);
    }
}
