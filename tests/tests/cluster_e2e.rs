//! End to end through the real cluster: 2 gateways × 2 room nodes over a
//! private NATS and a fresh Postgres database; 5 rooms, 20 clients with each
//! room's members spread over both gateways, 50 messages per client.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use chat_tests::{Client, TestCluster};
use serde_json::{json, Value};
use tokio::sync::Barrier;

const ROOMS: usize = 5;
const CLIENTS: usize = 20;
const PER_CLIENT: usize = 50;
const WAIT: Duration = Duration::from_secs(60);

struct ClientRun {
    user: String,
    room: String,
    /// seq of every delivered message, in delivery order, with its
    /// (user, client_id).
    delivered: Vec<(u64, String, String)>,
    /// client_id → (seq, send→ack latency).
    acks: HashMap<String, (u64, Duration)>,
}

async fn run_client(
    url: String,
    user: String,
    room: String,
    barrier: std::sync::Arc<Barrier>,
) -> anyhow::Result<ClientRun> {
    let mut c = Client::connect(&url).await?;
    c.send_json(json!({"type": "join", "room": room})).await?;
    let joined = c.recv_type(WAIT, "joined").await?;
    ensure!(joined["last_seq"] == 0, "fresh room expected, got {joined}");
    barrier.wait().await;
    let mut sent_at = HashMap::new();
    for k in 0..PER_CLIENT {
        let cid = format!("{user}-{k}");
        sent_at.insert(cid.clone(), Instant::now());
        c.send_json(json!({"type": "send", "room": room, "text": format!("{user} says {k} ✓"), "client_id": cid}))
            .await?;
    }
    let expected = PER_CLIENT * (CLIENTS / ROOMS);
    let mut run = ClientRun {
        user: user.clone(),
        room: room.clone(),
        delivered: Vec::new(),
        acks: HashMap::new(),
    };
    let deadline = Instant::now() + WAIT;
    while run.delivered.len() < expected || run.acks.len() < PER_CLIENT {
        let left = deadline
            .checked_duration_since(Instant::now())
            .context("deadline passed")?;
        let f = c.recv(left).await.with_context(|| {
            format!(
                "{user}: {} of {expected} messages, {} acks",
                run.delivered.len(),
                run.acks.len()
            )
        })?;
        match f["type"].as_str() {
            Some("message") => {
                ensure!(f["room"] == room.as_str(), "message from another room: {f}");
                run.delivered.push((
                    f["seq"].as_u64().context("seq")?,
                    f["user"].as_str().context("user")?.to_owned(),
                    f["client_id"].as_str().context("client_id")?.to_owned(),
                ));
            }
            Some("ack") => {
                let cid = f["client_id"].as_str().context("client_id")?.to_owned();
                let sent = sent_at
                    .get(&cid)
                    .with_context(|| format!("ack for unknown {cid}"))?;
                let seq = f["seq"].as_u64().context("seq")?;
                ensure!(
                    run.acks.insert(cid, (seq, sent.elapsed())).is_none(),
                    "two acks for one send: {f}"
                );
            }
            Some("presence") => {}
            _ => bail!("{user}: unexpected frame {f}"),
        }
    }
    c.close().await?;
    Ok(run)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_through_the_cluster_exactly_once_in_order() -> anyhow::Result<()> {
    let cluster = TestCluster::builder("cluster_e2e")
        .gateways(2)
        .room_nodes(2)
        .env("CHAT_RATE_LIMIT_PER_SEC", "0")
        .start()
        .await?;

    let barrier = std::sync::Arc::new(Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let room = format!("room-{}", i % ROOMS);
        let user = format!("user-{i}");
        // Room r's members are clients r, r+5, r+10, r+15: alternating gateways.
        let url = cluster.ws_url(i % 2, &user);
        tasks.push(tokio::spawn(run_client(url, user, room, barrier.clone())));
    }
    let started = Instant::now();
    let mut runs = Vec::new();
    for t in tasks {
        runs.push(t.await??);
    }
    let elapsed = started.elapsed();

    // Every member got every message of its room once, in seq order, no gaps.
    let mut by_room: BTreeMap<String, Vec<&ClientRun>> = BTreeMap::new();
    for r in &runs {
        by_room.entry(r.room.clone()).or_default().push(r);
    }
    let per_room = PER_CLIENT * (CLIENTS / ROOMS);
    for (room, members) in &by_room {
        let reference = &members[0].delivered;
        for m in members {
            let seqs: Vec<u64> = m.delivered.iter().map(|d| d.0).collect();
            let want: Vec<u64> = (1..=per_room as u64).collect();
            ensure!(
                seqs == want,
                "{} in {room}: seqs not exactly 1..={per_room} in order",
                m.user
            );
            ensure!(
                &m.delivered == reference,
                "{} in {room} saw a different order",
                m.user
            );
        }
        // Each sender's messages appear in the order sent.
        for m in members {
            let mine: Vec<&str> = reference
                .iter()
                .filter(|d| d.1 == m.user)
                .map(|d| d.2.as_str())
                .collect();
            let want: Vec<String> = (0..PER_CLIENT).map(|k| format!("{}-{k}", m.user)).collect();
            ensure!(mine == want, "{}'s messages reordered", m.user);
        }
    }
    // Every send acked, with the seq it was delivered under.
    let mut latencies = Vec::new();
    for r in &runs {
        ensure!(
            r.acks.len() == PER_CLIENT,
            "{} got {} acks",
            r.user,
            r.acks.len()
        );
        for (cid, (seq, lat)) in &r.acks {
            let at = r
                .delivered
                .iter()
                .find(|d| d.2 == *cid)
                .with_context(|| format!("{cid} never delivered"))?;
            ensure!(
                at.0 == *seq,
                "{cid}: ack seq {seq} but delivered as {}",
                at.0
            );
            latencies.push(*lat);
        }
    }
    latencies.sort();
    let total = CLIENTS * PER_CLIENT;
    println!(
        "e2e figures: {total} messages in {:.2?} ({:.0} msgs/s sent, {:.0} deliveries/s); send→ack p50 {:.1?} p99 {:.1?}",
        elapsed,
        total as f64 / elapsed.as_secs_f64(),
        (total * (CLIENTS / ROOMS)) as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    );

    // The database holds exactly those rows.
    let pool = cluster.pool().await?;
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT room, count(*), min(seq), max(seq) FROM messages GROUP BY room ORDER BY room",
    )
    .fetch_all(&pool)
    .await?;
    ensure!(rows.len() == ROOMS, "rooms in the database: {rows:?}");
    for (room, count, min, max) in &rows {
        ensure!(
            *count == per_room as i64 && *min == 1 && *max == per_room as i64,
            "{room}: {count} rows, seqs {min}..{max}"
        );
    }
    let acked: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT (user_id, client_id)) FROM messages")
            .fetch_one(&pool)
            .await?;
    ensure!(
        acked == total as i64,
        "distinct (user, client_id) rows: {acked}"
    );

    // A resend of an acknowledged client_id returns the same seq, adds no row.
    let first = &runs[0];
    let (orig_seq, _) = first.acks[&format!("{}-0", first.user)];
    let mut c = Client::connect(&cluster.ws_url(1, &first.user)).await?;
    c.send_json(json!({"type": "join", "room": first.room, "since": per_room}))
        .await?;
    c.recv_type(WAIT, "joined").await?;
    c.send_json(json!({"type": "send", "room": first.room, "text": "again", "client_id": format!("{}-0", first.user)}))
        .await?;
    let ack = c.recv_type(WAIT, "ack").await?;
    ensure!(
        ack["seq"] == orig_seq,
        "resend acked as {ack}, original seq {orig_seq}"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE room = $1")
        .bind(&first.room)
        .fetch_one(&pool)
        .await?;
    ensure!(count == per_room as i64, "resend added a row: {count}");

    // History returns them in order, paging backwards.
    c.send_json(json!({"type": "history", "room": first.room, "limit": 100}))
        .await?;
    let page = c.recv_type(WAIT, "history").await?;
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .context("messages")?
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .collect();
    ensure!(
        seqs == (per_room as u64 - 99..=per_room as u64).collect::<Vec<_>>(),
        "history page: {seqs:?}"
    );
    ensure!(page["has_more"] == true, "has_more: {page}");
    let lowest = seqs[0];
    c.send_json(json!({"type": "history", "room": first.room, "before": lowest, "limit": 100}))
        .await?;
    let page = c.recv_type(WAIT, "history").await?;
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .context("messages")?
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .collect();
    ensure!(
        seqs == (1..lowest).collect::<Vec<_>>(),
        "older page: {seqs:?}"
    );
    ensure!(page["has_more"] == false, "has_more: {page}");

    // A client joining with `since` gets exactly the missed ones, then live.
    let since = per_room as u64 - 37;
    let mut late = Client::connect(&cluster.ws_url(0, "late-comer")).await?;
    late.send_json(json!({"type": "join", "room": first.room, "since": since}))
        .await?;
    let joined = late.recv_type(WAIT, "joined").await?;
    ensure!(joined["last_seq"] == per_room, "joined: {joined}");
    let mut got = Vec::new();
    while got.len() < 37 {
        let m = late.recv_type(WAIT, "message").await?;
        got.push(m["seq"].as_u64().context("seq")?);
    }
    ensure!(
        got == (since + 1..=per_room as u64).collect::<Vec<_>>(),
        "backlog after since: {got:?}"
    );
    c.send_json(json!({"type": "send", "room": first.room, "text": "live", "client_id": "live-1"}))
        .await?;
    let live = late.recv_type(WAIT, "message").await?;
    ensure!(
        live["seq"] == per_room + 1 && live["text"] == "live",
        "next live message: {live}"
    );
    ensure!(
        late.frames_of_type("message").is_empty(),
        "unexpected extra messages: {:?}",
        late.skipped
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_two_gateways_see_presence_and_the_same_messages() -> anyhow::Result<()> {
    let cluster = TestCluster::builder("cluster_presence")
        .gateways(2)
        .room_nodes(2)
        .start()
        .await?;
    let mut ann = Client::connect(&cluster.ws_url(0, "ann")).await?;
    let mut bob = Client::connect(&cluster.ws_url(1, "bob")).await?;
    ann.send_json(json!({"type": "join", "room": "lobby"}))
        .await?;
    let j = ann.recv_type(WAIT, "joined").await?;
    ensure!(j["members"] == 1, "{j}");
    bob.send_json(json!({"type": "join", "room": "lobby"}))
        .await?;
    let j = bob.recv_type(WAIT, "joined").await?;
    ensure!(j["members"] == 2, "{j}");
    let p = ann.recv_type(WAIT, "presence").await?;
    ensure!(p["user"] == "bob" && p["state"] == "join", "{p}");
    bob.send_json(
        json!({"type": "send", "room": "lobby", "text": "hi ann 👋🏽 שלום", "client_id": "b1"}),
    )
    .await?;
    let m: Value = ann.recv_type(WAIT, "message").await?;
    ensure!(
        m["text"] == "hi ann 👋🏽 שלום" && m["user"] == "bob" && m["seq"] == 1,
        "{m}"
    );
    let m2 = bob.recv_type(WAIT, "message").await?;
    ensure!(m == m2, "both gateways deliver the same frame: {m} vs {m2}");
    bob.send_json(json!({"type": "leave", "room": "lobby"}))
        .await?;
    bob.recv_type(WAIT, "left").await?;
    let p = ann.recv_type(WAIT, "presence").await?;
    ensure!(p["user"] == "bob" && p["state"] == "leave", "{p}");
    // After leaving, sends are refused locally.
    bob.send_json(json!({"type": "send", "room": "lobby", "text": "x", "client_id": "b2"}))
        .await?;
    let e = bob.recv_type(WAIT, "error").await?;
    ensure!(e["code"] == "not_joined" && e["ref"] == "b2", "{e}");
    Ok(())
}

/// Two users joining the same new room at the same moment: whichever is
/// counted first must still hear of the other, however the join's answer
/// and the other's presence event race each other to its gateway; and the
/// one counted second, whose `joined` already counts the first, hears of
/// the first no second time. Same gateway and two gateways, alternately.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_joining_at_once_hear_of_each_other_exactly_once() -> anyhow::Result<()> {
    let cluster = TestCluster::builder("cluster_join_race")
        .gateways(2)
        .room_nodes(1)
        .start()
        .await?;
    for round in 0..12 {
        let room = format!("race-{round}");
        let mut ann = Client::connect(&cluster.ws_url(0, &format!("ann{round}"))).await?;
        let mut bob = Client::connect(&cluster.ws_url(round % 2, &format!("bob{round}"))).await?;
        let join = json!({"type": "join", "room": room});
        let (a, b) = tokio::join!(ann.send_json(join.clone()), bob.send_json(join));
        a?;
        b?;
        let ja = ann.recv_type(WAIT, "joined").await?;
        let jb = bob.recv_type(WAIT, "joined").await?;
        let (first, second, second_name) = match (ja["members"].as_u64(), jb["members"].as_u64()) {
            (Some(1), Some(2)) => (&mut ann, &mut bob, format!("bob{round}")),
            (Some(2), Some(1)) => (&mut bob, &mut ann, format!("ann{round}")),
            other => bail!("round {round}: joined counts {other:?}: {ja} {jb}"),
        };
        let p = first.recv_type(WAIT, "presence").await.with_context(|| {
            format!("round {round}: the user counted first never heard of {second_name}")
        })?;
        ensure!(
            p["user"] == second_name.as_str() && p["state"] == "join",
            "round {round}: {p}"
        );
        // The second is live once its own message comes back; no presence
        // of the first may come before it (its `joined` counted the first).
        second
            .send_json(json!({"type": "send", "room": room, "text": "hi", "client_id": "c1"}))
            .await?;
        let m = second.recv_type(WAIT, "message").await?;
        ensure!(m["text"] == "hi", "{m}");
        ensure!(
            !second.skipped.iter().any(|f| f["type"] == "presence"),
            "round {round}: presence the joined count already held: {:?}",
            second.skipped
        );
        ann.close().await?;
        bob.close().await?;
    }
    Ok(())
}
