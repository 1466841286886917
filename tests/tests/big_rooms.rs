//! Big rooms: a room grows past the shard threshold while its members send,
//! splits over member shards on three room nodes, and keeps one gap-free
//! order that every member and the history agree on; a node hosting member
//! shards is killed and its shards move with their members.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use chat_protocol::placement::Placement;
use chat_protocol::shard::{shard_key, user_shard};
use chat_protocol::{NodeId, RoomId, UserId};
use chat_tests::{metric, wait_for, Client, TestCluster};
use serde_json::{json, Value};
use tokio::sync::watch;

const ROOM: &str = "launch";
/// The test threshold: small, so 300 members mean many shards.
const THRESHOLD: usize = 20;
const WAIT: Duration = Duration::from_secs(30);

/// A member: joins from the start of the room's history and records every
/// message seq it is given, until it has seen `last` (once known).
async fn member(
    url: String,
    ready: tokio::sync::mpsc::Sender<()>,
    last: watch::Receiver<Option<u64>>,
) -> anyhow::Result<Vec<u64>> {
    let mut c = Client::connect(&url).await?;
    c.send_json(json!({"type": "join", "room": ROOM, "since": 0}))
        .await?;
    c.recv_until(WAIT, |f| f["type"] == "joined").await?;
    let _ = ready.send(()).await;
    let mut seqs = Vec::new();
    loop {
        if let Some(last) = *last.borrow() {
            if seqs.last().is_some_and(|s| *s >= last) {
                return Ok(seqs);
            }
        }
        // Quiet for a moment: look at `last` again.
        match c
            .recv_within(Duration::from_millis(200))
            .await
            .context("member connection")?
        {
            Some(f) if f["type"] == "message" => {
                seqs.push(f["seq"].as_u64().context("message without seq")?);
            }
            _ => {}
        }
    }
}

/// A sender: three sends back to back, then their acks, until told to stop.
/// A send answered with a retryable error (`unavailable` while a killed
/// node leaves the ring) is sent again with the same `client_id`, as a
/// client must. Returns every acked seq, and separately the seqs of sends
/// acked on their first try, in send order (those must be increasing).
async fn sender(
    url: String,
    name: String,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let mut c = Client::connect(&url).await?;
    c.send_json(json!({"type": "join", "room": ROOM})).await?;
    c.recv_until(WAIT, |f| f["type"] == "joined").await?;
    let mut acked = Vec::new();
    let mut first_try = Vec::new();
    let mut n = 0u64;
    while !*stop.borrow() {
        let ids: Vec<String> = (0..3).map(|i| format!("{name}-{}", n + i)).collect();
        n += 3;
        for id in &ids {
            c.send_json(json!({"type": "send", "room": ROOM, "text": id, "client_id": id}))
                .await?;
        }
        let mut retry = Vec::new();
        for id in &ids {
            let a = answer(&mut c, id).await?;
            match a["type"].as_str() {
                Some("ack") => {
                    let seq = a["seq"].as_u64().context("ack without seq")?;
                    acked.push(seq);
                    first_try.push(seq);
                }
                _ if matches!(a["code"].as_str(), Some("unavailable" | "overloaded")) => {
                    retry.push((id.clone(), a["retry_after_ms"].as_u64().unwrap_or(100)));
                }
                _ => anyhow::bail!("{name}: {a}"),
            }
        }
        for (id, wait_ms) in retry {
            let deadline = Instant::now() + WAIT;
            let mut wait_ms = wait_ms;
            loop {
                // The server's own retry hint.
                tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                c.send_json(json!({"type": "send", "room": ROOM, "text": id, "client_id": id}))
                    .await?;
                let a = answer(&mut c, &id).await?;
                if a["type"] == "ack" {
                    acked.push(a["seq"].as_u64().context("ack without seq")?);
                    break;
                }
                ensure!(Instant::now() < deadline, "{name}: {id} never acked: {a}");
                wait_ms = a["retry_after_ms"].as_u64().unwrap_or(100);
            }
        }
        // Pacing only: the test waits on conditions, not on this.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((acked, first_try))
}

/// The `ack` or `error` answering send `id`.
async fn answer(c: &mut Client, id: &str) -> anyhow::Result<serde_json::Value> {
    c.recv_until(WAIT, |f| {
        f["type"] == "ack" && f["client_id"] == id || f["type"] == "error" && f["ref"] == id
    })
    .await
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i:03}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_grows_past_the_threshold_across_three_nodes_without_loss_or_reorder(
) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(240), grow_split_kill())
        .await
        .context("the big-room run did not finish in 240 s")?
}

