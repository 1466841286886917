//! The node: takes commands from its bus inbox, checks that it owns the
//! room on the placement ring, and hands them to the room's actor
//! (spawning it on first use). Owns the map of running actors; nothing else
//! touches it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_protocol::bus::{
    decode_batch, encode_reply, is_batch, NodeRequest, ReplyHead, MAX_BATCH_SENDS,
};
use chat_protocol::placement::Placement;
use chat_protocol::subjects::Subjects;
use chat_protocol::{ErrorCode, NodeId, RoomId};
use futures::StreamExt;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, BusMessage};
use crate::lease::LeaseTable;
use crate::membership;
use crate::metrics::METRICS;
use crate::reply::{self, Reply};
use crate::room::{self, RoomCommand, RoomConfig, RoomDeps, RoomHandle};
use crate::shard::{self, ShardCommand, ShardDeps, ShardHandle};
use crate::store::Store;
use crate::writer;
use crate::{Error, Result};

/// Database reads (history, old backlogs) a node runs at once.
const READ_PERMITS: usize = 32;

/// Everything a node needs to serve.
#[derive(Clone)]
pub struct NodeSettings {
    /// This node's id (unique among live nodes).
    pub node_id: NodeId,
    /// Subject names.
    pub subjects: Subjects,
    /// Room actor settings.
    pub room: RoomConfig,
    /// A node missing heartbeats this long leaves every ring.
    pub node_ttl: Duration,
    /// Bound on the drain at shutdown.
    pub shutdown_grace: Duration,
}

struct Entry {
    handle: RoomHandle,
    sent: u64,
}

