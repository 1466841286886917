//! Delivery under faults: a workload of simulated users that behave like a
//! correct client (docs/PROTOCOL.md), and a checker that holds everything
//! they saw against the database.
//!
//! The promise under test: an `ack` means committed, and no acknowledged
//! message is ever lost, duplicated, reordered, or given a seq anyone saw
//! for another message, whatever fault hits the cluster meanwhile.
//!
//! # Layout
//! - [`WorkloadConfig`] and [`Workload`]: N users in M rooms, each sending
//!   at a steady rate, resending every unacked message with its original
//!   `client_id` after retryable errors and reconnects, reconnecting with
//!   backoff (to the next gateway when one is gone) and resuming each room
//!   with `since`. [`Workload::drain`] stops new messages, waits until every
//!   message is acked and every member has caught up, and returns the
//!   [`Records`].
//! - [`check`]: compares the [`Records`] with the `messages` table and
//!   returns a [`FaultReport`] with the counts and every violation found;
//!   [`FaultReport::finish`] prints the one-line summary
//!   (`fault figures: scenario=…`) and fails on any violation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures::stream::SplitSink;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::{random_u64, wait_for, Ws};

/// How long a send may stay unanswered on a live connection before the
/// client sends it again (the gateway itself retries an owner for up to
/// ~40 s; a resend is always safe, it is deduplicated).
const RESEND_AFTER: Duration = Duration::from_secs(20);
/// How long a new connection may take to answer every `join`.
const JOIN_DEADLINE: Duration = Duration::from_secs(20);
/// How long the WebSocket handshake plus `hello` may take.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// First reconnect delay; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Retry delay when a retryable error carries no `retry_after_ms`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_millis(250);
/// How long a user task may take to close its socket at the end.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// Violations quoted in a failure message (the counts are always exact).
const MAX_QUOTED: usize = 25;

/// What the workload looks like.
///
/// Why: scenarios differ in how hard they push (the repeated failover run
/// is long, CI runs are short); the defaults are the issue's 12 users in 4
/// rooms at 20 messages/s each.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Prefix of user and room names (`<name>-u3`, `<name>-r1-room`), so two
    /// workloads on one cluster never share a room. `[A-Za-z0-9_-]` only.
    pub name: String,
    /// Simulated users, each with one connection.
    pub users: usize,
    /// Rooms the users are spread over.
    pub rooms: usize,
    /// Rooms each user joins (user `u` joins rooms `u, u+1, …` mod
    /// `rooms`), so every room has members on every gateway.
    pub rooms_per_user: usize,
    /// New messages per second per user while sending.
    pub rate_per_sec: f64,
    /// Most sends a user has on the wire unanswered; the rest wait in its
    /// outbox (the gateway stops reading a socket at 256).
    pub window: usize,
}

impl WorkloadConfig {
    /// The default workload under the given name prefix.
    pub fn new(name: &str) -> Self {
        WorkloadConfig {
            name: name.to_string(),
            users: 12,
            rooms: 4,
            rooms_per_user: 2,
            rate_per_sec: 20.0,
            window: 64,
        }
    }

    /// Room `j`'s name, `<name>-r<j>-room`. The suffix matters: the
    /// placement ring hashes names with plain FNV-1a, which puts names that
    /// differ only in their last character (`…-r0`, `…-r1`) within a
    /// thousandth of the ring of each other, i.e. on one node; bytes after
    /// the index spread the rooms over the nodes as real names would.
    pub fn room(&self, j: usize) -> String {
        format!("{}-r{j}-room", self.name)
    }

    /// Every room's name.
    pub fn room_names(&self) -> Vec<String> {
        (0..self.rooms).map(|j| self.room(j)).collect()
    }

    /// User `u`'s name.
    pub fn user(&self, u: usize) -> String {
        format!("{}-u{u}", self.name)
    }

    /// The rooms user `u` joins.
    pub fn rooms_of(&self, u: usize) -> Vec<String> {
        let n = self.rooms_per_user.clamp(1, self.rooms.max(1));
        (0..n).map(|k| self.room((u + k) % self.rooms)).collect()
    }
}

/// A message a user created (and will resend until acked).
#[derive(Debug, Clone)]
pub struct Created {
    /// The sender.
    pub user: String,
    /// The room it was sent to.
    pub room: String,
    /// Its `client_id` (unique per user).
    pub client_id: String,
    /// Its text, to compare with what was stored and delivered.
    pub text: String,
    /// How many times it went on the wire.
    pub sends: u32,
}

/// One `ack` frame a user received.
#[derive(Debug, Clone)]
pub struct AckEvent {
    /// The sender (who got the ack).
    pub user: String,
    /// The room.
    pub room: String,
    /// The acked `client_id`.
    pub client_id: String,
    /// The seq the ack gave.
    pub seq: u64,
    /// When it arrived.
    pub at: Instant,
    /// When the message last went on the wire before this ack, when it was
    /// still unacked; `None` for an ack of an already acked message. Why:
    /// an ack of a send made after a fault proves the room is served again.
    pub sent_at: Option<Instant>,
    /// The user's connection number (1 = first) it arrived on.
    pub conn: u64,
}

/// One `message` frame a user received.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Its seq.
    pub seq: u64,
    /// Its cluster-unique id.
    pub id: String,
    /// Its sender.
    pub user: String,
    /// Its `client_id`.
    pub client_id: String,
    /// Its text.
    pub text: String,
    /// The receiver's connection number it arrived on.
    pub conn: u64,
}

/// Everything the users of a [`Workload`] did and saw.
///
/// Why: the checker needs the complete history (every ack, every delivery
/// in arrival order per user and room) to prove nothing was lost,
/// duplicated or reordered; scenarios use the timestamps for their
/// figures (time to serve again, recovery time).
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// The workload's rooms.
    pub rooms: Vec<String>,
    /// Each user's rooms.
    pub members: BTreeMap<String, Vec<String>>,
    /// Every message created, in creation order per user.
    pub created: Vec<Created>,
    /// Every ack, in arrival order.
    pub acks: Vec<AckEvent>,
    /// Every delivery per (user, room), in arrival order.
    pub deliveries: BTreeMap<(String, String), Vec<Delivery>>,
    /// Highest gap-free seq per (user, room), what a resume sends as
    /// `since`.
    pub contiguous: BTreeMap<(String, String), u64>,
    /// Error frames by code.
    pub errors: BTreeMap<String, u64>,
    /// Connection ends by close code (`1006` when the connection dropped
    /// without a close frame).
    pub closes: BTreeMap<String, u64>,
    /// Reconnects per user (connections after the first).
    pub reconnects: BTreeMap<String, u64>,
    /// Failed connection attempts (refused, 503 from a draining gateway,
    /// timeouts).
    pub connect_failures: u64,
    /// The last failed connection attempt's error, for diagnostics.
    pub last_connect_error: Option<String>,
    /// Presence frames seen (not checked: presence is best effort).
    pub presence_frames: u64,
    /// Things a correct server never does that the users noticed on the
    /// spot (e.g. `joined.last_seq` below a seq already received); each
    /// fails the check.
    pub anomalies: Vec<String>,
    /// What the drain could not reach before its deadline; each fails the
    /// check.
    pub drain_problems: Vec<String>,
}

