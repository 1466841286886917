//! Smoke runs of every `chat-load` scenario against a real cluster: a few
//! seconds each with a small N. They check the tool's own correctness
//! (every sent message acked and received by every member exactly once, in
//! seq order, no error frames, no unexpected closes), never timing: CI
//! machines are shared and slow.
//!
//! The cluster runs with `CHAT_RATE_LIMIT_PER_SEC=0` (rate limit off), as
//! load runs do; each run records that in its results.

use chat_load::{LoadConfig, Report};
use chat_tests::TestCluster;

/// Server settings every load run here relies on (CONTRACT names).
const SETTINGS: [(&str, &str); 1] = [("CHAT_RATE_LIMIT_PER_SEC", "0")];

async fn cluster(name: &str, gateways: usize, nodes: usize) -> anyhow::Result<TestCluster> {
    let mut b = TestCluster::builder(name)
        .gateways(gateways)
        .room_nodes(nodes);
    for (k, v) in SETTINGS {
        b = b.env(k, v);
    }
    b.start().await
}

/// Runs `chat-load` with `args` against every gateway of `cluster` and
/// fails with the tool's summary unless the run was correct.
async fn run(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<Report> {
    let urls: Vec<String> = cluster
        .gateway_addrs()
        .iter()
        .map(|a| format!("ws://{a}/ws"))
        .collect();
    let settings: Vec<String> = SETTINGS.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut argv = vec![
        "chat-load".to_string(),
        format!("--url={}", urls.join(",")),
        format!("--server-setting={}", settings.join(",")),
        "--settle=0".into(),
        "--drain-timeout=20".into(),
        "--quiet".into(),
    ];
    argv.extend(args.iter().map(|s| s.to_string()));
    let cfg = LoadConfig::from_args(&argv)?;
    let report = chat_load::run(cfg).await?;
    println!("{}", report.summary());
    anyhow::ensure!(
        report.correct,
        "load run not correct:\n{}",
        report.summary()
    );
    anyhow::ensure!(report.connected as usize == report.conns);
    anyhow::ensure!(
        report.config.server_settings == settings,
        "settings not in the results"
    );
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_idle_connections_stay_joined() -> anyhow::Result<()> {
    let c = cluster("load_idle_connections_stay_joined", 1, 1).await?;
    let r = run(
        &c,
        &[
            "idle",
            "--conns=60",
            "--rooms=6",
            "--duration=2",
            "--ping-secs=1",
        ],
    )
    .await?;
    anyhow::ensure!(r.sent == 0 && r.delivered == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_fanout_delivers_every_message_to_every_member() -> anyhow::Result<()> {
    let c = cluster("load_fanout_delivers_every_message_to_every_member", 2, 1).await?;
    let r = run(&c, &["fanout", "--conns=40", "--rate=50", "--duration=3"]).await?;
    anyhow::ensure!(
        r.acked > 0 && r.delivered == r.acked * 40,
        "{}",
        r.summary()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_rooms_deliver_in_order() -> anyhow::Result<()> {
    let c = cluster("load_rooms_deliver_in_order", 1, 2).await?;
    let r = run(
        &c,
        &[
            "rooms",
            "--conns=60",
            "--rooms=12",
            "--rate=10",
            "--duration=3",
        ],
    )
    .await?;
    anyhow::ensure!(r.acked > 0, "{}", r.summary());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_churn_resumes_without_loss() -> anyhow::Result<()> {
    let c = cluster("load_churn_resumes_without_loss", 2, 1).await?;
    let r = run(
        &c,
        &[
            "churn",
            "--conns=40",
            "--rooms=4",
            "--rate=20",
            "--churn-rate=15",
            "--duration=4",
        ],
    )
    .await?;
    anyhow::ensure!(
        r.churn_disconnects > 0 && r.acked > 0,
        "no churn happened: {}",
        r.summary()
    );
    Ok(())
}
