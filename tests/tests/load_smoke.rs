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
    run_at(&urls, args).await
}

/// Runs `chat-load` with `args` against the gateways at `urls`, checked
/// as [`run`] does.
async fn run_at(urls: &[String], args: &[&str]) -> anyhow::Result<Report> {
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

/// What a user measuring their own cluster has: gateways by host name (an
/// ingress routes by it) and no process ids, only the `/metrics` of the
/// gateways and room nodes. Memory per connection, CPU and the gateways'
/// connection count come from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reads_server_figures_from_metrics() -> anyhow::Result<()> {
    let c = cluster("load_reads_server_figures_from_metrics", 1, 1).await?;
    let gw = c.gateway_addr(0);
    let urls = vec![format!("ws://localhost:{}/ws", gw.port())];
    let gw_metrics = format!("--gateway-metrics=http://{gw}/metrics");
    let node_metrics = format!("--node-metrics=http://{}/metrics", c.node_admin_addr(0));
    let r = run_at(
        &urls,
        &[
            "rooms",
            "--conns=40",
            "--rooms=4",
            "--rate=10",
            "--duration=2",
            &gw_metrics,
            &node_metrics,
        ],
    )
    .await?;
    for (name, m) in [("gateway", &r.gateway_memory), ("node", &r.node_memory)] {
        anyhow::ensure!(
            m.source == Some("metrics") && m.before.is_some_and(|b| b > 0) && m.per_conn.is_some(),
            "{name} memory not read from /metrics: {m:?}"
        );
    }
    let cpu = r
        .metrics_cpu
        .ok_or_else(|| anyhow::anyhow!("no CPU from /metrics"))?;
    anyhow::ensure!(cpu.endpoints == 2 && cpu.percent >= 0.0, "{cpu:?}");
    anyhow::ensure!(
        r.gateway_connections.is_some_and(|n| n >= 40),
        "gateway reported {:?} connections with 40 joined",
        r.gateway_connections
    );
    anyhow::ensure!(r.summary().contains("(from /metrics)"), "{}", r.summary());
    anyhow::ensure!(r.prior_connects.is_some(), "no connect count read");

    // An endpoint that is not a server's /metrics fails before any
    // connection is made.
    let healthz = format!("--gateway-metrics=http://{gw}/healthz");
    let err = run_at(&urls, &["idle", "--conns=2", &healthz])
        .await
        .expect_err("a /healthz URL is not metrics");
    anyhow::ensure!(
        err.to_string().contains("process_resident_memory_bytes"),
        "{err}"
    );
    // One endpoint spelled twice would count its process twice.
    let twice = format!("--node-metrics=http://{gw}");
    let err = run_at(&urls, &["idle", "--conns=2", &gw_metrics, &twice])
        .await
        .expect_err("the same endpoint twice");
    anyhow::ensure!(err.to_string().contains("given twice"), "{err}");
    anyhow::ensure!(r.auth == "dev", "auth {}", r.auth);
    Ok(())
}

/// A cluster that checks tokens with a public key (no dev auth): the tool
/// signs each connection's token with the matching private key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_signs_tokens_with_a_private_key() -> anyhow::Result<()> {
    let fixture = |name: &str| fixture(name).display().to_string();
    let mut b = TestCluster::builder("load_signs_tokens_with_a_private_key")
        .env("CHAT_DEV_AUTH", "false")
        .env("CHAT_JWT_PUBLIC_KEY_FILE", fixture("es256.pub.pem"))
        .env("CHAT_JOIN_RATE_PER_SEC", "0");
    for (k, v) in SETTINGS {
        b = b.env(k, v);
    }
    let c = b.start().await?;
    let key = format!("--jwt-key-file={}", fixture("es256.key.pem"));
    let r = run(
        &c,
        &["fanout", "--conns=20", "--rate=20", "--duration=2", &key],
    )
    .await?;
    anyhow::ensure!(
        r.acked > 0 && r.delivered == r.acked * 20 && r.auth == "ES256",
        "{}",
        r.summary()
    );

    // Without a key every upgrade is refused: the run fails, says why, and
    // skips its measured phase.
    let url = format!("--url=ws://{}/ws", c.gateway_addr(0));
    let cfg = LoadConfig::from_args([
        "chat-load",
        "fanout",
        "--conns=3",
        "--duration=600",
        "--quiet",
        url.as_str(),
    ])?;
    let r = chat_load::run(cfg).await?;
    anyhow::ensure!(!r.correct && r.connected == 0, "{}", r.summary());
    // The gateway's reason is kept, and a refusal is not retried: the
    // same request would be refused again.
    anyhow::ensure!(
        r.connect_failures
            .keys()
            .any(|k| k.contains("401") && k.contains("missing credentials")),
        "{:?}",
        r.connect_failures
    );
    anyhow::ensure!(
        r.connect_errors == 3,
        "{} attempts for 3 connections",
        r.connect_errors
    );
    anyhow::ensure!(
        r.problems.iter().any(|p| p.contains("phase was skipped")),
        "{:?}",
        r.problems
    );
    Ok(())
}

/// A TLS front for the gateway at `gateway`, like an ingress: a test
/// certificate for `localhost` (signed by `fixtures/tls-ca.pem`), every
/// connection piped to the gateway. Returns its port.
async fn tls_front(gateway: std::net::SocketAddr) -> anyhow::Result<u16> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(fixture("tls-localhost.pem"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(fixture("tls-localhost.key.pem"))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut up) = tokio::net::TcpStream::connect(gateway).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });
    Ok(port)
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Through a TLS front (an ingress with a private CA): `wss://` with the
/// CA given works; without it every connection is refused for the
/// certificate, and the run says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_connects_over_tls_with_a_private_ca() -> anyhow::Result<()> {
    let c = cluster("load_connects_over_tls_with_a_private_ca", 1, 1).await?;
    let port = tls_front(c.gateway_addr(0)).await?;
    let urls = vec![format!("wss://localhost:{port}/ws")];
    let ca = format!("--ca-file={}", fixture("tls-ca.pem").display());
    let r = run_at(
        &urls,
        &["fanout", "--conns=20", "--rate=20", "--duration=2", &ca],
    )
    .await?;
    anyhow::ensure!(
        r.acked > 0 && r.delivered == r.acked * 20,
        "{}",
        r.summary()
    );

    let url = format!("--url={}", urls[0]);
    let cfg = LoadConfig::from_args(["chat-load", "idle", "--conns=2", "--quiet", url.as_str()])?;
    let r = chat_load::run(cfg).await?;
    anyhow::ensure!(!r.correct && r.connected == 0, "{}", r.summary());
    anyhow::ensure!(
        r.connect_failures
            .keys()
            .any(|k| k.to_lowercase().contains("certificate")),
        "{:?}",
        r.connect_failures
    );
    Ok(())
}