/// Serves rooms until `shutdown` fires, then drains: marks itself
/// draining (peers stop routing here), stops every room (each flushes its
/// buffer), waits for them within the grace period, and deletes its
/// heartbeat. `ready` turns true while serving.
///
/// # Errors
/// When the node id is already live elsewhere or the bus refuses the
/// subscription.
pub async fn serve(
    settings: NodeSettings,
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    ready: watch::Sender<bool>,
) -> Result<()> {
    let instance = uuid::Uuid::new_v4().to_string();
    let me = settings.node_id.clone();
    membership::ensure_unique(&bus, &settings.subjects, &me, &instance, settings.node_ttl)
        .await
        .map_err(Error::Bus)?;

    let bg = CancellationToken::new();
    let mut placement = membership::watch_placement(
        bus.clone(),
        &settings.subjects,
        settings.node_ttl,
        bg.clone(),
    )
    .await
    .map_err(Error::Bus)?;
    let mut gateways = membership::watch_live(
        bus.clone(),
        settings.subjects.gateways_bucket(),
        settings.node_ttl,
        bg.clone(),
    )
    .await
    .map_err(Error::Bus)?;
    let mut live_gateways: Vec<NodeId> = gateways.borrow_and_update().ids.clone();
    let multi_events = Arc::new(AtomicBool::new(gateways.borrow().unbatched.is_empty()));
    let presence_marks = Arc::new(AtomicBool::new(gateways.borrow().unmarked.is_empty()));
    let mut inbox = bus
        .subscribe(settings.subjects.node_inbox(&me))
        .await
        .map_err(Error::Bus)?;
    let (draining_tx, draining_rx) = watch::channel(false);
    let hb = tokio::spawn(membership::heartbeat(
        bus.clone(),
        settings.subjects.nodes_bucket(),
        me.clone(),
        instance,
        settings.node_ttl,
        draining_rx,
        bg.clone(),
    ));

    let lease_ttl = settings.node_ttl;
    let (writer, writer_task) = writer::spawn(store.clone(), me.clone(), lease_ttl);
    let leases = Arc::new(LeaseTable::default());
    let renewals = tokio::spawn(crate::lease::renew_loop(
        store.clone(),
        me.clone(),
        leases.clone(),
        lease_ttl,
        bg.clone(),
    ));
    let (idle_tx, mut idle_rx) = mpsc::channel(1024);
    let deps = RoomDeps {
        bus: bus.clone(),
        store: store.clone(),
        writer,
        config: Arc::new(settings.room.clone()),
        reads: Arc::new(Semaphore::new(READ_PERMITS)),
        idle: idle_tx,
        subjects: settings.subjects.clone(),
        node_id: me.clone(),
        leases,
        lease_ttl,
        multi_events: multi_events.clone(),
        presence_marks: presence_marks.clone(),
    };
    let rooms_cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut rooms: HashMap<RoomId, Entry> = HashMap::new();
    let shard_deps = ShardDeps {
        bus: bus.clone(),
        subjects: settings.subjects.clone(),
        placement: placement.clone(),
        config: deps.config.clone(),
        node_id: me.clone(),
        store: store.clone(),
        leases: deps.leases.clone(),
        lease_ttl,
    };
    let mut shards: Shards = HashMap::new();
    // Our own copy, so no watch guard is held across an await.
    let mut current = placement.borrow_and_update().clone();
    // Set here, not in the shared ring watcher: gateways watch the ring too
    // and must not export the room node's metrics.
    METRICS.ring_size.set(current.len() as i64);
    tracing::info!(node.id = %me, "room node serving");
    ready.send_replace(true);

    loop {
        tokio::select! {
            msg = inbox.next() => {
                let Some(msg) = msg else {
                    tracing::error!("inbox subscription ended");
                    break;
                };
                let mut here = Here { rooms: &mut rooms, shards: &mut shards };
                let cx = Ctx {
                    me: &me,
                    placement: &current,
                    deps: &deps,
                    shard_deps: &shard_deps,
                    bus: &bus,
                    tracker: &tracker,
                    cancel: &rooms_cancel,
                };
                dispatch(&cx, &mut here, msg).await;
            }
            Some((room, processed)) = idle_rx.recv() => {
                if rooms.get(&room).is_some_and(|e| e.sent == processed) {
                    // Dropping the only sender lets the actor finish and end.
                    rooms.remove(&room);
                }
            }
            changed = placement.changed() => {
                if changed.is_err() { break; }
                current = placement.borrow_and_update().clone();
                METRICS.ring_size.set(current.len() as i64);
                rooms.retain(|room, e| {
                    let keep = current.owner(room).as_ref() == Some(&me);
                    if !keep {
                        tracing::info!(%room, "room moved to another node; handing off");
                        // A full mailbox still ends when the handle drops.
                        let _ = e.handle.try_send(RoomCommand::Stop);
                    }
                    keep
                });
                // A shard that moved ends; gateways re-register its members
                // with the new owner when they see the ring change.
                shards.retain(|(room, k), _| {
                    current.owner_of(&chat_protocol::shard::shard_key(room, *k)).as_ref() == Some(&me)
                });
            }
            changed = gateways.changed() => {
                if changed.is_err() { break; }
                let (now, unbatched, unmarked) = {
                    let live = gateways.borrow_and_update();
                    (live.ids.clone(), !live.unbatched.is_empty(), !live.unmarked.is_empty())
                };
                set_gateway_feature(
                    &multi_events,
                    !unbatched,
                    "multi_events",
                    "gateways of an older release are gone: one event per commit",
                    "gateways of an older release are live: one event per message",
                );
                set_gateway_feature(
                    &presence_marks,
                    !unmarked,
                    "presence_marks",
                    "gateways without presence marks are gone: presence is marked",
                    "gateways without presence marks are live: presence goes unmarked",
                );
                for gone in live_gateways.iter().filter(|g| !now.contains(g)) {
                    tracing::info!(gateway = %gone, "gateway gone: dropping its members from every room");
                    for e in rooms.values_mut() {
                        match e.handle.try_send(RoomCommand::GatewayGone(gone.clone())) {
                            Ok(()) => e.sent += 1,
                            Err(err) => tracing::warn!(error = %err, "room too busy to drop a dead gateway's members"),
                        }
                    }
                    for s in shards.values() {
                        if let Err(err) = s.try_send(ShardCommand::GatewayGone(gone.clone())) {
                            tracing::warn!(error = %err, "shard too busy to drop a dead gateway's members");
                        }
                    }
                }
                live_gateways = now;
            }
            _ = shutdown.cancelled() => break,
        }
    }

    // Drain: leave the ring, flush every room, then stop.
    ready.send_replace(false);
    draining_tx.send_replace(true);
    tracing::info!(rooms = rooms.len(), "draining: flushing every room");
    rooms_cancel.cancel();
    rooms.clear();
    shards.clear();
    drop(shard_deps);
    drop(deps);
    tracker.close();
    let grace = settings.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        // Commands still arriving are answered `not_owner` while rooms flush.
        let refuse = async {
            while let Some(msg) = inbox.next().await {
                if let Some(to) = msg.reply {
                    // Best effort: the gateway retries elsewhere either way.
                    let _ = bus
                        .publish(to, encode_reply(&ReplyHead::NotOwner, &[]))
                        .await;
                }
            }
        };
        tokio::select! {
            _ = tracker.wait() => {}
            _ = refuse => tracker.wait().await,
        }
        // Every actor ended, so every writer handle is gone.
        let _ = writer_task.await;
    })
    .await;
    if drained.is_err() {
        tracing::error!(
            grace_secs = grace.as_secs(),
            "grace period over with rooms still flushing"
        );
    }
    bg.cancel();
    // The heartbeat task deletes our entry on its way out; renewals just
    // stop. With NATS unreachable these would wait for it forever.
    let farewell = async {
        let _ = hb.await;
        let _ = renewals.await;
        bus.drain().await;
    };
    if tokio::time::timeout(FAREWELL, farewell).await.is_err() {
        tracing::warn!(
            secs = FAREWELL.as_secs(),
            "bus unreachable at shutdown: leaving without a goodbye (peers notice by the TTL)"
        );
    }
    tracing::info!("room node stopped");
    Ok(())
}

