//! The room actor: one task per active room owns every piece of the room's
//! state (members, seq, rate limits, the buffer and its single alarm, the
//! dedup window, the recent ring). Commands arrive on a bounded mailbox;
//! replies go straight to the requester's reply subject on the bus, or to
//! its slot in a batch reply (see [`crate::reply`]).
//!
//! Life of a message: `send` → dedup check (before any seq is assigned, so
//! dedup never burns a seq) → rate limit → high-water check → seq assigned,
//! row buffered (the first buffered row arms the alarm) → the batch is due
//! at `flush_batch` rows or when the alarm fires → handed to the node
//! writer (up to `MAX_IN_FLIGHT` batches per room, committed in order) →
//! after commit: the frame is serialised once, published on the room
//! subject, kept in the recent ring, and the sender gets its `ack`. Nothing is broadcast or
//! acknowledged before commit, so a seq that was never committed was never
//! seen by anyone and may be reassigned when the database rejects a batch.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::bus::{Event, NodeRequest, PresenceMark, ReplyHead, MAX_REPLY_BYTES};
use chat_protocol::frames::{PresenceState, DEFAULT_BACKLOG, MAX_HISTORY_LIMIT};
use chat_protocol::{ErrorCode, Message, NodeId, RoomId, ServerFrame, UserId};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::lease::LeaseTable;
use crate::metrics::METRICS;
use crate::ratelimit::{RateLimit, TokenBucket};
use crate::reply::Reply;
use crate::store::{Page, Row, Store, StoreError};
use crate::writer::{FlushJob, Outcome, WriterHandle};

/// Commands a room actor's mailbox holds before senders are told the room
/// is busy.
pub const MAILBOX: usize = 4096;
/// Most messages a join backlog reply carries; the gateway pages the rest.
const BACKLOG_PAGE: u32 = 500;
/// Commands taken from the mailbox per loop turn.
const TAKE: usize = 128;
/// Batches a room may have at the writer at once. A busy room keeps
/// filling batches of `flush_batch` rows while earlier ones commit, and the
/// writer takes them into the same group commit: one commit carries up to
/// this many batches of the room, without any batch exceeding its size.
pub const MAX_IN_FLIGHT: usize = 4;

/// Batch generations, shared by every room actor of the process so they
/// only ever grow (see `writer::FlushJob::generation`).
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATIONS.fetch_add(1, Ordering::Relaxed)
}

/// Settings every room actor of a node shares.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Max rows in one room's batch.
    pub flush_batch: usize,
    /// The alarm: longest a buffered message waits for its batch.
    pub flush_interval: Duration,
    /// Per-user send limit in this room.
    pub rate: RateLimit,
    /// Buffered + in-flight messages above which sends get `overloaded`.
    pub high_water: usize,
    /// How long an empty room (no members, nothing buffered) lives on.
    pub idle_timeout: Duration,
    /// Messages kept in memory for backlogs and history.
    pub recent: usize,
    /// `(user, client_id)` pairs remembered for dedup without the database.
    pub dedup_window: usize,
    /// Users present above which a room is split into member shards.
    pub shard_threshold: usize,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            flush_batch: 50,
            flush_interval: Duration::from_millis(5),
            shard_threshold: 5000,
            rate: RateLimit {
                per_sec: 10.0,
                burst: 20.0,
            },
            high_water: 10_000,
            idle_timeout: Duration::from_secs(60),
            recent: 256,
            dedup_window: 2048,
        }
    }
}

/// What the actor needs from its node.
#[derive(Clone)]
pub struct RoomDeps {
    /// Replies and events.
    pub bus: Arc<dyn Bus>,
    /// Loads and history.
    pub store: Arc<dyn Store>,
    /// Group commit.
    pub writer: WriterHandle,
    /// Shared settings.
    pub config: Arc<RoomConfig>,
    /// Bounds concurrent database reads (history, old backlogs).
    pub reads: Arc<Semaphore>,
    /// Told when the room has been idle long enough to stop.
    pub idle: mpsc::Sender<(RoomId, u64)>,
    /// The room's event subject is built from this.
    pub subjects: chat_protocol::subjects::Subjects,
    /// This node, the owner named in leases.
    pub node_id: NodeId,
    /// Leases held, for bulk renewal.
    pub leases: Arc<LeaseTable>,
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
    /// Whether every live gateway reads a commit's messages as one event
    /// ([`Event::Messages`]); while one of an older release runs, each
    /// message is its own event. Kept by the node from gateway heartbeats.
    pub multi_events: Arc<std::sync::atomic::AtomicBool>,
    /// Whether every live gateway reads presence marks
    /// ([`chat_protocol::bus::PresenceMark`]); if not, presence goes
    /// unmarked, as before marks.
    pub presence_marks: Arc<std::sync::atomic::AtomicBool>,
}

/// A command for a room actor.
#[derive(Debug)]
pub enum RoomCommand {
    /// A request from a gateway, with the subject to answer on.
    Request {
        /// The request.
        req: NodeRequest,
        /// Where to answer (absent for fire-and-forget publishes).
        reply: Option<Reply>,
    },
    /// Stop serving: answer new requests `not_owner`, flush, then exit.
    Stop,
    /// A gateway died: its connections leave the room.
    GatewayGone(NodeId),
}

/// The room's mailbox. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RoomHandle {
    tx: mpsc::Sender<RoomCommand>,
}

impl RoomHandle {
    /// Queues a command without waiting.
    ///
    /// # Errors
    /// Gives the command back when the mailbox is full or the actor ended.
    pub fn try_send(&self, cmd: RoomCommand) -> Result<(), mpsc::error::TrySendError<RoomCommand>> {
        self.tx.try_send(cmd)
    }
}

/// Counters the unit tests read.
#[derive(Debug, Default, Clone, Copy)]
pub struct RoomStats {
    /// Times the alarm was armed.
    pub alarms_armed: u64,
    /// Batches handed to the writer.
    pub batches: u64,
}

struct Pending {
    row: Row,
    replies: Vec<Reply>,
    /// When the send reached the room, for `chat_room_send_ack_seconds`.
    received: Instant,
}

struct InFlight {
    /// The seq of its first row.
    first_seq: u64,
    replies: Vec<Vec<Reply>>,
    received: Vec<Instant>,
    done: oneshot::Receiver<(Vec<Row>, Outcome)>,
}

/// The maps every send touches (dedup window, pending sends, rate
/// buckets): SipHash was 7% of the node's time at 50k writes/s. foldhash
/// is seeded per process, so clients choosing keys cannot aim collisions.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A committed message, serialised once for its event and the ring.
struct Committed {
    seq: u64,
    user: UserId,
    client_id: String,
    id: String,
    frame: Bytes,
}

