//! Delivery under faults: an `ack` means committed, and no acknowledged
//! message is ever lost, duplicated, reordered, or given a seq anyone saw
//! for another message — across `kill -9` of a room node, a 30 s Postgres
//! outage, a NATS restart, a rolling restart of every process, and a
//! gateway killed with members in rooms.
//!
//! Each scenario starts its own cluster (2 gateways, 3 room nodes, rate
//! limit off, 3 s node TTL), runs the [`chat_tests::fault`] workload (12
//! correct clients in 4 rooms at 20 messages/s each) through the fault,
//! drains it, and checks every ack and every delivery against the
//! database. Each prints one `fault figures: scenario=…` line (visible with
//! `--nocapture`). `scripts/failover.sh` runs the kill -9 scenario many
//! times (the ignored `…_repeated` test) for p50/p99 figures.

use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use chat_tests::fault::{self, ms, percentile, FaultReport, Workload, WorkloadConfig};
use chat_tests::{Client, TestCluster, TestClusterBuilder};
use serde_json::{json, Value};
use tokio::time::Instant;

/// Longest wait for traffic to flow, or to flow again after a fault.
const WAIT: Duration = Duration::from_secs(60);
/// Acks every room must have before a fault is injected.
const WARM_ACKS: usize = 20;
/// Bound on the drain (every message acked, every member caught up).
const DRAIN: Duration = Duration::from_secs(90);
/// The database outage.
const PG_OUTAGE: Duration = Duration::from_secs(30);
/// How long NATS stays down in its restart.
const NATS_OUTAGE: Duration = Duration::from_secs(5);
/// Kill -9 rounds in CI.
const CI_KILL_RUNS: usize = 2;
/// Bound on presence `leave`s after a gateway is killed.
const PRESENCE_BOUND: Duration = Duration::from_secs(15);

/// The scenarios' cluster: 2 gateways, 3 room nodes, no rate limit (the
/// workload sends 20/s per user), 3 s node TTL (short failovers).
fn builder(test_name: &str) -> TestClusterBuilder {
    TestCluster::builder(test_name)
        .gateways(2)
        .room_nodes(3)
        .env("CHAT_RATE_LIMIT_PER_SEC", "0")
        .env("CHAT_NODE_TTL_MS", "3000")
}

/// Drains the workload and checks it against the cluster's database.
async fn drain_and_check(
    workload: Workload,
    cluster: &TestCluster,
    scenario: &str,
) -> anyhow::Result<FaultReport> {
    let pool = cluster.pool().await?;
    let records = workload.drain(&pool, DRAIN).await;
    fault::check(scenario, &records, &pool).await
}

/// The running room node with the most active rooms.
async fn busiest_node(cluster: &mut TestCluster) -> anyhow::Result<(usize, f64)> {
    let mut best: Option<(usize, f64)> = None;
    for i in 0..cluster.node_count() {
        if !cluster.node(i).is_running()? {
            continue;
        }
        let n = cluster
            .node_metric(i, "chat_room_active_rooms")
            .await?
            .with_context(|| format!("node {i} has no chat_room_active_rooms metric"))?;
        if best.is_none_or(|(_, b)| n > b) {
            best = Some((i, n));
        }
    }
    best.context("no room node is running")
}

/// The workload rooms whose lease `node` holds (from the `room_leases`
/// table), or every room if that cannot be read: then the figure is the
/// time until every room is served again, which the dead node's rooms
/// dominate anyway.
async fn rooms_owned_by(cluster: &TestCluster, node: &str, rooms: &[String]) -> Vec<String> {
    let owned: anyhow::Result<Vec<String>> = async {
        let pool = cluster.pool().await?;
        Ok(sqlx::query_scalar(
            "SELECT room FROM room_leases WHERE owner = $1 AND expires_at > now() AND room = ANY($2) ORDER BY room",
        )
        .bind(node)
        .bind(rooms)
        .fetch_all(&pool)
        .await?)
    }
    .await;
    match owned {
        Ok(o) if !o.is_empty() => o,
        _ => rooms.to_vec(),
    }
}