/// Longest the goodbye after a drain may take (deleting our heartbeat
/// entry, flushing the bus client): past it the process exits anyway, and
/// peers drop it from the ring when its heartbeat expires. Without a bound
/// a node stopped while NATS was down never exited.
pub const FAREWELL: Duration = Duration::from_secs(5);

/// Member shard actors on this node, by room and shard.
type Shards = HashMap<(RoomId, u32), ShardHandle>;

/// The actors this node runs.
struct Here<'a> {
    rooms: &'a mut HashMap<RoomId, Entry>,
    shards: &'a mut Shards,
}

/// What a request is dispatched with: the node's view and its actors.
struct Ctx<'a> {
    me: &'a NodeId,
    placement: &'a Placement,
    deps: &'a RoomDeps,
    shard_deps: &'a ShardDeps,
    bus: &'a Arc<dyn Bus>,
    tracker: &'a TaskTracker,
    cancel: &'a CancellationToken,
}

impl Ctx<'_> {
    fn owns(&self, req: &NodeRequest) -> bool {
        self.placement.owner_of(&req.placement_key()).as_ref() == Some(self.me)
    }
}

/// One request from the inbox, or a batch of sends.
async fn dispatch(cx: &Ctx<'_>, here: &mut Here<'_>, msg: BusMessage) {
    if is_batch(&msg.payload) {
        dispatch_batch(cx, here, msg).await;
        return;
    }
    let reply = msg.reply;
    let req: NodeRequest = match serde_json::from_slice(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            METRICS.commands.with_label_values(&["bad"]).inc();
            let head = bad_request(format!("bad request: {e}"));
            answer(cx.bus, reply.map(Reply::Subject), &head).await;
            return;
        }
    };
    if !cx.owns(&req) {
        METRICS.commands.with_label_values(&["not_owner"]).inc();
        answer(cx.bus, reply.map(Reply::Subject), &ReplyHead::NotOwner).await;
        return;
    }
    if let NodeRequest::Shard { shard, shards, req } = req {
        let room = req.room().clone();
        to_shard((room, shard, shards), req, reply, cx, here.shards).await;
        return;
    }
    to_room(req, reply.map(Reply::Subject), cx, here.rooms).await;
}

/// A batch of sends from one gateway: each goes to its room like a single
/// send, answering in its slot of the batch's one reply. Only plain sends
/// are batched (a big room's member requests, which a shard forwards on,
/// travel alone): a batch holding anything else is refused as a whole.
async fn dispatch_batch(cx: &Ctx<'_>, here: &mut Here<'_>, msg: BusMessage) {
    let Some(to) = msg.reply else {
        // Nobody to answer: a batch is always a request.
        METRICS.commands.with_label_values(&["bad"]).inc();
        return;
    };
    let reqs = match decode_batch(&msg.payload) {
        Ok(reqs) if !reqs.is_empty() && reqs.len() <= MAX_BATCH_SENDS => reqs,
        Ok(reqs) => {
            METRICS.commands.with_label_values(&["bad"]).inc();
            let message = format!(
                "a batch of {} sends; between 1 and {MAX_BATCH_SENDS}",
                reqs.len()
            );
            answer(cx.bus, Some(Reply::Subject(to)), &bad_request(message)).await;
            return;
        }
        Err(e) => {
            METRICS.commands.with_label_values(&["bad"]).inc();
            let head = bad_request(format!("bad batch: {e}"));
            answer(cx.bus, Some(Reply::Subject(to)), &head).await;
            return;
        }
    };
    METRICS.batch_sends.observe(reqs.len() as f64);
    let slots = reply::batch(cx.bus.clone(), to, reqs.len());
    for (req, slot) in reqs.into_iter().zip(slots) {
        if !cx.owns(&req) {
            METRICS.commands.with_label_values(&["not_owner"]).inc();
            slot.fill(&ReplyHead::NotOwner);
        } else {
            to_room(req, Some(Reply::Slot(slot)), cx, here.rooms).await;
        }
    }
}

