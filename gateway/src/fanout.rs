//! Per-room fan-out on a gateway. One task per room that has at least one
//! local member holds the room's single bus subscription and forwards each
//! event's bytes, unchanged, to every local member's queue.
//!
//! The room task keeps the last seq it delivered. Core NATS is at most
//! once, so a seq that skips ahead parks the event and fetches the missing
//! range from the owner before anything later is delivered; a member who
//! stays connected never misses a message silently. A joining member gets
//! `joined` and its backlog from a join task while the room task keeps
//! serving others; when the backlog is written, the room task tops the
//! member up from its recent ring and makes it live. Each member has a
//! cursor, so no frame is delivered to it twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::bus::{Event, NodeRequest, PresenceMark, ReplyHead};
use chat_protocol::subjects::Subjects;
use chat_protocol::{ErrorCode, NodeId, RoomId, ServerFrame, UserId};
use chat_room_node::bus::{Bus, BusMessage};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::conn::ConnTx;
use crate::metrics::{FrameKind, METRICS};
use crate::route::NodeClient;
use crate::ws::Payload;

/// Commands a room task's mailbox holds.
const ROOM_MAILBOX: usize = 1024;
/// Recent frames a room task keeps to top up members finishing a join.
const RING: usize = 256;
/// Most events parked ahead of a gap.
const MAX_AHEAD: usize = 10_000;
/// Page size when fetching a backlog or a gap from the owner.
const PAGE: u32 = 500;
/// How long the owner may be known to be ahead before we fetch the tail.
const TAIL_CHECK: Duration = Duration::from_millis(500);
/// Presence changes kept for one member while its join is in flight; past
/// it, later ones are not kept (a room with that much coming and going
/// while one join is answered; `joined.members` stays authoritative).
const MAX_EARLY_PRESENCE: usize = 256;

/// Why a join failed, as an error frame for the client.
pub type JoinResult = Result<(), ServerFrame>;

/// The rooms of one gateway. Cheap to clone.
#[derive(Clone)]
pub struct RoomHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    rooms: Mutex<HashMap<RoomId, mpsc::Sender<Cmd>>>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    client: NodeClient,
    gateway: NodeId,
}

enum Cmd {
    Add {
        conn: ConnTx,
        user: UserId,
        since: Option<u64>,
        done: oneshot::Sender<JoinResult>,
    },
    Remove {
        conn: u64,
    },
    Caught {
        conn: u64,
        upto: u64,
        /// The presence change the owner's `joined` counted up to (first
        /// `Caught` of a join only).
        presence: Option<PresenceMark>,
    },
    JoinFailed {
        conn: u64,
    },
    /// The owner registered the member, but its connection went away
    /// before it caught up: unregister it (its session's own `Remove` may
    /// have come first, and found the join still in flight).
    Abandoned {
        conn: u64,
    },
    Repaired {
        frames: Vec<(u64, Payload)>,
        ok: bool,
    },
    /// Re-register every member with the owner (after a reconnect).
    Resync,
    /// These members were re-registered: any of them that left meanwhile
    /// may have had its leave overtaken by the re-registration, so it is
    /// unregistered again.
    Reregistered {
        members: Vec<(u64, UserId)>,
    },
    /// Fetch whatever the owner committed after what we delivered (after a
    /// reconnect, when events may have been missed).
    Probe,
}

impl RoomHub {
    /// A hub for gateway `gateway`.
    pub fn new(bus: Arc<dyn Bus>, subjects: Subjects, client: NodeClient, gateway: NodeId) -> Self {
        Self {
            inner: Arc::new(HubInner {
                rooms: Mutex::new(HashMap::new()),
                bus,
                subjects,
                client,
                gateway,
            }),
        }
    }

    /// The id members are registered under at room owners.
    pub fn gateway_id(&self) -> &NodeId {
        &self.inner.gateway
    }

