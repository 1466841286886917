//! Room actor unit tests on paused time, with an in-memory bus and a
//! hand-written fake store whose failures the tests script.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use chat_protocol::bus::decode_reply;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::*;
use crate::bus::memory::MemoryBus;
use crate::store::{Result as StoreResult, RoomRows, Snapshot};

#[derive(Default)]
struct FakeState {
    rows: BTreeMap<(String, u64), Message>,
    fail_next: usize,
    commits: usize,
    /// room → (owner, epoch, released)
    leases: std::collections::HashMap<String, (String, u64, bool)>,
    /// room → member shards
    shards: std::collections::HashMap<String, u32>,
}

#[derive(Default)]
struct FakeStore {
    state: Mutex<FakeState>,
    /// Each commit takes one permit: a test lets commits through by
    /// adding permits, whether or not the writer is already waiting.
    gate: Option<Arc<Semaphore>>,
}

/// Room `r`'s stored (seq, client_id) pairs, in seq order.
fn seqs_and_client_ids(store: &FakeStore) -> Vec<(u64, String)> {
    store
        .rows("r")
        .into_iter()
        .map(|m| (m.seq, m.client_id))
        .collect()
}

impl FakeStore {
    fn rows(&self, room: &str) -> Vec<Message> {
        let s = self.state.lock().unwrap();
        s.rows
            .iter()
            .filter(|((r, _), _)| r == room)
            .map(|(_, m)| m.clone())
            .collect()
    }
}

#[async_trait]
impl Store for FakeStore {
    async fn commit(
        &self,
        owner: &NodeId,
        batches: &[RoomRows<'_>],
        _ttl: Duration,
        ts_ms: i64,
    ) -> StoreResult<Vec<usize>> {
        if let Some(g) = &self.gate {
            g.acquire().await.expect("gate open").forget();
        }
        let mut s = self.state.lock().unwrap();
        s.commits += 1;
        if s.fail_next > 0 {
            s.fail_next -= 1;
            return Err(StoreError::Unavailable("scripted outage".into()));
        }
        let fenced: Vec<usize> = batches
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                s.leases
                    .get(b.room.as_str())
                    .is_none_or(|(o, e, _)| o != owner.as_str() || *e != b.epoch)
            })
            .map(|(i, _)| i)
            .collect();
        let batches: Vec<&RoomRows<'_>> = batches
            .iter()
            .enumerate()
            .filter(|(i, _)| !fenced.contains(i))
            .map(|(_, b)| b)
            .collect();
        for b in &batches {
            for r in b.rows {
                let dup_key = s
                    .rows
                    .values()
                    .any(|m| m.room == *b.room && m.user == r.user && m.client_id == r.client_id);
                if s.rows.contains_key(&(b.room.to_string(), r.seq)) || dup_key {
                    return Err(StoreError::Rejected("unique violation".into()));
                }
            }
        }
        for b in batches {
            for r in b.rows {
                let m = Message {
                    room: b.room.clone(),
                    seq: r.seq,
                    id: r.id.clone(),
                    user: r.user.clone(),
                    text: r.text.clone(),
                    ts: ts_ms,
                    client_id: r.client_id.clone(),
                };
                s.rows.insert((b.room.to_string(), r.seq), m);
            }
        }
        Ok(fenced)
    }

    async fn acquire_lease(
        &self,
        room: &str,
        owner: &NodeId,
        _ttl: Duration,
    ) -> StoreResult<Option<u64>> {
        let mut s = self.state.lock().unwrap();
        let entry = s
            .leases
            .entry(room.to_string())
            .or_insert((owner.to_string(), 0, true));
        if entry.0 == owner.as_str() || entry.2 {
            *entry = (owner.to_string(), entry.1 + 1, false);
            Ok(Some(entry.1))
        } else {
            Ok(None)
        }
    }

    async fn renew_leases(
        &self,
        owner: &NodeId,
        leases: &[(String, u64)],
        _ttl: Duration,
    ) -> StoreResult<Vec<String>> {
        let s = self.state.lock().unwrap();
        Ok(leases
            .iter()
            .filter(|(r, e)| {
                s.leases
                    .get(r)
                    .is_some_and(|(o, le, _)| o == owner.as_str() && le == e)
            })
            .map(|(r, _)| r.clone())
            .collect())
    }

    async fn release_lease(&self, room: &str, owner: &NodeId, epoch: u64) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        if let Some(l) = s.leases.get_mut(room) {
            if l.0 == owner.as_str() && l.1 == epoch {
                l.2 = true;
            }
        }
        Ok(())
    }

    async fn set_shards(
        &self,
        room: &RoomId,
        owner: &NodeId,
        epoch: u64,
        shards: u32,
    ) -> StoreResult<bool> {
        let mut s = self.state.lock().unwrap();
        let held = s
            .leases
            .get(room.as_str())
            .is_some_and(|(o, e, _)| o == owner.as_str() && *e == epoch);
        if held {
            s.shards.insert(room.as_str().to_owned(), shards);
        }
        Ok(held)
    }

    async fn load_room(&self, room: &RoomId, recent: u32, _dedup: u32) -> StoreResult<Snapshot> {
        let rows = self.rows(room.as_str());
        let last_seq = rows.last().map_or(0, |m| m.seq);
        let skip = rows.len().saturating_sub(recent as usize);
        let dedup = rows
            .iter()
            .map(|m| (m.user.clone(), m.client_id.clone(), m.seq, m.id.clone()))
            .collect();
        Ok(Snapshot {
            last_seq,
            recent: rows[skip..].to_vec(),
            dedup,
            shards: self
                .state
                .lock()
                .unwrap()
                .shards
                .get(room.as_str())
                .copied()
                .unwrap_or(1),
        })
    }

    async fn history(&self, room: &RoomId, page: Page) -> StoreResult<(Vec<Message>, bool)> {
        let rows: Vec<Message> = self
            .rows(room.as_str())
            .into_iter()
            .filter(|m| {
                page.after.is_none_or(|a| m.seq > a) && page.before.is_none_or(|b| m.seq < b)
            })
            .collect();
        let limit = page.limit as usize;
        if page.after.is_some() {
            let more = rows.len() > limit;
            Ok((rows.into_iter().take(limit).collect(), more))
        } else {
            let more = rows.len() > limit;
            let skip = rows.len().saturating_sub(limit);
            Ok((rows[skip..].to_vec(), more))
        }
    }

    async fn find_client_ids(
        &self,
        room: &RoomId,
        keys: &[(UserId, String)],
    ) -> StoreResult<Vec<(UserId, String, u64, String)>> {
        Ok(self
            .rows(room.as_str())
            .into_iter()
            .filter(|m| keys.iter().any(|(u, c)| *u == m.user && *c == m.client_id))
            .map(|m| (m.user, m.client_id, m.seq, m.id))
            .collect())
    }

    async fn ping(&self) -> bool {
        true
    }
}

