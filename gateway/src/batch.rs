//! Sends bound for the same room node leave together: one bus request
//! carries every send that queued for that node while the last one was
//! going out, and the node answers them all in one reply
//! ([`chat_protocol::bus::encode_batch`]). Nothing waits for a batch to
//! fill: a send that finds its node's lane idle goes out alone at once,
//! so batching costs no latency and grows only with load, when the
//! per-message cost of the bus (a publish, a delivery and a reply each
//! way, in the gateway, in NATS and in the node) is what it saves.
//!
//! One lane per node subject, a task owning a bounded queue. Each send
//! keeps its own answer, and its own retries in [`crate::route`]: a batch
//! that fails (no responders, timeout) fails each of its sends, which are
//! then retried one by one like any other request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::bus::{decode_batch_reply, encode_batch, is_pending, MAX_BATCH_SENDS};
use chat_room_node::bus::{Bus, BusError};
use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::METRICS;

/// Sends one lane queues before senders wait (backpressure into their
/// sessions, which bound their own sends in flight).
const QUEUE: usize = 4096;
/// Batches one lane has in flight; past it the queue fills instead.
const MAX_IN_FLIGHT: usize = 256;
/// Most payload bytes of a batch of several sends, well inside a NATS
/// message (1 MiB by default).
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// A lane with nothing queued or in flight this long ends; the next send
/// to its node starts a new one.
const IDLE: Duration = Duration::from_secs(30);

/// One send waiting in a lane.
struct Item {
    payload: Bytes,
    done: oneshot::Sender<Result<Bytes, BusError>>,
}

/// The lanes to room nodes, by node inbox subject.
pub struct Batcher {
    bus: Arc<dyn Bus>,
    timeout: Duration,
    lanes: Mutex<HashMap<String, mpsc::Sender<Item>>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    /// Lanes over `bus`; each batch waits up to `timeout` for its reply.
    pub fn new(bus: Arc<dyn Bus>, timeout: Duration) -> Self {
        Self {
            bus,
            timeout,
            lanes: Mutex::new(HashMap::new()),
        }
    }

    /// Sends one request (a serialised [`chat_protocol::bus::NodeRequest::Send`])
    /// to `subject` with whatever else is queued for it, and returns its
    /// own reply, as [`Bus::request`] would.
    ///
    /// Sends queued in some order are published in that order (a lane
    /// sends its batches in order, and a batch keeps its sends' order), so
    /// one connection's pipelined sends still reach their room in order.
    ///
    /// # Errors
    /// As [`Bus::request`]: [`BusError::NoResponders`], [`BusError::TimedOut`]
    /// or another bus failure, for the whole batch.
    pub async fn request(&self, subject: &str, payload: Bytes) -> Result<Bytes, BusError> {
        // A send its node answers `pending` (its room is slow to commit,
        // and the batch's reply did not wait) is asked for again, within
        // the time one try of a single request would have had.
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let reply = self.request_once(subject, payload.clone()).await?;
            if !is_pending(&reply) {
                return Ok(reply);
            }
            METRICS
                .node_request_errors
                .with_label_values(&["pending"])
                .inc();
            if tokio::time::Instant::now() >= deadline {
                return Err(BusError::TimedOut);
            }
        }
    }

    async fn request_once(&self, subject: &str, payload: Bytes) -> Result<Bytes, BusError> {
        let (done, answer) = oneshot::channel();
        let mut item = Item { payload, done };
        // Twice: a lane that just ended (idle) is replaced.
        for _ in 0..2 {
            let lane = self.lane(subject);
            match lane.send(item).await {
                Ok(()) => {
                    return answer
                        .await
                        .unwrap_or_else(|_| Err(BusError::Other("batch lane stopped".into())));
                }
                Err(mpsc::error::SendError(back)) => {
                    item = back;
                    let mut lanes = self.lanes.lock().expect("lanes lock");
                    if lanes.get(subject).is_some_and(mpsc::Sender::is_closed) {
                        lanes.remove(subject);
                    }
                }
            }
        }
        Err(BusError::Other("batch lane stopped".into()))
    }

    /// The lane to `subject`, started on first use.
    fn lane(&self, subject: &str) -> mpsc::Sender<Item> {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        if let Some(lane) = lanes.get(subject).filter(|l| !l.is_closed()) {
            return lane.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run_lane(
            self.bus.clone(),
            subject.to_owned(),
            rx,
            self.timeout,
        ));
        lanes.insert(subject.to_owned(), tx.clone());
        tx
    }
}