    /// Joins `conn` to `room`: `joined`, the backlog, then live messages
    /// are queued to it. Resolves once the owner accepted or refused.
    pub async fn join(
        &self,
        room: RoomId,
        conn: ConnTx,
        user: UserId,
        since: Option<u64>,
    ) -> JoinResult {
        let (done, rx) = oneshot::channel();
        let mut cmd = Cmd::Add {
            conn,
            user,
            since,
            done,
        };
        for _ in 0..3 {
            let tx = self.room_sender(&room).await;
            match tx.send(cmd).await {
                Ok(()) => {
                    return rx.await.unwrap_or_else(|_| {
                        Err(ServerFrame::error(
                            ErrorCode::Internal,
                            "join was interrupted",
                        ))
                    })
                }
                // The room task ended between lookup and send: start anew.
                Err(mpsc::error::SendError(c)) => {
                    self.forget(&room, &tx);
                    cmd = c;
                }
            }
        }
        Err(ServerFrame::error(
            ErrorCode::Internal,
            "could not join the room",
        ))
    }

    /// Removes `conn` from `room` (and from the owner's roster).
    pub async fn leave(&self, room: &RoomId, conn: u64) {
        let tx = self
            .inner
            .rooms
            .lock()
            .expect("hub lock")
            .get(room)
            .cloned();
        if let Some(tx) = tx {
            // A room task that already ended has no member to remove.
            let _ = tx.send(Cmd::Remove { conn }).await;
        }
    }

    /// After every reconnect of the bus, tells each room to re-register its
    /// members and fetch what it may have missed. Runs until the bus closes.
    pub fn follow_reconnects(&self) {
        let hub = self.clone();
        let mut reconnects = self.inner.bus.reconnects();
        tokio::spawn(async move {
            while reconnects.changed().await.is_ok() {
                let rooms: Vec<mpsc::Sender<Cmd>> = hub
                    .inner
                    .rooms
                    .lock()
                    .expect("hub lock")
                    .values()
                    .cloned()
                    .collect();
                tracing::info!(rooms = rooms.len(), "bus reconnected: resyncing rooms");
                for tx in rooms {
                    for cmd in [Cmd::Resync, Cmd::Probe] {
                        if tx.try_send(cmd).is_err() {
                            tracing::warn!("room busy; it resyncs at its next gap");
                        }
                    }
                }
            }
        });
    }

    /// Keeps the members of split rooms registered at their member shards:
    /// when a room's shard count grows (learned from a `sharded` answer),
    /// and when the ring changes (a shard may have moved to a node that
    /// does not know its members). Runs until the client's ring closes.
    pub fn follow_shards(&self) {
        let hub = self.clone();
        let mut grew = self.inner.client.shard_growth();
        let mut ring = self.inner.client.placement_watch();
        tokio::spawn(async move {
            loop {
                let rooms: Vec<mpsc::Sender<Cmd>> = tokio::select! {
                    r = grew.recv() => match r {
                        Ok(room) => hub.inner.rooms.lock().expect("hub lock").get(&room).cloned().into_iter().collect(),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => hub.split_rooms(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                    changed = ring.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        hub.split_rooms()
                    }
                };
                for tx in rooms {
                    if tx.try_send(Cmd::Resync).is_err() {
                        tracing::warn!("room busy; its members re-register at the next change");
                    }
                }
            }
        });
    }

    /// After a re-registration of `members`: the room's task unregisters
    /// those that left while it ran (their leave may have reached the owner
    /// first, and the re-registration would keep a ghost). With no task
    /// left, nobody on this gateway is in the room: all are unregistered.
    async fn settle_reregistered(&self, room: RoomId, members: Vec<(u64, UserId)>) {
        let tx = self
            .inner
            .rooms
            .lock()
            .expect("hub lock")
            .get(&room)
            .cloned();
        let members = match tx {
            Some(tx) => match tx.send(Cmd::Reregistered { members }).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(Cmd::Reregistered { members })) => members,
                Err(_) => return,
            },
            None => members,
        };
        for (conn, user) in members {
            self.unregister(&room, user, conn).await;
        }
    }

    /// Tells the room's owner (or the member's shard) that connection
    /// `conn` of `user` left; best effort, logged when it cannot be told.
    async fn unregister(&self, room: &RoomId, user: UserId, conn: u64) {
        let req = NodeRequest::Leave {
            room: room.clone(),
            user,
            gateway: self.inner.gateway.clone(),
            conn,
        };
        if let Err(e) = self.inner.client.call(&req).await {
            tracing::warn!(%room, error = %e, "leave not delivered to the owner");
        }
    }

    /// The room tasks of rooms split into member shards.
    fn split_rooms(&self) -> Vec<mpsc::Sender<Cmd>> {
        let client = &self.inner.client;
        self.inner
            .rooms
            .lock()
            .expect("hub lock")
            .iter()
            .filter(|(room, _)| client.shard_count(room) > 1)
            .map(|(_, tx)| tx.clone())
            .collect()
    }

    /// Rooms with a subscription on this gateway.
    pub fn room_count(&self) -> usize {
        self.inner.rooms.lock().expect("hub lock").len()
    }

    fn forget(&self, room: &RoomId, tx: &mpsc::Sender<Cmd>) {
        let mut rooms = self.inner.rooms.lock().expect("hub lock");
        if rooms.get(room).is_some_and(|t| t.same_channel(tx)) {
            rooms.remove(room);
        }
    }

    async fn room_sender(&self, room: &RoomId) -> mpsc::Sender<Cmd> {
        if let Some(tx) = self.inner.rooms.lock().expect("hub lock").get(room) {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        // Subscribe before anyone can ask the owner for a backlog, so no
        // event committed after the backlog can be missed.
        let subject = self.inner.subjects.room_events(room);
        let events = match self.inner.bus.subscribe(subject).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%room, error = %e, "cannot subscribe to room events");
                futures::stream::pending().boxed()
            }
        };
        let mut rooms = self.inner.rooms.lock().expect("hub lock");
        if let Some(tx) = rooms.get(room) {
            if !tx.is_closed() {
                // Someone else created it meanwhile; ours is dropped.
                return tx.clone();
            }
        }
        let (tx, rx) = mpsc::channel(ROOM_MAILBOX);
        rooms.insert(room.clone(), tx.clone());
        METRICS.rooms.inc();
        let task = RoomTask {
            room: room.clone(),
            hub: self.clone(),
            tx: tx.downgrade(),
            rx,
            members: HashMap::new(),
            delivered: None,
            ring: VecDeque::new(),
            ahead: BTreeMap::new(),
            repairing: false,
            tail: None,
        };
        tokio::spawn(task.run(events));
        tx
    }
}