struct Harness {
    bus: MemoryBus,
    store: Arc<FakeStore>,
    handle: RoomHandle,
    task: tokio::task::JoinHandle<RoomStats>,
    events: BoxStream<'static, crate::bus::BusMessage>,
    replies: BoxStream<'static, crate::bus::BusMessage>,
    idle: mpsc::Receiver<(RoomId, u64)>,
    /// Seqs of a multi-message event not yet taken by `next_event`.
    seqs: std::collections::VecDeque<u64>,
    /// Whether the room marks presence (every gateway reads marks).
    presence_marks: Arc<std::sync::atomic::AtomicBool>,
}

fn room() -> RoomId {
    RoomId::new("r").unwrap()
}

async fn harness(store: FakeStore, config: RoomConfig) -> Harness {
    harness_with(store, config, true).await
}

/// `multi_events`: whether every gateway reads multi-message events.
async fn harness_with(store: FakeStore, config: RoomConfig, multi_events: bool) -> Harness {
    let bus = MemoryBus::new();
    let store = Arc::new(store);
    let subjects = chat_protocol::subjects::Subjects::new("t").unwrap();
    let events = bus.subscribe(subjects.room_events(&room())).await.unwrap();
    let replies = bus.subscribe("reply".into()).await.unwrap();
    let node = NodeId::new("n1").unwrap();
    let (writer, _w) = crate::writer::spawn(store.clone(), node.clone(), Duration::from_secs(5));
    let (idle, idle_rx) = mpsc::channel(8);
    let presence_marks = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let deps = RoomDeps {
        bus: Arc::new(bus.clone()),
        store: store.clone(),
        writer,
        config: Arc::new(config),
        reads: Arc::new(Semaphore::new(4)),
        idle,
        subjects,
        node_id: node,
        leases: Arc::new(LeaseTable::default()),
        lease_ttl: Duration::from_secs(5),
        multi_events: Arc::new(multi_events.into()),
        presence_marks: presence_marks.clone(),
    };
    let (handle, task) = spawn(room(), deps, CancellationToken::new());
    Harness {
        bus,
        store,
        handle,
        task,
        events,
        replies,
        idle: idle_rx,
        seqs: Default::default(),
        presence_marks,
    }
}

fn send(h: &Harness, user: &str, cid: &str) {
    let req = NodeRequest::Send {
        room: room(),
        user: UserId::new(user).unwrap(),
        text: format!("text of {cid}"),
        client_id: cid.into(),
    };
    h.handle
        .try_send(RoomCommand::Request {
            req,
            reply: Some("reply".into()),
        })
        .unwrap();
}

fn config() -> RoomConfig {
    RoomConfig {
        rate: RateLimit {
            per_sec: 0.0,
            burst: 0.0,
        },
        ..RoomConfig::default()
    }
}

/// Next message's seq (one at a time, also from a multi-message event),
/// or None if nothing is published within `wait`.
async fn next_event(h: &mut Harness, wait: Duration) -> Option<u64> {
    if let Some(seq) = h.seqs.pop_front() {
        return Some(seq);
    }
    let m = tokio::time::timeout(wait, h.events.next()).await.ok()??;
    match Event::decode(&m.payload).unwrap() {
        Event::Message { seq, .. } => Some(seq),
        Event::Messages { first, frames } => {
            h.seqs.extend((first..).take(frames.len()));
            h.seqs.pop_front()
        }
        Event::Presence { .. } | Event::Shards { .. } | Event::ToAll { .. } => None,
        // The actor announces itself once it serves: skip to the next.
        Event::Resync => Box::pin(next_event(h, wait)).await,
    }
}

async fn next_reply(h: &mut Harness, wait: Duration) -> Option<ReplyHead> {
    let m = tokio::time::timeout(wait, h.replies.next()).await.ok()??;
    Some(decode_reply(&m.payload).unwrap().0)
}

async fn stop(h: Harness) -> (RoomStats, Arc<FakeStore>) {
    h.handle.try_send(RoomCommand::Stop).unwrap();
    let stats = h.task.await.unwrap();
    drop(h.bus);
    (stats, h.store)
}

