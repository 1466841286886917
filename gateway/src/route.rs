//! Requests to room owners: find the owner on the placement ring, send over
//! the bus, and when the node says `not_owner`, is gone, or does not answer,
//! wait for the ring to settle and try again, a bounded number of times.
//! Every request is safe to repeat: sends are deduplicated by
//! `(user, client_id)`, joins and leaves are keyed by connection, history
//! only reads.

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::bus::{decode_reply, NodeRequest, ReplyHead};
use chat_protocol::placement::Placement;
use chat_protocol::shard::user_shard;
use chat_protocol::subjects::Subjects;
use chat_protocol::{ErrorCode, NodeId, RoomId, ServerFrame, UserId};
use chat_room_node::bus::{Bus, BusError};
use tokio::sync::{broadcast, watch};

use crate::batch::Batcher;
use crate::metrics::METRICS;

/// Tries before a request is answered `unavailable`.
const ATTEMPTS: u32 = 8;
/// First wait between tries; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Why a request found no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No owner answered within the bound; retryable.
    #[error("no room node is available: {0}")]
    Unavailable(String),
}

/// Resolves once an earlier request has been answered (or given up).
type Gate = futures::future::Shared<futures::future::BoxFuture<'static, ()>>;

/// One send of a connection to a room, as the connection's next send to
/// that room sees it: whether it is done, and where it went out. A send
/// may go out at once only behind a send that is out on the same route
/// (the same owner and placement key): then the bus delivers the two in
/// order to the same actor. Behind a send on another route (the ring or
/// the room's shard count changed between the two), or one not out
/// (waiting to retry), it waits until that send is done, so it can never
/// be sequenced first.
#[derive(Clone)]
pub struct Trail {
    done: Gate,
    /// Fingerprint of the route the send is out on; 0 while it is not out.
    route: Arc<AtomicU64>,
}

impl std::fmt::Debug for Trail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trail")
            .field("route", &self.route.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The send's own end of its [`Trail`]: it records the route of each try,
/// and dropping it marks the send done.
#[derive(Debug)]
pub struct TrailMark {
    _done: tokio::sync::oneshot::Sender<()>,
    route: Arc<AtomicU64>,
}

/// A new send's mark, and the trail the next send follows.
pub fn trail() -> (TrailMark, Trail) {
    use futures::FutureExt as _;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let route = Arc::new(AtomicU64::new(0));
    (
        TrailMark {
            _done: tx,
            route: route.clone(),
        },
        Trail {
            done: rx.map(|_| ()).boxed().shared(),
            route,
        },
    )
}

/// A nonzero fingerprint of a route: the owner and the placement key.
fn route_of(owner: &NodeId, key: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    owner.as_str().hash(&mut h);
    key.hash(&mut h);
    h.finish().max(1)
}

impl RouteError {
    /// The error frame fields for the client.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Unavailable
    }
}

/// The `error` frame for a request whose reply was not the success its
/// caller expected: the owner's own error, `internal` for a reply of the
/// wrong kind (`what` names the request in the log), or `unavailable`
/// with a retry hint when no owner answered. `reference` becomes `ref`.
pub fn failure_frame(
    reply: Result<(ReplyHead, Vec<Bytes>), RouteError>,
    reference: Option<String>,
    what: &str,
) -> ServerFrame {
    let (code, message, retry_after_ms) = match reply {
        Ok((
            ReplyHead::Error {
                code,
                message,
                retry_after_ms,
            },
            _,
        )) => (code, message, retry_after_ms),
        Ok((other, _)) => {
            tracing::warn!(reply = ?other, "unexpected reply to {what}");
            (
                ErrorCode::Internal,
                "unexpected reply from the room owner".to_owned(),
                None,
            )
        }
        Err(e) => (e.code(), e.to_string(), Some(1000)),
    };
    ServerFrame::Error {
        code,
        message,
        reference,
        retry_after_ms,
    }
}

/// Sends requests to room owners, and the member requests of big rooms to
/// their member shards.
#[derive(Clone)]
pub struct NodeClient {
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    placement: watch::Receiver<Placement>,
    timeout: Duration,
    shards: Arc<ShardCounts>,
    batcher: Arc<Batcher>,
}