struct Member {
    conn: ConnTx,
    user: UserId,
    cursor: u64,
    live: bool,
    /// Left while its join was still in flight: unregister once it lands.
    leaving: bool,
    /// The last presence change its `joined` counted; `None` until the
    /// owner answered, or from an owner without marks.
    joined_mark: Option<PresenceMark>,
    /// Marked presence changes that arrived before the member was live:
    /// those later than `joined_mark` are delivered when it goes live (the
    /// join's answer and the room's events travel apart, so a change just
    /// after the answer may arrive first).
    early: Vec<(PresenceMark, Payload)>,
}

struct RoomTask {
    room: RoomId,
    hub: RoomHub,
    tx: mpsc::WeakSender<Cmd>,
    rx: mpsc::Receiver<Cmd>,
    members: HashMap<u64, Member>,
    /// Last seq delivered to live members; `None` until the first join
    /// tells us where the room stands.
    delivered: Option<u64>,
    ring: VecDeque<(u64, Payload)>,
    ahead: BTreeMap<u64, Payload>,
    repairing: bool,
    /// The owner's last seq as a join reported it, when ahead of us, and
    /// when we learned it.
    tail: Option<(u64, Instant)>,
}

/// Reads the `seq` of a message frame (only on repair and backlog paths).
fn frame_seq(frame: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(frame).ok().map(|s| s.seq)
}

fn text(frame: Bytes) -> Option<Payload> {
    Payload::from_utf8(frame)
}

