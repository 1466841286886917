//! One protocol conformance suite, run against both set-ups: the embedded
//! single process (in-process bus + SQLite) and the cluster (2 gateways,
//! 2 room nodes, NATS, Postgres). Same test code, two targets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context};
use chat_tests::{binary, free_port, http_get, wait_for, Client, Proc, TestCluster};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

/// Where the suite connects.
trait Target {
    /// A WebSocket URL for `user` on the `i`-th entry point.
    fn url(&self, i: usize, user: &str) -> String;
}

impl Target for TestCluster {
    fn url(&self, i: usize, user: &str) -> String {
        self.ws_url(i % self.gateway_count(), user)
    }
}

/// The embedded server as a real process.
struct Embedded {
    proc: Proc,
    addr: SocketAddr,
    data_dir: PathBuf,
}

impl Target for Embedded {
    fn url(&self, _i: usize, user: &str) -> String {
        format!("ws://{}/ws?user={user}", self.addr)
    }
}

impl Embedded {
    async fn start(test: &str, data_dir: PathBuf) -> anyhow::Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let env = vec![
            ("CHAT_STANDALONE".to_owned(), "true".to_owned()),
            ("CHAT_LISTEN".to_owned(), addr.to_string()),
            ("CHAT_DATA_DIR".to_owned(), data_dir.display().to_string()),
            ("CHAT_RATE_LIMIT_PER_SEC".to_owned(), "0".to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ];
        let proc = Proc::spawn(test, "embedded", &binary("chat-gateway")?, &[], &env)?;
        let mut e = Self {
            proc,
            addr,
            data_dir,
        };
        e.wait_ready().await?;
        Ok(e)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let addr = self.addr;
        wait_for("embedded /readyz", WAIT, || async move {
            Ok(http_get(addr, "/readyz")
                .await
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| ()))
        })
        .await
        .with_context(|| self.proc.log_tail(30))
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "chat-{name}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The first frame matching `pred`, looking first at frames an earlier wait
/// skipped (acks and messages race each other), then at new ones.
async fn take(c: &mut Client, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    if let Some(i) = c.skipped.iter().position(&pred) {
        return Ok(c.skipped.remove(i));
    }
    c.recv_until(WAIT, pred).await
}

async fn take_type(c: &mut Client, t: &str) -> anyhow::Result<Value> {
    take(c, |f| f["type"] == t).await
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().filter_map(|m| m["seq"].as_u64()).collect()
}

async fn join(c: &mut Client, room: &str, since: Option<u64>) -> anyhow::Result<Value> {
    let mut f = json!({"type": "join", "room": room});
    if let Some(s) = since {
        f["since"] = json!(s);
    }
    c.send_json(f).await?;
    take(c, |f| f["type"] == "joined" && f["room"] == room).await
}

async fn send(c: &mut Client, room: &str, text: &str, cid: &str) -> anyhow::Result<()> {
    c.send_json(json!({"type": "send", "room": room, "text": text, "client_id": cid}))
        .await
}

async fn ack(c: &mut Client, cid: &str) -> anyhow::Result<u64> {
    let a = take(c, |f| f["type"] == "ack" && f["client_id"] == cid).await?;
    a["seq"].as_u64().context("ack seq")
}

async fn error(c: &mut Client) -> anyhow::Result<Value> {
    take_type(c, "error").await
}

/// The whole suite. Rooms are fresh per run.
async fn conformance(t: &dyn Target) -> anyhow::Result<()> {
    let room = "conf-room";
    // hello
    let mut ann = Client::connect(&t.url(0, "ann")).await?;
    ensure!(
        ann.hello["user"] == "ann" && ann.hello["protocol"] == 1,
        "hello: {}",
        ann.hello
    );
    ensure!(
        ann.hello["limits"]["max_message_bytes"].as_u64().is_some(),
        "hello limits: {}",
        ann.hello
    );

    // join a fresh room
    let j = join(&mut ann, room, None).await?;
    ensure!(j["last_seq"] == 0 && j["members"] == 1, "joined: {j}");

    // send, ack, order
    for i in 1..=5 {
        send(
            &mut ann,
            room,
            &format!("m{i} — ünïcødé 🚀 مرحبا"),
            &format!("a{i}"),
        )
        .await?;
    }
    let mut live = Vec::new();
    for _ in 0..5 {
        live.push(take_type(&mut ann, "message").await?);
    }
    ensure!(
        seqs(&live) == vec![1, 2, 3, 4, 5],
        "live order: {:?}",
        seqs(&live)
    );
    for i in 1..=5 {
        ensure!(ack(&mut ann, &format!("a{i}")).await? == i, "ack {i}");
    }
    ensure!(
        live[0]["text"] == "m1 — ünïcødé 🚀 مرحبا" && live[0]["user"] == "ann",
        "text kept: {}",
        live[0]
    );
    ensure!(
        live[0]["ts"].as_i64().is_some() && live[0]["id"].as_str().is_some(),
        "ts and id: {}",
        live[0]
    );

    // presence and member count, on another entry point
    let mut bob = Client::connect(&t.url(1, "bob")).await?;
    let j = join(&mut bob, room, None).await?;
    ensure!(j["last_seq"] == 5 && j["members"] == 2, "bob joined: {j}");
    let backlog: Vec<Value> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(take_type(&mut bob, "message").await?);
        }
        v
    };
    ensure!(backlog == live, "backlog equals what was delivered live");
    let p = take_type(&mut ann, "presence").await?;
    ensure!(p["user"] == "bob" && p["state"] == "join", "presence: {p}");

    // dedup of resends: same seq, no second message
    send(&mut bob, room, "b1", "b1").await?;
    let b1 = ack(&mut bob, "b1").await?;
    ensure!(b1 == 6, "b1 seq {b1}");
    send(&mut bob, room, "b1 again", "b1").await?;
    ensure!(ack(&mut bob, "b1").await? == 6, "resend keeps its seq");
    send(&mut bob, room, "b2", "b2").await?;
    ensure!(
        ack(&mut bob, "b2").await? == 7,
        "next send gets the next seq"
    );
    let m6 = take_type(&mut ann, "message").await?;
    let m7 = take_type(&mut ann, "message").await?;
    ensure!(
        m6["seq"] == 6 && m6["text"] == "b1" && m7["seq"] == 7,
        "no duplicate delivered: {m6} {m7}"
    );

    // history, paging back
    ann.send_json(json!({"type": "history", "room": room, "limit": 3}))
        .await?;
    let h = take_type(&mut ann, "history").await?;
    let hm: Vec<Value> = h["messages"].as_array().context("messages")?.clone();
    ensure!(
        seqs(&hm) == vec![5, 6, 7] && h["has_more"] == true,
        "history: {h}"
    );
    ensure!(hm[0] == live[4], "history frames equal live frames");
    ann.send_json(json!({"type": "history", "room": room, "before": 5, "limit": 10}))
        .await?;
    let h = take_type(&mut ann, "history").await?;
    ensure!(
        seqs(h["messages"].as_array().context("messages")?) == vec![1, 2, 3, 4]
            && h["has_more"] == false,
        "older: {h}"
    );

    // since
    let mut cy = Client::connect(&t.url(0, "cy")).await?;
    let j = join(&mut cy, room, Some(4)).await?;
    ensure!(j["last_seq"] == 7, "cy joined: {j}");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(take_type(&mut cy, "message").await?);
    }
    ensure!(
        seqs(&got) == vec![5, 6, 7],
        "since backlog: {:?}",
        seqs(&got)
    );

    // leave and presence leave
    cy.send_json(json!({"type": "leave", "room": room})).await?;
    take_type(&mut cy, "left").await?;
    let p = take(&mut ann, |f| {
        f["type"] == "presence" && f["user"] == "cy" && f["state"] == "leave"
    })
    .await?;
    ensure!(p["room"] == room, "{p}");

    // errors for bad frames; the connection stays usable after each
    ann.send_text("not json").await?;
    ensure!(error(&mut ann).await?["code"] == "bad_frame", "not json");
    ann.send_json(json!({"type": "teleport"})).await?;
    ensure!(
        error(&mut ann).await?["code"] == "bad_frame",
        "unknown type"
    );
    ann.send_json(json!({"type": "join", "room": "no spaces!"}))
        .await?;
    ensure!(error(&mut ann).await?["code"] == "bad_room", "bad room");
    ann.send_json(json!({"type": "join"})).await?;
    ensure!(
        error(&mut ann).await?["code"] == "bad_frame",
        "missing room"
    );
    send(&mut ann, "never-joined", "x", "nj").await?;
    let e = error(&mut ann).await?;
    ensure!(
        e["code"] == "not_joined" && e["ref"] == "nj",
        "not joined: {e}"
    );
    let max = ann.hello["limits"]["max_message_bytes"]
        .as_u64()
        .context("limit")? as usize;
    send(&mut ann, room, &"x".repeat(max + 1), "big").await?;
    let e = error(&mut ann).await?;
    ensure!(
        e["code"] == "too_large" && e["ref"] == "big",
        "too large: {e}"
    );
    send(&mut ann, room, "x", "").await?;
    ensure!(
        error(&mut ann).await?["code"] == "bad_frame",
        "empty client_id"
    );
    send(&mut ann, room, "nul \u{0} inside", "nul").await?;
    ensure!(error(&mut ann).await?["code"] == "bad_frame", "NUL refused");
    ann.send_raw(Message::Binary(vec![1, 2, 3].into())).await?;
    ensure!(
        error(&mut ann).await?["code"] == "bad_frame",
        "binary frame"
    );
    ann.send_json(json!({"type": "join", "room": room})).await?;
    ensure!(error(&mut ann).await?["code"] == "bad_frame", "double join");
    ann.send_json(json!({"type": "ping"})).await?;
    take_type(&mut ann, "pong").await?;
    // ... and still chats
    send(&mut ann, room, "still here", "a6").await?;
    ensure!(ack(&mut ann, "a6").await? == 8, "send after errors");
    let m = take(&mut bob, |f| f["type"] == "message" && f["seq"] == 8).await?;
    ensure!(m["text"] == "still here", "{m}");
    ensure!(
        bob.frames_of_type("message")
            .iter()
            .all(|m| m["seq"].as_u64() < Some(8) && m["seq"].as_u64() > Some(5)),
        "bob saw no duplicate: {:?}",
        bob.skipped
    );

    // leave right behind join, without waiting: `joined` comes before
    // `left`, and the connection really leaves the room: a member there
    // sees its presence `leave` (the leave once overtook the registration
    // and left a ghost member that never left).
    let flash: Vec<String> = (0..8).map(|i| format!("conf-flash-{i}")).collect();
    let mut dan = Client::connect(&t.url(0, "dan")).await?;
    for r in &flash {
        join(&mut dan, r, None).await?;
    }
    let mut cat = Client::connect(&t.url(0, "cat")).await?;
    for r in &flash {
        cat.send_json(json!({"type": "join", "room": r})).await?;
        cat.send_json(json!({"type": "leave", "room": r})).await?;
    }
    for r in &flash {
        let first = take(&mut cat, |f| {
            (f["type"] == "joined" || f["type"] == "left") && f["room"] == r.as_str()
        })
        .await?;
        ensure!(first["type"] == "joined", "{r}: {first} came before joined");
        take(&mut cat, |f| f["type"] == "left" && f["room"] == r.as_str()).await?;
    }
    for r in &flash {
        take(&mut dan, |f| {
            f["type"] == "presence"
                && f["room"] == r.as_str()
                && f["user"] == "cat"
                && f["state"] == "leave"
        })
        .await
        .with_context(|| format!("{r}: cat left but never left the room"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_embedded() -> anyhow::Result<()> {
    let e = Embedded::start("conformance_embedded", temp_dir("conf")).await?;
    let res = conformance(&e).await;
    let _ = std::fs::remove_dir_all(&e.data_dir);
    res.with_context(|| e.proc.log_tail(40))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_cluster() -> anyhow::Result<()> {
    let cluster = TestCluster::builder("conformance_cluster")
        .gateways(2)
        .room_nodes(2)
        .env("CHAT_RATE_LIMIT_PER_SEC", "0")
        .start()
        .await?;
    conformance(&cluster).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_restart_keeps_history_and_continues_seq() -> anyhow::Result<()> {
    let dir = temp_dir("restart");
    let mut e = Embedded::start("embedded_restart", dir.clone()).await?;
    let mut c = Client::connect(&e.url(0, "ann")).await?;
    join(&mut c, "keep", None).await?;
    let mut before = Vec::new();
    for i in 1..=3 {
        send(&mut c, "keep", &format!("m{i}"), &format!("c{i}")).await?;
        ensure!(ack(&mut c, &format!("c{i}")).await? == i, "seq {i}");
        before.push(take(&mut c, |f| f["type"] == "message" && f["seq"] == i).await?);
    }
    e.proc.term()?;
    let code = c.expect_close(WAIT).await?;
    ensure!(code == 1012, "drain closes with 1012, got {code}");
    let status = e.proc.wait_exit(Duration::from_secs(25)).await?;
    ensure!(status.success(), "SIGTERM exit: {status}");

    e.proc.respawn()?;
    e.wait_ready().await?;
    let mut c = Client::connect(&e.url(0, "ann")).await?;
    let j = join(&mut c, "keep", Some(0)).await?;
    ensure!(j["last_seq"] == 3, "after restart: {j}");
    let mut after = Vec::new();
    for _ in 0..3 {
        after.push(take_type(&mut c, "message").await?);
    }
    ensure!(after == before, "history identical after restart");
    // A resend of an old client_id is still recognised; a new send continues.
    send(&mut c, "keep", "m2 again", "c2").await?;
    ensure!(ack(&mut c, "c2").await? == 2, "dedup survives restart");
    send(&mut c, "keep", "m4", "c4").await?;
    ensure!(ack(&mut c, "c4").await? == 4, "seq continues without reuse");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