fn bad_request(message: String) -> ReplyHead {
    ReplyHead::Error {
        code: ErrorCode::BadFrame,
        message,
        retry_after_ms: None,
    }
}

/// Hands a request to its room's actor, starting it on first use.
async fn to_room(
    req: NodeRequest,
    reply: Option<Reply>,
    cx: &Ctx<'_>,
    rooms: &mut HashMap<RoomId, Entry>,
) {
    let room = req.room().clone();
    let mut cmd = RoomCommand::Request { req, reply };
    // Two tries: the second after replacing an actor that just ended.
    for _ in 0..2 {
        let entry = rooms.entry(room.clone()).or_insert_with(|| {
            let (handle, task) = room::spawn(room.clone(), cx.deps.clone(), cx.cancel.clone());
            cx.tracker.spawn(async move {
                if let Err(e) = task.await {
                    tracing::error!(error = %e, "room actor failed");
                }
            });
            Entry { handle, sent: 0 }
        });
        match entry.handle.try_send(cmd) {
            Ok(()) => {
                entry.sent += 1;
                METRICS.commands_ok.inc();
                return;
            }
            Err(mpsc::error::TrySendError::Full(RoomCommand::Request { reply, .. })) => {
                busy(cx.bus, reply, "room is busy; retry shortly").await;
                return;
            }
            // Only requests are ever sent through here.
            Err(mpsc::error::TrySendError::Full(_)) => return,
            Err(mpsc::error::TrySendError::Closed(c)) => {
                rooms.remove(&room);
                cmd = c;
            }
        }
    }
}

/// Hands a member request to its shard actor, starting it on first use.
async fn to_shard(
    (room, index, count): (RoomId, u32, u32),
    req: Box<NodeRequest>,
    reply: Option<String>,
    cx: &Ctx<'_>,
    shards: &mut Shards,
) {
    if index >= count || count > room::MAX_SHARDS {
        METRICS.commands.with_label_values(&["bad"]).inc();
        let head = bad_request(format!("no member shard {index} of {count}"));
        answer(cx.bus, reply.map(Reply::Subject), &head).await;
        return;
    }
    let mut cmd = ShardCommand::Request {
        req,
        shards: count,
        reply,
    };
    let key = (room.clone(), index);
    if !shards.contains_key(&key) {
        // Before starting one, forget the shards that ended on their own
        // (idle), so the map holds only live actors.
        shards.retain(|_, h| !h.is_closed());
    }
    for _ in 0..2 {
        let handle = shards.entry(key.clone()).or_insert_with(|| {
            let (handle, task) = shard::spawn(
                room.clone(),
                index,
                count,
                cx.shard_deps.clone(),
                cx.cancel.clone(),
            );
            cx.tracker.spawn(async move {
                if let Err(e) = task.await {
                    tracing::error!(error = %e, "member shard actor failed");
                }
            });
            handle
        });
        match handle.try_send(cmd) {
            Ok(()) => {
                METRICS.commands_ok.inc();
                return;
            }
            Err(mpsc::error::TrySendError::Full(ShardCommand::Request { reply, .. })) => {
                let reply = reply.map(Reply::Subject);
                busy(cx.bus, reply, "room shard is busy; retry shortly").await;
                return;
            }
            Err(mpsc::error::TrySendError::Full(_)) => return,
            Err(mpsc::error::TrySendError::Closed(c)) => {
                // It ended (idle): start a fresh one.
                shards.remove(&key);
                cmd = c;
            }
        }
    }
}

/// A full mailbox: counted, and the sender told to retry shortly.
async fn busy(bus: &Arc<dyn Bus>, reply: Option<Reply>, message: &str) {
    METRICS.commands.with_label_values(&["busy"]).inc();
    let head = ReplyHead::Error {
        code: ErrorCode::Overloaded,
        message: message.into(),
        retry_after_ms: Some(100),
    };
    answer(bus, reply, &head).await;
}

async fn answer(bus: &Arc<dyn Bus>, reply: Option<Reply>, head: &ReplyHead) {
    if let Some(to) = reply {
        // Best effort: an unanswered request times out at the gateway,
        // which retries.
        let _ = to.send(bus, head, &[]).await;
    }
}