impl RoomTask {
    async fn run(mut self, mut events: BoxStream<'static, BusMessage>) {
        loop {
            let tail_at = self.tail.map(|(_, at)| at + TAIL_CHECK);
            tokio::select! {
                ev = events.next() => match ev {
                    Some(m) => self.on_event(m.payload),
                    None => {
                        tracing::warn!(room = %self.room, "room subscription ended; resubscribing");
                        events = self.resubscribe().await;
                    }
                },
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.on_cmd(cmd),
                    None => break,
                },
                _ = tokio::time::sleep_until(tail_at.unwrap_or_else(Instant::now)), if tail_at.is_some() => {
                    self.check_tail();
                }
            }
            if self.members.is_empty() && self.try_retire() {
                break;
            }
        }
        METRICS.rooms.dec();
    }

    async fn resubscribe(&self) -> BoxStream<'static, BusMessage> {
        let subject = self.hub.inner.subjects.room_events(&self.room);
        loop {
            match self.hub.inner.bus.subscribe(subject.clone()).await {
                Ok(s) => return s,
                Err(e) => {
                    tracing::warn!(room = %self.room, error = %e, "resubscribe failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Ends the task if no command is waiting; the hub lock makes the check
    /// and the removal atomic with respect to new joins.
    fn try_retire(&mut self) -> bool {
        let mut rooms = self.hub.inner.rooms.lock().expect("hub lock");
        if !self.rx.is_empty() {
            return false;
        }
        if let Some(tx) = self.tx.upgrade() {
            if rooms.get(&self.room).is_some_and(|t| t.same_channel(&tx)) {
                rooms.remove(&self.room);
            }
        }
        true
    }

    fn on_event(&mut self, payload: Bytes) {
        match Event::decode(&payload) {
            Ok(Event::Message { seq, frame }) => {
                if let Some(frame) = text(frame) {
                    self.on_message(seq, frame);
                }
            }
            Ok(Event::Messages { first, frames }) => {
                for (seq, frame) in (first..).zip(frames) {
                    if let Some(frame) = text(frame) {
                        self.on_message(seq, frame);
                    }
                }
            }
            Ok(Event::Presence { user, frame, mark }) => {
                if let Some(frame) = text(frame) {
                    // A user's own connections never hear of their own
                    // arrival (a quick reconnect would otherwise see it).
                    for m in self.members.values_mut().filter(|m| m.user != user) {
                        // A change its `joined` already counted (the room
                        // task may take the join's answer first).
                        let counted = mark.zip(m.joined_mark).is_some_and(|(e, j)| e <= j);
                        if counted {
                            continue;
                        }
                        if m.live {
                            m.conn.try_deliver(frame.clone(), FrameKind::Presence);
                        } else if let Some(mark) = mark {
                            if m.early.len() < MAX_EARLY_PRESENCE {
                                m.early.push((mark, frame.clone()));
                            }
                        }
                    }
                }
            }
            Ok(Event::Resync) => self.resync(),
            Ok(Event::Shards { count }) => {
                // The room was split: route its members by shard from now
                // on. Learning a larger count re-registers the members at
                // their shards (through `follow_shards`, once).
                self.hub.inner.client.learn_shards(&self.room, count);
            }
            Ok(Event::ToAll { frame }) => {
                if let Some(frame) = text(frame) {
                    for m in self.members.values().filter(|m| m.live) {
                        m.conn.try_deliver(frame.clone(), FrameKind::Presence);
                    }
                }
            }
            Err(e) => tracing::warn!(room = %self.room, error = %e, "undecodable room event"),
        }
    }

    fn on_message(&mut self, seq: u64, frame: Payload) {
        if self.delivered.is_some_and(|d| seq <= d) {
            return;
        }
        self.ahead.insert(seq, frame);
        while self.ahead.len() > MAX_AHEAD {
            self.ahead.pop_first();
        }
        self.advance();
    }

    /// Delivers every parked event that continues the sequence, then asks
    /// the owner for whatever gap remains.
    fn advance(&mut self) {
        let Some(mut d) = self.delivered else { return };
        while let Some(frame) = self.ahead.remove(&(d + 1)) {
            d += 1;
            for m in self.members.values_mut() {
                if m.live && m.cursor < d {
                    m.cursor = d;
                    m.conn.try_deliver(frame.clone(), FrameKind::Message);
                }
            }
            self.ring.push_back((d, frame));
            if self.ring.len() > RING {
                self.ring.pop_front();
            }
        }
        self.delivered = Some(d);
        // Anything at or below what we delivered is stale.
        while self.ahead.first_key_value().is_some_and(|(s, _)| *s <= d) {
            self.ahead.pop_first();
        }
        if self.tail.is_some_and(|(t, _)| t <= d) {
            self.tail = None;
        }
        if let Some((&next, _)) = self.ahead.first_key_value() {
            self.repair(d, next);
        }
    }

    /// Fetches `after < seq < before` from the owner, in the background.
    fn repair(&mut self, after: u64, before: u64) {
        if self.repairing || self.members.is_empty() {
            return;
        }
        self.repairing = true;
        METRICS.gap_repairs.inc();
        let client = self.hub.inner.client.clone();
        let room = self.room.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let req = NodeRequest::History {
                room,
                before: Some(before),
                after: Some(after),
                limit: PAGE,
            };
            let (frames, ok) = match client.call(&req).await {
                Ok((ReplyHead::History { .. }, frames)) => (
                    frames
                        .into_iter()
                        .filter_map(|f| Some((frame_seq(&f)?, text(f)?)))
                        .collect(),
                    true,
                ),
                _ => (Vec::new(), false),
            };
            if !ok {
                // Let the owner settle before the next try.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            if let Some(tx) = tx.upgrade() {
                // The room task may have ended; then nobody needs it.
                let _ = tx.send(Cmd::Repaired { frames, ok }).await;
            }
        });
    }

    /// Re-registers every joined member with the room's (new) owner,
    /// quietly: they were present before, so nobody hears of them again.
    fn resync(&self) {
        // In a split room, members still joining count too: a join the
        // sequencer took just before the split was handed over with its
        // roster, so it must be registered at the shard as well (quiet
        // re-registration is idempotent).
        let split = self.hub.inner.client.shard_count(&self.room) > 1;
        let members: Vec<(u64, UserId)> = self
            .members
            .iter()
            .filter(|(_, m)| (m.live || split) && !m.leaving)
            .map(|(id, m)| (*id, m.user.clone()))
            .collect();
        if members.is_empty() {
            return;
        }
        let hub = self.hub.clone();
        let client = self.hub.inner.client.clone();
        let room = self.room.clone();
        let gateway = self.hub.inner.gateway.clone();
        tokio::spawn(async move {
            use futures::stream::{self, StreamExt as _};
            let n = members.len();
            let failed = stream::iter(members.clone())
                .map(|(conn, user)| {
                    let req = NodeRequest::Join {
                        room: room.clone(),
                        user,
                        gateway: gateway.clone(),
                        conn,
                        since: None,
                        quiet: true,
                    };
                    let client = client.clone();
                    async move { client.call(&req).await.is_err() }
                })
                .buffer_unordered(16)
                .filter(|failed| std::future::ready(*failed))
                .count()
                .await;
            tracing::debug!(%room, members = n, failed, "members re-registered with the owner");
            hub.settle_reregistered(room, members).await;
        });
    }

    /// Asks the owner for everything after what was delivered.
    fn probe(&mut self) {
        if let Some(d) = self.delivered {
            self.repair(d, u64::MAX);
        }
    }

    fn check_tail(&mut self) {
        let Some((tail, _)) = self.tail else { return };
        match self.delivered {
            Some(d) if d < tail => {
                self.tail = Some((tail, Instant::now()));
                self.repair(d, tail + 1);
            }
            _ => self.tail = None,
        }
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Add {
                conn,
                user,
                since,
                done,
            } => {
                let id = conn.id;
                if self.members.contains_key(&id) {
                    // Already joined on this connection: nothing to redo (and
                    // a session that stopped waiting does not care).
                    let _ = done.send(Ok(()));
                    return;
                }
                self.members.insert(
                    id,
                    Member {
                        conn: conn.clone(),
                        user: user.clone(),
                        cursor: 0,
                        live: false,
                        leaving: false,
                        joined_mark: None,
                        early: Vec::new(),
                    },
                );
                let Some(tx) = self.tx.upgrade() else { return };
                tokio::spawn(join_task(
                    self.hub.clone(),
                    self.room.clone(),
                    conn,
                    user,
                    since,
                    tx,
                    done,
                ));
            }
            Cmd::Remove { conn } => match self.members.get_mut(&conn) {
                // The join is still on its way to the owner: a leave sent now
                // could overtake it, so unregister when it lands.
                Some(m) if !m.live => m.leaving = true,
                Some(_) => {
                    if let Some(m) = self.members.remove(&conn) {
                        self.send_leave(m.user, conn);
                    }
                }
                None => {}
            },
            Cmd::JoinFailed { conn } => {
                self.members.remove(&conn);
            }
            Cmd::Abandoned { conn } => {
                if let Some(m) = self.members.remove(&conn) {
                    self.send_leave(m.user, conn);
                }
            }
            Cmd::Caught {
                conn,
                upto,
                presence,
            } => self.on_caught(conn, upto, presence),
            Cmd::Resync => self.resync(),
            Cmd::Reregistered { members } => {
                for (conn, user) in members {
                    if !self.members.contains_key(&conn) {
                        self.send_leave(user, conn);
                    }
                }
            }
            Cmd::Probe => self.probe(),
            Cmd::Repaired { frames, ok } => {
                self.repairing = false;
                let full_page = frames.len() >= PAGE as usize;
                for (seq, frame) in frames {
                    if self.delivered.is_none_or(|d| seq > d) {
                        self.ahead.insert(seq, frame);
                    }
                }
                if ok {
                    self.advance();
                    if full_page && !self.repairing {
                        // There may be more after this page.
                        self.probe();
                    }
                } else if let (Some(d), Some((&next, _))) =
                    (self.delivered, self.ahead.first_key_value())
                {
                    self.repair(d, next);
                }
            }
        }
    }

    fn on_caught(&mut self, conn: u64, upto: u64, presence: Option<PresenceMark>) {
        match self.members.get(&conn) {
            None => return,
            Some(m) if m.leaving => {
                if let Some(m) = self.members.remove(&conn) {
                    self.send_leave(m.user, conn);
                }
                return;
            }
            Some(_) => {}
        }
        let delivered = match self.delivered {
            Some(d) => d,
            None => {
                self.delivered = Some(upto);
                self.advance();
                upto
            }
        };
        if upto > delivered {
            // The owner is ahead of our stream: events are in flight, or
            // were lost and must be fetched if they do not come soon.
            if self.tail.is_none_or(|(t, _)| t < upto) {
                self.tail = Some((upto, Instant::now()));
            }
        }
        let first_in_ring = self.ring.front().map_or(delivered + 1, |(s, _)| *s);
        let m = self.members.get_mut(&conn).expect("checked above");
        m.cursor = m.cursor.max(upto);
        if presence.is_some() {
            m.joined_mark = presence;
        }
        if m.cursor >= delivered || m.cursor + 1 >= first_in_ring {
            for (seq, frame) in &self.ring {
                if *seq > m.cursor {
                    m.conn.try_deliver(frame.clone(), FrameKind::Message);
                    m.cursor = *seq;
                }
            }
            m.live = true;
            // What changed after the join's answer and arrived before it.
            let early = std::mem::take(&mut m.early);
            if let Some(joined) = m.joined_mark {
                for (_, frame) in early.into_iter().filter(|(mark, _)| *mark > joined) {
                    m.conn.try_deliver(frame, FrameKind::Presence);
                }
            }
        } else {
            // Too far behind for the ring: page the rest from the owner.
            let Some(tx) = self.tx.upgrade() else { return };
            tokio::spawn(backfill_task(
                self.hub.inner.client.clone(),
                self.room.clone(),
                m.conn.clone(),
                m.cursor,
                delivered,
                tx,
            ));
        }
    }

    fn send_leave(&self, user: UserId, conn: u64) {
        let hub = self.hub.clone();
        let room = self.room.clone();
        tokio::spawn(async move { hub.unregister(&room, user, conn).await });
    }
}

