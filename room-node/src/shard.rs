//! A member shard of a big room (DESIGN, "Big rooms"): one actor per
//! `room#k`, placed on the ring under that key. It owns the roster and the
//! presence count of the users that hash to it, their rate limits, and
//! forwards the sends it accepts to the room's sequencer in order, one
//! batch in flight at a time. It serves under its own lease (key `room#k`
//! in the lease table), so two nodes never both run one shard, even while
//! they disagree about the ring. It keeps nothing durable: when it moves
//! to another node, gateways re-register its members there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::bus::{decode_reply, encode_reply, ForwardedSend, NodeRequest, ReplyHead};
use chat_protocol::placement::Placement;
use chat_protocol::shard::{shard_key, user_shard};
use chat_protocol::subjects::Subjects;
use chat_protocol::{ErrorCode, NodeId, RoomId, UserId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::lease::LeaseTable;
use crate::metrics::METRICS;
use crate::ratelimit::TokenBucket;
use crate::room::RoomConfig;
use crate::store::Store;

/// Commands a shard actor may have waiting.
const MAILBOX: usize = 4096;
/// Most sends in one forwarded batch.
const MAX_BATCH: usize = 256;
/// Most text bytes in one forwarded batch (well inside NATS's 1 MiB).
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Tries to reach the sequencer before the sends are answered `unavailable`.
const ATTEMPTS: u32 = 8;
/// How long one try waits for the sequencer.
const TIMEOUT: Duration = Duration::from_secs(2);
/// A changed member count reaches the sequencer after at most this long.
const REPORT_SOON: Duration = Duration::from_millis(100);
/// An unchanged count is reported again this often (a new sequencer
/// learns it).
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// What a shard actor needs from its node.
#[derive(Clone)]
pub struct ShardDeps {
    /// Forwards, reports and replies.
    pub bus: Arc<dyn Bus>,
    /// Subject names.
    pub subjects: Subjects,
    /// Where the sequencer is.
    pub placement: watch::Receiver<Placement>,
    /// Rate limit, idle timeout.
    pub config: Arc<RoomConfig>,
    /// This node, the owner named in leases.
    pub node_id: NodeId,
    /// Where the shard's lease is taken.
    pub store: Arc<dyn Store>,
    /// Leases held, for bulk renewal.
    pub leases: Arc<LeaseTable>,
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
}

/// A command for a shard actor.
#[derive(Debug)]
pub enum ShardCommand {
    /// A member request routed to this shard, with the shard count the
    /// gateway routed by.
    Request {
        /// `join`, `leave` or `send` (boxed as it came off the wire).
        req: Box<NodeRequest>,
        /// The gateway's shard count.
        shards: u32,
        /// Where the gateway waits.
        reply: Option<String>,
    },
    /// A gateway died: drop its members.
    GatewayGone(NodeId),
}

/// The node's handle on a shard actor.
#[derive(Debug, Clone)]
pub struct ShardHandle {
    tx: mpsc::Sender<ShardCommand>,
}

impl ShardHandle {
    /// Queues a command without waiting.
    ///
    /// # Errors
    /// Gives the command back when the mailbox is full or the actor ended.
    pub fn try_send(
        &self,
        cmd: ShardCommand,
    ) -> Result<(), mpsc::error::TrySendError<ShardCommand>> {
        self.tx.try_send(cmd)
    }

    /// The actor has ended (idle, lease lost, or shut down).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Starts member shard `index` of `room`, split into `shards`. It ends when
/// `cancel` fires (after forwarding what it holds), when its handle is
/// dropped, or after the idle timeout with no members.
pub fn spawn(
    room: RoomId,
    index: u32,
    shards: u32,
    deps: ShardDeps,
    cancel: CancellationToken,
) -> (ShardHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(MAILBOX);
    let span =
        tracing::info_span!("shard", room.id = %room, shard = index, node.id = %deps.node_id);
    let actor = ShardActor {
        room,
        index,
        shards,
        deps,
        rx,
        members: HashMap::new(),
        user_conns: HashMap::new(),
        buckets: HashMap::new(),
        outbox: Vec::new(),
        inflight: None,
        reported: None,
        report_at: None,
    };
    let task = tokio::spawn(tracing::Instrument::instrument(actor.run(cancel), span));
    (ShardHandle { tx }, task)
}

struct ShardActor {
    room: RoomId,
    index: u32,
    shards: u32,
    deps: ShardDeps,
    rx: mpsc::Receiver<ShardCommand>,
    members: HashMap<(NodeId, u64), UserId>,
    user_conns: HashMap<UserId, u32>,
    buckets: HashMap<UserId, TokenBucket>,
    outbox: Vec<ForwardedSend>,
    inflight: Option<oneshot::Receiver<()>>,
    reported: Option<u64>,
    report_at: Option<Instant>,
}

impl ShardActor {
    async fn run(mut self, cancel: CancellationToken) {
        let key = shard_key(&self.room, self.index);
        // Requests wait in the mailbox until the lease is ours.
        let rx = &self.rx;
        let deps = &self.deps;
        let taken = crate::lease::take(
            deps.store.as_ref(),
            &deps.leases,
            &key,
            &deps.node_id,
            deps.lease_ttl,
            &cancel,
            || rx.is_closed(),
        )
        .await;
        let Some((epoch, lost)) = taken else {
            return;
        };
        METRICS.member_shards.inc();
        let mut idle_since: Option<Instant> = None;
        loop {
            let idle = self.members.is_empty() && self.outbox.is_empty() && self.inflight.is_none();
            idle_since = match (idle, idle_since) {
                (true, None) => Some(Instant::now()),
                (false, _) => None,
                (true, s) => s,
            };
            let idle_at = idle_since.map(|t| t + self.deps.config.idle_timeout);
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                _ = async { (&mut self.inflight.as_mut().expect("guarded")).await }, if self.inflight.is_some() => {
                    self.inflight = None;
                    self.forward();
                }
                _ = tokio::time::sleep_until(self.report_at.unwrap_or_else(Instant::now)), if self.report_at.is_some() => {
                    self.report_at = None;
                    self.report().await;
                }
                _ = tokio::time::sleep_until(idle_at.unwrap_or_else(Instant::now)), if idle_at.is_some() => break,
                _ = cancel.cancelled() => break,
                _ = lost.cancelled() => {
                    tracing::warn!(shard = %key, "shard lease lost to another node; stopping");
                    break;
                }
            }
        }
        // What was accepted is still handed on.
        while self.inflight.is_some() || !self.outbox.is_empty() {
            if let Some(rx) = self.inflight.take() {
                let _ = rx.await;
            }
            self.forward();
        }
        // Best effort: an unreleased lease expires after its TTL.
        if let Err(e) = self
            .deps
            .store
            .release_lease(&key, &self.deps.node_id, epoch)
            .await
        {
            tracing::debug!(shard = %key, error = %e, "shard lease release failed; it expires");
        }
        self.deps.leases.remove(&key, epoch);
        METRICS.member_shards.dec();
    }

    async fn handle(&mut self, cmd: ShardCommand) {
        let (req, shards, reply) = match cmd {
            ShardCommand::GatewayGone(gw) => {
                let gone: Vec<(NodeId, u64)> = self
                    .members
                    .keys()
                    .filter(|(g, _)| *g == gw)
                    .cloned()
                    .collect();
                for key in gone {
                    self.remove(&key);
                }
                return;
            }
            ShardCommand::Request { req, shards, reply } => (req, shards, reply),
        };
        if shards > self.shards {
            self.adopt(shards);
        }
        // The gateway routed by an older count, or the member is not ours.
        if shards < self.shards
            || req
                .member()
                .is_some_and(|u| user_shard(u, self.shards) != self.index)
        {
            self.answer(
                reply,
                &ReplyHead::Sharded {
                    shards: self.shards,
                },
            )
            .await;
            return;
        }
        match *req {
            NodeRequest::Join {
                user,
                gateway,
                conn,
                since,
                quiet,
                ..
            } => {
                tracing::debug!(%user, %gateway, conn, quiet, "member registered");
                if self.members.insert((gateway, conn), user.clone()).is_none() {
                    *self.user_conns.entry(user).or_insert(0) += 1;
                    self.report_soon();
                }
                if quiet {
                    // A re-registration: nobody reads more than success.
                    let head = ReplyHead::Joined {
                        last_seq: 0,
                        members: self.user_conns.len() as u64,
                        complete: true,
                        presence: None,
                    };
                    self.answer(reply, &head).await;
                } else if let Some(to) = reply {
                    // The sequencer has the backlog; fetch it off the actor.
                    let deps = self.deps.clone();
                    let room = self.room.clone();
                    tokio::spawn(async move { backlog(deps, room, since, to).await });
                }
            }
            NodeRequest::Leave { gateway, conn, .. } => {
                tracing::debug!(%gateway, conn, "member left");
                self.remove(&(gateway, conn));
                self.answer(reply, &ReplyHead::Left).await;
            }
            NodeRequest::Send {
                user,
                text,
                client_id,
                ..
            } => self.on_send(user, text, client_id, reply).await,
            NodeRequest::Users { .. } => {
                let head = crate::room::user_list(self.user_conns.keys());
                self.answer(reply, &head).await;
            }
            _ => {
                let head = ReplyHead::Error {
                    code: ErrorCode::BadFrame,
                    message: "not a member request".into(),
                    retry_after_ms: None,
                };
                self.answer(reply, &head).await;
            }
        }
    }

    /// The room was split further: users that hash elsewhere now are
    /// re-registered there by their gateways, so this shard lets them go.
    fn adopt(&mut self, shards: u32) {
        self.shards = shards;
        let index = self.index;
        let moved: Vec<(NodeId, u64)> = self
            .members
            .iter()
            .filter(|(_, u)| user_shard(u, shards) != index)
            .map(|(k, _)| k.clone())
            .collect();
        for key in moved {
            self.remove(&key);
        }
        self.buckets.retain(|u, _| user_shard(u, shards) == index);
        self.report_soon();
    }

    fn remove(&mut self, key: &(NodeId, u64)) {
        if let Some(user) = self.members.remove(key) {
            if let Some(n) = self.user_conns.get_mut(&user) {
                *n -= 1;
                if *n == 0 {
                    self.user_conns.remove(&user);
                }
            }
            self.report_soon();
        }
    }

    async fn on_send(
        &mut self,
        user: UserId,
        text: String,
        client_id: String,
        reply: Option<String>,
    ) {
        let rate = self.deps.config.rate;
        if !rate.disabled() {
            let now = Instant::now();
            let bucket = self
                .buckets
                .entry(user.clone())
                .or_insert_with(|| TokenBucket::new(rate, now));
            if let Err(wait) = bucket.take(rate, now) {
                METRICS.rate_limited.inc();
                let head = ReplyHead::Error {
                    code: ErrorCode::RateLimited,
                    message: "too many messages; slow down".into(),
                    retry_after_ms: Some(
                        u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
                    ),
                };
                self.answer(reply, &head).await;
                return;
            }
            if self.buckets.len() > 4096 {
                self.buckets.retain(|_, b| !b.is_full(rate, now));
            }
        }
        self.outbox.push(ForwardedSend {
            user,
            text,
            client_id,
            reply,
        });
        self.forward();
    }

    /// Hands the oldest accepted sends to the sequencer, unless a batch is
    /// already on its way (order: one batch in flight).
    fn forward(&mut self) {
        if self.inflight.is_some() || self.outbox.is_empty() {
            return;
        }
        let mut n = 0;
        let mut bytes = 0;
        for s in &self.outbox {
            if n == MAX_BATCH || (n > 0 && bytes + s.text.len() > MAX_BATCH_BYTES) {
                break;
            }
            n += 1;
            bytes += s.text.len();
        }
        let sends: Vec<ForwardedSend> = self.outbox.drain(..n).collect();
        let (done, rx) = oneshot::channel();
        self.inflight = Some(rx);
        let deps = self.deps.clone();
        let room = self.room.clone();
        tokio::spawn(async move {
            forward_batch(deps, room, sends).await;
            let _ = done.send(());
        });
    }

    fn report_soon(&mut self) {
        let soon = Instant::now() + REPORT_SOON;
        if self.report_at.is_none_or(|t| t > soon) {
            self.report_at = Some(soon);
        }
    }

    /// Tells the sequencer how many users this shard has.
    async fn report(&mut self) {
        let members = self.user_conns.len() as u64;
        let req = NodeRequest::Count {
            room: self.room.clone(),
            shard: self.index,
            shards: self.shards,
            members,
        };
        let owner = self.deps.placement.borrow().owner(&self.room);
        if let Some(owner) = owner {
            let payload = Bytes::from(serde_json::to_vec(&req).expect("requests serialise"));
            if let Err(e) = self
                .deps
                .bus
                .publish(self.deps.subjects.node_inbox(&owner), payload)
                .await
            {
                tracing::debug!(error = %e, "member count report lost; sent again later");
            }
            self.reported = Some(members);
        }
        if !self.members.is_empty() || self.reported != Some(0) {
            self.report_at = Some(Instant::now() + REPORT_EVERY);
        }
    }

    async fn answer(&self, to: Option<String>, head: &ReplyHead) {
        if let Some(to) = to {
            if let Err(e) = self.deps.bus.publish(to, encode_reply(head, &[])).await {
                tracing::debug!(error = %e, "reply lost; the gateway retries");
            }
        }
    }
}

/// Sends `req` to the room's sequencer, waiting out ring changes, and
/// returns its reply payload.
async fn to_sequencer(deps: &ShardDeps, room: &RoomId, req: &NodeRequest) -> Option<Bytes> {
    let payload = Bytes::from(serde_json::to_vec(req).expect("requests serialise"));
    let mut placement = deps.placement.clone();
    let mut backoff = Duration::from_millis(25);
    for _ in 0..ATTEMPTS {
        let owner = placement.borrow_and_update().owner(room);
        if let Some(owner) = owner {
            if let Ok(bytes) = deps
                .bus
                .request(deps.subjects.node_inbox(&owner), payload.clone(), TIMEOUT)
                .await
            {
                match decode_reply(&bytes) {
                    Ok((ReplyHead::NotOwner, _)) => {}
                    Ok((
                        ReplyHead::Error {
                            code: ErrorCode::Overloaded,
                            ..
                        },
                        _,
                    )) => {}
                    Ok(_) => return Some(bytes),
                    Err(e) => tracing::warn!(error = %e, "undecodable reply from the sequencer"),
                }
            }
        }
        tokio::select! {
            _ = placement.changed() => {}
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    None
}

/// What a member hears when no sequencer answered: retryable.
fn sequencer_unreachable() -> ReplyHead {
    ReplyHead::Error {
        code: ErrorCode::Unavailable,
        message: "the room's sequencer is not reachable; retry".into(),
        retry_after_ms: Some(1000),
    }
}

/// Forwards one batch; the sequencer answers each send itself. A batch no
/// sequencer took is answered `unavailable` send by send (the gateway's
/// client resends with the same `client_id`, so nothing is doubled).
async fn forward_batch(deps: ShardDeps, room: RoomId, sends: Vec<ForwardedSend>) {
    let req = NodeRequest::Forward {
        room: room.clone(),
        sends,
    };
    if to_sequencer(&deps, &room, &req).await.is_some() {
        return;
    }
    tracing::warn!(%room, "no sequencer took a forwarded batch; its sends are answered unavailable");
    let NodeRequest::Forward { sends, .. } = req else {
        return;
    };
    let payload = encode_reply(&sequencer_unreachable(), &[]);
    for s in sends {
        if let Some(to) = s.reply {
            let _ = deps.bus.publish(to, payload.clone()).await;
        }
    }
}

/// Answers a member's `join` with the sequencer's `joined` and backlog.
async fn backlog(deps: ShardDeps, room: RoomId, since: Option<u64>, to: String) {
    let req = NodeRequest::Backlog {
        room: room.clone(),
        since,
    };
    let payload = match to_sequencer(&deps, &room, &req).await {
        Some(bytes) => bytes,
        None => encode_reply(&sequencer_unreachable(), &[]),
    };
    let _ = deps.bus.publish(to, payload).await;
}