/// Turns a bus feature on while every live gateway reads it and off while
/// one that does not is live (rolling upgrades), logging each turn.
fn set_gateway_feature(flag: &AtomicBool, on: bool, feature: &str, on_says: &str, off_says: &str) {
    if flag.swap(on, Ordering::Relaxed) != on {
        tracing::info!(feature, on, "{}", if on { on_says } else { off_says });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::store::sqlite::SqliteStore;
    use bytes::Bytes;
    use chat_protocol::bus::{decode_batch_reply, decode_reply, encode_batch};
    use chat_protocol::UserId;

    fn send(room: &str, client_id: &str) -> NodeRequest {
        NodeRequest::Send {
            room: RoomId::new(room).unwrap(),
            user: UserId::new("u").unwrap(),
            text: "hello".into(),
            client_id: client_id.into(),
        }
    }

    fn payload(req: &NodeRequest) -> Bytes {
        Bytes::from(serde_json::to_vec(req).unwrap())
    }

    /// A node serving on an in-process bus and a fresh SQLite file.
    async fn node() -> (Arc<dyn Bus>, String, CancellationToken, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("chat-node-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let store = Arc::new(SqliteStore::open(&dir).await.unwrap());
        let subjects = Subjects::new("t").unwrap();
        let node_id = NodeId::new("n1").unwrap();
        let inbox = subjects.node_inbox(&node_id);
        let settings = NodeSettings {
            node_id,
            subjects,
            room: RoomConfig::default(),
            node_ttl: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
        };
        let stop = CancellationToken::new();
        let (ready, _) = watch::channel(false);
        tokio::spawn(serve(settings, bus.clone(), store, stop.clone(), ready));
        // Serving once a send is answered other than `not_owner` (the ring
        // takes a moment to hold the node) or `no responders`.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let probe = payload(&send("probe", "p"));
            if let Ok(bytes) = bus
                .request(inbox.clone(), probe, Duration::from_secs(5))
                .await
            {
                if !matches!(decode_reply(&bytes).unwrap().0, ReplyHead::NotOwner) {
                    break;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "node never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (bus, inbox, stop, dir)
    }

    #[tokio::test]
    async fn a_batch_is_answered_in_one_reply_one_answer_per_send_in_order() {
        let (bus, inbox, stop, dir) = node().await;
        let join = NodeRequest::Join {
            room: RoomId::new("a").unwrap(),
            user: UserId::new("u").unwrap(),
            gateway: NodeId::new("g").unwrap(),
            conn: 1,
            since: None,
            quiet: false,
        };
        // Two rooms, and a resend of the first send inside the same batch.
        let reqs = [
            send("a", "c1"),
            send("b", "c1"),
            send("a", "c2"),
            send("a", "c1"),
        ];
        let batch = encode_batch(&reqs.iter().map(payload).collect::<Vec<_>>());
        let reply = bus
            .request(inbox.clone(), batch, Duration::from_secs(10))
            .await
            .unwrap();
        let heads: Vec<ReplyHead> = decode_batch_reply(&reply, reqs.len())
            .unwrap()
            .iter()
            .map(|p| decode_reply(p).unwrap().0)
            .collect();
        let seq = |h: &ReplyHead| match h {
            ReplyHead::Ack { seq, .. } => *seq,
            other => panic!("expected an ack, got {other:?}"),
        };
        assert_eq!(seq(&heads[0]), 1);
        assert_eq!(seq(&heads[1]), 1, "room b numbers on its own");
        assert_eq!(seq(&heads[2]), 2, "the batch keeps its order in a room");
        assert_eq!(seq(&heads[3]), 1, "the resend gets the first send's seq");

        // Too large a batch, one holding anything but sends, or one that is
        // not an array of requests, is refused as a whole, in one head.
        let many: Vec<Bytes> = (0..=MAX_BATCH_SENDS)
            .map(|i| payload(&send("a", &format!("m{i}"))))
            .collect();
        let with_join = encode_batch(&[payload(&send("a", "c3")), payload(&join)]);
        for bad in [encode_batch(&many), with_join, Bytes::from_static(b"[1,2]")] {
            let reply = bus
                .request(inbox.clone(), bad, Duration::from_secs(10))
                .await
                .unwrap();
            let (head, _) = decode_reply(&reply).unwrap();
            assert!(
                matches!(
                    head,
                    ReplyHead::Error {
                        code: ErrorCode::BadFrame,
                        ..
                    }
                ),
                "{head:?}"
            );
        }
        stop.cancel();
        let _ = std::fs::remove_dir_all(dir);
    }
}