/// Asks the owner to register the member, queues `joined` and the backlog,
/// then tells the room task where the member stands.
async fn join_task(
    hub: RoomHub,
    room: RoomId,
    conn: ConnTx,
    user: UserId,
    since: Option<u64>,
    tx: mpsc::Sender<Cmd>,
    done: oneshot::Sender<JoinResult>,
) {
    let id = conn.id;
    // Who a failed join is unregistered as (below).
    let leaver = user.clone();
    let req = NodeRequest::Join {
        room: room.clone(),
        user,
        gateway: hub.inner.gateway.clone(),
        conn: id,
        since,
        quiet: false,
    };
    let failure = match hub.inner.client.call(&req).await {
        Ok((
            ReplyHead::Joined {
                last_seq,
                members,
                complete,
                presence,
            },
            frames,
        )) => {
            return joined(
                hub,
                room,
                conn,
                since,
                tx,
                done,
                (last_seq, members, complete, presence),
                frames,
            )
            .await;
        }
        other => {
            // A join that timed out, or that a member shard registered but
            // could not complete (its sequencer unreachable), may be held
            // at the owner: unregister it before the client hears of the
            // failure, so neither a ghost nor a retried join can race it.
            let unsure = matches!(
                &other,
                Err(_)
                    | Ok((
                        ReplyHead::Error {
                            code: ErrorCode::Unavailable,
                            ..
                        },
                        _
                    ))
            );
            if unsure {
                hub.unregister(&room, leaver, id).await;
            }
            crate::route::failure_frame(other, None, "join")
        }
    };
    // The room task or the session may be gone; then nobody waits.
    let _ = tx.send(Cmd::JoinFailed { conn: id }).await;
    let _ = done.send(Err(failure));
}