async fn grow_split_kill() -> anyhow::Result<()> {
    let mut cluster = TestCluster::builder("big_rooms")
        .gateways(2)
        .room_nodes(3)
        .env("CHAT_RATE_LIMIT_PER_SEC", "0")
        .env("CHAT_SHARD_THRESHOLD", THRESHOLD.to_string())
        .env("CHAT_NODE_TTL_MS", "3000")
        .start()
        .await?;
    let (last_tx, last_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(512);

    // Ten members and three senders to begin with.
    let names = users(300);
    let mut members = Vec::new();
    let spawn_member = |i: usize, name: &str| {
        tokio::spawn(member(
            cluster.ws_url(i % 2, name),
            ready_tx.clone(),
            last_rx.clone(),
        ))
    };
    for (i, name) in names.iter().take(10).enumerate() {
        members.push(spawn_member(i, name));
    }
    for _ in 0..10 {
        ready_rx.recv().await.context("member ready")?;
    }
    // Who is here, in the room before its split: its owner's roster.
    let mut early = Client::connect(&cluster.ws_url(1, "early")).await?;
    early
        .send_json(json!({"type": "join", "room": ROOM}))
        .await?;
    early.recv_until(WAIT, |f| f["type"] == "joined").await?;
    early
        .send_json(json!({"type": "members", "room": ROOM}))
        .await?;
    let who = early
        .recv_until(WAIT, |f| f["type"] == "members" && f.get("users").is_some())
        .await?;
    let mut want: Vec<String> = names.iter().take(10).cloned().collect();
    want.push("early".into());
    want.sort();
    ensure!(
        who["count"] == 11 && who["users"] == json!(want),
        "before the split: {who}"
    );

    let senders: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(sender(
                cluster.ws_url(i % 2, &format!("s{i}")),
                format!("s{i}"),
                stop_rx.clone(),
            ))
        })
        .collect();

    // Grow to 300 members while they send: the room splits, then splits
    // into more shards as it grows.
    let grown = Instant::now();
    for (i, name) in names.iter().enumerate().skip(10) {
        members.push(spawn_member(i, name));
        if i % 10 == 9 {
            for _ in 0..10 {
                ready_rx.recv().await.context("member ready")?;
            }
        }
    }
    let joined_secs = grown.elapsed();

    // The room splits again as its shards fill: wait until there are
    // enough shards for everyone at no more than the threshold on average.
    let pool = cluster.pool().await?;
    let present = names.len() + 3;
    let count = wait_for("enough member shards", WAIT, || {
        let pool = pool.clone();
        async move {
            let n: Option<i32> =
                sqlx::query_scalar("SELECT shards FROM room_shards WHERE room = $1")
                    .bind(ROOM)
                    .fetch_optional(&pool)
                    .await?;
            Ok(n.filter(|n| *n as usize * THRESHOLD >= present))
        }
    })
    .await?;
    let count = u32::try_from(count)?;
    let settled_secs = grown.elapsed();

    // Member shards run on more than one node.
    let (splits, shard_actors) = wait_for("member shards on several nodes", WAIT, || async {
        let mut splits = 0.0;
        let mut actors = Vec::new();
        for i in 0..3 {
            let m = cluster.node_metrics(i).await?;
            splits += metric(&m, "chat_room_splits_total");
            actors.push(metric(&m, "chat_room_member_shards"));
        }
        Ok((actors.iter().filter(|n| **n > 0.0).count() >= 2).then_some((splits, actors)))
    })
    .await?;
    ensure!(
        splits >= 2.0,
        "the room split once and never grew: {splits}"
    );

    // The count of users present reaches everyone, summarised: a fresh
    // member is told 300 + 3 senders + itself.
    let total = names.len() + 3 + 2;
    let mut late = Client::connect(&cluster.ws_url(0, "late")).await?;
    late.send_json(json!({"type": "join", "room": ROOM}))
        .await?;
    late.recv_until(WAIT, |f| f["type"] == "joined").await?;
    late.recv_until(WAIT, |f| {
        f["type"] == "members" && f["count"].as_u64() == Some(total as u64)
    })
    .await
    .context("the summarised member count")?;
    ensure!(
        !late.skipped.iter().any(|f| f["type"] == "presence"),
        "a sharded room sent per-user presence"
    );
    // Who is here, in the split room: every shard's members, merged.
    late.send_json(json!({"type": "members", "room": ROOM}))
        .await?;
    let who = late
        .recv_until(WAIT, |f| f["type"] == "members" && f.get("users").is_some())
        .await?;
    let listed: Vec<&str> = who["users"]
        .as_array()
        .context("users")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        who["count"].as_u64() == Some(total as u64) && listed.len() == total,
        "after the split: count {} with {} users listed",
        who["count"],
        listed.len()
    );
    ensure!(
        listed.windows(2).all(|w| w[0] < w[1]),
        "sorted, no duplicate"
    );
    ensure!(
        listed.contains(&"late") && listed.contains(&"m299") && listed.contains(&"s2"),
        "members missing from the list"
    );

    eprintln!("[big_rooms] grown and split; killing a shard node");
    // Kill a node that hosts member shards but not the sequencer.
    let nodes: Vec<NodeId> = (0..3)
        .map(|i| NodeId::new(&cluster.node_id(i)))
        .collect::<Result<_, _>>()?;
    let ring = Placement::new(nodes.clone());
    let room = RoomId::new(ROOM)?;
    let sequencer = ring.owner(&room).context("no owner")?;
    let owner_of = |k: u32| ring.owner_of(&shard_key(&room, k));
    let victim = (0..3)
        .find(|&i| {
            nodes[i] != sequencer && (0..count).any(|k| owner_of(k).as_ref() == Some(&nodes[i]))
        })
        .context("no node hosts shards without the sequencer")?;
    // Each running shard holds its own lease, taken by its ring owner.
    let leases: Vec<(String, String)> = sqlx::query_as(
        "SELECT room, owner FROM room_leases WHERE room LIKE $1 AND expires_at > now()",
    )
    .bind(format!("{ROOM}#%"))
    .fetch_all(&pool)
    .await?;
    ensure!(leases.len() >= 2, "shard leases: {leases:?}");
    for (key, owner) in &leases {
        ensure!(
            ring.owner_of(key).is_some_and(|n| n.as_str() == owner),
            "{key} leased by {owner}, not its ring owner"
        );
    }
    // A new user whose shard is on the victim.
    let newcomer = (0..10_000)
        .map(|i| format!("new{i}"))
        .find(|u| {
            let k = user_shard(&UserId::new(u).expect("user id"), count);
            owner_of(k).as_ref() == Some(&nodes[victim])
        })
        .context("no user hashes to the victim's shards")?;
    let killed = Instant::now();
    cluster.node(victim).kill9().await?;
    cluster.wait_ring_nodes(2).await?;
    eprintln!("[big_rooms] node {victim} killed");
    // The victim's shards move to the survivors with their members (the
    // gateways re-register them): a newcomer in a moved shard makes the
    // count one more than before, which only holds if the shard's earlier
    // members are there too.
    let mut mover = Client::connect(&cluster.ws_url(1, &newcomer)).await?;
    mover
        .send_json(json!({"type": "join", "room": ROOM}))
        .await?;
    mover.recv_until(WAIT, |f| f["type"] == "joined").await?;
    mover
        .send_json(
            json!({"type": "send", "room": ROOM, "text": "after the kill", "client_id": "k1"}),
        )
        .await?;
    let ack = mover
        .recv_until(WAIT, |f| f["type"] == "ack" || f["type"] == "error")
        .await?;
    ensure!(ack["type"] == "ack", "send through a moved shard: {ack}");
    let moved_in = killed.elapsed();
    late.recv_until(WAIT, |f| {
        f["type"] == "members" && f["count"].as_u64() == Some(total as u64 + 1)
    })
    .await
    .context("the member count after the shard node was killed")?;

    eprintln!("[big_rooms] shard moved; stopping the senders");
    // Stop sending; every member must reach the last seq.
    stop_tx.send_replace(true);
    let mut acked_all = Vec::new();
    for s in senders {
        let (acked, first_try) = s.await??;
        ensure!(
            first_try.windows(2).all(|w| w[0] < w[1]),
            "a sender's messages were reordered: {first_try:?}"
        );
        acked_all.extend(acked);
    }
    acked_all.push(ack["seq"].as_u64().context("seq")?);
    let last = *acked_all.iter().max().context("nothing was sent")?;
    eprintln!("[big_rooms] senders done at seq {last}; checking every member");
    last_tx.send_replace(Some(last));
    let results = tokio::time::timeout(WAIT, futures::future::join_all(members))
        .await
        .with_context(|| format!("not every member reached seq {last}"))?;
    for (i, r) in results.into_iter().enumerate() {
        let seqs = r?.with_context(|| format!("member {i}"))?;
        let want: Vec<u64> = (1..=last).collect();
        ensure!(
            seqs == want,
            "member {i}: {} messages, first gap or duplicate near {:?}",
            seqs.len(),
            seqs.windows(2).find(|w| w[1] != w[0] + 1)
        );
    }
    // History agrees: exactly the acked messages, gap-free.
    let stored: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM messages WHERE room = $1 ORDER BY seq")
            .bind(ROOM)
            .fetch_all(&pool)
            .await?;
    ensure!(
        stored == (1..=last as i64).collect::<Vec<_>>(),
        "stored seqs are not 1..={last}"
    );
    let acked: BTreeSet<u64> = acked_all.iter().copied().collect();
    ensure!(acked.len() == acked_all.len(), "a seq was acked twice");
    println!(
        "big room figures: 10 -> 300 members joined in {joined_secs:.2?}, shards settled after {settled_secs:.2?}, 3 senders, {last} messages, \
         {splits} splits, {count} shards, shard actors per node {shard_actors:?}; \
         shard node killed, a newcomer in a moved shard sent after {moved_in:.2?}"
    );
    Ok(())
}