/// A lane: takes every queued send as one batch, publishes it, and hands
/// each send its answer when the reply comes; many batches in flight.
async fn run_lane(
    bus: Arc<dyn Bus>,
    subject: String,
    mut rx: mpsc::Receiver<Item>,
    timeout: Duration,
) {
    let mut in_flight = FuturesUnordered::new();
    // A send that did not fit the last batch: it starts the next one.
    let mut carry: Option<Item> = None;
    loop {
        if in_flight.len() < MAX_IN_FLIGHT {
            if let Some(first) = carry.take() {
                let batch = take_batch(first, &mut rx, &mut carry);
                in_flight.push(send_batch(bus.clone(), subject.clone(), batch, timeout));
            }
        }
        tokio::select! {
            // Completions first, which is also where new batches are
            // published (their first poll), before taking more.
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            item = rx.recv(), if in_flight.len() < MAX_IN_FLIGHT && carry.is_none() => {
                let Some(first) = item else { break };
                let batch = take_batch(first, &mut rx, &mut carry);
                in_flight.push(send_batch(bus.clone(), subject.clone(), batch, timeout));
            }
            // Refuse new sends; what is already queued still goes, then
            // `recv` ends the loop.
            () = tokio::time::sleep(IDLE), if in_flight.is_empty() => rx.close(),
        }
    }
    while in_flight.next().await.is_some() {}
}

/// `first` and whatever is queued behind it, up to the batch bounds; a
/// send that would pass [`MAX_BATCH_BYTES`] is left in `carry` for the
/// next batch (a batch of one may be larger: it is the send as it is).
fn take_batch(first: Item, rx: &mut mpsc::Receiver<Item>, carry: &mut Option<Item>) -> Vec<Item> {
    let mut bytes = first.payload.len();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH_SENDS {
        match rx.try_recv() {
            Ok(item) if bytes + item.payload.len() + 1 > MAX_BATCH_BYTES => {
                *carry = Some(item);
                break;
            }
            Ok(item) => {
                bytes += item.payload.len() + 1;
                batch.push(item);
            }
            Err(_) => break,
        }
    }
    batch
}

