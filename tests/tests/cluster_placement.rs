//! Placement liveness: a room node that stops (cleanly or with kill -9)
//! leaves every ring within a bound, and its rooms are served by the others
//! with their history and seq intact.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use chat_tests::{Client, TestCluster};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// Sends one message per room from `c` and returns the acked seqs.
async fn send_each(c: &mut Client, rooms: &[String], tag: &str) -> anyhow::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for room in rooms {
        let cid = format!("{tag}-{room}");
        c.send_json(json!({"type": "send", "room": room, "text": tag, "client_id": cid}))
            .await?;
        let ack = c
            .recv_until(WAIT, |f| {
                f["type"] == "ack" && f["client_id"] == cid.as_str()
            })
            .await?;
        seqs.push(ack["seq"].as_u64().context("seq")?);
    }
    Ok(seqs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_the_ring_and_its_rooms_move_with_their_history() -> anyhow::Result<()>
{
    let mut cluster = TestCluster::builder("cluster_placement_kill")
        .gateways(1)
        .room_nodes(2)
        .env("CHAT_RATE_LIMIT_PER_SEC", "0")
        .env("CHAT_NODE_TTL_MS", "3000")
        .start()
        .await?;
    // Enough rooms that both nodes own some.
    let rooms: Vec<String> = (0..12).map(|i| format!("r{i}")).collect();
    let mut c = Client::connect(&cluster.ws_url(0, "ann")).await?;
    for room in &rooms {
        c.send_json(json!({"type": "join", "room": room})).await?;
        c.recv_until(WAIT, |f| {
            f["type"] == "joined" && f["room"] == room.as_str()
        })
        .await?;
    }
    let before = send_each(&mut c, &rooms, "before").await?;
    ensure!(before.iter().all(|s| *s == 1), "first seqs: {before:?}");
    let metrics = cluster.node_metrics(1).await?;
    let owned: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("chat_room_active_rooms ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    ensure!(owned > 0.0, "node 1 owns no room; the test needs it to");

    let killed = Instant::now();
    cluster.node(1).kill9().await?;
    cluster.wait_ring_nodes(1).await?;
    let left_ring = killed.elapsed();

    // Every room is served again (those of the dead node by the survivor),
    // continuing the same sequence.
    let after = send_each(&mut c, &rooms, "after").await?;
    let served = killed.elapsed();
    ensure!(
        after.iter().all(|s| *s == 2),
        "seqs after the move: {after:?}"
    );
    println!("placement figures: node left the ring {left_ring:.2?} after kill -9 (TTL 3 s); every room served again after {served:.2?}");
    let pool = cluster.pool().await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&pool)
        .await?;
    ensure!(n == 2 * rooms.len() as i64, "rows: {n}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_flushes_and_leaves_the_ring_at_once() -> anyhow::Result<()> {
    let mut cluster = TestCluster::builder("cluster_placement_drain")
        .gateways(1)
        .room_nodes(2)
        .env("CHAT_RATE_LIMIT_PER_SEC", "0")
        .start()
        .await?;
    let rooms: Vec<String> = (0..12).map(|i| format!("d{i}")).collect();
    let mut c = Client::connect(&cluster.ws_url(0, "bob")).await?;
    for room in &rooms {
        c.send_json(json!({"type": "join", "room": room})).await?;
        c.recv_until(WAIT, |f| {
            f["type"] == "joined" && f["room"] == room.as_str()
        })
        .await?;
    }
    send_each(&mut c, &rooms, "one").await?;
    let t = Instant::now();
    cluster.node(1).term()?;
    let status = cluster.node(1).wait_exit(Duration::from_secs(25)).await?;
    ensure!(status.success(), "drained node exited with {status}");
    cluster.wait_ring_nodes(1).await?;
    println!(
        "drain figures: node exited and left the ring in {:.2?}",
        t.elapsed()
    );
    let seqs = send_each(&mut c, &rooms, "two").await?;
    ensure!(seqs.iter().all(|s| *s == 2), "seqs after drain: {seqs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_stopped_while_nats_is_down_still_exit() -> anyhow::Result<()> {
    // Grace 2 s: each process must be gone within grace + the 5 s
    // farewell bound, not wait for NATS to come back.
    let mut cluster = TestCluster::builder("processes_stopped_while_nats_is_down_still_exit")
        .room_nodes(1)
        .env("CHAT_SHUTDOWN_GRACE_SECS", "2")
        .start()
        .await?;
    let mut c = Client::connect(&cluster.ws_url(0, "ann")).await?;
    c.send_json(json!({"type": "join", "room": "down"})).await?;
    c.recv_until(WAIT, |f| f["type"] == "joined").await?;
    cluster.nats().stop().await?;
    let t = Instant::now();
    cluster.gateway(0).term()?;
    cluster.node(0).term()?;
    let bound = Duration::from_secs(2 + 5 + 3);
    cluster.gateway(0).wait_exit(bound).await?;
    cluster.node(0).wait_exit(bound).await?;
    println!("stopped with NATS down: both exited in {:.2?}", t.elapsed());
    Ok(())
}