impl Records {
    /// Acks that prove `room` was served after `t`: of a message that last
    /// went on the wire at or after `t`. Returns the first one's arrival.
    pub fn first_ack_sent_after(&self, room: &str, t: Instant) -> Option<Instant> {
        self.acks
            .iter()
            .filter(|a| a.room == room && a.sent_at.is_some_and(|s| s >= t))
            .map(|a| a.at)
            .min()
    }

    /// Acks that arrived in `[from, to)`.
    pub fn acks_between(&self, from: Instant, to: Instant) -> usize {
        self.acks
            .iter()
            .filter(|a| a.at >= from && a.at < to)
            .count()
    }

    fn anomaly(&mut self, s: String) {
        if self.anomalies.len() < 10_000 {
            self.anomalies.push(s);
        }
    }
}

/// What the users are told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Create new messages at the configured rate.
    Sending,
    /// No new messages; keep resending until everything is acked.
    Draining,
    /// Close the connection and stop.
    Done,
}

/// State shared between the users and the controller.
struct Shared {
    records: Mutex<Records>,
    /// Unacked messages per user.
    pending: Vec<AtomicUsize>,
    /// Whether each user completed its first joins.
    ready: Vec<AtomicBool>,
}

impl Shared {
    fn records(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running workload; see the module docs.
///
/// Why: every fault scenario needs the same traffic of correct clients
/// during the fault, and the same proof afterwards.
pub struct Workload {
    cfg: Arc<WorkloadConfig>,
    shared: Arc<Shared>,
    phase: watch::Sender<Phase>,
    tasks: Vec<JoinHandle<()>>,
    started: Instant,
}

impl fmt::Debug for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workload")
            .field("cfg", &self.cfg)
            .field("phase", &*self.phase.borrow())
            .field("started", &self.started)
            .finish()
    }
}

impl Workload {
    /// Starts every user (user `u` first connects to gateway
    /// `u % gateways.len()`). Must be called inside a Tokio runtime.
    pub fn start(cfg: WorkloadConfig, gateways: Vec<SocketAddr>) -> Workload {
        assert!(
            !gateways.is_empty(),
            "a workload needs at least one gateway"
        );
        assert!(cfg.rate_per_sec > 0.0, "rate_per_sec must be positive");
        let cfg = Arc::new(cfg);
        let mut records = Records {
            rooms: cfg.room_names(),
            ..Records::default()
        };
        for u in 0..cfg.users {
            records.members.insert(cfg.user(u), cfg.rooms_of(u));
        }
        let shared = Arc::new(Shared {
            records: Mutex::new(records),
            pending: (0..cfg.users).map(|_| AtomicUsize::new(0)).collect(),
            ready: (0..cfg.users).map(|_| AtomicBool::new(false)).collect(),
        });
        let (phase, phase_rx) = watch::channel(Phase::Sending);
        let gateways = Arc::new(gateways);
        let tasks = (0..cfg.users)
            .map(|u| {
                let user = User {
                    idx: u,
                    name: cfg.user(u),
                    rooms: cfg.rooms_of(u),
                    gateways: gateways.clone(),
                    cfg: cfg.clone(),
                    shared: shared.clone(),
                    phase: phase_rx.clone(),
                    outbox: BTreeMap::new(),
                    by_cid: HashMap::new(),
                    next_msg: 1,
                    next_room: 0,
                    contiguous: HashMap::new(),
                    conn: 0,
                    gateway: u % gateways.len(),
                    failures: 0,
                };
                tokio::spawn(user.run())
            })
            .collect();
        Workload {
            cfg,
            shared,
            phase,
            tasks,
            started: Instant::now(),
        }
    }