/// The shard counts of the split rooms this gateway has heard of (rooms
/// not in the map have one shard). Learned from the sequencer's `shards`
/// event and from `sharded` answers; counts only grow.
#[derive(Debug)]
struct ShardCounts {
    counts: Mutex<HashMap<RoomId, u32>>,
    /// Rooms whose count grew, so their members are re-registered.
    grew: broadcast::Sender<RoomId>,
}

/// A reply of the wrong kind, as a routing error.
fn unexpected(head: ReplyHead) -> RouteError {
    tracing::warn!(reply = ?head, "unexpected reply to a members request");
    RouteError::Unavailable("unexpected reply from the room owner".into())
}

/// Tries of a member request while the room's shard count changes.
const RESHARD_TRIES: u32 = 4;

impl NodeClient {
    /// A client over `bus`, following `placement`; each try waits up to
    /// `timeout` for a reply.
    pub fn new(
        bus: Arc<dyn Bus>,
        subjects: Subjects,
        placement: watch::Receiver<Placement>,
        timeout: Duration,
    ) -> Self {
        Self {
            bus: bus.clone(),
            subjects,
            placement,
            timeout,
            batcher: Arc::new(Batcher::new(bus.clone(), timeout)),
            shards: Arc::new(ShardCounts {
                counts: Mutex::new(HashMap::new()),
                grew: broadcast::channel(256).0,
            }),
        }
    }

    /// The member shards `room` is split into, as far as this gateway
    /// knows (1: not split).
    pub fn shard_count(&self, room: &RoomId) -> u32 {
        self.shards
            .counts
            .lock()
            .expect("shard counts lock")
            .get(room)
            .copied()
            .unwrap_or(1)
    }

    /// Records that `room` is split into `shards`; says whether that is
    /// news (then the room's members must be re-registered at their shards).
    pub fn learn_shards(&self, room: &RoomId, shards: u32) -> bool {
        if shards <= 1 {
            return false;
        }
        let grew = {
            let mut counts = self.shards.counts.lock().expect("shard counts lock");
            let known = counts.entry(room.clone()).or_insert(1);
            let grew = shards > *known;
            *known = (*known).max(shards);
            grew
        };
        if grew {
            // Nobody listening (no hub yet) is fine.
            let _ = self.shards.grew.send(room.clone());
        }
        grew
    }

    /// Rooms whose shard count grew, as they are learned.
    pub fn shard_growth(&self) -> broadcast::Receiver<RoomId> {
        self.shards.grew.subscribe()
    }

    /// A watch on the placement ring.
    pub fn placement_watch(&self) -> watch::Receiver<Placement> {
        self.placement.clone()
    }

    /// The current ring.
    pub fn placement(&self) -> Placement {
        self.placement.borrow().clone()
    }

    /// Sends `req` to its room's owner and returns the reply head and frames.
    /// Error replies from the node come back as `Ok` with
    /// [`ReplyHead::Error`]; only a missing owner is an `Err`.
    ///
    /// Cancel-safe: dropping the future abandons the request (which is safe
    /// to repeat).
    ///
    /// # Errors
    /// [`RouteError::Unavailable`] after [`ATTEMPTS`] tries.
    pub async fn call(&self, req: &NodeRequest) -> Result<(ReplyHead, Vec<Bytes>), RouteError> {
        self.call_after(req, None, None).await
    }