/// The owner registered the member: queue `joined` and the backlog.
#[allow(clippy::too_many_arguments)]
async fn joined(
    hub: RoomHub,
    room: RoomId,
    conn: ConnTx,
    since: Option<u64>,
    tx: mpsc::Sender<Cmd>,
    done: oneshot::Sender<JoinResult>,
    (last_seq, members, complete, presence): (u64, u64, bool, Option<PresenceMark>),
    frames: Vec<Bytes>,
) {
    let id = conn.id;
    // `joined` is queued before the session learns of success: a `leave`
    // sent meanwhile answers `left` only once the session knows, so `left`
    // can never overtake `joined`. (Sends are accepted from the moment of
    // the `join`, so nothing waits on this order.)
    let queued = conn
        .reply(&ServerFrame::Joined {
            room: room.clone(),
            last_seq,
            members,
        })
        .await;
    // A session that is gone does not care.
    let _ = done.send(Ok(()));
    if !queued {
        let _ = tx.send(Cmd::Abandoned { conn: id }).await;
        return;
    }
    let mut cursor = since.unwrap_or(0).min(last_seq);
    for f in frames {
        if let Some(seq) = frame_seq(&f) {
            cursor = seq;
        }
        if let Some(t) = text(f) {
            if !conn.deliver(t, FrameKind::Message).await {
                let _ = tx.send(Cmd::Abandoned { conn: id }).await;
                return;
            }
        }
    }
    if !complete
        && page_range(&hub.inner.client, &room, &conn, cursor, last_seq)
            .await
            .is_none()
    {
        // The connection is closing.
        let _ = tx.send(Cmd::Abandoned { conn: id }).await;
        return;
    }
    // The member is now exactly at `last_seq`. The room task outlives this
    // send unless it is shutting down, when nobody needs the answer.
    let _ = tx
        .send(Cmd::Caught {
            conn: id,
            upto: last_seq,
            presence,
        })
        .await;
}