    /// The workload's rooms.
    pub fn rooms(&self) -> Vec<String> {
        self.cfg.room_names()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &WorkloadConfig {
        &self.cfg
    }

    /// Waits until every user has joined its rooms and every room has at
    /// least `acks_per_room` acks, i.e. traffic flows everywhere. Why: a
    /// fault injected before that tests nothing.
    ///
    /// # Errors
    /// On timeout, saying which users or rooms are behind.
    pub async fn wait_flowing(
        &self,
        acks_per_room: usize,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        let rooms = self.rooms();
        wait_for("every user joined and every room acking", deadline, || {
            let not_ready: Vec<String> = (0..self.cfg.users)
                .filter(|&u| !self.shared.ready[u].load(Ordering::SeqCst))
                .map(|u| self.cfg.user(u))
                .collect();
            let r = self.shared.records();
            let slow: Vec<String> = rooms
                .iter()
                .filter(|room| r.acks.iter().filter(|a| &a.room == *room).count() < acks_per_room)
                .cloned()
                .collect();
            let res = if not_ready.is_empty() && slow.is_empty() {
                Ok(Some(()))
            } else {
                Err(anyhow!(
                    "users not joined yet: {not_ready:?}; rooms with fewer than {acks_per_room} acks: {slow:?}; \
                     errors so far: {:?}; closes: {:?}; failed connects: {} (last: {:?}); last anomalies: {:?}",
                    r.errors,
                    r.closes,
                    r.connect_failures,
                    r.last_connect_error,
                    &r.anomalies[r.anomalies.len().saturating_sub(3)..]
                ))
            };
            async move { res }
        })
        .await
    }

    /// Waits until each of `rooms` has acked a message sent at or after
    /// `t` (so its owner serves it), and returns for each room how long
    /// after `t` that first ack arrived.
    ///
    /// # Errors
    /// On timeout, naming the rooms not served.
    pub async fn wait_served_after(
        &self,
        t: Instant,
        rooms: &[String],
        deadline: Duration,
    ) -> anyhow::Result<Vec<(String, Duration)>> {
        wait_for("every room served again", deadline, || {
            let r = self.shared.records();
            let mut out = Vec::new();
            let mut missing = Vec::new();
            for room in rooms {
                match r.first_ack_sent_after(room, t) {
                    Some(at) => out.push((room.clone(), at - t)),
                    None => missing.push(room.clone()),
                }
            }
            let res = if missing.is_empty() {
                Ok(Some(out))
            } else {
                Err(anyhow!(
                    "rooms with no ack of a message sent after the fault: {missing:?}; errors so far: {:?}",
                    r.errors
                ))
            };
            async move { res }
        })
        .await
    }

    /// Waits until every user has an ack of a message it sent at or after
    /// `t` and returns how long after `t` the last of them came. Why: after
    /// a gateway dies, its users must reconnect elsewhere and resume
    /// sending; rooms alone would look served by the other users.
    ///
    /// # Errors
    /// On timeout, naming the users still waiting.
    pub async fn wait_every_user_acked_after(
        &self,
        t: Instant,
        deadline: Duration,
    ) -> anyhow::Result<Duration> {
        let users: Vec<String> = (0..self.cfg.users).map(|u| self.cfg.user(u)).collect();
        wait_for("every user acked again", deadline, || {
            let r = self.shared.records();
            let mut worst = Duration::ZERO;
            let mut missing = Vec::new();
            for u in &users {
                let first = r
                    .acks
                    .iter()
                    .filter(|a| &a.user == u && a.sent_at.is_some_and(|s| s >= t))
                    .map(|a| a.at)
                    .min();
                match first {
                    Some(at) => worst = worst.max(at - t),
                    None => missing.push(u.clone()),
                }
            }
            let res = if missing.is_empty() {
                Ok(Some(worst))
            } else {
                Err(anyhow!(
                    "users with no ack of a message sent after the fault: {missing:?}; closes so far: {:?}",
                    r.closes
                ))
            };
            async move { res }
        })
        .await
    }

    /// Waits until any ack arrives at or after `t` and returns how long
    /// after `t` it came. Why: recovery time after an outage.
    ///
    /// # Errors
    /// On timeout.
    pub async fn wait_first_ack_after(
        &self,
        t: Instant,
        deadline: Duration,
    ) -> anyhow::Result<Duration> {
        wait_for("a new ack", deadline, || {
            let first = self
                .shared
                .records()
                .acks
                .iter()
                .filter(|a| a.at >= t)
                .map(|a| a.at)
                .min();
            let res: anyhow::Result<Option<Duration>> = Ok(first.map(|at| at - t));
            async move { res }
        })
        .await
    }

    /// Acks received so far.
    pub fn ack_count(&self) -> usize {
        self.shared.records().acks.len()
    }

    /// Acks that arrived in `[from, to)`.
    pub fn acks_between(&self, from: Instant, to: Instant) -> usize {
        self.shared.records().acks_between(from, to)
    }

    /// Stops creating messages, then waits (within `deadline` overall)
    /// until every created message is acked and every member of every room
    /// has received every seq up to the room's final max in the database
    /// (`pool`), then closes every connection and returns what the users
    /// recorded. What it cannot reach in time is put into
    /// [`Records::drain_problems`], so the checker still runs and fails
    /// with the whole picture.
    pub async fn drain(mut self, pool: &sqlx::PgPool, deadline: Duration) -> Records {
        let end = Instant::now() + deadline;
        self.phase.send_replace(Phase::Draining);
        let mut problems = Vec::new();

        // 1. Every message acked.
        let acked = wait_for(
            "every message acked",
            end.saturating_duration_since(Instant::now()),
            || {
                let pending: usize = self
                    .shared
                    .pending
                    .iter()
                    .map(|p| p.load(Ordering::SeqCst))
                    .sum();
                let res = if pending == 0 {
                    Ok(Some(()))
                } else {
                    Err(anyhow!("{pending} messages still unacked"))
                };
                async move { res }
            },
        )
        .await;
        if let Err(e) = acked {
            let per_user: Vec<String> = (0..self.cfg.users)
                .filter_map(|u| {
                    let n = self.shared.pending[u].load(Ordering::SeqCst);
                    (n > 0).then(|| format!("{}: {n}", self.cfg.user(u)))
                })
                .collect();
            problems.push(format!("drain: {e:#} (per user: {per_user:?})"));
        }

        // 2. The final max seq of each room, from the database.
        let rooms = self.rooms();
        let maxima = wait_for(
            "the rooms' max seq",
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_secs(5)),
            || {
                let rooms = rooms.clone();
                async move {
                    let rows: Vec<(String, i64)> = sqlx::query_as(
                        "SELECT room, max(seq) FROM messages WHERE room = ANY($1) GROUP BY room",
                    )
                    .bind(&rooms)
                    .fetch_all(pool)
                    .await?;
                    Ok(Some(rows.into_iter().collect::<HashMap<String, i64>>()))
                }
            },
        )
        .await;

        // 3. Every member caught up to it.
        match maxima {
            Err(e) => problems.push(format!("drain: cannot read the rooms' max seq: {e:#}")),
            Ok(maxima) => {
                let members = self.shared.records().members.clone();
                let caught = wait_for(
                    "every member caught up",
                    end.saturating_duration_since(Instant::now()),
                    || {
                        let r = self.shared.records();
                        let mut behind = Vec::new();
                        for (user, rooms) in &members {
                            for room in rooms {
                                let max = maxima.get(room).copied().unwrap_or(0).max(0) as u64;
                                let have = r
                                    .contiguous
                                    .get(&(user.clone(), room.clone()))
                                    .copied()
                                    .unwrap_or(0);
                                if have < max {
                                    behind.push(format!("{user} in {room} at {have} of {max}"));
                                }
                            }
                        }
                        let res = if behind.is_empty() {
                            Ok(Some(()))
                        } else {
                            Err(anyhow!("members behind: {behind:?}"))
                        };
                        async move { res }
                    },
                )
                .await;
                if let Err(e) = caught {
                    problems.push(format!("drain: {e:#}"));
                }
            }
        }

        // 4. Close everything.
        self.phase.send_replace(Phase::Done);
        for task in self.tasks.drain(..) {
            let abort = task.abort_handle();
            if tokio::time::timeout(STOP_DEADLINE, task).await.is_err() {
                abort.abort();
                problems.push("drain: a user task did not stop in time".to_string());
            }
        }
        let mut records = std::mem::take(&mut *self.shared.records());
        records.drain_problems.extend(problems);
        records
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// One simulated user
// ---------------------------------------------------------------------------

/// Where an unacked message stands.
#[derive(Debug, Clone, Copy)]
enum OutState {
    /// To send on the current connection.
    Queued,
    /// Sent on the current connection at this time, no answer yet.
    InFlight(Instant),
    /// A retryable error asked to wait until then.
    RetryAt(Instant),
}

/// An unacked message in a user's outbox.
#[derive(Debug)]
struct Outgoing {
    room: String,
    client_id: String,
    text: String,
    state: OutState,
    last_sent: Option<Instant>,
    /// Index in [`Records::created`], to count sends.
    created: usize,
}

/// How a connection ended.
enum End {
    /// The workload is over.
    Done,
    /// Reconnect (to the next gateway when asked).
    Reconnect { next_gateway: bool },
}

type WsSink = SplitSink<Ws, Message>;

/// A simulated user: one connection at a time, an outbox of unacked
/// messages, and per room the highest seq received without a gap.
struct User {
    idx: usize,
    name: String,
    rooms: Vec<String>,
    gateways: Arc<Vec<SocketAddr>>,
    cfg: Arc<WorkloadConfig>,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
    outbox: BTreeMap<u64, Outgoing>,
    by_cid: HashMap<String, u64>,
    next_msg: u64,
    next_room: usize,
    contiguous: HashMap<String, u64>,
    conn: u64,
    gateway: usize,
    failures: u32,
}

/// A short jittered pause of about `d` (between half and all of it).
fn jittered(d: Duration) -> Duration {
    let frac = 0.5 + (random_u64() % 1000) as f64 / 2000.0;
    d.mul_f64(frac)
}

/// Connects and reads `hello`.
async fn connect(url: &str) -> anyhow::Result<Ws> {
    let (mut ws, _) = tokio::time::timeout(CONNECT_DEADLINE, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| anyhow!("no handshake within {CONNECT_DEADLINE:?}"))??;
    let first = tokio::time::timeout(CONNECT_DEADLINE, ws.next())
        .await
        .map_err(|_| anyhow!("no hello within {CONNECT_DEADLINE:?}"))?;
    match first {
        Some(Ok(Message::Text(t))) => {
            let v: Value = serde_json::from_str(t.as_str())?;
            if v["type"] != "hello" {
                bail!("first frame is not hello: {v}");
            }
            Ok(ws)
        }
        other => bail!("no hello: {other:?}"),
    }
}

impl User {
    async fn run(mut self) {
        loop {
            if *self.phase.borrow() == Phase::Done {
                return;
            }
            let addr = self.gateways[self.gateway];
            let url = format!("ws://{addr}/ws?user={}", self.name);
            let end = match connect(&url).await {
                Err(e) => {
                    let mut r = self.shared.records();
                    r.connect_failures += 1;
                    r.last_connect_error = Some(format!("{url}: {e:#}"));
                    drop(r);
                    End::Reconnect { next_gateway: true }
                }
                Ok(ws) => {
                    self.conn += 1;
                    if self.conn > 1 {
                        *self
                            .shared
                            .records()
                            .reconnects
                            .entry(self.name.clone())
                            .or_default() += 1;
                    }
                    self.session(ws).await
                }
            };
            match end {
                End::Done => return,
                End::Reconnect { next_gateway } => {
                    if next_gateway {
                        self.gateway = (self.gateway + 1) % self.gateways.len();
                    }
                    let exp = self.failures.min(6);
                    self.failures += 1;
                    let delay = jittered((FIRST_BACKOFF * 2u32.pow(exp)).min(MAX_BACKOFF));
                    let mut phase = self.phase.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = phase.wait_for(|p| *p == Phase::Done) => return,
                    }
                }
            }
        }
    }

    /// One connection: join every room (resuming with `since`), resend the
    /// outbox, then send, receive and retry until it ends.
    async fn session(&mut self, ws: Ws) -> End {
        let (mut sink, mut stream) = ws.split();
        // Whatever was on the wire of the old connection is unanswered.
        for m in self.outbox.values_mut() {
            if matches!(m.state, OutState::InFlight(_)) {
                m.state = OutState::Queued;
            }
        }
        for room in self.rooms.clone() {
            let since = self.contiguous.get(&room).copied().unwrap_or(0);
            let frame = json!({"type": "join", "room": room, "since": since});
            if sink.send(Message::text(frame.to_string())).await.is_err() {
                self.note_close("1006");
                return End::Reconnect {
                    next_gateway: false,
                };
            }
        }
        let mut joining: HashSet<String> = self.rooms.iter().cloned().collect();
        let join_end = Instant::now() + JOIN_DEADLINE;
        while !joining.is_empty() {
            let next = match tokio::time::timeout_at(join_end, stream.next()).await {
                Ok(n) => n,
                Err(_) => {
                    self.shared.records().anomaly(format!(
                        "{} conn {}: no `joined` for {joining:?} within {JOIN_DEADLINE:?}",
                        self.name, self.conn
                    ));
                    return End::Reconnect { next_gateway: true };
                }
            };
            if let Some(end) = self.on_ws(next, &mut joining) {
                return end;
            }
        }
        self.failures = 0;
        self.shared.ready[self.idx].store(true, Ordering::SeqCst);

        let period = Duration::from_secs_f64(1.0 / self.cfg.rate_per_sec);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut phase = self.phase.clone();
        loop {
            if self.pump(&mut sink).await.is_err() {
                self.note_close("1006");
                return End::Reconnect {
                    next_gateway: false,
                };
            }
            let current = *phase.borrow_and_update();
            if current == Phase::Done {
                // Best effort: the server cleans up either way.
                let _ = sink.send(Message::Close(None)).await;
                return End::Done;
            }
            let wake = self.next_wake();
            tokio::select! {
                next = stream.next() => {
                    if let Some(end) = self.on_ws(next, &mut joining) {
                        return end;
                    }
                }
                _ = tick.tick(), if current == Phase::Sending => self.create_message(),
                _ = tokio::time::sleep_until(wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if wake.is_some() => {}
                _ = phase.changed() => {}
            }
        }
    }

    /// The earliest time a retry or a resend of a silent send is due.
    fn next_wake(&self) -> Option<Instant> {
        self.outbox
            .values()
            .filter_map(|m| match m.state {
                OutState::Queued => None,
                OutState::InFlight(at) => Some(at + RESEND_AFTER),
                OutState::RetryAt(t) => Some(t),
            })
            .min()
    }

    /// Sends due messages, oldest first, keeping at most `window` on the
    /// wire unanswered.
    async fn pump(&mut self, sink: &mut WsSink) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut on_wire = self
            .outbox
            .values()
            .filter(|m| matches!(m.state, OutState::InFlight(at) if now < at + RESEND_AFTER))
            .count();
        let mut due = Vec::new();
        for (k, m) in &self.outbox {
            if on_wire >= self.cfg.window {
                break;
            }
            let ready = match m.state {
                OutState::Queued => true,
                OutState::RetryAt(t) => t <= now,
                OutState::InFlight(at) => now >= at + RESEND_AFTER,
            };
            if ready {
                due.push(*k);
                on_wire += 1;
            }
        }
        if due.is_empty() {
            return Ok(());
        }
        let mut created = Vec::with_capacity(due.len());
        for k in due {
            let Some(m) = self.outbox.get_mut(&k) else {
                continue;
            };
            let frame =
                json!({"type": "send", "room": m.room, "text": m.text, "client_id": m.client_id});
            sink.feed(Message::text(frame.to_string())).await?;
            m.state = OutState::InFlight(now);
            m.last_sent = Some(now);
            created.push(m.created);
        }
        sink.flush().await?;
        let mut r = self.shared.records();
        for i in created {
            r.created[i].sends += 1;
        }
        Ok(())
    }

    fn create_message(&mut self) {
        let n = self.next_msg;
        self.next_msg += 1;
        let room = self.rooms[self.next_room % self.rooms.len()].clone();
        self.next_room += 1;
        let client_id = format!("{}.{n}", self.name);
        // Quotes, a backslash, a newline and non-ASCII: stored and
        // delivered byte-identical, and the bus's line framing must cope.
        let text = format!("{} #{n} → {room} \"q\" \\ ✓\nline 2", self.name);
        let created = {
            let mut r = self.shared.records();
            r.created.push(Created {
                user: self.name.clone(),
                room: room.clone(),
                client_id: client_id.clone(),
                text: text.clone(),
                sends: 0,
            });
            r.created.len() - 1
        };
        self.by_cid.insert(client_id.clone(), n);
        self.outbox.insert(
            n,
            Outgoing {
                room,
                client_id,
                text,
                state: OutState::Queued,
                last_sent: None,
                created,
            },
        );
        self.shared.pending[self.idx].fetch_add(1, Ordering::SeqCst);
    }

    fn note_close(&self, code: &str) {
        *self
            .shared
            .records()
            .closes
            .entry(code.to_string())
            .or_default() += 1;
    }

    /// Handles what the socket yielded; `Some` ends the connection.
    fn on_ws(
        &mut self,
        next: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
        joining: &mut HashSet<String>,
    ) -> Option<End> {
        match next {
            None | Some(Err(_)) => {
                self.note_close("1006");
                Some(End::Reconnect {
                    next_gateway: false,
                })
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                self.note_close(&code.to_string());
                // 1012: this gateway is draining; go elsewhere.
                Some(End::Reconnect {
                    next_gateway: code == 1012,
                })
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<Value>(t.as_str()) {
                Ok(v) => self.on_frame(v, joining),
                Err(e) => {
                    self.shared.records().anomaly(format!(
                        "{}: frame is not JSON ({e}): {}",
                        self.name,
                        t.as_str()
                    ));
                    None
                }
            },
            Some(Ok(Message::Binary(b))) => {
                self.shared.records().anomaly(format!(
                    "{}: unexpected binary frame of {} bytes",
                    self.name,
                    b.len()
                ));
                None
            }
            Some(Ok(_)) => None,
        }
    }

    fn on_frame(&mut self, v: Value, joining: &mut HashSet<String>) -> Option<End> {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        match v["type"].as_str().unwrap_or_default() {
            "message" => {
                let room = s("room");
                let Some(seq) = v["seq"].as_u64() else {
                    self.shared
                        .records()
                        .anomaly(format!("{}: message without seq: {v}", self.name));
                    return None;
                };
                let c = self.contiguous.entry(room.clone()).or_insert(0);
                if seq > *c {
                    // A gap is recorded (the checker reports it) and not
                    // re-requested: a correct server never leaves one.
                    *c = seq;
                }
                let c = *c;
                let mut r = self.shared.records();
                r.contiguous.insert((self.name.clone(), room.clone()), c);
                r.deliveries
                    .entry((self.name.clone(), room))
                    .or_default()
                    .push(Delivery {
                        seq,
                        id: s("id"),
                        user: s("user"),
                        client_id: s("client_id"),
                        text: s("text"),
                        conn: self.conn,
                    });
                None
            }
            "ack" => {
                let room = s("room");
                let client_id = s("client_id");
                let Some(seq) = v["seq"].as_u64() else {
                    self.shared
                        .records()
                        .anomaly(format!("{}: ack without seq: {v}", self.name));
                    return None;
                };
                let key = self.by_cid.remove(&client_id);
                let sent_at = key
                    .and_then(|k| self.outbox.remove(&k))
                    .and_then(|m| m.last_sent);
                if key.is_some() {
                    self.shared.pending[self.idx].fetch_sub(1, Ordering::SeqCst);
                }
                self.shared.records().acks.push(AckEvent {
                    user: self.name.clone(),
                    room,
                    client_id,
                    seq,
                    at: Instant::now(),
                    sent_at,
                    conn: self.conn,
                });
                None
            }
            "error" => self.on_error(&v, joining),
            "joined" => {
                let room = s("room");
                joining.remove(&room);
                let seen = self.contiguous.get(&room).copied().unwrap_or(0);
                let last = v["last_seq"].as_u64().unwrap_or(0);
                if last < seen {
                    self.shared.records().anomaly(format!(
                        "{} conn {}: joined {room} with last_seq {last}, below seq {seen} already received",
                        self.name, self.conn
                    ));
                }
                None
            }
            "presence" => {
                self.shared.records().presence_frames += 1;
                None
            }
            "pong" | "left" | "hello" => None,
            other => {
                self.shared.records().anomaly(format!(
                    "{}: unexpected frame type {other:?}: {v}",
                    self.name
                ));
                None
            }
        }
    }

    fn on_error(&mut self, v: &Value, joining: &HashSet<String>) -> Option<End> {
        let code = v["code"].as_str().unwrap_or("?").to_string();
        *self
            .shared
            .records()
            .errors
            .entry(code.clone())
            .or_default() += 1;
        let Some(cid) = v["ref"].as_str() else {
            // Only a join is answered by an error without `ref` here.
            if joining.is_empty() {
                self.shared.records().anomaly(format!(
                    "{} conn {}: error without ref outside a join: {v}",
                    self.name, self.conn
                ));
                return None;
            }
            return Some(End::Reconnect {
                next_gateway: false,
            });
        };
        let retry = v["retry_after_ms"]
            .as_u64()
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_RETRY_AFTER);
        let key = self.by_cid.get(cid).copied();
        if let Some(m) = key.and_then(|k| self.outbox.get_mut(&k)) {
            m.state = OutState::RetryAt(Instant::now() + retry);
        }
        match code.as_str() {
            "unavailable" | "overloaded" | "rate_limited" => None,
            // The protocol says: reconnect.
            "internal" => Some(End::Reconnect {
                next_gateway: false,
            }),
            _ => {
                self.shared.records().anomaly(format!(
                    "{} conn {}: send {cid} answered with a non-retryable error: {v}",
                    self.name, self.conn
                ));
                None
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The checker
// ---------------------------------------------------------------------------

/// A stored message.
#[derive(Debug, Clone)]
struct Row {
    seq: u64,
    id: String,
    user: String,
    client_id: String,
    body: String,
}

/// The outcome of [`check`]: counts and every violation found.
///
/// Why: one line of figures per scenario for the report, and a failure
/// message precise enough to start debugging from.
#[derive(Debug, Clone, Default)]
pub struct FaultReport {
    /// The scenario's name.
    pub scenario: String,
    /// Distinct messages created.
    pub sent: usize,
    /// Distinct messages acked.
    pub acked: usize,
    /// `ack` frames received (resends make more than `acked`).
    pub ack_frames: usize,
    /// Messages sent more than once (after errors or reconnects).
    pub resent: usize,
    /// Rows in the workload's rooms.
    pub stored: usize,
    /// Acked messages missing from the database. Must be 0.
    pub lost: usize,
    /// Created messages never acked by the end of the drain. Must be 0.
    pub unacked: usize,
    /// A (user, client_id) stored more than once, or stored rows nobody
    /// sent. Must be 0.
    pub dup_stored: usize,
    /// Seqs delivered twice to one member of a room. Must be 0.
    pub dup_delivered: usize,
    /// Deliveries with a seq below one delivered before. Must be 0.
    pub reordered: usize,
    /// Seqs a member skipped (between its first and last delivery, or
    /// before its first, since every user first joins with `since: 0`).
    /// Must be 0.
    pub delivery_gaps: usize,
    /// Seqs at the end of a room a member never received. Must be 0.
    pub undelivered: usize,
    /// Missing seqs in the database (rooms must hold exactly 1..=max).
    /// Must be 0.
    pub db_gaps: usize,
    /// A seq given for two different messages: an ack whose seq holds
    /// another message, acks of one message with different seqs, or a
    /// delivered frame that differs from the stored row. Must be 0.
    pub seq_conflicts: usize,
    /// Stored or delivered texts that differ from what was sent. Must be 0.
    pub text_mismatches: usize,
    /// `message` frames received in total.
    pub deliveries: usize,
    /// Reconnects over all users.
    pub reconnects: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Error frames by code.
    pub errors: BTreeMap<String, u64>,
    /// Connection ends by close code.
    pub closes: BTreeMap<String, u64>,
    /// Scenario-specific figures, appended to the summary line.
    pub figures: Vec<(String, String)>,
    /// Every violation, one line each.
    pub violations: Vec<String>,
}

impl FaultReport {
    /// Adds a figure to the summary line (e.g. `time_to_serve_p50_ms`).
    pub fn figure(&mut self, key: &str, value: impl fmt::Display) {
        self.figures.push((key.to_string(), value.to_string()));
    }

    /// The one-line summary: `fault figures: scenario=… acked=… lost=0 …`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "fault figures: scenario={} sent={} acked={} lost={} dup={} reordered={} gaps={} undelivered={} conflicts={} unacked={} stored={} ack_frames={} resent={} deliveries={} reconnects={} connect_failures={} errors={:?} closes={:?}",
            self.scenario,
            self.sent,
            self.acked,
            self.lost,
            self.dup_stored + self.dup_delivered,
            self.reordered,
            self.delivery_gaps + self.db_gaps,
            self.undelivered,
            self.seq_conflicts + self.text_mismatches,
            self.unacked,
            self.stored,
            self.ack_frames,
            self.resent,
            self.deliveries,
            self.reconnects,
            self.connect_failures,
            self.errors,
            self.closes,
        );
        for (k, v) in &self.figures {
            // Writing to a String cannot fail.
            let _ = write!(s, " {k}={v}");
        }
        s
    }

    /// Fails when any check found a violation, quoting the counts and the
    /// first violations.
    ///
    /// # Errors
    /// One error describing every kind of violation found.
    pub fn ensure_clean(&self) -> anyhow::Result<()> {
        if self.violations.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "scenario {}: {} violations of the delivery promise\n{}\n",
            self.scenario,
            self.violations.len(),
            self.summary()
        );
        for v in self.violations.iter().take(MAX_QUOTED) {
            msg.push_str("  - ");
            msg.push_str(v);
            msg.push('\n');
        }
        if self.violations.len() > MAX_QUOTED {
            let _ = writeln!(msg, "  … and {} more", self.violations.len() - MAX_QUOTED);
        }
        bail!(msg)
    }

    /// Prints the summary line, then [`FaultReport::ensure_clean`].
    ///
    /// # Errors
    /// As [`FaultReport::ensure_clean`].
    pub fn finish(&self) -> anyhow::Result<()> {
        println!("{}", self.summary());
        self.ensure_clean()
    }
}

/// Checks `records` against the `messages` table of `pool` (see the module
/// docs for what is checked). Violations are counted in the report, not
/// returned as errors; only a failing database query is an `Err`.
///
/// # Errors
/// When the database cannot be read.
pub async fn check(
    scenario: &str,
    records: &Records,
    pool: &sqlx::PgPool,
) -> anyhow::Result<FaultReport> {
    let raw: Vec<(String, i64, String, String, String, String)> = sqlx::query_as(
        "SELECT room, seq, id, user_id, client_id, body FROM messages \
         WHERE room = ANY($1) ORDER BY room, seq",
    )
    .bind(&records.rooms)
    .fetch_all(pool)
    .await
    .context("reading the stored messages for the check")?;
    let mut rows: BTreeMap<String, BTreeMap<u64, Row>> = BTreeMap::new();
    for (room, seq, id, user, client_id, body) in raw {
        rows.entry(room).or_default().insert(
            seq as u64,
            Row {
                seq: seq as u64,
                id,
                user,
                client_id,
                body,
            },
        );
    }
    Ok(check_rows(scenario, records, &rows))
}

/// The checks of [`check`], on rows already read.
fn check_rows(
    scenario: &str,
    records: &Records,
    rows: &BTreeMap<String, BTreeMap<u64, Row>>,
) -> FaultReport {
    let mut rep = FaultReport {
        scenario: scenario.to_string(),
        sent: records.created.len(),
        resent: records.created.iter().filter(|c| c.sends > 1).count(),
        ack_frames: records.acks.len(),
        deliveries: records.deliveries.values().map(Vec::len).sum(),
        reconnects: records.reconnects.values().sum(),
        connect_failures: records.connect_failures,
        errors: records.errors.clone(),
        closes: records.closes.clone(),
        stored: rows.values().map(BTreeMap::len).sum(),
        ..FaultReport::default()
    };
    let v = &mut rep.violations;
    for a in &records.anomalies {
        v.push(format!("client saw: {a}"));
    }
    for p in &records.drain_problems {
        v.push(p.clone());
    }

    // Stored rows by (room, user, client_id).
    let mut stored: HashMap<(&str, &str, &str), Vec<&Row>> = HashMap::new();
    for (room, by_seq) in rows {
        for row in by_seq.values() {
            stored
                .entry((room.as_str(), row.user.as_str(), row.client_id.as_str()))
                .or_default()
                .push(row);
        }
    }
    let created: HashMap<(&str, &str, &str), &Created> = records
        .created
        .iter()
        .map(|c| ((c.room.as_str(), c.user.as_str(), c.client_id.as_str()), c))
        .collect();

    // (b) every room holds exactly 1..=max.
    for (room, by_seq) in rows {
        let max = by_seq.keys().next_back().copied().unwrap_or(0);
        let missing: Vec<u64> = (1..=max).filter(|s| !by_seq.contains_key(s)).collect();
        if !missing.is_empty() {
            rep.db_gaps += missing.len();
            v.push(format!(
                "database: room {room} holds seqs up to {max} but lacks {} of them: {}",
                missing.len(),
                short_list(&missing)
            ));
        }
    }

    // Stored twice, or stored without being sent.
    for ((room, user, cid), rs) in &stored {
        if rs.len() > 1 {
            rep.dup_stored += rs.len() - 1;
            let seqs: Vec<u64> = rs.iter().map(|r| r.seq).collect();
            v.push(format!(
                "database: {user}/{cid} stored {} times in {room}, at seqs {seqs:?}",
                rs.len()
            ));
        }
        match created.get(&(*room, *user, *cid)) {
            None => {
                rep.dup_stored += 1;
                v.push(format!(
                    "database: row {room}#{} from {user}/{cid} was never sent by any user",
                    rs[0].seq
                ));
            }
            Some(c) => {
                for r in rs {
                    if r.body != c.text {
                        rep.text_mismatches += 1;
                        v.push(format!(
                            "database: {room}#{} ({user}/{cid}) stores {:?}, the user sent {:?}",
                            r.seq, r.body, c.text
                        ));
                    }
                }
            }
        }
    }

    // (a) every ack is stored once, at its seq; one seq per message.
    let mut ack_seq: HashMap<(&str, &str, &str), u64> = HashMap::new();
    for a in &records.acks {
        let key = (a.room.as_str(), a.user.as_str(), a.client_id.as_str());
        match ack_seq.get(&key) {
            Some(&s) if s != a.seq => {
                rep.seq_conflicts += 1;
                v.push(format!(
                    "ack: {}/{} in {} acked with seq {s} and later with seq {} (conn {})",
                    a.user, a.client_id, a.room, a.seq, a.conn
                ));
            }
            Some(_) => {}
            None => {
                ack_seq.insert(key, a.seq);
            }
        }
    }
    rep.acked = ack_seq.len();
    for (&(room, user, cid), &seq) in &ack_seq {
        match stored.get(&(room, user, cid)) {
            None => {
                rep.lost += 1;
                let at_seq = rows
                    .get(room)
                    .and_then(|r| r.get(&seq))
                    .map(|r| format!("{}/{}", r.user, r.client_id))
                    .unwrap_or_else(|| "nothing".to_string());
                v.push(format!(
                    "LOST: {user}/{cid} acked in {room} with seq {seq} is not in the database (seq {seq} holds {at_seq})"
                ));
            }
            Some(rs) => {
                if !rs.iter().any(|r| r.seq == seq) {
                    rep.seq_conflicts += 1;
                    let stored_at: Vec<u64> = rs.iter().map(|r| r.seq).collect();
                    let at_seq = rows
                        .get(room)
                        .and_then(|r| r.get(&seq))
                        .map(|r| format!("{}/{}", r.user, r.client_id))
                        .unwrap_or_else(|| "nothing".to_string());
                    v.push(format!(
                        "ack: {user}/{cid} acked in {room} with seq {seq} but stored at {stored_at:?}; seq {seq} holds {at_seq}"
                    ));
                }
            }
        }
    }
    let unacked: Vec<String> = records
        .created
        .iter()
        .filter(|c| {
            !ack_seq.contains_key(&(c.room.as_str(), c.user.as_str(), c.client_id.as_str()))
        })
        .map(|c| {
            let where_ =
                if stored.contains_key(&(c.room.as_str(), c.user.as_str(), c.client_id.as_str())) {
                    "stored"
                } else {
                    "not stored"
                };
            format!(
                "{}/{} ({where_}, sent {} times)",
                c.user, c.client_id, c.sends
            )
        })
        .collect();
    if !unacked.is_empty() {
        rep.unacked = unacked.len();
        v.push(format!(
            "{} messages never acked: {}",
            unacked.len(),
            short_list(&unacked)
        ));
    }

    // (c) and (d): every member got every seq once, in order, as stored.
    for (user, rooms) in &records.members {
        for room in rooms {
            let empty = Vec::new();
            let ds = records
                .deliveries
                .get(&(user.clone(), room.clone()))
                .unwrap_or(&empty);
            let by_seq = rows.get(room);
            let max = by_seq
                .and_then(|r| r.keys().next_back().copied())
                .unwrap_or(0);
            let mut seen: HashSet<u64> = HashSet::new();
            let mut last = 0u64;
            let mut last_conn = 0u64;
            for d in ds {
                if !seen.insert(d.seq) {
                    rep.dup_delivered += 1;
                    v.push(format!(
                        "delivery: {user} got {room}#{} twice (again on conn {}, after #{last})",
                        d.seq, d.conn
                    ));
                } else if d.seq < last {
                    rep.reordered += 1;
                    v.push(format!(
                        "delivery: {user} got {room}#{} after #{last} (conn {})",
                        d.seq, d.conn
                    ));
                } else if d.seq > last + 1 {
                    let skipped = d.seq - last - 1;
                    rep.delivery_gaps += skipped as usize;
                    let across = if d.conn != last_conn && last_conn != 0 {
                        format!(" across a reconnect (conn {last_conn} → {})", d.conn)
                    } else {
                        format!(" on conn {}", d.conn)
                    };
                    v.push(format!(
                        "delivery: {user} in {room} got #{} right after #{last}: {skipped} seqs skipped{across}",
                        d.seq
                    ));
                }
                last = last.max(d.seq);
                last_conn = d.conn;
                match by_seq.and_then(|r| r.get(&d.seq)) {
                    None => {
                        rep.seq_conflicts += 1;
                        v.push(format!(
                            "delivery: {user} got {room}#{} ({}/{}) but the database has no such seq",
                            d.seq, d.user, d.client_id
                        ));
                    }
                    Some(row) => {
                        if row.id != d.id || row.user != d.user || row.client_id != d.client_id {
                            rep.seq_conflicts += 1;
                            v.push(format!(
                                "delivery: {user} got {room}#{} as {}/{} id {}, the database has {}/{} id {}",
                                d.seq, d.user, d.client_id, d.id, row.user, row.client_id, row.id
                            ));
                        } else if row.body != d.text {
                            rep.text_mismatches += 1;
                            v.push(format!(
                                "delivery: {user} got {room}#{} with text {:?}, stored {:?}",
                                d.seq, d.text, row.body
                            ));
                        }
                    }
                }
            }
            if last < max {
                rep.undelivered += (max - last) as usize;
                v.push(format!(
                    "delivery: {user} in {room} received up to #{last} of {max}"
                ));
            }
        }
    }
    rep
}

/// At most ten items of a list, for messages.
fn short_list<T: fmt::Debug>(items: &[T]) -> String {
    if items.len() <= 10 {
        format!("{items:?}")
    } else {
        format!("{:?} … ({} in all)", &items[..10], items.len())
    }
}

/// The `p`-th percentile (0–100, nearest rank) of `values`; zero when empty.
/// Why: failover figures are reported as p50/p99 over runs.
pub fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut v = values.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Milliseconds of a duration, for figures.
pub fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[cfg(test)]
mod unit {
    use super::*;

    fn row(seq: u64, user: &str, cid: &str, body: &str) -> Row {
        Row {
            seq,
            id: format!("id{seq}"),
            user: user.into(),
            client_id: cid.into(),
            body: body.into(),
        }
    }

    fn delivery(seq: u64, user: &str, cid: &str, body: &str, conn: u64) -> Delivery {
        Delivery {
            seq,
            id: format!("id{seq}"),
            user: user.into(),
            client_id: cid.into(),
            text: body.into(),
            conn,
        }
    }

    fn base() -> (Records, BTreeMap<String, BTreeMap<u64, Row>>) {
        let now = Instant::now();
        let mut r = Records {
            rooms: vec!["r".into()],
            ..Records::default()
        };
        r.members.insert("a".into(), vec!["r".into()]);
        for (i, cid) in ["a.1", "a.2", "a.3"].iter().enumerate() {
            r.created.push(Created {
                user: "a".into(),
                room: "r".into(),
                client_id: cid.to_string(),
                text: format!("t{i}"),
                sends: 1,
            });
            r.acks.push(AckEvent {
                user: "a".into(),
                room: "r".into(),
                client_id: cid.to_string(),
                seq: i as u64 + 1,
                at: now,
                sent_at: Some(now),
                conn: 1,
            });
        }
        r.deliveries.insert(
            ("a".into(), "r".into()),
            vec![
                delivery(1, "a", "a.1", "t0", 1),
                delivery(2, "a", "a.2", "t1", 1),
                delivery(3, "a", "a.3", "t2", 2),
            ],
        );
        let mut rows = BTreeMap::new();
        rows.insert(
            "r".to_string(),
            (1..=3)
                .map(|s| (s, row(s, "a", &format!("a.{s}"), &format!("t{}", s - 1))))
                .collect(),
        );
        (r, rows)
    }

    #[test]
    fn a_clean_history_passes() {
        let (r, rows) = base();
        let rep = check_rows("x", &r, &rows);
        assert!(rep.violations.is_empty(), "{:?}", rep.violations);
        assert_eq!((rep.sent, rep.acked, rep.stored), (3, 3, 3));
    }

    #[test]
    fn a_lost_ack_a_gap_and_a_conflict_are_found() {
        let (mut r, mut rows) = base();
        rows.get_mut("r").unwrap().remove(&2);
        r.acks[2].seq = 4;
        let rep = check_rows("x", &r, &rows);
        assert_eq!(rep.lost, 1, "{:?}", rep.violations);
        assert_eq!(rep.db_gaps, 1);
        assert_eq!(rep.seq_conflicts, 2, "{:?}", rep.violations); // ack and delivery
        assert!(rep.ensure_clean().is_err());
    }

    #[test]
    fn duplicate_and_reordered_deliveries_are_found() {
        let (mut r, rows) = base();
        let ds = r.deliveries.get_mut(&("a".into(), "r".into())).unwrap();
        ds.swap(0, 1);
        ds.push(delivery(3, "a", "a.3", "t2", 3));
        let rep = check_rows("x", &r, &rows);
        assert_eq!(rep.dup_delivered, 1, "{:?}", rep.violations);
        assert_eq!(rep.reordered, 1, "{:?}", rep.violations);
        assert_eq!(rep.delivery_gaps, 1, "{:?}", rep.violations);
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