    /// [`call`](Self::call) for a connection's send that must keep its
    /// place behind `earlier`, the connection's previous send to the same
    /// room (see [`Trail`]); `mine` records where this send goes out, for
    /// the send behind it. A send that finds `earlier` out on another
    /// route, or not out, waits until it is done; so does every retry
    /// (its owner or shard moved). One connection's sends to a room are
    /// therefore sequenced in the order they were sent, across moves and
    /// splits.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub async fn call_after(
        &self,
        req: &NodeRequest,
        mut earlier: Option<Trail>,
        mine: Option<&TrailMark>,
    ) -> Result<(ReplyHead, Vec<Bytes>), RouteError> {
        let room = req.room();
        for _ in 0..RESHARD_TRIES {
            let count = self.shard_count(room);
            let reply = match req.member() {
                Some(user) if count > 1 => {
                    let wrapped = NodeRequest::Shard {
                        shard: user_shard(user, count),
                        shards: count,
                        req: Box::new(req.clone()),
                    };
                    self.call_owner(&wrapped, &mut earlier, mine).await?
                }
                _ => self.call_owner(req, &mut earlier, mine).await?,
            };
            match reply {
                (ReplyHead::Sharded { shards }, _) if shards != count => {
                    METRICS
                        .node_request_errors
                        .with_label_values(&["resharded"])
                        .inc();
                    if let Some(m) = mine {
                        m.route.store(0, Ordering::Release);
                    }
                    self.learn_shards(room, shards);
                    if let Some(t) = earlier.take() {
                        t.done.await;
                    }
                }
                other => return Ok(other),
            }
        }
        Err(RouteError::Unavailable(format!(
            "the member shards of {room} kept changing"
        )))
    }

    /// The users present in `room` (sorted, at most `MAX_MEMBER_LIST`) and
    /// their count: from its owner, or in a split room from every member
    /// shard, merged.
    ///
    /// # Errors
    /// When an owner or a shard cannot be reached.
    pub async fn users(&self, room: &RoomId) -> Result<(Vec<UserId>, u64), RouteError> {
        use futures::stream::{self, StreamExt as _, TryStreamExt as _};
        let req = NodeRequest::Users { room: room.clone() };
        for _ in 0..RESHARD_TRIES {
            let count = self.shard_count(room);
            if count <= 1 {
                match self.call_owner(&req, &mut None, None).await? {
                    (ReplyHead::Users { users, count }, _) => return Ok((users, count)),
                    (ReplyHead::Sharded { shards }, _) => {
                        self.learn_shards(room, shards);
                        continue;
                    }
                    other => return Err(unexpected(other.0)),
                }
            }
            let parts: Vec<(Vec<UserId>, u64)> = stream::iter(0..count)
                .map(|k| {
                    let shard = NodeRequest::Shard {
                        shard: k,
                        shards: count,
                        req: Box::new(req.clone()),
                    };
                    async move {
                        match self.call_owner(&shard, &mut None, None).await? {
                            (ReplyHead::Users { users, count }, _) => Ok(Some((users, count))),
                            (ReplyHead::Sharded { shards }, _) => {
                                self.learn_shards(room, shards);
                                Ok(None)
                            }
                            other => Err(unexpected(other.0)),
                        }
                    }
                })
                .buffer_unordered(8)
                .try_filter_map(|p| std::future::ready(Ok(p)))
                .try_collect()
                .await?;
            if parts.len() as u32 != count {
                continue; // the count changed meanwhile: ask again
            }
            let total = parts.iter().map(|p| p.1).sum();
            let mut users: Vec<UserId> = parts.into_iter().flat_map(|p| p.0).collect();
            users.sort();
            users.truncate(chat_protocol::frames::MAX_MEMBER_LIST);
            return Ok((users, total));
        }
        Err(RouteError::Unavailable(format!(
            "the member shards of {room} kept changing"
        )))
    }

    /// One request to the owner of its placement key, retried while the
    /// ring settles; in its place behind `earlier` (see [`Trail`]).
    async fn call_owner(
        &self,
        req: &NodeRequest,
        earlier: &mut Option<Trail>,
        mine: Option<&TrailMark>,
    ) -> Result<(ReplyHead, Vec<Bytes>), RouteError> {
        let payload = Bytes::from(serde_json::to_vec(req).expect("requests serialise"));
        let key = req.placement_key();
        // Plain sends travel in batches, to nodes that take them;
        // everything else (joins, a big room's member requests, reads)
        // alone.
        let send = matches!(req, NodeRequest::Send { .. });
        let mut placement = self.placement.clone();
        let mut backoff = FIRST_BACKOFF;
        let mut last = String::from("no room node is live");
        for _ in 0..ATTEMPTS {
            let (owner, batches) = loop {
                let (owner, batches) = {
                    let ring = placement.borrow_and_update();
                    let owner = ring.owner_of(&key);
                    let batches = owner.as_ref().is_some_and(|o| ring.batches(o));
                    (owner, batches)
                };
                let route = owner.as_ref().map_or(0, |o| route_of(o, &key));
                match earlier.take() {
                    // Out elsewhere or not out: wait until it is done, then
                    // look at the ring again.
                    Some(t) if t.route.load(Ordering::Acquire) != route => t.done.await,
                    kept => {
                        *earlier = kept;
                        if let Some(m) = mine {
                            m.route.store(route, Ordering::Release);
                        }
                        break (owner, batches);
                    }
                }
            };
            if let Some(owner) = owner {
                let subject = self.subjects.node_inbox(&owner);
                let reply = if send && batches {
                    self.batcher.request(&subject, payload.clone()).await
                } else {
                    self.bus
                        .request(subject, payload.clone(), self.timeout)
                        .await
                };
                match reply {
                    Ok(bytes) => match decode_reply(&bytes) {
                        Ok((ReplyHead::NotOwner, _)) => {
                            METRICS
                                .node_request_errors
                                .with_label_values(&["not_owner"])
                                .inc();
                            last = format!("node {owner} does not own the room");
                        }
                        Ok(reply) => {
                            METRICS.node_requests_ok.inc();
                            return Ok(reply);
                        }
                        Err(e) => {
                            METRICS
                                .node_request_errors
                                .with_label_values(&["bad_reply"])
                                .inc();
                            tracing::warn!(node = %owner, error = %e, "undecodable reply");
                            last = format!("bad reply from {owner}");
                        }
                    },
                    Err(BusError::NoResponders) => {
                        METRICS
                            .node_request_errors
                            .with_label_values(&["no_responders"])
                            .inc();
                        last = format!("node {owner} is not listening");
                    }
                    Err(BusError::TimedOut) => {
                        METRICS
                            .node_request_errors
                            .with_label_values(&["timeout"])
                            .inc();
                        last = format!("node {owner} did not answer in time");
                    }
                    Err(e) => {
                        METRICS
                            .node_request_errors
                            .with_label_values(&["bus"])
                            .inc();
                        last = e.to_string();
                    }
                }
            } else {
                METRICS
                    .node_request_errors
                    .with_label_values(&["no_nodes"])
                    .inc();
            }
            // Not out while it waits: a later send must wait for it.
            if let Some(m) = mine {
                m.route.store(0, Ordering::Release);
            }
            // Wait for the ring to change, or the backoff, whichever first.
            tokio::select! {
                _ = placement.changed() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            // Then for the request this one must not overtake.
            if let Some(t) = earlier.take() {
                t.done.await;
            }
        }
        METRICS
            .node_requests
            .with_label_values(&["unavailable"])
            .inc();
        Err(RouteError::Unavailable(last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_protocol::bus::encode_reply;
    use chat_room_node::bus::memory::MemoryBus;
    use futures::StreamExt as _;

    fn node(n: &str) -> NodeId {
        NodeId::new(n).expect("node id")
    }

    fn send(cid: &str) -> NodeRequest {
        NodeRequest::Send {
            room: RoomId::new("r").expect("room"),
            user: UserId::new("u").expect("user"),
            text: cid.into(),
            client_id: cid.into(),
        }
    }

    fn ack(seq: u64) -> Bytes {
        encode_reply(
            &ReplyHead::Ack {
                seq,
                id: format!("id{seq}"),
                duplicate: false,
            },
            &[],
        )
    }

    fn client_id(payload: &Bytes) -> String {
        match serde_json::from_slice(payload).expect("a request") {
            NodeRequest::Send { client_id, .. } => client_id,
            other => panic!("not a send: {other:?}"),
        }
    }

    /// The owner moves while a connection's first send is unanswered at
    /// the old owner: the second send, routed to the new owner, must not
    /// be sequenced before the first (which the old owner then turns away
    /// and the gateway retries at the new owner).
    #[tokio::test(start_paused = true)]
    async fn a_send_never_overtakes_the_previous_one_across_an_owner_move() {
        let bus = Arc::new(MemoryBus::new());
        let subjects = Subjects::new("t").expect("prefix");
        let (a, b) = (node("a"), node("b"));
        // Single requests (no batch lanes): each reply is its own.
        let (ring_tx, ring) =
            watch::channel(Placement::new([a.clone()]).with_unbatched(vec![a.clone(), b.clone()]));
        let client = NodeClient::new(bus.clone(), subjects.clone(), ring, Duration::from_secs(5));
        let mut inbox_a = bus.subscribe(subjects.node_inbox(&a)).await.expect("sub a");
        let mut inbox_b = bus.subscribe(subjects.node_inbox(&b)).await.expect("sub b");

        let (mark1, trail1) = trail();
        let first = {
            let client = client.clone();
            tokio::spawn(async move { client.call_after(&send("c1"), None, Some(&mark1)).await })
        };
        let held = inbox_a.next().await.expect("the first send at a");
        assert_eq!(client_id(&held.payload), "c1");

        // The ring moves the room to b; the second send follows it.
        ring_tx.send_replace(Placement::new([b.clone()]).with_unbatched(vec![a, b]));
        let (mark2, _trail2) = trail();
        let second = {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .call_after(&send("c2"), Some(trail1), Some(&mark2))
                    .await
            })
        };
        // b acks in arrival order. With time paused, the timeout fires
        // only once every task is idle: the second send had every chance
        // to reach b, and must not have.
        let early = tokio::time::timeout(Duration::from_secs(1), inbox_b.next()).await;
        assert!(
            early.is_err(),
            "the second send reached the new owner first"
        );

        // The old owner turns the first away; it is retried at b.
        let to = held.reply.expect("a reply inbox");
        bus.publish(to, encode_reply(&ReplyHead::NotOwner, &[]))
            .await
            .expect("reply");
        let mut seq = 0;
        for want in ["c1", "c2"] {
            let m = inbox_b.next().await.expect("a send at b");
            assert_eq!(client_id(&m.payload), want);
            seq += 1;
            bus.publish(m.reply.expect("a reply inbox"), ack(seq))
                .await
                .expect("reply");
        }
        for (task, want) in [(first, 1), (second, 2)] {
            match task.await.expect("task").expect("answered") {
                (ReplyHead::Ack { seq, .. }, _) => assert_eq!(seq, want),
                other => panic!("not an ack: {other:?}"),
            }
        }
    }

    /// Behind a send that is out on the same route, the next send goes
    /// out at once: pipelining is kept while nothing moves.
    #[tokio::test(start_paused = true)]
    async fn sends_on_the_same_route_go_out_without_waiting() {
        let bus = Arc::new(MemoryBus::new());
        let subjects = Subjects::new("t").expect("prefix");
        let a = node("a");
        let (_ring_tx, ring) =
            watch::channel(Placement::new([a.clone()]).with_unbatched(vec![a.clone()]));
        let client = NodeClient::new(bus.clone(), subjects.clone(), ring, Duration::from_secs(5));
        let mut inbox = bus.subscribe(subjects.node_inbox(&a)).await.expect("sub");
        let (mark1, trail1) = trail();
        let c = client.clone();
        let first =
            tokio::spawn(async move { c.call_after(&send("c1"), None, Some(&mark1)).await });
        let (mark2, _trail2) = trail();
        let c = client.clone();
        let second =
            tokio::spawn(
                async move { c.call_after(&send("c2"), Some(trail1), Some(&mark2)).await },
            );
        // Both are out before either is answered.
        let m1 = inbox.next().await.expect("first");
        let m2 = inbox.next().await.expect("second");
        assert_eq!(
            (client_id(&m1.payload), client_id(&m2.payload)),
            ("c1".into(), "c2".into())
        );
        for (m, seq) in [(m1, 1), (m2, 2)] {
            bus.publish(m.reply.expect("inbox"), ack(seq))
                .await
                .expect("reply");
        }
        assert!(first.await.expect("task").is_ok());
        assert!(second.await.expect("task").is_ok());
    }
}