impl Committed {
    fn new(msg: Message) -> Self {
        let (seq, user, client_id, id) = (
            msg.seq,
            msg.user.clone(),
            msg.client_id.clone(),
            msg.id.clone(),
        );
        Self {
            seq,
            user,
            client_id,
            id,
            frame: ServerFrame::Message(msg).to_bytes(),
        }
    }
}

/// Spawns the actor for `room`; returns its handle and its task.
pub fn spawn(
    room: RoomId,
    deps: RoomDeps,
    cancel: CancellationToken,
) -> (RoomHandle, tokio::task::JoinHandle<RoomStats>) {
    let (tx, rx) = mpsc::channel(MAILBOX);
    // Every log line of the actor names its room and node, so one room's
    // story can be followed across owners.
    let span = tracing::info_span!("room", room.id = %room, node.id = %deps.node_id);
    let actor = RoomActor::new(room, deps, rx);
    let task = tokio::spawn(tracing::Instrument::instrument(actor.run(cancel), span));
    (RoomHandle { tx }, task)
}

struct RoomActor {
    room: RoomId,
    deps: RoomDeps,
    rx: mpsc::Receiver<RoomCommand>,
    events_subject: String,
    last_seq: u64,
    next_seq: u64,
    members: HashMap<(NodeId, u64), UserId>,
    user_conns: HashMap<UserId, u32>,
    buffer: VecDeque<Pending>,
    /// Batches at the writer, oldest first; the writer answers in order.
    inflight: VecDeque<InFlight>,
    /// Rows in `inflight`.
    inflight_rows: usize,
    /// Renewed by every reconcile: the writer cancels this actor's batches
    /// of a rejected generation (see `writer::Outcome::Cancelled`).
    generation: u64,
    alarm: Option<Instant>,
    alarm_fired: bool,
    dedup: FastMap<(UserId, String), (u64, String)>,
    dedup_order: VecDeque<(UserId, String)>,
    pending_keys: FastMap<(UserId, String), u64>,
    recent: VecDeque<(u64, Bytes)>,
    buckets: FastMap<UserId, TokenBucket>,
    stopping: bool,
    /// Lease epoch this actor serves under (0 before it holds one).
    epoch: u64,
    /// Presence changes this actor announced: with `epoch` (new for every
    /// actor of the room), the mark of the last one
    /// ([`Self::presence_mark`]).
    presence_n: u64,
    /// Fires when the lease renewal finds another node took the room.
    lease_lost: CancellationToken,
    /// Another node owns the room now: nothing more is written.
    fenced: bool,
    processed: u64,
    idle_since: Option<Instant>,
    stats: RoomStats,
    /// Member shards the room is split into (1: not split).
    shards: u32,
    /// Users present per member shard, as each shard last reported.
    shard_counts: HashMap<u32, u64>,
    /// The member count last announced to a sharded room.
    announced: u64,
    /// When the next `members` announcement may go out, if one is due.
    announce_at: Option<Instant>,
    /// A shard reported past the threshold before the last split settled:
    /// the room splits again when it has (no later report is awaited).
    regrow_at: Option<Instant>,
    /// When the room was last split.
    split_at: Option<Instant>,
}

/// The `users` answer for a roster: sorted, at most `MAX_MEMBER_LIST`.
pub fn user_list<'a>(users: impl Iterator<Item = &'a UserId>) -> ReplyHead {
    let mut users: Vec<UserId> = users.cloned().collect();
    users.sort();
    let count = users.len() as u64;
    users.truncate(chat_protocol::frames::MAX_MEMBER_LIST);
    ReplyHead::Users { users, count }
}

/// How long after a split the shard counts settle before the next split.
const SPLIT_SETTLE: Duration = Duration::from_secs(2);
/// Most often a split room announces its member count.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// Most member shards a room is split into.
pub const MAX_SHARDS: u32 = 1024;

/// How many member shards `members` users need: enough that each starts at
/// about half the threshold, so the room grows a while before the next
/// split; at least 2.
pub fn shards_for(members: usize, threshold: usize) -> u32 {
    let per = (threshold / 2).max(1);
    let n = members.div_ceil(per).max(2);
    u32::try_from(n).unwrap_or(MAX_SHARDS).min(MAX_SHARDS)
}

/// Whether a send still needs the per-user rate limit: a member shard of
/// a big room limits its members before it forwards their sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Check,
    Done,
}

/// When an alarm armed at `now` fires: at the next multiple of `interval`
/// on a clock every room of the process shares. A message still waits at
/// most `interval` (half of it on average), and rooms whose first messages
/// arrive within the same interval fall due at the same instant, so the
/// writer commits them as one group instead of one commit each (fewer
/// commits, the cost that dominates under many quiet rooms).
fn alarm_at(now: Instant, interval: Duration) -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    next_boundary(*EPOCH.get_or_init(Instant::now), now, interval)
}

