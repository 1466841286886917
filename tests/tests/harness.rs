//! Smoke tests of the harness itself: a private NATS can be started,
//! stopped and restarted on the same port with its JetStream store, and
//! fresh databases are distinct and usable. They need no chat binaries.

use std::time::Duration;

use anyhow::Context as _;
use chat_tests::{fresh_database, wait_for, Nats};
use sqlx::Connection as _;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// Reads the server's INFO greeting, proving a client can connect.
async fn greeting(url: &str) -> anyhow::Result<String> {
    let addr = url.trim_start_matches("nats://");
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .context("no greeting within 5 s")??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test]
async fn nats_start_stop_restart() -> anyhow::Result<()> {
    let mut nats = Nats::start().await?;
    let url = nats.url();
    assert!(url.starts_with("nats://127.0.0.1:"), "{url}");
    let info = greeting(&url).await?;
    assert!(info.starts_with("INFO "), "{info}");
    assert!(
        info.contains("\"jetstream\":true"),
        "JetStream must be on: {info}"
    );

    nats.stop().await?;
    assert!(!nats.is_running());
    assert!(
        TcpStream::connect(url.trim_start_matches("nats://"))
            .await
            .is_err(),
        "port still accepting after stop"
    );
    // Stopping twice is harmless.
    nats.stop().await?;

    nats.restart().await?;
    assert_eq!(nats.url(), url, "restart must keep the port");
    let info = greeting(&url).await?;
    assert!(info.starts_with("INFO "), "{info}");

    // restart() on a running server stops it first.
    nats.restart().await?;
    greeting(&url).await?;
    Ok(())
}

#[tokio::test]
async fn fresh_databases_are_distinct_and_usable() -> anyhow::Result<()> {
    let a = fresh_database().await?;
    let b = fresh_database().await?;
    assert_ne!(a, b);
    for url in [&a, &b] {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let (name,): (String,) = sqlx::query_as("SELECT current_database()")
            .fetch_one(&mut conn)
            .await?;
        assert!(name.starts_with("chat_test_"), "{name}");
        assert!(url.ends_with(&name), "{url} vs {name}");
        sqlx::query("CREATE TABLE t (x int)")
            .execute(&mut conn)
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn wait_for_polls_until_ready_and_times_out() -> anyhow::Result<()> {
    let mut n = 0;
    let v = wait_for("counter to reach 3", Duration::from_secs(5), || {
        n += 1;
        let cur = n;
        async move { Ok((cur >= 3).then_some(cur)) }
    })
    .await?;
    assert_eq!(v, 3);

    let err = wait_for::<(), _, _>("never", Duration::from_millis(100), || async {
        anyhow::bail!("still broken")
    })
    .await
    .expect_err("must time out");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("never") && msg.contains("still broken"),
        "{msg}"
    );
    Ok(())
}