/// Kills the busiest room node `runs` times under traffic (restarting it
/// after each), measures how long its rooms go unserved, and checks the
/// workload. Returns the report and the per-run time to serve again.
async fn kill9_runs(test_name: &str, runs: usize) -> anyhow::Result<(FaultReport, Vec<Duration>)> {
    let mut cluster = builder(test_name).start().await?;
    // Six rooms, so that the ring spreads them over the nodes.
    let cfg = WorkloadConfig {
        rooms: 6,
        ..WorkloadConfig::new("k")
    };
    let w = Workload::start(cfg, cluster.gateway_addrs());
    w.wait_flowing(WARM_ACKS, WAIT).await?;
    let all_rooms = w.rooms();
    let mut times = Vec::new();
    let mut moved = 0usize;
    for run in 1..=runs {
        let (victim, active) = busiest_node(&mut cluster).await?;
        let node_id = cluster.node_id(victim);
        let rooms = rooms_owned_by(&cluster, &node_id, &all_rooms).await;
        let t = Instant::now();
        cluster.node(victim).kill9().await?;
        let served = w
            .wait_served_after(t, &rooms, WAIT)
            .await
            .with_context(|| format!("run {run}: rooms of {node_id} after kill -9"))?;
        let worst = served.iter().map(|(_, d)| *d).max().unwrap_or_default();
        println!(
            "failover run {run}: kill -9 {node_id} ({active} active rooms, leases {rooms:?}): time_to_serve_ms={} per room {:?}",
            ms(worst),
            served.iter().map(|(r, d)| (r.as_str(), ms(*d))).collect::<Vec<_>>()
        );
        times.push(worst);
        moved += rooms.len();
        cluster.respawn_node(victim).await?;
        cluster.wait_ring_nodes(cluster.node_count()).await?;
        // Traffic flows everywhere on the restored ring before the next
        // kill (the rooms move back to the restarted node).
        let back = Instant::now();
        w.wait_served_after(back, &all_rooms, WAIT)
            .await
            .with_context(|| format!("run {run}: rooms after {node_id} came back"))?;
    }
    let mut report = drain_and_check(w, &cluster, test_name).await?;
    report.figure("kills", runs);
    report.figure("rooms_moved", moved);
    report.figure("time_to_serve_p50_ms", ms(percentile(&times, 50.0)));
    report.figure("time_to_serve_max_ms", ms(percentile(&times, 100.0)));
    Ok((report, times))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_busiest_room_node() -> anyhow::Result<()> {
    let (report, _) = kill9_runs("kill9_of_the_busiest_room_node", CI_KILL_RUNS).await?;
    report.finish()
}

/// `scripts/failover.sh`: the kill -9 scenario `CHAT_FAILOVER_RUNS` times
/// (default 30), printing `failover figures: … p50 … p99 …`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/failover.sh"]
async fn kill9_of_the_busiest_room_node_repeated() -> anyhow::Result<()> {
    let runs = match std::env::var("CHAT_FAILOVER_RUNS") {
        Ok(s) => s
            .parse::<usize>()
            .with_context(|| format!("CHAT_FAILOVER_RUNS={s:?} is not a number"))?,
        Err(_) => 30,
    };
    ensure!(runs > 0, "CHAT_FAILOVER_RUNS must be at least 1");
    let (report, times) = kill9_runs("kill9_of_the_busiest_room_node_repeated", runs).await?;
    println!(
        "failover figures: runs={runs} time_to_serve_ms p50={} p99={} max={} min={}",
        ms(percentile(&times, 50.0)),
        ms(percentile(&times, 99.0)),
        ms(percentile(&times, 100.0)),
        ms(percentile(&times, 0.0)),
    );
    report.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_30_seconds() -> anyhow::Result<()> {
    let mut cluster = builder("postgres_down_for_30_seconds")
        .private_postgres()
        .start()
        .await?;
    let w = Workload::start(WorkloadConfig::new("p"), cluster.gateway_addrs());
    w.wait_flowing(WARM_ACKS, WAIT).await?;
    let stopping = Instant::now();
    cluster.postgres().stop().await?;
    let down = Instant::now();
    // The outage itself: traffic keeps coming; clients may get
    // `overloaded`/`unavailable` and must retry.
    tokio::time::sleep(PG_OUTAGE).await;
    let starting = Instant::now();
    cluster.postgres().start_again().await?;
    let up = Instant::now();
    let acks_while_down = w.acks_between(down, starting);
    let recovery = w
        .wait_first_ack_after(up, WAIT)
        .await
        .context("no ack after Postgres came back")?;
    let served = w
        .wait_served_after(up, &w.rooms(), WAIT)
        .await
        .context("rooms after Postgres came back")?;
    let all_served = served.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let mut report = drain_and_check(w, &cluster, "postgres_down_for_30_seconds").await?;
    report.figure("pg_stop_ms", ms(down - stopping));
    report.figure("outage_ms", ms(up - down));
    report.figure("acks_while_down", acks_while_down);
    report.figure("recovery_first_ack_ms", ms(recovery));
    report.figure("recovery_all_rooms_ms", ms(all_served));
    report.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart() -> anyhow::Result<()> {
    let mut cluster = builder("nats_restart").start().await?;
    let w = Workload::start(WorkloadConfig::new("n"), cluster.gateway_addrs());
    w.wait_flowing(WARM_ACKS, WAIT).await?;
    let t = Instant::now();
    cluster.nats().stop().await?;
    // Down long enough for every heartbeat to go stale (TTL 3 s) and for
    // every process to notice the lost connection, with traffic going on.
    tokio::time::sleep(NATS_OUTAGE).await;
    cluster.nats().restart().await?;
    let up = Instant::now();
    let served = w
        .wait_served_after(up, &w.rooms(), WAIT)
        .await
        .context("rooms after the NATS restart")?;
    let all_served = served.iter().map(|(_, d)| *d).max().unwrap_or_default();
    cluster.wait_ring_nodes(cluster.node_count()).await?;
    for i in 0..cluster.node_count() {
        ensure!(
            cluster.node(i).is_running()?,
            "room node {i} exited across the NATS restart"
        );
    }
    for i in 0..cluster.gateway_count() {
        ensure!(
            cluster.gateway(i).is_running()?,
            "gateway {i} exited across the NATS restart"
        );
    }
    let mut report = drain_and_check(w, &cluster, "nats_restart").await?;
    report.figure("nats_down_ms", ms(up - t));
    report.figure("time_to_serve_ms", ms(all_served));
    report.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart() -> anyhow::Result<()> {
    let mut cluster = builder("rolling_restart").start().await?;
    let w = Workload::start(WorkloadConfig::new("rr"), cluster.gateway_addrs());
    w.wait_flowing(WARM_ACKS, WAIT).await?;
    let rooms = w.rooms();
    let mut steps = Vec::new();
    for i in 0..cluster.node_count() {
        let t = Instant::now();
        cluster.node(i).term()?;
        let status = cluster.node(i).wait_exit(Duration::from_secs(30)).await?;
        ensure!(status.success(), "room node {i} drained with {status}");
        // It left every ring before it comes back.
        cluster.wait_ring_nodes(cluster.node_count() - 1).await?;
        cluster.respawn_node(i).await?;
        cluster.wait_ring_nodes(cluster.node_count()).await?;
        w.wait_served_after(Instant::now(), &rooms, WAIT)
            .await
            .with_context(|| format!("rooms after restarting room node {i}"))?;
        steps.push(format!("node{i}={}", ms(t.elapsed())));
    }
    for g in 0..cluster.gateway_count() {
        let t = Instant::now();
        cluster.gateway(g).term()?;
        let status = cluster
            .gateway(g)
            .wait_exit(Duration::from_secs(30))
            .await?;
        ensure!(status.success(), "gateway {g} drained with {status}");
        cluster.respawn_gateway(g).await?;
        cluster.wait_ring_nodes(cluster.node_count()).await?;
        w.wait_every_user_acked_after(Instant::now(), WAIT)
            .await
            .with_context(|| format!("users after restarting gateway {g}"))?;
        steps.push(format!("gw{g}={}", ms(t.elapsed())));
    }
    let mut report = drain_and_check(w, &cluster, "rolling_restart").await?;
    report.figure("steps_ms", steps.join(","));
    report.finish()?;
    ensure!(
        report.closes.get("1012").copied().unwrap_or(0) > 0,
        "no client saw close code 1012 while both gateways drained (closes: {:?})",
        report.closes
    );
    Ok(())
}

/// Reads `c` until `done(presence frames so far)` holds, keeping every
/// presence frame (other frames are ignored); fails at `end`, quoting what
/// it saw.
async fn read_presence(
    c: &mut Client,
    seen: &mut Vec<Value>,
    end: Instant,
    done: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<()> {
    while !done(seen) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("presence frames so far: {}", describe_presence(seen));
        }
        match c.recv(left).await {
            Ok(v) if v["type"] == "presence" => seen.push(v),
            Ok(_) => {}
            Err(e) => bail!("{e:#}; presence frames so far: {}", describe_presence(seen)),
        }
    }
    Ok(())
}

fn describe_presence(seen: &[Value]) -> String {
    let v: Vec<String> = seen
        .iter()
        .map(|p| {
            format!(
                "{}:{}",
                p["user"].as_str().unwrap_or("?"),
                p["state"].as_str().unwrap_or("?")
            )
        })
        .collect();
    format!("[{}]", v.join(", "))
}

fn count(seen: &[Value], user: &str, state: &str) -> usize {
    seen.iter()
        .filter(|p| p["user"] == user && p["state"] == state)
        .count()
}

async fn join(c: &mut Client, room: &str) -> anyhow::Result<Value> {
    c.send_json(json!({"type": "join", "room": room})).await?;
    c.recv_until(WAIT, |f| f["type"] == "joined" && f["room"] == room)
        .await
}

/// The presence half of the gateway-kill scenario; its error says exactly
/// what the watchers saw.
async fn presence_after_gateway_kill(
    cluster: &mut TestCluster,
    killed_at: &mut Option<Instant>,
) -> anyhow::Result<Vec<(String, String)>> {
    let room = "g-presence";
    let gone_users = ["gone-0", "gone-1", "gone-2"];
    // Watchers on gateway 0 see the others come and go.
    let mut watchers = Vec::new();
    for name in ["watch-0", "watch-1"] {
        let mut c = Client::connect(&cluster.ws_url(0, name)).await?;
        join(&mut c, room).await?;
        watchers.push((name, c, Vec::<Value>::new()));
    }
    // Users only on gateway 1 (gone-2 with two connections there), and one
    // user on both gateways, who stays present.
    let mut on_gw1 = Vec::new();
    for name in gone_users.iter().chain(["gone-2", "both"].iter()) {
        let mut c = Client::connect(&cluster.ws_url(1, name)).await?;
        join(&mut c, room).await?;
        on_gw1.push(c);
    }
    let mut both0 = Client::connect(&cluster.ws_url(0, "both")).await?;
    join(&mut both0, room).await?;
    let end = Instant::now() + WAIT;
    for (_, c, seen) in &mut watchers {
        read_presence(c, seen, end, |s| {
            gone_users.iter().all(|u| count(s, u, "join") >= 1) && count(s, "both", "join") >= 1
        })
        .await
        .context("presence joins before the kill")?;
        seen.clear();
    }
    let mut probe = Client::connect(&cluster.ws_url(0, "probe")).await?;
    let before = join(&mut probe, room).await?["members"]
        .as_u64()
        .context("joined without members")?;
    probe.close().await?;

    let t = Instant::now();
    *killed_at = Some(t);
    cluster.gateway(1).kill9().await?;
    drop(on_gw1);
    let end = t + PRESENCE_BOUND;
    let mut last_leave = Duration::ZERO;
    for (name, c, seen) in &mut watchers {
        read_presence(c, seen, end, |s| {
            gone_users.iter().all(|u| count(s, u, "leave") >= 1)
        })
        .await
        .with_context(|| {
            format!(
                "{name} on gateway 0 did not get a presence leave for each of {gone_users:?} \
                 within {PRESENCE_BOUND:?} of kill -9 of gateway 1: the room nodes must drop the \
                 members of a gateway whose heartbeat stopped"
            )
        })?;
        last_leave = last_leave.max(t.elapsed());
    }
    // A new joiner's count no longer includes them; its presence join is
    // the barrier after which no late duplicate leave can still be queued.
    let mut late = Client::connect(&cluster.ws_url(0, "late")).await?;
    let after = join(&mut late, room).await?["members"]
        .as_u64()
        .context("joined without members")?;
    for (_, c, seen) in &mut watchers {
        read_presence(c, seen, Instant::now() + WAIT, |s| {
            count(s, "late", "join") >= 1
        })
        .await
        .context("presence join of the late joiner")?;
    }
    for (name, _, seen) in &watchers {
        for u in gone_users {
            let n = count(seen, u, "leave");
            ensure!(
                n == 1,
                "{name} got {n} presence leaves for {u} (expected exactly 1): {}",
                describe_presence(seen)
            );
        }
        ensure!(
            count(seen, "both", "leave") == 0,
            "{name} got a presence leave for `both`, who is still connected through gateway 0: {}",
            describe_presence(seen)
        );
    }
    // `before` counted the probe, the watchers, `both` and the gone users;
    // `after` counts the late joiner instead of the probe.
    ensure!(
        after + gone_users.len() as u64 == before,
        "joined.members after the kill is {after}; before it a joiner saw {before}, so {} \
         expected with the {} users of the dead gateway gone",
        before - gone_users.len() as u64,
        gone_users.len()
    );
    Ok(vec![
        ("presence_leaves_ms".to_string(), ms(last_leave).to_string()),
        ("members".to_string(), format!("{before}->{after}")),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_with_members() -> anyhow::Result<()> {
    let mut cluster = builder("gateway_killed_with_members").start().await?;
    let w = Workload::start(WorkloadConfig::new("g"), cluster.gateway_addrs());
    w.wait_flowing(WARM_ACKS, WAIT).await?;
    let mut killed_at = None;
    let presence = presence_after_gateway_kill(&mut cluster, &mut killed_at).await;
    // The workload's users on gateway 1 moved to gateway 0.
    let t = killed_at.unwrap_or_else(Instant::now);
    let served = w.wait_every_user_acked_after(t, WAIT).await;
    let mut report = drain_and_check(w, &cluster, "gateway_killed_with_members").await?;
    if let Ok(worst) = &served {
        report.figure("users_sending_again_ms", ms(*worst));
    }
    if let Ok(figures) = &presence {
        for (k, v) in figures {
            report.figure(k, v);
        }
    }
    let delivery = report.finish();
    match (presence, delivery) {
        (Ok(_), Ok(())) => {
            served?;
            Ok(())
        }
        (Err(p), Ok(())) => Err(p.context("presence after kill -9 of gateway 1")),
        (Ok(_), Err(d)) => Err(d),
        (Err(p), Err(d)) => bail!("{d:#}\nand presence after kill -9 of gateway 1: {p:#}"),
    }
}

/// Messages in the resume scenario: more than the owner's in-memory recent
/// ring (256), so `since` must be served from the database.
const DEEP_MESSAGES: u64 = 400;

/// `join` with `since` after the room's owner was killed: the new owner
/// has only what it loaded from the database, and the gap (everything
/// after seq 7) is larger than the recent ring, so the backlog comes from
/// the database. It must be exactly seqs 8..=400, in order, each with the
/// text sent N-th (one connection's burst is sequenced in the order sent),
/// and the next send continues at 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_beyond_the_recent_ring_across_an_owner_change() -> anyhow::Result<()> {
    let mut cluster = builder("resume_beyond_the_recent_ring_across_an_owner_change")
        .gateways(1)
        .room_nodes(2)
        .start()
        .await?;
    let room = "deep-resume";
    let mut a = Client::connect(&cluster.ws_url(0, "alice")).await?;
    join(&mut a, room).await?;
    for i in 1..=DEEP_MESSAGES {
        a.send_json(json!({"type": "send", "room": room, "client_id": format!("d{i}"), "text": format!("deep {i}")}))
            .await?;
    }
    let mut acked = 0;
    while acked < DEEP_MESSAGES {
        let f = a
            .recv_until(WAIT, |f| f["type"] == "ack" || f["type"] == "error")
            .await?;
        ensure!(f["type"] == "ack", "send refused: {f}");
        acked += 1;
    }
    a.close().await?;
    let owner = sqlx::query_scalar::<_, String>("SELECT owner FROM room_leases WHERE room = $1")
        .bind(room)
        .fetch_one(&cluster.pool().await?)
        .await
        .context("reading the room's lease")?;
    let victim = (0..cluster.node_count())
        .find(|&i| cluster.node_id(i) == owner)
        .with_context(|| format!("lease owner {owner} is not a node of this cluster"))?;
    cluster.node(victim).kill9().await?;
    cluster.wait_ring_nodes(1).await?;

    let mut b = Client::connect(&cluster.ws_url(0, "bob")).await?;
    b.send_json(json!({"type": "join", "room": room, "since": 7}))
        .await?;
    let joined = b
        .recv_until(WAIT, |f| {
            (f["type"] == "joined" && f["room"] == room) || f["type"] == "error"
        })
        .await?;
    ensure!(joined["type"] == "joined", "join refused: {joined}");
    ensure!(
        joined["last_seq"] == DEEP_MESSAGES,
        "the new owner lost messages: {joined}"
    );
    let mut seqs = Vec::new();
    while seqs.len() < (DEEP_MESSAGES - 7) as usize {
        let m = b.recv_type(WAIT, "message").await.with_context(|| {
            format!(
                "backlog after {} of {} messages",
                seqs.len(),
                DEEP_MESSAGES - 7
            )
        })?;
        let seq = m["seq"].as_u64().context("message without seq")?;
        ensure!(
            m["text"] == format!("deep {seq}"),
            "seq {seq} carries the wrong text: {m}"
        );
        seqs.push(seq);
    }
    let want: Vec<u64> = (8..=DEEP_MESSAGES).collect();
    ensure!(seqs == want, "backlog out of order or with gaps: {seqs:?}");

    b.send_json(json!({"type": "send", "room": room, "client_id": "after", "text": "after"}))
        .await?;
    let ack = b
        .recv_until(WAIT, |f| f["type"] == "ack" || f["type"] == "error")
        .await?;
    ensure!(
        ack["type"] == "ack" && ack["seq"] == DEEP_MESSAGES + 1,
        "the next send after the owner change must get seq {}: {ack}",
        DEEP_MESSAGES + 1
    );
    Ok(())
}