/// The first multiple of `interval` after `epoch` that is later than `now`.
fn next_boundary(epoch: Instant, now: Instant, interval: Duration) -> Instant {
    let step = interval.as_nanos().max(1);
    let Some(since) = now.checked_duration_since(epoch) else {
        // A clock from before the epoch (paused test clocks): no alignment.
        return now + interval;
    };
    let next = (since.as_nanos() / step + 1) * step;
    u64::try_from(next).map_or(now + interval, |n| epoch + Duration::from_nanos(n))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RoomActor {
    fn new(room: RoomId, deps: RoomDeps, rx: mpsc::Receiver<RoomCommand>) -> Self {
        let events_subject = deps.subjects.room_events(&room);
        Self {
            room,
            deps,
            rx,
            events_subject,
            last_seq: 0,
            next_seq: 1,
            members: HashMap::new(),
            user_conns: HashMap::new(),
            buffer: VecDeque::new(),
            inflight: VecDeque::new(),
            inflight_rows: 0,
            generation: next_generation(),
            shards: 1,
            shard_counts: HashMap::new(),
            announced: 0,
            announce_at: None,
            regrow_at: None,
            split_at: None,
            alarm: None,
            alarm_fired: false,
            dedup: FastMap::default(),
            dedup_order: VecDeque::new(),
            pending_keys: FastMap::default(),
            recent: VecDeque::new(),
            buckets: FastMap::default(),
            stopping: false,
            epoch: 0,
            presence_n: 0,
            lease_lost: CancellationToken::new(),
            fenced: false,
            processed: 0,
            idle_since: None,
            stats: RoomStats::default(),
        }
    }

    async fn run(mut self, cancel: CancellationToken) -> RoomStats {
        METRICS.active_rooms.inc();
        if !self.acquire(&cancel).await {
            self.refuse_queued().await;
            METRICS.active_rooms.dec();
            return self.stats;
        }
        self.load().await;
        // Gateways holding members of this room re-register them with us:
        // rosters and presence survive a change of owner.
        if let Err(e) = self
            .deps
            .bus
            .publish(self.events_subject.clone(), Event::Resync.encode())
            .await
        {
            tracing::warn!(room = %self.room, error = %e, "resync announcement lost");
        }
        let mut cmds = Vec::with_capacity(TAKE);
        loop {
            self.maybe_submit();
            if self.stopping && self.buffer.is_empty() && self.inflight.is_empty() {
                break;
            }
            self.update_idle();
            let alarm = self.alarm;
            let idle_at = self.idle_since.map(|t| t + self.deps.config.idle_timeout);
            tokio::select! {
                n = self.rx.recv_many(&mut cmds, TAKE), if !self.stopping || !self.rx.is_closed() => {
                    if n == 0 {
                        // The node dropped our handle: flush and end.
                        self.stopping = true;
                        continue;
                    }
                    for cmd in cmds.drain(..) {
                        self.processed += 1;
                        self.handle(cmd).await;
                    }
                }
                _ = tokio::time::sleep_until(alarm.unwrap_or_else(Instant::now)), if alarm.is_some() => {
                    self.alarm = None;
                    self.alarm_fired = true;
                }
                res = async { (&mut self.inflight.front_mut().expect("guarded").done).await }, if !self.inflight.is_empty() => {
                    let inflight = self.inflight.pop_front().expect("guarded");
                    self.inflight_rows -= inflight.replies.len();
                    match res {
                        Ok((rows, Outcome::Committed { ts_ms })) => {
                            for t in &inflight.received {
                                METRICS.send_ack_seconds.observe(t.elapsed().as_secs_f64());
                            }
                            self.committed(rows, inflight.replies, ts_ms).await;
                        }
                        Ok((rows, Outcome::Rejected { reason })) => {
                            self.rejected(rows, inflight.replies, &reason).await;
                        }
                        Ok((rows, Outcome::Cancelled)) => {
                            // Only follows a rejection, which `rejected`
                            // already collected; taken the same way if not.
                            self.rejected(rows, inflight.replies, "an earlier batch was rejected").await;
                        }
                        Ok((_, Outcome::Fenced)) => self.on_fenced(inflight.replies).await,
                        Err(_) => {
                            // The writer is gone: only happens at process exit.
                            tracing::error!(room = %self.room, "writer stopped with a batch in flight");
                            break;
                        }
                    }
                }
                _ = tokio::time::sleep_until(idle_at.unwrap_or_else(Instant::now)), if idle_at.is_some() && !self.stopping => {
                    self.idle_since = None;
                    // If the node is busy it will ask again later.
                    let _ = self.deps.idle.try_send((self.room.clone(), self.processed));
                }
                _ = tokio::time::sleep_until(self.announce_at.unwrap_or_else(Instant::now)), if self.announce_at.is_some() => {
                    self.announce_at = None;
                    self.announce().await;
                }
                _ = tokio::time::sleep_until(self.regrow_at.unwrap_or_else(Instant::now)), if self.regrow_at.is_some() => {
                    self.regrow_at = None;
                    self.regrow().await;
                }
                _ = cancel.cancelled(), if !self.stopping => {
                    self.stopping = true;
                }
                _ = self.lease_lost.cancelled(), if !self.fenced => {
                    self.on_fenced(Vec::new()).await;
                }
            }
        }
        if self.fenced {
            METRICS.handoffs.with_label_values(&["fenced"]).inc();
        } else {
            METRICS.handoffs.with_label_values(&["released"]).inc();
            // Best effort: an unreleased lease expires after its TTL.
            if let Err(e) = self
                .deps
                .store
                .release_lease(self.room.as_str(), &self.deps.node_id, self.epoch)
                .await
            {
                tracing::warn!(room = %self.room, error = %e, "lease release failed; it expires by itself");
            }
        }
        self.deps.leases.remove(self.room.as_str(), self.epoch);
        self.refuse_queued().await;
        if self.shards > 1 {
            METRICS.sharded_rooms.dec();
        }
        METRICS.active_rooms.dec();
        METRICS.members.sub(self.members.len() as i64);
        self.stats
    }

    /// Takes the room's lease before anything is read or written, waiting
    /// out another owner's (a crashed node's lease expires after its TTL; a
    /// draining one releases it after its flush). Gives up when the node
    /// drops the room or shuts down.
    async fn acquire(&mut self, cancel: &CancellationToken) -> bool {
        let deps = &self.deps;
        let rx = &self.rx;
        let taken = crate::lease::take(
            deps.store.as_ref(),
            &deps.leases,
            self.room.as_str(),
            &deps.node_id,
            deps.lease_ttl,
            cancel,
            || rx.is_closed(),
        )
        .await;
        match taken {
            Some((epoch, lost)) => {
                self.epoch = epoch;
                self.lease_lost = lost;
                true
            }
            None => false,
        }
    }

    /// Another node owns the room now: every waiting sender is told
    /// `not_owner` (its gateway retries at the new owner, where the dedup
    /// window makes the retry safe), and the actor ends.
    async fn on_fenced(&mut self, inflight: Vec<Vec<Reply>>) {
        if !self.fenced {
            tracing::warn!(room = %self.room, epoch = self.epoch, "room fenced: handing it to its new owner");
        }
        self.fenced = true;
        self.stopping = true;
        let buffered: Vec<Pending> = self.buffer.drain(..).collect();
        METRICS
            .buffered_messages
            .sub((buffered.len() + inflight.len()) as i64);
        let replies = inflight
            .into_iter()
            .flatten()
            .chain(buffered.into_iter().flat_map(|p| p.replies));
        for to in replies {
            self.reply(Some(to), &ReplyHead::NotOwner, &[]).await;
        }
        self.pending_keys.clear();
        self.alarm = None;
        self.alarm_fired = false;
    }

    /// Answers commands still in the mailbox `not_owner` as the actor ends.
    async fn refuse_queued(&mut self) {
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            if let RoomCommand::Request { reply, .. } = cmd {
                self.reply(reply, &ReplyHead::NotOwner, &[]).await;
            }
        }
    }

    /// Loads `last_seq`, the recent ring and the dedup window, retrying
    /// while the database is unavailable (commands wait in the mailbox).
    async fn load(&mut self) {
        let cfg = self.deps.config.clone();
        let mut delay = Duration::from_millis(50);
        let snap = loop {
            match self
                .deps
                .store
                .load_room(&self.room, cfg.recent as u32, cfg.dedup_window as u32)
                .await
            {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(room = %self.room, error = %e, "cannot load room; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        self.last_seq = snap.last_seq;
        self.next_seq = snap.last_seq + 1;
        for m in snap.recent {
            let seq = m.seq;
            self.push_recent(seq, ServerFrame::Message(m).to_bytes());
        }
        for (user, cid, seq, id) in snap.dedup {
            self.remember(user, cid, seq, id);
        }
        if snap.shards > 1 {
            // Its shards report their members as they hear from gateways.
            self.shards = snap.shards;
            METRICS.sharded_rooms.inc();
        }
    }

    fn update_idle(&mut self) {
        let idle = self.members.is_empty()
            && self.shard_counts.values().all(|&n| n == 0)
            && self.buffer.is_empty()
            && self.inflight.is_empty();
        match (idle, self.idle_since) {
            (true, None) => self.idle_since = Some(Instant::now()),
            (false, Some(_)) => self.idle_since = None,
            _ => {}
        }
    }

    async fn handle(&mut self, cmd: RoomCommand) {
        let (req, reply) = match cmd {
            RoomCommand::Stop => {
                self.stopping = true;
                return;
            }
            RoomCommand::GatewayGone(gw) => {
                let gone: Vec<(u64, UserId)> = self
                    .members
                    .iter()
                    .filter(|((g, _), _)| *g == gw)
                    .map(|((_, conn), user)| (*conn, user.clone()))
                    .collect();
                if !gone.is_empty() {
                    tracing::info!(room = %self.room, gateway = %gw, members = gone.len(), "gateway gone: dropping its members");
                }
                for (conn, user) in gone {
                    self.on_leave(&gw, conn, &user).await;
                }
                return;
            }
            RoomCommand::Request { req, reply } => (req, reply),
        };
        if self.stopping {
            self.reply(reply, &ReplyHead::NotOwner, &[]).await;
            return;
        }
        match req {
            NodeRequest::Send {
                user,
                text,
                client_id,
                ..
            } => {
                self.on_send(user, text, client_id, reply, Limit::Check)
                    .await;
            }
            NodeRequest::Forward { sends, .. } => {
                let accepted = u32::try_from(sends.len()).unwrap_or(u32::MAX);
                METRICS.forwarded.inc_by(u64::from(accepted));
                for s in sends {
                    // The shard limited its own members' rates.
                    self.on_send(
                        s.user,
                        s.text,
                        s.client_id,
                        s.reply.map(Reply::Subject),
                        Limit::Done,
                    )
                    .await;
                }
                self.reply(reply, &ReplyHead::Forwarded { accepted }, &[])
                    .await;
            }
            NodeRequest::Join {
                user,
                gateway,
                conn,
                since,
                quiet,
                ..
            } => {
                self.on_join(user, gateway, conn, since, quiet, reply).await;
            }
            NodeRequest::Leave {
                user,
                gateway,
                conn,
                ..
            } => {
                let was_here = self.members.contains_key(&(gateway.clone(), conn));
                self.on_leave(&gateway, conn, &user).await;
                let head = if self.shards > 1 && !was_here {
                    // The member is registered at its shard.
                    self.sharded()
                } else {
                    ReplyHead::Left
                };
                self.reply(reply, &head, &[]).await;
            }
            NodeRequest::Users { .. } => {
                let head = if self.shards > 1 {
                    // Each shard knows its own members.
                    self.sharded()
                } else {
                    user_list(self.user_conns.keys())
                };
                self.reply(reply, &head, &[]).await;
            }
            NodeRequest::Backlog { since, .. } => {
                let members = self.present();
                // A shard's backlog: presence there is the shard's own.
                self.answer_join(reply, since, false, members, None).await;
            }
            NodeRequest::Count {
                shard,
                shards,
                members,
                ..
            } => self.on_count(shard, shards, members).await,
            NodeRequest::Shard { .. } => {
                // The node hands shard requests to shard actors, never here.
                self.error(reply, ErrorCode::Internal, "misrouted shard request", None)
                    .await;
            }
            NodeRequest::History {
                before,
                after,
                limit,
                ..
            } => {
                self.on_history(
                    Page {
                        before,
                        after,
                        limit: limit.clamp(1, MAX_HISTORY_LIMIT.max(BACKLOG_PAGE)),
                    },
                    reply,
                )
                .await;
            }
        }
    }

    async fn reply(&self, to: Option<Reply>, head: &ReplyHead, frames: &[Bytes]) {
        if let Some(to) = to {
            if let Err(e) = to.send(&self.deps.bus, head, frames).await {
                tracing::warn!(room = %self.room, error = %e, "reply lost; the gateway will retry");
            }
        }
    }

    async fn error(
        &self,
        to: Option<Reply>,
        code: ErrorCode,
        message: &str,
        retry: Option<Duration>,
    ) {
        let head = ReplyHead::Error {
            code,
            message: message.to_owned(),
            retry_after_ms: retry.map(ms),
        };
        self.reply(to, &head, &[]).await;
    }

    async fn on_send(
        &mut self,
        user: UserId,
        text: String,
        client_id: String,
        reply: Option<Reply>,
        limit: Limit,
    ) {
        let key = (user, client_id);
        if let Some((seq, id)) = self.dedup.get(&key) {
            METRICS.duplicates.inc();
            let head = ReplyHead::Ack {
                seq: *seq,
                id: id.clone(),
                duplicate: true,
            };
            self.reply(reply, &head, &[]).await;
            return;
        }
        if let Some(&seq) = self.pending_keys.get(&key) {
            // A resend of a message not yet committed: answer both at commit.
            METRICS.duplicates.inc();
            if let Some(to) = reply {
                self.attach_reply(seq, to);
            }
            return;
        }
        let cfg = self.deps.config.clone();
        if limit == Limit::Check && !cfg.rate.disabled() {
            let now = Instant::now();
            let bucket = self
                .buckets
                .entry(key.0.clone())
                .or_insert_with(|| TokenBucket::new(cfg.rate, now));
            if let Err(wait) = bucket.take(cfg.rate, now) {
                METRICS.rate_limited.inc();
                self.error(
                    reply,
                    ErrorCode::RateLimited,
                    "too many messages; slow down",
                    Some(wait),
                )
                .await;
                return;
            }
            if self.buckets.len() > 4096 {
                self.buckets.retain(|_, b| !b.is_full(cfg.rate, now));
            }
        }
        if self.buffer.len() + self.inflight_rows >= cfg.high_water {
            METRICS.overloaded.inc();
            let retry = Some(Duration::from_millis(500));
            self.error(
                reply,
                ErrorCode::Overloaded,
                "room is overloaded; retry shortly",
                retry,
            )
            .await;
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let (user, client_id) = key;
        self.pending_keys
            .insert((user.clone(), client_id.clone()), seq);
        let row = Row {
            seq,
            id: uuid::Uuid::now_v7().to_string(),
            user,
            text,
            client_id,
        };
        if self.buffer.is_empty() && self.alarm.is_none() && !self.alarm_fired {
            self.alarm = Some(alarm_at(Instant::now(), cfg.flush_interval));
            self.stats.alarms_armed += 1;
            METRICS.alarms_armed.inc();
        }
        self.buffer.push_back(Pending {
            row,
            replies: reply.into_iter().collect(),
            received: Instant::now(),
        });
        METRICS.buffered_messages.inc();
    }

    fn attach_reply(&mut self, seq: u64, to: Reply) {
        if let Some(front) = self.buffer.front().map(|p| p.row.seq) {
            if seq >= front {
                if let Some(p) = self.buffer.get_mut((seq - front) as usize) {
                    p.replies.push(to);
                    return;
                }
            }
        }
        // In-flight rows are the ones just below the buffer, oldest first.
        if let Some(f) = self.inflight.iter_mut().rev().find(|f| f.first_seq <= seq) {
            if let Some(r) = f.replies.get_mut((seq - f.first_seq) as usize) {
                r.push(to);
            }
        }
    }

    /// Hands due batches to the writer while fewer than `MAX_IN_FLIGHT`
    /// are there.
    fn maybe_submit(&mut self) {
        while self.inflight.len() < MAX_IN_FLIGHT && !self.buffer.is_empty() {
            let cfg = &self.deps.config;
            let due = self.alarm_fired || self.stopping || self.buffer.len() >= cfg.flush_batch;
            if !due || !self.submit_one() {
                return;
            }
        }
    }

    /// Hands the next batch to the writer; false when the writer's queue
    /// is full (the rows stay buffered until the next alarm).
    fn submit_one(&mut self) -> bool {
        let cfg = &self.deps.config;
        let n = self.buffer.len().min(cfg.flush_batch);
        let first_seq = self.buffer.front().map_or(0, |p| p.row.seq);
        let (tx, rx) = oneshot::channel();
        let mut rows = Vec::with_capacity(n);
        let mut replies = Vec::with_capacity(n);
        let mut received = Vec::with_capacity(n);
        for p in self.buffer.drain(..n) {
            rows.push(p.row);
            replies.push(p.replies);
            received.push(p.received);
        }
        let job = FlushJob {
            room: self.room.clone(),
            epoch: self.epoch,
            generation: self.generation,
            rows,
            done: tx,
        };
        match self.deps.writer.submit(job) {
            Ok(()) => {
                self.stats.batches += 1;
                self.inflight_rows += replies.len();
                self.inflight.push_back(InFlight {
                    first_seq,
                    replies,
                    received,
                    done: rx,
                });
                if self.buffer.is_empty() {
                    self.alarm = None;
                    self.alarm_fired = false;
                } else if !self.alarm_fired && self.alarm.is_none() {
                    // Rows left behind wait at most one more interval.
                    self.alarm = Some(alarm_at(Instant::now(), cfg.flush_interval));
                    self.stats.alarms_armed += 1;
                    METRICS.alarms_armed.inc();
                }
                true
            }
            Err(job) => {
                // The writer's queue is full: put the rows back in order and
                // try again when the alarm fires.
                for ((row, replies), received) in
                    job.rows.into_iter().zip(replies).zip(received).rev()
                {
                    self.buffer.push_front(Pending {
                        row,
                        replies,
                        received,
                    });
                }
                self.alarm_fired = false;
                self.alarm = Some(Instant::now() + cfg.flush_interval);
                false
            }
        }
    }

    /// A batch is in: one event for all of its messages (split only where
    /// it would not fit one bus message), then each message is kept and
    /// acknowledged.
    async fn committed(&mut self, rows: Vec<Row>, replies: Vec<Vec<Reply>>, ts_ms: i64) {
        METRICS.buffered_messages.sub(rows.len() as i64);
        let done: Vec<Committed> = rows
            .into_iter()
            .map(|row| {
                let Row {
                    seq,
                    id,
                    user,
                    text,
                    client_id,
                } = row;
                self.pending_keys.remove(&(user.clone(), client_id.clone()));
                let msg = Message {
                    room: self.room.clone(),
                    seq,
                    id,
                    user,
                    text,
                    ts: ts_ms,
                    client_id,
                };
                Committed::new(msg)
            })
            .collect();
        self.publish_events(&done).await;
        for (c, replies) in done.into_iter().zip(replies) {
            self.settle(c, replies, false).await;
        }
    }

    /// Broadcasts one committed message and answers its senders.
    async fn publish_committed(&mut self, msg: Message, replies: Vec<Reply>, duplicate: bool) {
        let c = Committed::new(msg);
        self.publish_events(std::slice::from_ref(&c)).await;
        self.settle(c, replies, duplicate).await;
    }

    /// Publishes the events of committed messages, in seq order: runs of
    /// consecutive seqs as one [`Event::Messages`] each, up to
    /// [`MAX_REPLY_BYTES`] a run, a lone message (or every message, while a
    /// gateway that cannot read runs is live) as [`Event::Message`].
    async fn publish_events(&self, done: &[Committed]) {
        let mut rest = done;
        let multi = self.deps.multi_events.load(Ordering::Relaxed);
        while !rest.is_empty() {
            let mut bytes = rest[0].frame.len();
            let mut n = 1;
            while multi
                && n < rest.len()
                && rest[n].seq == rest[n - 1].seq + 1
                && bytes + rest[n].frame.len() < MAX_REPLY_BYTES
            {
                bytes += rest[n].frame.len() + 1;
                n += 1;
            }
            let (run, later) = rest.split_at(n);
            rest = later;
            let event = match run {
                [one] => Event::Message {
                    seq: one.seq,
                    frame: one.frame.clone(),
                },
                _ => Event::Messages {
                    first: run[0].seq,
                    frames: run.iter().map(|c| c.frame.clone()).collect(),
                },
            }
            .encode();
            let subject = self.events_subject.clone();
            if let Err(e) = self.deps.bus.publish(subject, event).await {
                // Gateways repair the gap from history when the next event
                // or their tail check shows it.
                let seq = run[0].seq;
                tracing::warn!(room = %self.room, seq, error = %e, "event publish failed");
            }
        }
    }

    /// After its event: keeps a committed message (recent ring, dedup
    /// window) and answers its senders.
    async fn settle(&mut self, c: Committed, replies: Vec<Reply>, duplicate: bool) {
        let Committed {
            seq,
            user,
            client_id,
            id,
            frame,
        } = c;
        self.push_recent(seq, frame);
        self.last_seq = self.last_seq.max(seq);
        self.remember(user, client_id, seq, id.clone());
        let head = ReplyHead::Ack { seq, id, duplicate };
        for to in replies {
            self.reply(Some(to), &head, &[]).await;
        }
    }

    /// A batch came back unwritten (rejected, or cancelled behind a
    /// rejection): the room's later batches at the writer come back
    /// cancelled, as the writer stops writing the room's rows of this
    /// generation. Collects them in order, behind this one, then
    /// reconciles everything that is not yet written. It waits for them
    /// here, mailbox unread: they are behind at most the writer's queue,
    /// the wait they had anyway, and rejections are rare.
    async fn rejected(&mut self, mut rows: Vec<Row>, mut replies: Vec<Vec<Reply>>, reason: &str) {
        while let Some(f) = self.inflight.pop_front() {
            self.inflight_rows -= f.replies.len();
            match f.done.await {
                // A commit cannot follow a rejection of the same
                // generation; were it to, the reconcile reads its rows back
                // from the database and publishes them like any other.
                Ok((
                    more,
                    Outcome::Rejected { .. } | Outcome::Cancelled | Outcome::Committed { .. },
                )) => {
                    rows.extend(more);
                    replies.extend(f.replies);
                }
                Ok((_, Outcome::Fenced)) => {
                    self.on_fenced(f.replies).await;
                }
                Err(_) => {
                    tracing::error!(room = %self.room, "writer stopped with a batch in flight");
                }
            }
        }
        if self.fenced {
            // Another node owns the room: these senders go there.
            METRICS.buffered_messages.sub(rows.len() as i64);
            for to in replies.into_iter().flatten() {
                self.reply(Some(to), &ReplyHead::NotOwner, &[]).await;
            }
            return;
        }
        self.generation = next_generation();
        self.reconcile(rows, replies, reason).await;
    }

    /// The database refused a batch: find out what it already holds (a
    /// commit that did land, a rival owner's rows, or resends older than
    /// the dedup window), publish and answer those, and renumber the rest
    /// after the true `last_seq`. Nothing of ours was shown before, so the
    /// renumbering is invisible.
    async fn reconcile(&mut self, rows: Vec<Row>, replies: Vec<Vec<Reply>>, reason: &str) {
        tracing::warn!(room = %self.room, reason, "reconciling a rejected batch with the database");
        let mut pending: VecDeque<Pending> = rows
            .into_iter()
            .zip(replies)
            // The first try's receipt times are gone with the rejected
            // batch; these sends are timed from the reconcile on.
            .map(|(row, replies)| Pending {
                row,
                replies,
                received: Instant::now(),
            })
            .collect();
        pending.extend(self.buffer.drain(..));
        let mut delay = Duration::from_millis(50);
        loop {
            match self.try_reconcile(&mut pending).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(room = %self.room, error = %e, "reconcile failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Renumber what is left after the true last seq.
        self.next_seq = self.last_seq + 1;
        self.pending_keys.clear();
        for p in &mut pending {
            p.row.seq = self.next_seq;
            self.next_seq += 1;
            self.pending_keys
                .insert((p.row.user.clone(), p.row.client_id.clone()), p.row.seq);
        }
        self.buffer = pending;
        self.alarm_fired = !self.buffer.is_empty();
    }

    async fn try_reconcile(&mut self, pending: &mut VecDeque<Pending>) -> Result<(), StoreError> {
        // 1. Everything committed after what we know, in order.
        loop {
            let page = Page {
                before: None,
                after: Some(self.last_seq),
                limit: 500,
            };
            let (msgs, more) = self.deps.store.history(&self.room, page).await?;
            for m in msgs {
                let key = (m.user.clone(), m.client_id.clone());
                let mine = pending
                    .iter()
                    .position(|p| (p.row.user.clone(), p.row.client_id.clone()) == key);
                let replies = mine
                    .and_then(|i| pending.remove(i))
                    .map(|p| p.replies)
                    .unwrap_or_default();
                if mine.is_some() {
                    METRICS.buffered_messages.dec();
                }
                self.publish_committed(m, replies, false).await;
            }
            if !more {
                break;
            }
        }
        // 2. Resends of messages older than the dedup window.
        let keys: Vec<(UserId, String)> = pending
            .iter()
            .map(|p| (p.row.user.clone(), p.row.client_id.clone()))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        for (user, cid, seq, id) in self.deps.store.find_client_ids(&self.room, &keys).await? {
            if let Some(i) = pending
                .iter()
                .position(|p| p.row.user == user && p.row.client_id == cid)
            {
                let p = pending.remove(i).expect("index from position");
                METRICS.buffered_messages.dec();
                METRICS.duplicates.inc();
                let head = ReplyHead::Ack {
                    seq,
                    id: id.clone(),
                    duplicate: true,
                };
                for to in p.replies {
                    self.reply(Some(to), &head, &[]).await;
                }
                self.remember(user, cid, seq, id);
            }
        }
        Ok(())
    }

    fn remember(&mut self, user: UserId, cid: String, seq: u64, id: String) {
        let key = (user, cid);
        if self.dedup.insert(key.clone(), (seq, id)).is_none() {
            self.dedup_order.push_back(key);
        }
        while self.dedup_order.len() > self.deps.config.dedup_window {
            if let Some(old) = self.dedup_order.pop_front() {
                self.dedup.remove(&old);
            }
        }
    }

    fn push_recent(&mut self, seq: u64, frame: Bytes) {
        if self.recent.back().is_some_and(|(s, _)| *s >= seq) {
            return;
        }
        if self.recent.back().is_some_and(|(s, _)| *s + 1 != seq) {
            // Keep the ring contiguous so coverage checks stay simple.
            self.recent.clear();
        }
        self.recent.push_back((seq, frame));
        while self.recent.len() > self.deps.config.recent {
            self.recent.pop_front();
        }
    }

    /// Frames with `after < seq < before` from the ring, oldest first, when
    /// the ring covers the whole range.
    fn ring_range(&self, after: u64, before: u64) -> Option<Vec<Bytes>> {
        if before <= after + 1 {
            return Some(Vec::new());
        }
        let first = self.recent.front()?.0;
        if after + 1 < first {
            return None;
        }
        let start = (after + 1 - first) as usize;
        let end = ((before - first) as usize).min(self.recent.len());
        Some(
            self.recent
                .range(start..end.max(start))
                .map(|(_, f)| f.clone())
                .collect(),
        )
    }

    async fn on_join(
        &mut self,
        user: UserId,
        gateway: NodeId,
        conn: u64,
        since: Option<u64>,
        quiet: bool,
        reply: Option<Reply>,
    ) {
        if self.shards > 1 {
            // Members of a split room register at their shard.
            let head = self.sharded();
            self.reply(reply, &head, &[]).await;
            return;
        }
        if self.members.insert((gateway, conn), user.clone()).is_none() {
            METRICS.members.inc();
            let n = self.user_conns.entry(user.clone()).or_insert(0);
            *n += 1;
            if *n == 1 && !quiet {
                self.presence(user, PresenceState::Join).await;
            }
        }
        let members = self.present();
        let mark = self.presence_mark();
        self.answer_join(reply, since, quiet, members, Some(mark))
            .await;
        if self.user_conns.len() > self.deps.config.shard_threshold {
            let want = shards_for(self.user_conns.len(), self.deps.config.shard_threshold);
            self.split(want).await;
        }
    }

    /// Users present: the roster's, or in a split room the shards' sum.
    /// The answer to a member request that belongs at a member shard.
    fn sharded(&self) -> ReplyHead {
        ReplyHead::Sharded {
            shards: self.shards,
        }
    }

    fn present(&self) -> u64 {
        if self.shards > 1 {
            self.shard_counts.values().sum()
        } else {
            self.user_conns.len() as u64
        }
    }

    /// Answers a join (or a shard's backlog request): `joined` with the
    /// room's `last_seq` and `members` (as of presence change `presence`),
    /// and the backlog after `since`.
    async fn answer_join(
        &mut self,
        reply: Option<Reply>,
        since: Option<u64>,
        quiet: bool,
        members: u64,
        presence: Option<PresenceMark>,
    ) {
        let last = self.last_seq;
        if quiet {
            let head = ReplyHead::Joined {
                last_seq: last,
                members,
                complete: true,
                presence,
            };
            self.reply(reply, &head, &[]).await;
            return;
        }
        let (after, limit) = match since {
            Some(s) => (s.min(last), BACKLOG_PAGE),
            None => (
                last.saturating_sub(u64::from(DEFAULT_BACKLOG)),
                DEFAULT_BACKLOG,
            ),
        };
        let before = (after + u64::from(limit)).min(last) + 1;
        if let Some(frames) = self.ring_range(after, before) {
            let (frames, complete) = cap_frames(frames, before - 1 == last);
            let head = ReplyHead::Joined {
                last_seq: last,
                members,
                complete,
                presence,
            };
            self.reply(reply, &head, &frames).await;
            return;
        }
        let page = Page {
            before: Some(before),
            after: Some(after),
            limit,
        };
        self.read_from_db(reply, page, move |frames, _| {
            let (frames, complete) = cap_frames(frames, before - 1 == last);
            (
                ReplyHead::Joined {
                    last_seq: last,
                    members,
                    complete,
                    presence,
                },
                frames,
            )
        });
    }

    /// Splits the room's members over `shards` member shards (or more of
    /// them): records the count under the lease, hands the roster over
    /// (gateways re-register their members at the shards when they hear
    /// the count) and tells every gateway. Sequencing is untouched: sends
    /// keep flowing, direct or through shards, into the same buffer.
    async fn split(&mut self, shards: u32) {
        if shards <= self.shards {
            return;
        }
        let started = std::time::Instant::now();
        match self
            .deps
            .store
            .set_shards(&self.room, &self.deps.node_id, self.epoch, shards)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(room = %self.room, "split fenced: another node owns the room");
                return;
            }
            Err(e) => {
                // The next join or count report tries again.
                tracing::warn!(room = %self.room, error = %e, "cannot record the split; retrying later");
                return;
            }
        }
        let before = self.shards;
        if before == 1 {
            // Until the shards report, count the roster by shard.
            self.shard_counts.clear();
            for user in self.user_conns.keys() {
                *self
                    .shard_counts
                    .entry(chat_protocol::shard::user_shard(user, shards))
                    .or_insert(0) += 1;
            }
            METRICS.members.sub(self.members.len() as i64);
            self.members.clear();
            self.user_conns.clear();
            METRICS.sharded_rooms.inc();
        }
        // After a regrowth the old counts stand until each shard, told the
        // new count by the gateways' re-registrations, reports again.
        self.shards = shards;
        self.split_at = Some(Instant::now());
        self.regrow_at = None;
        METRICS.splits.inc();
        tracing::info!(room = %self.room, from = before, to = shards, members = self.present(), "room split into member shards");
        let event = Event::Shards { count: shards }.encode();
        if let Err(e) = self
            .deps
            .bus
            .publish(self.events_subject.clone(), event)
            .await
        {
            // Gateways also learn it from `sharded` answers.
            tracing::warn!(room = %self.room, error = %e, "split announcement lost");
        }
        METRICS
            .split_seconds
            .observe(started.elapsed().as_secs_f64());
        self.schedule_announce();
    }

    /// A member shard's count: updates the total, grows the shard count
    /// when a shard is past the threshold.
    async fn on_count(&mut self, shard: u32, shards: u32, members: u64) {
        if shards != self.shards || shard >= self.shards {
            return; // counted under an older split; a fresh report follows
        }
        METRICS.shard_members.observe(members as f64);
        self.shard_counts.insert(shard, members);
        self.schedule_announce();
        let threshold = self.deps.config.shard_threshold;
        // Shards settle after a split (members re-register, counts are
        // reported anew) before the next one is considered.
        let settled = self.split_at.is_none_or(|t| t.elapsed() >= SPLIT_SETTLE);
        if members as usize > threshold {
            if settled {
                self.regrow().await;
            } else if self.regrow_at.is_none() {
                // Shards report only on change (and every 5 s): look again
                // once the split has settled rather than at the next report.
                self.regrow_at = self.split_at.map(|t| t + SPLIT_SETTLE);
            }
        }
    }

    /// Splits into more shards: enough for everyone present at about half
    /// the threshold each, and at least one more than now.
    async fn regrow(&mut self) {
        let threshold = self.deps.config.shard_threshold;
        if !self.shard_counts.values().any(|&n| n as usize > threshold) {
            return;
        }
        let want = shards_for(self.present() as usize, threshold).max(self.shards + 1);
        self.split(want).await;
    }

    /// Arms the (single) announcement of a split room's member count.
    fn schedule_announce(&mut self) {
        if self.shards > 1 && self.announce_at.is_none() && self.present() != self.announced {
            self.announce_at = Some(Instant::now() + ANNOUNCE_EVERY);
        }
    }

    /// Tells every member of a split room how many users are present.
    async fn announce(&mut self) {
        let count = self.present();
        if self.shards <= 1 || count == self.announced {
            return;
        }
        self.announced = count;
        let frame = ServerFrame::Members {
            room: self.room.clone(),
            count,
            users: None,
        }
        .to_bytes();
        if let Err(e) = self
            .deps
            .bus
            .publish(self.events_subject.clone(), Event::ToAll { frame }.encode())
            .await
        {
            tracing::warn!(room = %self.room, error = %e, "member count announcement lost");
        }
    }

    async fn on_leave(&mut self, gateway: &NodeId, conn: u64, user: &UserId) {
        if self.members.remove(&(gateway.clone(), conn)).is_some() {
            METRICS.members.dec();
            if let Some(n) = self.user_conns.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    self.user_conns.remove(user);
                    self.presence(user.clone(), PresenceState::Leave).await;
                }
            }
        }
    }

    /// The mark of the last presence change announced: what a `joined`
    /// answered now counts.
    fn presence_mark(&self) -> PresenceMark {
        PresenceMark {
            epoch: self.epoch,
            n: self.presence_n,
        }
    }

    async fn presence(&mut self, user: UserId, state: PresenceState) {
        let frame = ServerFrame::Presence {
            room: self.room.clone(),
            user: user.clone(),
            state,
        }
        .to_bytes();
        // Counted whether or not the event carries it, so a mark is never
        // reused within the epoch.
        self.presence_n += 1;
        let mark = self
            .deps
            .presence_marks
            .load(Ordering::Relaxed)
            .then(|| self.presence_mark());
        // Presence is best effort (not sequenced); a lost one is corrected
        // by the next join's member count.
        let _ = self
            .deps
            .bus
            .publish(
                self.events_subject.clone(),
                Event::Presence { user, frame, mark }.encode(),
            )
            .await;
    }

    async fn on_history(&mut self, page: Page, reply: Option<Reply>) {
        let last = self.last_seq;
        let before = page.before.map_or(last + 1, |b| b.min(last + 1));
        let (after, forward) = match page.after {
            Some(a) => (a, true),
            None => (before.saturating_sub(u64::from(page.limit) + 1), false),
        };
        let end = if forward {
            (after + u64::from(page.limit) + 1).min(before)
        } else {
            before
        };
        // Seqs start at 1 and have no gaps, so whether more exist follows
        // from the bounds alone.
        let has_more = if forward { end < before } else { after > 0 };
        if let Some(frames) = self.ring_range(after, end) {
            let (frames, capped) = cap_frames_dir(frames, forward);
            let head = ReplyHead::History {
                has_more: has_more || capped,
            };
            self.reply(reply, &head, &frames).await;
            return;
        }
        let db_page = Page {
            before: Some(before),
            after: page.after,
            limit: page.limit,
        };
        self.read_from_db(reply, db_page, move |frames, more| {
            let (frames, capped) = cap_frames_dir(frames, forward);
            (
                ReplyHead::History {
                    has_more: more || capped,
                },
                frames,
            )
        });
    }

    /// Answers from the database in a separate task so the room keeps
    /// serving; bounded by the node's read permits.
    fn read_from_db<F>(&self, reply: Option<Reply>, page: Page, build: F)
    where
        F: FnOnce(Vec<Bytes>, bool) -> (ReplyHead, Vec<Bytes>) + Send + 'static,
    {
        let Some(to) = reply else { return };
        let bus = self.deps.bus.clone();
        let store = self.deps.store.clone();
        let room = self.room.clone();
        let Ok(permit) = self.deps.reads.clone().try_acquire_owned() else {
            let head = ReplyHead::Error {
                code: ErrorCode::Overloaded,
                message: "too many history reads; retry shortly".into(),
                retry_after_ms: Some(200),
            };
            tokio::spawn(async move {
                // Best effort: the gateway times out and retries otherwise.
                let _ = to.send(&bus, &head, &[]).await;
            });
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let (head, frames) = match store.history(&room, page).await {
                Ok((msgs, more)) => {
                    let frames = msgs
                        .into_iter()
                        .map(|m| ServerFrame::Message(m).to_bytes())
                        .collect();
                    build(frames, more)
                }
                Err(e) => {
                    tracing::warn!(%room, error = %e, "history read failed");
                    let head = ReplyHead::Error {
                        code: ErrorCode::Unavailable,
                        message: "history is unavailable; retry shortly".into(),
                        retry_after_ms: Some(1000),
                    };
                    (head, Vec::new())
                }
            };
            // Best effort: the gateway times out and retries otherwise.
            let _ = to.send(&bus, &head, &frames).await;
        });
    }
}

/// Keeps the oldest frames that fit in one reply; `complete` stays true only
/// when nothing was cut.
fn cap_frames(mut frames: Vec<Bytes>, complete: bool) -> (Vec<Bytes>, bool) {
    let mut total = 256;
    for (i, f) in frames.iter().enumerate() {
        total += f.len() + 1;
        if total > MAX_REPLY_BYTES {
            frames.truncate(i);
            return (frames, false);
        }
    }
    (frames, complete)
}

/// Caps a history page in bytes, keeping the side nearest the cursor: the
/// oldest for forward pages, the newest for backward ones. Says whether it
/// cut anything.
fn cap_frames_dir(mut frames: Vec<Bytes>, forward: bool) -> (Vec<Bytes>, bool) {
    let mut total = 256;
    let n = frames.len();
    let mut keep = 0;
    for i in 0..n {
        let f = if forward {
            &frames[i]
        } else {
            &frames[n - 1 - i]
        };
        total += f.len() + 1;
        if total > MAX_REPLY_BYTES {
            break;
        }
        keep += 1;
    }
    if keep == n {
        return (frames, false);
    }
    if forward {
        frames.truncate(keep);
    } else {
        frames.drain(..n - keep);
    }
    (frames, true)
}

#[cfg(test)]
mod tests;