/// Delivers `after < seq <= upto` from the owner in pages; returns the last
/// seq delivered, or `None` when the connection went away or the owner
/// could not be reached (then the connection is closed so the client
/// resumes with `since` rather than silently missing messages).
async fn page_range(
    client: &NodeClient,
    room: &RoomId,
    conn: &ConnTx,
    mut after: u64,
    upto: u64,
) -> Option<u64> {
    while after < upto {
        let req = NodeRequest::History {
            room: room.clone(),
            before: Some(upto + 1),
            after: Some(after),
            limit: PAGE,
        };
        match client.call(&req).await {
            Ok((ReplyHead::History { .. }, frames)) if !frames.is_empty() => {
                for f in frames {
                    let seq = frame_seq(&f)?;
                    let t = text(f)?;
                    if seq > after {
                        if !conn.deliver(t, FrameKind::Message).await {
                            return None;
                        }
                        after = seq;
                    }
                }
            }
            other => {
                tracing::warn!(%room, reply = ?other.map(|r| r.0), "backlog page failed; closing so the client resumes");
                conn.close(chat_protocol::frames::close::INTERNAL);
                return None;
            }
        }
    }
    Some(after)
}

async fn backfill_task(
    client: NodeClient,
    room: RoomId,
    conn: ConnTx,
    after: u64,
    upto: u64,
    tx: mpsc::Sender<Cmd>,
) {
    if page_range(&client, &room, &conn, after, upto)
        .await
        .is_some()
    {
        // A room task that ended has no member to make live.
        let _ = tx
            .send(Cmd::Caught {
                conn: conn.id,
                upto,
                presence: None,
            })
            .await;
    }
}