/// Publishes one batch and answers its sends. A batch of one goes as the
/// plain request it is. `unconstrained`: the lane pushes batches in order
/// and `FuturesUnordered` first polls them in push order, which is when
/// they are published; with tokio's cooperative budget spent, a first
/// poll could return before publishing and let a later batch overtake.
fn send_batch(
    bus: Arc<dyn Bus>,
    subject: String,
    mut batch: Vec<Item>,
    timeout: Duration,
) -> tokio::task::Unconstrained<futures::future::BoxFuture<'static, ()>> {
    use futures::FutureExt as _;
    METRICS.node_batch_sends.observe(batch.len() as f64);
    tokio::task::unconstrained(
        async move {
            if batch.len() == 1 {
                let Item { payload, done } = batch.pop().expect("a batch of one");
                // A sender that gave up is no longer waiting.
                let _ = done.send(bus.request(subject, payload, timeout).await);
                return;
            }
            let payload = encode_batch(batch.iter().map(|i| &i.payload));
            let reply = bus.request(subject, payload, timeout).await;
            match reply.map(|bytes| decode_batch_reply(&bytes, batch.len())) {
                Ok(Ok(answers)) => {
                    for (item, answer) in batch.into_iter().zip(answers) {
                        let _ = item.done.send(Ok(answer));
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "undecodable batch reply");
                    let e = BusError::Other(format!("bad batch reply: {e}"));
                    for item in batch {
                        let _ = item.done.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for item in batch {
                        let _ = item.done.send(Err(e.clone()));
                    }
                }
            }
        }
        .boxed(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_protocol::bus::NodeRequest;
    use chat_protocol::bus::{decode_batch, decode_reply, encode_batch_reply, ReplyHead};
    use chat_protocol::{RoomId, UserId};
    use chat_room_node::bus::memory::MemoryBus;

    fn send(n: u64) -> Bytes {
        let req = NodeRequest::Send {
            room: RoomId::new("r").unwrap(),
            user: UserId::new("u").unwrap(),
            text: "t".into(),
            client_id: format!("c{n}"),
        };
        Bytes::from(serde_json::to_vec(&req).unwrap())
    }

    fn ack(seq: u64) -> ReplyHead {
        ReplyHead::Ack {
            seq,
            id: format!("m{seq}"),
            duplicate: false,
        }
    }

    #[tokio::test]
    async fn sends_queued_together_go_as_one_request_and_each_gets_its_answer() {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let mut inbox = bus.subscribe("n.in".into()).await.unwrap();
        // A node that answers each send with an ack numbered by its client id.
        let node = {
            let bus = bus.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while let Some(msg) = inbox.next().await {
                    let reqs = decode_batch(&msg.payload).unwrap();
                    seen.push(reqs.len());
                    let heads: Vec<ReplyHead> = reqs
                        .iter()
                        .map(|r| match r {
                            NodeRequest::Send { client_id, .. } => {
                                ack(client_id[1..].parse().unwrap())
                            }
                            other => panic!("not a send: {other:?}"),
                        })
                        .collect();
                    bus.publish(msg.reply.unwrap(), encode_batch_reply(&heads))
                        .await
                        .unwrap();
                    if seen.iter().sum::<usize>() == 3 {
                        return seen;
                    }
                }
                seen
            })
        };
        let batcher = Batcher::new(bus.clone(), Duration::from_secs(5));
        // Queued in one poll, before the lane runs: one batch of three.
        let replies =
            futures::future::join_all((1..=3).map(|n| batcher.request("n.in", send(n)))).await;
        for (n, reply) in (1..=3).zip(replies) {
            assert_eq!(decode_reply(&reply.unwrap()).unwrap().0, ack(n));
        }
        assert_eq!(node.await.unwrap(), vec![3]);
    }

    #[tokio::test]
    async fn a_batch_stays_under_its_byte_bound_and_the_send_that_would_pass_it_goes_next() {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let mut inbox = bus.subscribe("n.in".into()).await.unwrap();
        let node = {
            let bus = bus.clone();
            tokio::spawn(async move {
                let mut sizes = Vec::new();
                while sizes.iter().sum::<usize>() < 3 {
                    let msg = inbox.next().await.unwrap();
                    assert!(msg.payload.len() <= MAX_BATCH_BYTES + 2);
                    let reqs = if chat_protocol::bus::is_batch(&msg.payload) {
                        decode_batch(&msg.payload).unwrap()
                    } else {
                        vec![serde_json::from_slice(&msg.payload).unwrap()]
                    };
                    sizes.push(reqs.len());
                    let heads: Vec<ReplyHead> = reqs.iter().map(|_| ack(1)).collect();
                    bus.publish(msg.reply.unwrap(), encode_batch_reply(&heads))
                        .await
                        .unwrap();
                }
                sizes
            })
        };
        let big = |n: u64| {
            let req = NodeRequest::Send {
                room: RoomId::new("r").unwrap(),
                user: UserId::new("u").unwrap(),
                text: "x".repeat(100 * 1024),
                client_id: format!("c{n}"),
            };
            Bytes::from(serde_json::to_vec(&req).unwrap())
        };
        let batcher = Batcher::new(bus.clone(), Duration::from_secs(5));
        // Three sends of 100 KiB queued at once: two fit 256 KiB, the
        // third goes next, alone.
        let replies =
            futures::future::join_all((1..=3).map(|n| batcher.request("n.in", big(n)))).await;
        assert!(replies.iter().all(Result::is_ok));
        assert_eq!(node.await.unwrap(), vec![2, 1]);
    }

    #[tokio::test]
    async fn a_pending_send_is_asked_for_again_until_answered() {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let mut inbox = bus.subscribe("n.in".into()).await.unwrap();
        // A node whose room commits only by the third ask.
        let node = {
            let bus = bus.clone();
            tokio::spawn(async move {
                for asked in 1..=3 {
                    let msg = inbox.next().await.unwrap();
                    let head = if asked < 3 {
                        ReplyHead::Pending
                    } else {
                        ack(1)
                    };
                    let reply = chat_protocol::bus::encode_reply(&head, &[]);
                    bus.publish(msg.reply.unwrap(), reply).await.unwrap();
                }
            })
        };
        let batcher = Batcher::new(bus.clone(), Duration::from_secs(5));
        let reply = batcher.request("n.in", send(1)).await.unwrap();
        assert_eq!(decode_reply(&reply).unwrap().0, ack(1));
        node.await.unwrap();
    }

    #[tokio::test]
    async fn a_batch_nobody_answers_fails_each_of_its_sends() {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let batcher = Batcher::new(bus, Duration::from_secs(5));
        let replies =
            futures::future::join_all((1..=3).map(|n| batcher.request("nobody", send(n)))).await;
        for reply in replies {
            assert!(matches!(reply, Err(BusError::NoResponders)), "{reply:?}");
        }
    }
}
