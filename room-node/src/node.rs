//! The node: takes commands from its bus inbox, checks that it owns the
//! room on the placement ring, and hands them to the room's actor
//! (spawning it on first use). Owns the map of running actors; nothing else
//! touches it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chat_protocol::bus::{encode_reply, NodeRequest, ReplyHead};
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
    let mut live_gateways: Vec<NodeId> = gateways.borrow_and_update().clone();
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
                dispatch(&me, &current, &deps, &shard_deps, &bus, &mut here, &tracker, &rooms_cancel, msg).await;
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
                let now: Vec<NodeId> = gateways.borrow_and_update().clone();
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

#[allow(clippy::too_many_arguments)]
async fn dispatch(
    me: &NodeId,
    placement: &Placement,
    deps: &RoomDeps,
    shard_deps: &ShardDeps,
    bus: &Arc<dyn Bus>,
    here: &mut Here<'_>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    msg: BusMessage,
) {
    let rooms = &mut *here.rooms;
    let reply = msg.reply;
    let req: NodeRequest = match serde_json::from_slice(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            METRICS.commands.with_label_values(&["bad"]).inc();
            let head = ReplyHead::Error {
                code: ErrorCode::BadFrame,
                message: format!("bad request: {e}"),
                retry_after_ms: None,
            };
            answer(bus, reply, &head).await;
            return;
        }
    };
    let room = req.room().clone();
    if placement.owner_of(&req.placement_key()).as_ref() != Some(me) {
        METRICS.commands.with_label_values(&["not_owner"]).inc();
        answer(bus, reply, &ReplyHead::NotOwner).await;
        return;
    }
    if let NodeRequest::Shard { shard, shards, req } = req {
        to_shard(
            (room, shard, shards),
            req,
            reply,
            shard_deps,
            bus,
            here.shards,
            tracker,
            cancel,
        )
        .await;
        return;
    }
    let mut cmd = RoomCommand::Request { req, reply };
    // Two tries: the second after replacing an actor that just ended.
    for _ in 0..2 {
        let entry = rooms.entry(room.clone()).or_insert_with(|| {
            let (handle, task) = room::spawn(room.clone(), deps.clone(), cancel.clone());
            tracker.spawn(async move {
                if let Err(e) = task.await {
                    tracing::error!(error = %e, "room actor failed");
                }
            });
            Entry { handle, sent: 0 }
        });
        match entry.handle.try_send(cmd) {
            Ok(()) => {
                entry.sent += 1;
                METRICS.commands.with_label_values(&["ok"]).inc();
                return;
            }
            Err(mpsc::error::TrySendError::Full(RoomCommand::Request { reply, .. })) => {
                busy(bus, reply, "room is busy; retry shortly").await;
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
#[allow(clippy::too_many_arguments)]
async fn to_shard(
    (room, index, count): (RoomId, u32, u32),
    req: Box<NodeRequest>,
    reply: Option<String>,
    deps: &ShardDeps,
    bus: &Arc<dyn Bus>,
    shards: &mut Shards,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    if index >= count || count > room::MAX_SHARDS {
        METRICS.commands.with_label_values(&["bad"]).inc();
        let head = ReplyHead::Error {
            code: ErrorCode::BadFrame,
            message: format!("no member shard {index} of {count}"),
            retry_after_ms: None,
        };
        answer(bus, reply, &head).await;
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
            let (handle, task) =
                shard::spawn(room.clone(), index, count, deps.clone(), cancel.clone());
            tracker.spawn(async move {
                if let Err(e) = task.await {
                    tracing::error!(error = %e, "member shard actor failed");
                }
            });
            handle
        });
        match handle.try_send(cmd) {
            Ok(()) => {
                METRICS.commands.with_label_values(&["ok"]).inc();
                return;
            }
            Err(mpsc::error::TrySendError::Full(ShardCommand::Request { reply, .. })) => {
                busy(bus, reply, "room shard is busy; retry shortly").await;
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
async fn busy(bus: &Arc<dyn Bus>, reply: Option<String>, message: &str) {
    METRICS.commands.with_label_values(&["busy"]).inc();
    let head = ReplyHead::Error {
        code: ErrorCode::Overloaded,
        message: message.into(),
        retry_after_ms: Some(100),
    };
    answer(bus, reply, &head).await;
}

async fn answer(bus: &Arc<dyn Bus>, reply: Option<String>, head: &ReplyHead) {
    if let Some(to) = reply {
        // Best effort: an unanswered request times out at the gateway,
        // which retries.
        let _ = bus.publish(to, encode_reply(head, &[])).await;
    }
}
