//! Requests to room owners: find the owner on the placement ring, send over
//! the bus, and when the node says `not_owner`, is gone, or does not answer,
//! wait for the ring to settle and try again, a bounded number of times.
//! Every request is safe to repeat: sends are deduplicated by
//! `(user, client_id)`, joins and leaves are keyed by connection, history
//! only reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::bus::{decode_reply, NodeRequest, ReplyHead};
use chat_protocol::placement::Placement;
use chat_protocol::shard::user_shard;
use chat_protocol::subjects::Subjects;
use chat_protocol::{ErrorCode, RoomId, ServerFrame, UserId};
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

/// Resolves once an earlier request has been answered (or given up): what
/// a retry waits for, so it cannot overtake that request.
pub type Gate = futures::future::Shared<futures::future::BoxFuture<'static, ()>>;

/// A gate that opens when the returned sender is dropped (the request it
/// stands for is done, whatever its outcome).
pub fn gate() -> (tokio::sync::oneshot::Sender<()>, Gate) {
    use futures::FutureExt as _;
    let (tx, rx) = tokio::sync::oneshot::channel();
    (tx, rx.map(|_| ()).boxed().shared())
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
        self.call_after(req, None).await
    }

    /// [`call`](Self::call), but a request that must be tried again (its
    /// owner or shard moved) first waits for `earlier`: the previous send
    /// of the same connection to the same room. Sends that failed together
    /// (a node died under all of them) are then retried in the order they
    /// were sent, not in whatever order their timers wake.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub async fn call_after(
        &self,
        req: &NodeRequest,
        mut earlier: Option<Gate>,
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
                    self.call_owner(&wrapped, &mut earlier).await?
                }
                _ => self.call_owner(req, &mut earlier).await?,
            };
            match reply {
                (ReplyHead::Sharded { shards }, _) if shards != count => {
                    METRICS
                        .node_request_errors
                        .with_label_values(&["resharded"])
                        .inc();
                    self.learn_shards(room, shards);
                    if let Some(gate) = earlier.take() {
                        gate.await;
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
                match self.call_owner(&req, &mut None).await? {
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
                        match self.call_owner(&shard, &mut None).await? {
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
    /// ring settles.
    async fn call_owner(
        &self,
        req: &NodeRequest,
        earlier: &mut Option<Gate>,
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
            let (owner, batches) = {
                let ring = placement.borrow_and_update();
                let owner = ring.owner_of(&key);
                let batches = owner.as_ref().is_some_and(|o| ring.batches(o));
                (owner, batches)
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
            // Wait for the ring to change, or the backoff, whichever first.
            tokio::select! {
                _ = placement.changed() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            // Then for the request this one must not overtake.
            if let Some(gate) = earlier.take() {
                gate.await;
            }
        }
        METRICS
            .node_requests
            .with_label_values(&["unavailable"])
            .inc();
        Err(RouteError::Unavailable(last))
    }
}
