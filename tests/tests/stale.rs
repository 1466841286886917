//! Stale connections: a client that stops answering (a half-open socket, a
//! frozen tab) is closed after the ping timeout, leaves its rooms, and the
//! clean-up is counted.

use std::time::{Duration, Instant};

use anyhow::ensure;
use chat_tests::{Client, TestCluster};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_and_leaves_its_rooms() -> anyhow::Result<()> {
    let cluster = TestCluster::builder("stale_client")
        .gateways(1)
        .room_nodes(1)
        .env("CHAT_PING_INTERVAL_SECS", "1")
        .env("CHAT_PING_TIMEOUT_SECS", "3")
        .start()
        .await?;
    let mut watcher = Client::connect(&cluster.ws_url(0, "watcher")).await?;
    watcher
        .send_json(json!({"type": "join", "room": "stale"}))
        .await?;
    watcher.recv_type(WAIT, "joined").await?;
    let mut silent = Client::connect(&cluster.ws_url(0, "silent")).await?;
    silent
        .send_json(json!({"type": "join", "room": "stale"}))
        .await?;
    silent.recv_type(WAIT, "joined").await?;
    watcher
        .recv_until(WAIT, |f| {
            f["type"] == "presence" && f["user"] == "silent" && f["state"] == "join"
        })
        .await?;

    // From now on `silent` neither reads nor writes, so it never answers the
    // server's pings. The watcher keeps reading (and so answering pings).
    let t = Instant::now();
    let p = watcher
        .recv_until(WAIT, |f| {
            f["type"] == "presence" && f["user"] == "silent" && f["state"] == "leave"
        })
        .await?;
    let took = t.elapsed();
    ensure!(p["room"] == "stale", "{p}");
    ensure!(took >= Duration::from_secs(2), "closed too early: {took:?}");
    println!("stale figures: silent client removed after {took:.2?} (interval 1 s, timeout 3 s)");
    let m = cluster.metrics(0).await?;
    ensure!(
        m.lines()
            .any(|l| l.starts_with("chat_gateway_disconnects_total{reason=\"ping_timeout\"} 1")),
        "ping-timeout close not counted:\n{}",
        m.lines()
            .filter(|l| l.contains("disconnects"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The watcher, which answers pings, is still connected.
    watcher.send_json(json!({"type": "ping"})).await?;
    watcher.recv_type(WAIT, "pong").await?;
    let code = silent.expect_close(WAIT).await?;
    ensure!(code == 4000, "close code {code}");
    Ok(())
}