/// Churn while the room splits: users that join and leave (or drop their
/// connection) over and over while the room keeps re-splitting must not
/// stay behind as members. Once the churn stops, `members` answers exactly
/// the users still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_during_splits_leaves_no_ghost_members() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(180), churn())
        .await
        .context("the churn run did not finish in 180 s")?
}

async fn churn() -> anyhow::Result<()> {
    const ROOM: &str = "churn";
    const STAYING: usize = 100;
    const FLAPPERS: usize = 20;
    let cluster = TestCluster::builder("big_rooms_churn")
        .gateways(2)
        .room_nodes(2)
        .env("CHAT_SHARD_THRESHOLD", "6")
        .env("CHAT_JOIN_RATE_PER_SEC", "0")
        .start()
        .await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // Users that join and leave until told to stop: half leave politely,
    // half cut their connection.
    let flappers: Vec<_> = (0..FLAPPERS)
        .map(|i| {
            let url = cluster.ws_url(i % 2, &format!("flap{i:02}"));
            let stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut round = 0u64;
                while !*stop.borrow() {
                    let mut c = Client::connect(&url).await?;
                    c.send_json(json!({"type": "join", "room": ROOM})).await?;
                    // Sometimes leave before the join is answered.
                    if !round.is_multiple_of(3) {
                        c.recv_until(WAIT, |f| f["type"] == "joined").await?;
                    }
                    if (i + round as usize).is_multiple_of(2) {
                        c.send_json(json!({"type": "leave", "room": ROOM})).await?;
                        c.recv_until(WAIT, |f| f["type"] == "left").await?;
                        c.close().await?;
                    } else {
                        drop(c);
                    }
                    round += 1;
                }
                anyhow::Ok(round)
            })
        })
        .collect();
    // Meanwhile the room grows one member at a time, splitting again and
    // again (threshold 6: about one split per three joins at first).
    let mut staying = Vec::new();
    let mut names = Vec::new();
    for i in 0..STAYING {
        let name = format!("stay{i:03}");
        let mut c = Client::connect(&cluster.ws_url(i % 2, &name)).await?;
        c.send_json(json!({"type": "join", "room": ROOM})).await?;
        c.recv_until(WAIT, |f| f["type"] == "joined").await?;
        staying.push(c);
        names.push(name);
    }
    stop_tx.send(true)?;
    let mut rounds = 0;
    for f in flappers {
        rounds += f.await??;
    }
    ensure!(
        rounds >= FLAPPERS as u64,
        "the flappers barely ran: {rounds}"
    );
    // Nobody is left but the staying members, and the count says so.
    names.sort();
    let asker = &mut staying[0];
    let deadline = Instant::now() + WAIT;
    let mut last;
    loop {
        asker
            .send_json(json!({"type": "members", "room": ROOM}))
            .await?;
        last = asker
            .recv_until(WAIT, |f| f["type"] == "members" && f.get("users").is_some())
            .await?;
        if last["count"] == STAYING && last["users"] == json!(names) {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        // Within the request limit (5 a second).
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let pool = cluster.pool().await?;
    let shards: Option<i32> = sqlx::query_scalar("SELECT shards FROM room_shards WHERE room = $1")
        .bind(ROOM)
        .fetch_optional(&pool)
        .await?;
    ensure!(
        shards.unwrap_or(1) > 2,
        "the room did not split: {shards:?}"
    );
    ensure!(
        last["count"] == STAYING && last["users"] == json!(names),
        "after {rounds} flapper rounds and {shards:?} shards, members still says {} ({} listed): {}",
        last["count"],
        last["users"].as_array().map_or(0, Vec::len),
        last["users"]
    );
    Ok(())
}