#[tokio::test(start_paused = true)]
async fn alarm_is_armed_once_for_many_messages() {
    let mut h = harness(FakeStore::default(), config()).await;
    // Start on an alarm boundary (they are shared by the process), so the
    // 1 ms pause below cannot straddle one.
    tokio::time::sleep_until(alarm_at(Instant::now(), config().flush_interval)).await;
    for i in 0..10 {
        send(&h, "ann", &format!("a{i}"));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    for i in 0..10 {
        send(&h, "bob", &format!("b{i}"));
    }
    for want in 1..=20 {
        assert_eq!(next_event(&mut h, Duration::from_secs(1)).await, Some(want));
    }
    let (stats, store) = stop(h).await;
    assert_eq!(stats.alarms_armed, 1, "one alarm for one buffer fill");
    assert_eq!(stats.batches, 1, "all twenty rows in one batch");
    assert_eq!(store.rows("r").len(), 20);
}

#[tokio::test(start_paused = true)]
async fn full_batch_flushes_without_waiting_for_the_alarm() {
    let cfg = RoomConfig {
        flush_batch: 5,
        flush_interval: Duration::from_secs(3600),
        ..config()
    };
    let mut h = harness(FakeStore::default(), cfg).await;
    for i in 0..5 {
        send(&h, "ann", &format!("a{i}"));
    }
    // The alarm is an hour away; the batch is due by size.
    assert_eq!(next_event(&mut h, Duration::from_secs(1)).await, Some(1));
    let (stats, _) = stop(h).await;
    assert_eq!(stats.batches, 1);
}

/// The events a commit of three messages publishes, as (seq, client id)
/// per event.
async fn events_of_one_commit(multi_events: bool) -> Vec<Vec<(u64, String)>> {
    let cfg = RoomConfig {
        flush_batch: 3,
        flush_interval: Duration::from_secs(3600),
        ..config()
    };
    let mut h = harness_with(FakeStore::default(), cfg, multi_events).await;
    for i in 0..3 {
        send(&h, "ann", &format!("a{i}"));
    }
    let parse = |f: &Bytes| {
        let v: serde_json::Value = serde_json::from_slice(f).unwrap();
        let cid = v["client_id"].as_str().unwrap().to_owned();
        (v["seq"].as_u64().unwrap(), cid)
    };
    let mut events = Vec::new();
    while events.iter().map(Vec::len).sum::<usize>() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(1), h.events.next())
            .await
            .expect("an event in time")
            .unwrap();
        match Event::decode(&m.payload).unwrap() {
            Event::Resync => {}
            Event::Message { seq, frame } => {
                assert_eq!(parse(&frame).0, seq);
                events.push(vec![parse(&frame)]);
            }
            Event::Messages { first, frames } => {
                assert_eq!(parse(&frames[0]).0, first);
                events.push(frames.iter().map(parse).collect());
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    let (stats, _) = stop(h).await;
    assert_eq!(stats.batches, 1);
    events
}

#[tokio::test(start_paused = true)]
async fn a_commit_of_several_messages_is_one_event_carrying_them_in_order() {
    let one = |s: u64| (s, format!("a{}", s - 1));
    assert_eq!(
        events_of_one_commit(true).await,
        vec![vec![one(1), one(2), one(3)]]
    );
    // While a gateway of an older release runs: one event per message.
    assert_eq!(
        events_of_one_commit(false).await,
        vec![vec![one(1)], vec![one(2)], vec![one(3)]]
    );
}

#[tokio::test(start_paused = true)]
async fn failed_flush_keeps_order_and_retries_and_nothing_is_broadcast_before_commit() {
    let store = FakeStore {
        state: Mutex::new(FakeState {
            fail_next: 3,
            ..Default::default()
        }),
        gate: None,
    };
    let mut h = harness(store, config()).await;
    for i in 0..5 {
        send(&h, "ann", &format!("c{i}"));
    }
    // The alarm fires at 5 ms; the first commits fail and back off.
    assert_eq!(next_event(&mut h, Duration::from_millis(40)).await, None);
    assert!(
        next_reply(&mut h, Duration::from_millis(1)).await.is_none(),
        "no ack before commit"
    );
    for want in 1..=5 {
        assert_eq!(
            next_event(&mut h, Duration::from_secs(10)).await,
            Some(want)
        );
    }
    for want in 1..=5 {
        match next_reply(&mut h, Duration::from_secs(1)).await {
            Some(ReplyHead::Ack {
                seq,
                duplicate: false,
                ..
            }) => assert_eq!(seq, want),
            other => panic!("expected ack {want}, got {other:?}"),
        }
    }
    let (_, store) = stop(h).await;
    assert_eq!(
        store.state.lock().unwrap().commits,
        4,
        "three failures, then success"
    );
    let seqs: Vec<u64> = store.rows("r").iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    let cids: Vec<String> = store.rows("r").into_iter().map(|m| m.client_id).collect();
    assert_eq!(cids, vec!["c0", "c1", "c2", "c3", "c4"]);
}

#[tokio::test(start_paused = true)]
async fn nothing_is_broadcast_while_the_commit_is_in_flight() {
    let (store, gate) = gated();
    let mut h = harness(store, config()).await;
    send(&h, "ann", "c1");
    assert_eq!(next_event(&mut h, Duration::from_secs(5)).await, None);
    assert!(next_reply(&mut h, Duration::from_millis(1)).await.is_none());
    gate.add_permits(1);
    assert_eq!(next_event(&mut h, Duration::from_secs(1)).await, Some(1));
    assert!(matches!(
        next_reply(&mut h, Duration::from_secs(1)).await,
        Some(ReplyHead::Ack { seq: 1, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn resends_get_the_original_seq_and_burn_none() {
    let mut h = harness(FakeStore::default(), config()).await;
    send(&h, "ann", "x");
    send(&h, "ann", "x"); // resend while pending
    assert_eq!(next_event(&mut h, Duration::from_secs(1)).await, Some(1));
    for _ in 0..2 {
        assert!(matches!(
            next_reply(&mut h, Duration::from_secs(1)).await,
            Some(ReplyHead::Ack { seq: 1, .. })
        ));
    }
    send(&h, "ann", "x"); // resend after commit
    assert!(matches!(
        next_reply(&mut h, Duration::from_secs(1)).await,
        Some(ReplyHead::Ack {
            seq: 1,
            duplicate: true,
            ..
        })
    ));
    send(&h, "bob", "x"); // same client id, other user: a new message
    assert_eq!(next_event(&mut h, Duration::from_secs(1)).await, Some(2));
    let (_, store) = stop(h).await;
    assert_eq!(store.rows("r").len(), 2);
}

/// Lets the actor load (last_seq 0), then writes seq 1 as a rival owner
/// would, so the room's first batch is rejected.
async fn rival_writes_seq_1(h: &Harness) {
    tokio::time::sleep(Duration::from_millis(1)).await;
    let mut s = h.store.state.lock().unwrap();
    let m = Message {
        room: room(),
        seq: 1,
        id: "rival".into(),
        user: UserId::new("zed").unwrap(),
        text: "from a rival owner".into(),
        ts: 1,
        client_id: "z1".into(),
    };
    s.rows.insert(("r".into(), 1), m);
}

#[tokio::test(start_paused = true)]
async fn rejected_batch_is_reconciled_and_renumbered_without_gaps() {
    let mut h = harness(FakeStore::default(), config()).await;
    rival_writes_seq_1(&h).await;
    send(&h, "ann", "a1");
    send(&h, "ann", "a2");
    // The rival's message is published first, then ours renumbered.
    assert_eq!(next_event(&mut h, Duration::from_secs(5)).await, Some(1));
    assert_eq!(next_event(&mut h, Duration::from_secs(5)).await, Some(2));
    assert_eq!(next_event(&mut h, Duration::from_secs(5)).await, Some(3));
    let (_, store) = stop(h).await;
    let rows = seqs_and_client_ids(&store);
    assert_eq!(
        rows,
        vec![(1, "z1".into()), (2, "a1".into()), (3, "a2".into())]
    );
}

/// A store whose commits each wait for a permit of the returned gate.
fn gated() -> (FakeStore, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let store = FakeStore {
        gate: Some(gate.clone()),
        ..Default::default()
    };
    (store, gate)
}

/// Sends `n` messages (client ids c0, c1, …) while commits wait at the
/// gate, gives the room time to hand in its batches, then opens the gate.
async fn send_behind_gate(h: &Harness, gate: &Semaphore, n: usize) {
    for i in 0..n {
        send(h, "ann", &format!("c{i}"));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.add_permits(100);
}

/// Acks for `n` sends, in the order they come; panics on any other reply.
async fn ack_seqs(h: &mut Harness, n: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(n);
    for _ in 0..n {
        match next_reply(h, Duration::from_secs(5)).await {
            Some(ReplyHead::Ack { seq, .. }) => seqs.push(seq),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    seqs
}

/// A busy room keeps filling batches while one commits; the batches that
/// filled meanwhile reach the writer together and share one commit, so a
/// room is not held to one batch of `flush_batch` rows per commit.
#[tokio::test(start_paused = true)]
async fn a_busy_room_commits_the_batches_that_filled_meanwhile_together() {
    let (store, gate) = gated();
    let mut h = harness(store, config()).await;
    // The first commit waits at the gate while the room fills the rest.
    send_behind_gate(&h, &gate, 200).await;
    for want in 1..=200 {
        assert_eq!(next_event(&mut h, Duration::from_secs(5)).await, Some(want));
    }
    assert_eq!(ack_seqs(&mut h, 200).await, (1..=200).collect::<Vec<_>>());
    let (stats, store) = stop(h).await;
    assert_eq!(stats.batches, 4, "four batches of flush_batch (50) rows");
    let commits = store.state.lock().unwrap().commits;
    assert!(
        commits <= 2,
        "the batches queued behind the first share a commit: {commits} commits"
    );
    let seqs: Vec<u64> = store.rows("r").iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

/// When the database rejects a batch, the room's batches queued behind it
/// must not be written (their seqs follow the rejected ones, which are
/// renumbered): they come back cancelled and are renumbered with it, so
/// the room's seqs stay without gaps and in send order.
#[tokio::test(start_paused = true)]
async fn batches_behind_a_rejected_one_are_renumbered_with_it() {
    let (store, gate) = gated();
    let mut h = harness(store, config()).await;
    rival_writes_seq_1(&h).await;
    send_behind_gate(&h, &gate, 200).await;
    for want in 1..=201 {
        assert_eq!(next_event(&mut h, Duration::from_secs(5)).await, Some(want));
    }
    assert_eq!(ack_seqs(&mut h, 200).await, (2..=201).collect::<Vec<_>>());
    let (_, store) = stop(h).await;
    let rows = seqs_and_client_ids(&store);
    let mut want = vec![(1, "z1".to_string())];
    want.extend((0..200).map(|i| (i + 2, format!("c{i}"))));
    assert_eq!(rows, want);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_answers_with_a_retry_hint() {
    let cfg = RoomConfig {
        rate: RateLimit {
            per_sec: 1.0,
            burst: 2.0,
        },
        high_water: 1000,
        ..RoomConfig::default()
    };
    let mut h = harness(FakeStore::default(), cfg).await;
    send(&h, "ann", "1");
    send(&h, "ann", "2");
    send(&h, "ann", "3");
    match next_reply(&mut h, Duration::from_secs(1)).await {
        Some(ReplyHead::Error {
            code: ErrorCode::RateLimited,
            retry_after_ms: Some(ms),
            ..
        }) => {
            assert!(ms > 0 && ms <= 1000)
        }
        other => panic!("expected rate_limited, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn join_backlog_and_history_come_from_the_ring() {
    let mut h = harness(FakeStore::default(), config()).await;
    for i in 0..60 {
        send(&h, "ann", &format!("c{i}"));
    }
    for _ in 0..60 {
        next_event(&mut h, Duration::from_secs(1)).await.unwrap();
    }
    for _ in 0..60 {
        next_reply(&mut h, Duration::from_secs(1)).await.unwrap();
    }
    let join = NodeRequest::Join {
        room: room(),
        user: UserId::new("bob").unwrap(),
        gateway: NodeId::new("g").unwrap(),
        conn: 1,
        since: Some(55),
        quiet: false,
    };
    h.handle
        .try_send(RoomCommand::Request {
            req: join,
            reply: Some("reply".into()),
        })
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(1), h.replies.next())
        .await
        .unwrap()
        .unwrap();
    let (head, frames) = decode_reply(&m.payload).unwrap();
    let ReplyHead::Joined {
        last_seq,
        members,
        complete,
        presence,
    } = head
    else {
        panic!("joined expected, got {head:?}");
    };
    assert_eq!((last_seq, members, complete), (60, 1, true));
    assert_eq!(
        presence.map(|p| p.n),
        Some(1),
        "the joiner's own arrival counts"
    );
    let seqs: Vec<u64> = frames
        .iter()
        .map(|f| {
            serde_json::from_slice::<serde_json::Value>(f).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![56, 57, 58, 59, 60]);
    let hist = NodeRequest::History {
        room: room(),
        before: Some(11),
        after: None,
        limit: 5,
    };
    h.handle
        .try_send(RoomCommand::Request {
            req: hist,
            reply: Some("reply".into()),
        })
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(1), h.replies.next())
        .await
        .unwrap()
        .unwrap();
    let (head, frames) = decode_reply(&m.payload).unwrap();
    assert_eq!(head, ReplyHead::History { has_more: true });
    let seqs: Vec<u64> = frames
        .iter()
        .map(|f| {
            serde_json::from_slice::<serde_json::Value>(f).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![6, 7, 8, 9, 10]);
}

#[tokio::test(start_paused = true)]
async fn past_the_high_water_mark_sends_get_overloaded_and_nothing_is_dropped() {
    let (store, gate) = gated();
    let cfg = RoomConfig {
        flush_batch: 2,
        high_water: 3,
        ..config()
    };
    let mut h = harness(store, cfg).await;
    for i in 0..4 {
        send(&h, "ann", &format!("c{i}"));
    }
    match next_reply(&mut h, Duration::from_secs(1)).await {
        Some(ReplyHead::Error {
            code: ErrorCode::Overloaded,
            retry_after_ms: Some(_),
            ..
        }) => {}
        other => panic!("expected overloaded, got {other:?}"),
    }
    gate.add_permits(2);
    for want in 1..=3 {
        assert_eq!(next_event(&mut h, Duration::from_secs(1)).await, Some(want));
    }
}

#[tokio::test(start_paused = true)]
async fn an_empty_room_reports_idle_and_ends_when_its_handle_is_dropped() {
    let cfg = RoomConfig {
        idle_timeout: Duration::from_secs(30),
        ..config()
    };
    let mut h = harness(FakeStore::default(), cfg).await;
    let join = NodeRequest::Join {
        room: room(),
        user: UserId::new("ann").unwrap(),
        gateway: NodeId::new("g").unwrap(),
        conn: 7,
        since: None,
        quiet: false,
    };
    h.handle
        .try_send(RoomCommand::Request {
            req: join,
            reply: None,
        })
        .unwrap();
    // A member keeps the room alive.
    assert!(
        tokio::time::timeout(Duration::from_secs(120), h.idle.recv())
            .await
            .is_err()
    );
    let leave = NodeRequest::Leave {
        room: room(),
        user: UserId::new("ann").unwrap(),
        gateway: NodeId::new("g").unwrap(),
        conn: 7,
    };
    h.handle
        .try_send(RoomCommand::Request {
            req: leave,
            reply: None,
        })
        .unwrap();
    let (r, processed) = tokio::time::timeout(Duration::from_secs(31), h.idle.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r, processed), (room(), 2), "idle after both commands");
    // The node drops the only handle: the actor ends by itself.
    drop(h.handle);
    tokio::time::timeout(Duration::from_secs(1), h.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_fenced_batch_writes_nothing_and_senders_are_sent_to_the_new_owner() {
    let (store, gate) = gated();
    let mut h = harness(store, config()).await;
    send(&h, "ann", "a1");
    // The batch is in flight (the commit waits at the gate) when another
    // node takes the lease.
    tokio::time::sleep(Duration::from_millis(20)).await;
    {
        let mut s = h.store.state.lock().unwrap();
        let l = s.leases.get_mut("r").unwrap();
        *l = ("n2".into(), l.1 + 1, false);
    }
    send(&h, "ann", "a2");
    gate.add_permits(1);
    for _ in 0..2 {
        assert_eq!(
            next_reply(&mut h, Duration::from_secs(1)).await,
            Some(ReplyHead::NotOwner)
        );
    }
    assert_eq!(
        next_event(&mut h, Duration::from_secs(1)).await,
        None,
        "nothing broadcast"
    );
    h.task.await.unwrap();
    assert!(h.store.rows("r").is_empty(), "nothing written");
}

#[tokio::test(start_paused = true)]
async fn a_room_waits_for_a_lease_held_elsewhere_then_serves() {
    let store = FakeStore::default();
    store
        .state
        .lock()
        .unwrap()
        .leases
        .insert("r".into(), ("n2".into(), 7, false));
    let mut h = harness(store, config()).await;
    send(&h, "ann", "a1");
    assert_eq!(
        next_event(&mut h, Duration::from_secs(3)).await,
        None,
        "not served while n2 holds it"
    );
    h.store.state.lock().unwrap().leases.get_mut("r").unwrap().2 = true; // n2 releases
    assert_eq!(next_event(&mut h, Duration::from_secs(3)).await, Some(1));
    let (_, store) = stop(h).await;
    let s = store.state.lock().unwrap();
    assert_eq!(
        s.leases["r"],
        ("n1".to_string(), 8, true),
        "taken at the next epoch, released at the end"
    );
}

#[test]
fn alarms_fall_on_shared_boundaries_within_one_interval() {
    let interval = Duration::from_millis(5);
    let epoch = Instant::now();
    let base = epoch + Duration::from_micros(1_234_567);
    let at = |t| super::next_boundary(epoch, t, interval);
    let first = at(base);
    assert_eq!(first, epoch + Duration::from_millis(1_235));
    assert!(
        first > base && first <= base + interval,
        "waits at most one interval"
    );
    // Every instant up to the boundary maps to it: rooms armed in the same
    // interval fall due together.
    for us in [0u64, 1, 999, 2_500] {
        let t = base + Duration::from_micros(us);
        if t < first {
            assert_eq!(at(t), first);
        }
    }
    // At the boundary the next one is a whole interval on.
    assert_eq!(at(first), first + interval);
    // A clock behind the epoch just waits the interval.
    let early = epoch.checked_sub(Duration::from_millis(1)).unwrap_or(epoch);
    if early < epoch {
        assert_eq!(at(early), early + interval);
    }
}

fn forward(h: &Harness, sends: &[(&str, &str, &str)]) {
    let req = NodeRequest::Forward {
        room: room(),
        sends: sends
            .iter()
            .map(|(user, cid, reply)| chat_protocol::bus::ForwardedSend {
                user: UserId::new(user).unwrap(),
                text: format!("text of {cid}"),
                client_id: (*cid).into(),
                reply: Some((*reply).into()),
            })
            .collect(),
    };
    h.handle
        .try_send(RoomCommand::Request {
            req,
            reply: Some("shard".into()),
        })
        .unwrap();
}

async fn reply_on(sub: &mut BoxStream<'static, crate::bus::BusMessage>) -> ReplyHead {
    let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("a reply in time")
        .expect("subscription open");
    decode_reply(&m.payload).unwrap().0
}

#[tokio::test(start_paused = true)]
async fn forwarded_sends_are_sequenced_in_order_and_acked_at_their_own_reply() {
    // A tight limit the shard already applied: the sequencer must not
    // apply it again to forwarded sends.
    let cfg = RoomConfig {
        rate: RateLimit {
            per_sec: 1.0,
            burst: 1.0,
        },
        ..RoomConfig::default()
    };
    let mut h = harness(FakeStore::default(), cfg).await;
    let mut shard = h.bus.subscribe("shard".into()).await.unwrap();
    let mut subs = Vec::new();
    for r in ["g1", "g2", "g3"] {
        subs.push(h.bus.subscribe(r.into()).await.unwrap());
    }
    forward(
        &h,
        &[
            ("ann", "a1", "g1"),
            ("ann", "a2", "g2"),
            ("bob", "b1", "g3"),
        ],
    );
    assert_eq!(
        reply_on(&mut shard).await,
        ReplyHead::Forwarded { accepted: 3 }
    );
    for (want, sub) in (1..=3).zip(subs.iter_mut()) {
        match reply_on(sub).await {
            ReplyHead::Ack { seq, duplicate, .. } => {
                assert_eq!((seq, duplicate), (want, false), "in the shard's order");
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    for want in 1..=3 {
        assert_eq!(next_event(&mut h, Duration::from_secs(1)).await, Some(want));
    }
    // A resend through the shard of what was already stored is the same
    // message, not a new one.
    let mut again = h.bus.subscribe("g4".into()).await.unwrap();
    forward(&h, &[("ann", "a1", "g4")]);
    assert_eq!(
        reply_on(&mut shard).await,
        ReplyHead::Forwarded { accepted: 1 }
    );
    match reply_on(&mut again).await {
        ReplyHead::Ack { seq, duplicate, .. } => assert_eq!((seq, duplicate), (1, true)),
        other => panic!("expected a duplicate ack, got {other:?}"),
    }
    // A direct send from ann is still limited (her burst of 1 is unspent
    // by the forwarded ones, so the first passes and the second does not).
    send(&h, "ann", "a3");
    send(&h, "ann", "a4");
    let mut heads = vec![
        next_reply(&mut h, Duration::from_secs(5)).await.unwrap(),
        next_reply(&mut h, Duration::from_secs(5)).await.unwrap(),
    ];
    heads.sort_by_key(|r| matches!(r, ReplyHead::Ack { .. }));
    assert!(
        matches!(
            &heads[0],
            ReplyHead::Error {
                code: ErrorCode::RateLimited,
                ..
            }
        ),
        "{heads:?}"
    );
    assert!(
        matches!(&heads[1], ReplyHead::Ack { seq: 4, .. }),
        "{heads:?}"
    );
    let (_, store) = stop(h).await;
    let seqs: Vec<u64> = store.rows("r").iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "gap-free, no duplicate");
}

fn join(h: &Harness, user: &str, conn: u64, reply: &str) {
    let req = NodeRequest::Join {
        room: room(),
        user: UserId::new(user).unwrap(),
        gateway: NodeId::new("g").unwrap(),
        conn,
        since: None,
        quiet: false,
    };
    h.handle
        .try_send(RoomCommand::Request {
            req,
            reply: Some(reply.into()),
        })
        .unwrap();
}

/// The next room event that is not a message or a resync.
async fn next_room_event(h: &mut Harness) -> Event {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), h.events.next())
            .await
            .expect("an event in time")
            .expect("subscription open");
        match Event::decode(&m.payload).unwrap() {
            Event::Resync
            | Event::Message { .. }
            | Event::Messages { .. }
            | Event::Presence { .. } => {}
            other => return other,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_room_past_the_threshold_splits_and_hands_its_members_to_shards() {
    let cfg = RoomConfig {
        shard_threshold: 3,
        ..config()
    };
    let store = FakeStore::default();
    let mut h = harness(store, cfg).await;
    let mut joins = h.bus.subscribe("j".into()).await.unwrap();
    for (i, user) in ["ann", "bob", "cid", "dan"].iter().enumerate() {
        join(&h, user, i as u64, "j");
        assert!(matches!(
            reply_on(&mut joins).await,
            ReplyHead::Joined { .. }
        ));
    }
    // The fourth user is past the threshold of 3: the room splits into
    // shards of about half the threshold each.
    let want = shards_for(4, 3);
    assert_eq!(want, 4);
    assert_eq!(next_room_event(&mut h).await, Event::Shards { count: want });
    assert_eq!(
        h.store.state.lock().unwrap().shards.get("r").copied(),
        Some(want),
        "the count is stored under the lease"
    );
    // Members now register at their shard ...
    join(&h, "eve", 9, "j");
    assert_eq!(
        reply_on(&mut joins).await,
        ReplyHead::Sharded { shards: want }
    );
    // ... which asks the sequencer for the backlog: the count so far is
    // the roster's, by shard.
    h.handle
        .try_send(RoomCommand::Request {
            req: NodeRequest::Backlog {
                room: room(),
                since: None,
            },
            reply: Some("j".into()),
        })
        .unwrap();
    match reply_on(&mut joins).await {
        ReplyHead::Joined { members, .. } => assert_eq!(members, 4),
        other => panic!("expected joined, got {other:?}"),
    }
    // Shards report their counts; the total is announced to every member.
    let mut reports: HashMap<u32, u64> = HashMap::new();
    for user in ["ann", "bob", "cid", "dan", "eve", "fay"] {
        let k = chat_protocol::shard::user_shard(&UserId::new(user).unwrap(), want);
        *reports.entry(k).or_insert(0) += 1;
    }
    for (&shard, &members) in &reports {
        h.handle
            .try_send(RoomCommand::Request {
                req: NodeRequest::Count {
                    room: room(),
                    shard,
                    shards: want,
                    members,
                },
                reply: None,
            })
            .unwrap();
    }
    match next_room_event(&mut h).await {
        Event::ToAll { frame } => {
            let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
            assert_eq!(v["type"], "members");
            assert_eq!(v["count"], 6, "{v}");
        }
        other => panic!("expected the member count, got {other:?}"),
    }
    // Sends still go straight to the sequencer and keep one sequence.
    send(&h, "ann", "x1");
    assert_eq!(next_event(&mut h, Duration::from_secs(1)).await, Some(1));
    let (_, store) = stop(h).await;
    assert_eq!(store.rows("r").len(), 1);
}

/// A member shard serves only under its own lease: while another node holds
/// `r#k` it answers nobody, it serves once that lease is free, it stops
/// when the lease is taken from it, and it releases the lease it holds.
#[tokio::test(start_paused = true)]
async fn a_member_shard_serves_only_under_its_own_lease() {
    use crate::shard::{self, ShardCommand, ShardDeps};
    use chat_protocol::placement::Placement;

    let store = Arc::new(FakeStore::default());
    let key = chat_protocol::shard::shard_key(&room(), 0);
    store
        .state
        .lock()
        .unwrap()
        .leases
        .insert(key.clone(), ("n2".into(), 1, false));
    let bus = MemoryBus::new();
    let mut replies = bus.subscribe("reply".into()).await.unwrap();
    let me = NodeId::new("n1").unwrap();
    let (_ring, placement) = tokio::sync::watch::channel(Placement::new([me.clone()]));
    let leases = Arc::new(LeaseTable::default());
    let ttl = Duration::from_secs(3);
    let deps = ShardDeps {
        bus: Arc::new(bus.clone()),
        subjects: chat_protocol::subjects::Subjects::new("t").unwrap(),
        placement,
        config: Arc::new(config()),
        node_id: me.clone(),
        store: store.clone(),
        leases: leases.clone(),
        lease_ttl: ttl,
    };
    let cancel = CancellationToken::new();
    let renewals = tokio::spawn(crate::lease::renew_loop(
        store.clone(),
        me.clone(),
        leases.clone(),
        ttl,
        cancel.clone(),
    ));
    let (handle, task) = shard::spawn(room(), 0, 2, deps, cancel.clone());
    let user = (0..)
        .map(|i| UserId::new(&format!("u{i}")).unwrap())
        .find(|u| chat_protocol::shard::user_shard(u, 2) == 0)
        .unwrap();
    let join = |conn| ShardCommand::Request {
        req: Box::new(NodeRequest::Join {
            room: room(),
            user: user.clone(),
            gateway: NodeId::new("gw").unwrap(),
            conn,
            since: None,
            quiet: true,
        }),
        shards: 2,
        reply: Some("reply".into()),
    };
    handle.try_send(join(1)).unwrap();
    async fn wait(replies: &mut BoxStream<'static, crate::bus::BusMessage>) -> Option<ReplyHead> {
        let m = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .ok()??;
        Some(decode_reply(&m.payload).unwrap().0)
    }
    assert!(
        wait(&mut replies).await.is_none(),
        "served while n2 holds the lease"
    );
    assert!(leases.snapshot().is_empty());

    // n2 lets go: the waiting join is served, under a lease of n1's.
    store.state.lock().unwrap().leases.get_mut(&key).unwrap().2 = true;
    match wait(&mut replies).await {
        Some(ReplyHead::Joined { members: 1, .. }) => {}
        other => panic!("expected the join served, got {other:?}"),
    }
    assert_eq!(leases.snapshot(), vec![(key.clone(), 2)]);

    // n2 takes it back: the next renewal finds it lost and the shard stops.
    *store.state.lock().unwrap().leases.get_mut(&key).unwrap() = ("n2".into(), 3, false);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the shard stops when its lease is lost")
        .unwrap();
    assert!(leases.snapshot().is_empty());
    assert!(
        handle.try_send(join(2)).is_err(),
        "a stopped shard takes nothing"
    );
    // What n2 holds is untouched by the stopped shard's release.
    assert_eq!(
        store.state.lock().unwrap().leases[&key],
        ("n2".into(), 3, false)
    );
    cancel.cancel();
    renewals.await.unwrap();
}

/// A shard that stops on its own releases its lease at once, so the next
/// owner need not wait out the TTL.
#[tokio::test(start_paused = true)]
async fn a_stopping_member_shard_releases_its_lease() {
    use crate::shard::{self, ShardDeps};
    use chat_protocol::placement::Placement;

    let store = Arc::new(FakeStore::default());
    let bus = MemoryBus::new();
    let me = NodeId::new("n1").unwrap();
    let (_ring, placement) = tokio::sync::watch::channel(Placement::new([me.clone()]));
    let leases = Arc::new(LeaseTable::default());
    let deps = ShardDeps {
        bus: Arc::new(bus.clone()),
        subjects: chat_protocol::subjects::Subjects::new("t").unwrap(),
        placement,
        config: Arc::new(config()),
        node_id: me,
        store: store.clone(),
        leases: leases.clone(),
        lease_ttl: Duration::from_secs(3),
    };
    let cancel = CancellationToken::new();
    let (_handle, task) = shard::spawn(room(), 1, 2, deps, cancel.clone());
    let key = chat_protocol::shard::shard_key(&room(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while leases.snapshot().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no lease taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    task.await.unwrap();
    let (owner, _, released) = store.state.lock().unwrap().leases[&key].clone();
    assert_eq!(owner, "n1");
    assert!(released, "the lease is released when the shard stops");
    assert!(leases.snapshot().is_empty());
}

/// A shard that reports past the threshold while the last split is still
/// settling makes the room split again once it has settled, without
/// waiting for another report (shards report only on change).
#[tokio::test(start_paused = true)]
async fn a_shard_past_the_threshold_during_the_settle_splits_the_room_again() {
    let cfg = RoomConfig {
        shard_threshold: 3,
        ..config()
    };
    let mut h = harness(FakeStore::default(), cfg).await;
    let mut joins = h.bus.subscribe("j".into()).await.unwrap();
    for (i, user) in ["ann", "bob", "cid", "dan"].iter().enumerate() {
        join(&h, user, i as u64, "j");
        reply_on(&mut joins).await;
    }
    assert_eq!(next_room_event(&mut h).await, Event::Shards { count: 4 });
    let split = Instant::now();
    // Shard 0 fills up at once, well inside the settle time.
    h.handle
        .try_send(RoomCommand::Request {
            req: NodeRequest::Count {
                room: room(),
                shard: 0,
                shards: 4,
                members: 9,
            },
            reply: None,
        })
        .unwrap();
    loop {
        match next_room_event(&mut h).await {
            Event::Shards { count } => {
                assert!(count > 4, "split into more shards: {count}");
                break;
            }
            Event::ToAll { .. } => {} // the member count
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        split.elapsed() >= SPLIT_SETTLE,
        "split again before the last one settled: {:?}",
        split.elapsed()
    );
    stop(h).await;
}

/// The next presence event: whose, and its mark.
async fn next_presence(h: &mut Harness) -> (String, Option<PresenceMark>) {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), h.events.next())
            .await
            .expect("an event in time")
            .expect("subscription open");
        if let Event::Presence { user, mark, .. } = Event::decode(&m.payload).unwrap() {
            return (user.as_str().to_owned(), mark);
        }
    }
}

/// The mark a `joined` answer carries.
async fn joined_mark(h: &mut Harness) -> (u64, Option<PresenceMark>) {
    match next_reply(h, Duration::from_secs(5)).await {
        Some(ReplyHead::Joined {
            members, presence, ..
        }) => (members, presence),
        other => panic!("joined expected, got {other:?}"),
    }
}

#[tokio::test]
async fn presence_is_marked_in_order_and_joined_counts_up_to_its_mark() {
    let mut h = harness(FakeStore::default(), config()).await;
    join(&h, "ann", 1, "reply");
    let (user, ann_event) = next_presence(&mut h).await;
    assert_eq!(user, "ann");
    let (members, ann_joined) = joined_mark(&mut h).await;
    assert_eq!(members, 1);
    assert!(
        ann_event.is_some() && ann_joined == ann_event,
        "{ann_event:?} {ann_joined:?}"
    );
    join(&h, "bob", 2, "reply");
    let (user, bob_event) = next_presence(&mut h).await;
    assert_eq!(user, "bob");
    let (members, bob_joined) = joined_mark(&mut h).await;
    assert_eq!(members, 2);
    assert!(bob_event > ann_event, "{bob_event:?} after {ann_event:?}");
    assert_eq!(bob_joined, bob_event, "bob's joined counts his own arrival");
    // A second connection of a user present already changes nothing.
    join(&h, "bob", 3, "reply");
    assert_eq!(joined_mark(&mut h).await, (2, bob_joined));
    // While a gateway without marks is live, presence goes unmarked, and
    // the count goes on, so no mark is ever given twice.
    h.presence_marks
        .store(false, std::sync::atomic::Ordering::Relaxed);
    join(&h, "cy", 4, "reply");
    assert_eq!(next_presence(&mut h).await, ("cy".to_owned(), None));
    let (members, cy_joined) = joined_mark(&mut h).await;
    assert_eq!(members, 3);
    assert_eq!(
        cy_joined.map(|m| m.n),
        bob_event.map(|m| m.n + 1),
        "{cy_joined:?}"
    );
    stop(h).await;
}
