//! Authentication, authorisation, limits and hostile input, end to end:
//! each rule of the security model checked against a real cluster (private
//! NATS, a fresh Postgres database, the real binaries), one test per rule.
//!
//! Every test sets the limits it relies on explicitly, so a changed default
//! cannot silently change what a test checks. Waits are conditions with
//! deadlines; where a test must let time pass (a token's expiry), it waits
//! for the wall clock to pass a known instant and then asserts on state.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use chat_tests::{
    http_request, metric, wait_for, Client, HttpResponse, TestCluster, TestClusterBuilder,
};
use futures::{SinkExt as _, StreamExt as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{self, Message};

/// Deadline of one expected frame or effect.
const WAIT: Duration = Duration::from_secs(10);
/// HS256 secret of the token clusters (at least 16 bytes).
const SECRET: &str = "auth-limits-suite-secret-0123456789";
/// Server API key of the API test (at least 16 characters).
const API_KEY: &str = "api-key-of-the-auth-limits-suite";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("test tokens encode")
}

/// An HMAC key from raw bytes (never fails for non-empty input).
fn secret_key(bytes: &[u8]) -> EncodingKey {
    EncodingKey::from_secret(bytes).expect("HMAC keys accept any bytes")
}

fn hs256(claims: &Value) -> String {
    let key = secret_key(SECRET.as_bytes());
    sign(Algorithm::HS256, &key, claims)
}

/// Claims for `sub` valid for `secs` more seconds.
fn claims(sub: &str, secs: u64) -> Value {
    json!({"sub": sub, "exp": now_secs() + secs})
}

/// Unpadded base64url, for hand-made (unsigned) tokens.
fn b64url(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &x)| acc | (u32::from(x) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A cluster whose gateway accepts HS256 tokens only (dev auth off), with
/// the per-user send limit off unless a test sets it.
fn token_cluster(test: &str) -> TestClusterBuilder {
    TestCluster::builder(test)
        .env("CHAT_DEV_AUTH", "false")
        .env("CHAT_JWT_SECRET", SECRET)
        .env("CHAT_RATE_LIMIT_PER_SEC", "0")
        .env("CHAT_JOIN_RATE_PER_SEC", "0")
        .env("CHAT_HISTORY_RATE_PER_SEC", "0")
}

/// A dev-auth cluster with every rate limit off; tests add what they check.
fn dev_cluster(test: &str) -> TestClusterBuilder {
    TestCluster::builder(test)
        .env("CHAT_RATE_LIMIT_PER_SEC", "0")
        .env("CHAT_JOIN_RATE_PER_SEC", "0")
        .env("CHAT_HISTORY_RATE_PER_SEC", "0")
}

fn ws_base(c: &TestCluster) -> String {
    format!("ws://{}/ws", c.gateway_addr(0))
}

async fn connect_token(c: &TestCluster, token: &str) -> anyhow::Result<Client> {
    let bearer = format!("Bearer {token}");
    Client::connect_with_headers(&ws_base(c), &[("authorization", &bearer)]).await
}

/// What a WebSocket upgrade attempt ended in.
#[derive(Debug)]
enum Upgrade {
    /// Refused with this HTTP status and body.
    Refused(u16, String),
    /// Upgraded, and the server's first frame was a close with this code.
    Closed(u16),
    /// Upgraded, and the server's first frame was this text frame.
    Open(Value),
}

/// Tries an upgrade with `headers` and reports how it ended, keeping the
/// status of a refusal and the code of an immediate close, which
/// [`Client::connect`] folds into an error.
async fn try_upgrade(url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Upgrade> {
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes())?,
            HeaderValue::from_str(v)?,
        );
    }
    let connect = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await;
    let mut ws = match connect.context("no handshake in time")? {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            return Ok(Upgrade::Refused(resp.status().as_u16(), body));
        }
        Err(e) => return Err(e.into()),
        Ok((ws, _)) => ws,
    };
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Err(_) => bail!("no first frame in time"),
            Ok(None) => bail!("connection ended without a frame"),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(Message::Close(f)))) => {
                return Ok(Upgrade::Closed(f.map_or(1005, |f| u16::from(f.code))));
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                // Closed politely so the gateway frees the place at once.
                let _ = ws.close(None).await;
                return Ok(Upgrade::Open(serde_json::from_str(t.as_str())?));
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Asserts an upgrade is refused with 401 and the contract's JSON error.
async fn expect_401(url: &str, headers: &[(&str, &str)], what: &str) -> anyhow::Result<()> {
    match try_upgrade(url, headers).await? {
        Upgrade::Refused(401, body) => {
            let v: Value = serde_json::from_str(&body)
                .with_context(|| format!("{what}: 401 body is not JSON: {body}"))?;
            ensure!(
                v["error"]["code"] == "unauthorized" && v["error"]["message"].is_string(),
                "{what}: 401 body {v}"
            );
            Ok(())
        }
        other => bail!("{what}: expected HTTP 401, got {other:?}"),
    }
}

/// The first frame matching `pred`, looking first at frames an earlier
/// wait skipped.
async fn take(c: &mut Client, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    if let Some(i) = c.skipped.iter().position(&pred) {
        return Ok(c.skipped.remove(i));
    }
    c.recv_until(WAIT, pred).await
}

async fn join(c: &mut Client, room: &str) -> anyhow::Result<Value> {
    c.send_json(json!({"type": "join", "room": room})).await?;
    take(c, |f| {
        (f["type"] == "joined" && f["room"] == room) || f["type"] == "error"
    })
    .await
}

async fn joined(c: &mut Client, room: &str) -> anyhow::Result<Value> {
    let f = join(c, room).await?;
    ensure!(f["type"] == "joined", "join {room}: {f}");
    Ok(f)
}

async fn send(c: &mut Client, room: &str, text: &str, cid: &str) -> anyhow::Result<()> {
    c.send_json(json!({"type": "send", "room": room, "text": text, "client_id": cid}))
        .await
}

/// The `ack` or `error` answering the send `cid`.
async fn answer(c: &mut Client, cid: &str) -> anyhow::Result<Value> {
    take(c, |f| {
        (f["type"] == "ack" && f["client_id"] == cid) || (f["type"] == "error" && f["ref"] == cid)
    })
    .await
}

async fn ack(c: &mut Client, cid: &str) -> anyhow::Result<u64> {
    let a = answer(c, cid).await?;
    ensure!(a["type"] == "ack", "send {cid}: {a}");
    a["seq"].as_u64().context("ack without seq")
}

async fn next_error(c: &mut Client) -> anyhow::Result<Value> {
    take(c, |f| f["type"] == "error").await
}

/// Round trip through the connection: every frame the server queued before
/// the `pong` has been received (into `skipped`) when this returns.
async fn barrier(c: &mut Client) -> anyhow::Result<()> {
    c.send_json(json!({"type": "ping"})).await?;
    c.recv_type(WAIT, "pong").await.map(drop)
}

async fn gateway_metric(c: &TestCluster, name: &str) -> anyhow::Result<f64> {
    Ok(metric(&c.metrics(0).await?, name))
}

/// Waits until gateway 0's `name` reaches at least `min`.
async fn wait_metric(c: &TestCluster, name: &str, min: f64) -> anyhow::Result<f64> {
    wait_for(&format!("{name} >= {min}"), WAIT, || async move {
        let v = gateway_metric(c, name).await?;
        Ok((v >= min).then_some(v))
    })
    .await
}

// ---------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_401_before_the_upgrade() -> anyhow::Result<()> {
    let c = token_cluster("bad_tokens_are_refused_with_401_before_the_upgrade")
        .start()
        .await?;
    let url = ws_base(&c);
    let bearer = |t: &str| format!("Bearer {t}");

    let expired = hs256(&json!({"sub": "ann", "exp": now_secs() - 5}));
    expect_401(&url, &[("authorization", &bearer(&expired))], "expired").await?;

    let other_key = secret_key(b"another-secret-entirely-0123456789");
    let wrong_sig = sign(Algorithm::HS256, &other_key, &claims("ann", 60));
    expect_401(
        &url,
        &[("authorization", &bearer(&wrong_sig))],
        "wrong signature",
    )
    .await?;

    // Same secret, another algorithm: the key is pinned to HS256.
    let key = secret_key(SECRET.as_bytes());
    let hs384 = sign(Algorithm::HS384, &key, &claims("ann", 60));
    expect_401(&url, &[("authorization", &bearer(&hs384))], "HS384").await?;

    // Unsigned, in every spelling of "none".
    for alg in ["none", "None", "NONE"] {
        let unsigned = format!(
            "{}.{}.",
            b64url(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes()),
            b64url(claims("ann", 60).to_string().as_bytes())
        );
        expect_401(&url, &[("authorization", &bearer(&unsigned))], alg).await?;
        expect_401(&format!("{url}?token={unsigned}"), &[], alg).await?;
    }

    // A valid signature with a payload swapped in afterwards.
    let good = hs256(&claims("ann", 60));
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged = b64url(claims("root", 60).to_string().as_bytes());
    parts[1] = &forged;
    expect_401(
        &url,
        &[("authorization", &bearer(&parts.join(".")))],
        "forged",
    )
    .await?;

    let no_exp = hs256(&json!({"sub": "ann"}));
    expect_401(&url, &[("authorization", &bearer(&no_exp))], "no exp").await?;
    let no_sub = hs256(&json!({"exp": now_secs() + 60}));
    expect_401(&url, &[("authorization", &bearer(&no_sub))], "no sub").await?;
    expect_401(&url, &[("authorization", "Bearer x.y.z")], "garbage").await?;
    expect_401(&url, &[], "no credentials").await?;
    // Dev names are nothing without dev auth.
    expect_401(&format!("{url}?user=ann"), &[], "dev name").await?;

    // The control: the same route takes a good token, in the header or
    // the query, and a dev name next to a token changes nothing.
    let ok = connect_token(&c, &good).await?;
    ensure!(ok.hello["user"] == "ann", "hello {}", ok.hello);
    let ok = Client::connect(&format!("{url}?token={good}&user=root")).await?;
    ensure!(ok.hello["user"] == "ann", "hello {}", ok.hello);

    let refused = gateway_metric(&c, "chat_gateway_auth_failures_total").await?;
    ensure!(refused >= 15.0, "auth failures counted: {refused}");
    Ok(())
}

/// Connects with a token signed by a fixture key and checks the identity;
/// then checks the classic confusion attack (HS256 signed with the public
/// key's bytes) and a token of the other asymmetric algorithm are refused.
async fn asymmetric_key_accepted(test: &str, alg: Algorithm, name: &str) -> anyhow::Result<()> {
    let public = fixture(&format!("{name}.pub.pem"));
    let c = TestCluster::builder(test)
        .env("CHAT_DEV_AUTH", "false")
        .env("CHAT_JWT_PUBLIC_KEY_FILE", public.display().to_string())
        .env("CHAT_RATE_LIMIT_PER_SEC", "0")
        .env("CHAT_JOIN_RATE_PER_SEC", "0")
        .start()
        .await?;
    let private = std::fs::read(fixture(&format!("{name}.key.pem")))?;
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&private)?,
        _ => EncodingKey::from_ec_pem(&private)?,
    };
    let token = sign(alg, &key, &claims("ann", 60));
    let mut ann = connect_token(&c, &token).await?;
    ensure!(ann.hello["user"] == "ann", "hello {}", ann.hello);
    joined(&mut ann, "keys").await?;
    send(&mut ann, "keys", "signed in", "k1").await?;
    ack(&mut ann, "k1").await?;

    let url = ws_base(&c);
    let pem = std::fs::read(&public)?;
    let confused = sign(Algorithm::HS256, &secret_key(&pem), &claims("ann", 60));
    expect_401(
        &url,
        &[("authorization", &format!("Bearer {confused}"))],
        "HS256 with the public key",
    )
    .await?;
    let (other_alg, other) = match alg {
        Algorithm::RS256 => (Algorithm::ES256, "es256"),
        _ => (Algorithm::RS256, "rs256"),
    };
    let other_private = std::fs::read(fixture(&format!("{other}.key.pem")))?;
    let other_key = match other_alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&other_private)?,
        _ => EncodingKey::from_ec_pem(&other_private)?,
    };
    let wrong = sign(other_alg, &other_key, &claims("ann", 60));
    expect_401(
        &url,
        &[("authorization", &format!("Bearer {wrong}"))],
        "other algorithm",
    )
    .await?;
    let expired = sign(alg, &key, &json!({"sub": "ann", "exp": now_secs() - 5}));
    expect_401(
        &url,
        &[("authorization", &format!("Bearer {expired}"))],
        "expired",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_are_accepted_with_a_public_key() -> anyhow::Result<()> {
    asymmetric_key_accepted(
        "rs256_tokens_are_accepted_with_a_public_key",
        Algorithm::RS256,
        "rs256",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_are_accepted_with_a_public_key() -> anyhow::Result<()> {
    asymmetric_key_accepted(
        "es256_tokens_are_accepted_with_a_public_key",
        Algorithm::ES256,
        "es256",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_is_always_the_token_subject() -> anyhow::Result<()> {
    let c = token_cluster("the_sender_is_always_the_token_subject")
        .start()
        .await?;
    let mut ann = connect_token(&c, &hs256(&claims("ann", 60))).await?;
    let mut bob = connect_token(&c, &hs256(&claims("bob", 60))).await?;
    joined(&mut ann, "spoof").await?;
    joined(&mut bob, "spoof").await?;
    // Every field a client might use to claim another identity.
    ann.send_json(json!({
        "type": "send", "room": "spoof", "text": "I am bob", "client_id": "s1",
        "user": "bob", "sender": "bob", "user_id": "bob", "sub": "bob", "from": "bob",
        "id": "forged-id", "seq": 1_000_000, "ts": 1
    }))
    .await?;
    let seq = ack(&mut ann, "s1").await?;
    let m = take(&mut bob, |f| {
        f["type"] == "message" && f["client_id"] == "s1"
    })
    .await?;
    ensure!(m["user"] == "ann", "sender taken from the frame: {m}");
    ensure!(
        m["seq"] == seq && m["id"] != "forged-id" && m["ts"] != 1,
        "{m}"
    );
    let pool = c.pool().await?;
    let (user,): (String,) =
        sqlx::query_as("SELECT user_id FROM messages WHERE room = 'spoof' AND client_id = 's1'")
            .fetch_one(&pool)
            .await?;
    ensure!(user == "ann", "stored sender {user}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_extends_the_same_subject_and_another_subject_closes_4003() -> anyhow::Result<()> {
    let c = token_cluster("refresh_extends_the_same_subject_and_another_subject_closes_4003")
        .start()
        .await?;
    let first_exp = now_secs() + 2;
    let mut ann = connect_token(&c, &hs256(&json!({"sub": "ann", "exp": first_exp}))).await?;
    joined(&mut ann, "refresh").await?;

    // A bad token is an error frame; the connection and its expiry stay.
    ann.send_json(json!({"type": "refresh", "token": "x.y.z"}))
        .await?;
    let e = next_error(&mut ann).await?;
    ensure!(e["code"] == "unauthorized", "{e}");

    let new_exp = now_secs() + 120;
    let token = hs256(&json!({"sub": "ann", "exp": new_exp}));
    ann.send_json(json!({"type": "refresh", "token": token}))
        .await?;
    let r = ann.recv_type(WAIT, "refreshed").await?;
    ensure!(r["exp"] == new_exp, "{r}");

    // Let the first token's expiry pass (plus the second it may round up
    // to), then show the connection is still fully usable.
    wait_for("the first token's expiry to pass", WAIT, || async {
        Ok((now_secs() > first_exp + 1).then_some(()))
    })
    .await?;
    barrier(&mut ann).await?;
    send(&mut ann, "refresh", "still here", "r1").await?;
    ack(&mut ann, "r1").await?;
    ensure!(ann.close_code.is_none());

    // A token for someone else ends the connection with 4003.
    let mut bob_as_ann = connect_token(&c, &hs256(&claims("ann", 60))).await?;
    let token = hs256(&claims("bob", 60));
    bob_as_ann
        .send_json(json!({"type": "refresh", "token": token}))
        .await?;
    let code = bob_as_ann.expect_close(WAIT).await?;
    ensure!(code == 4003, "close code {code}");
    ensure!(bob_as_ann.frames_of_type("refreshed").is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_the_connection_with_4001() -> anyhow::Result<()> {
    let c = token_cluster("an_expired_token_closes_the_connection_with_4001")
        .start()
        .await?;
    let exp = now_secs() + 2;
    let mut ann = connect_token(&c, &hs256(&json!({"sub": "ann", "exp": exp}))).await?;
    joined(&mut ann, "expiry").await?;
    let code = ann.expect_close(WAIT).await?;
    ensure!(code == 4001, "close code {code}");
    ensure!(now_secs() >= exp, "closed before the token expired");
    let m = wait_metric(
        &c,
        "chat_gateway_disconnects_total{reason=\"token_expired\"}",
        1.0,
    )
    .await?;
    ensure!(m >= 1.0);
    Ok(())
}

// ---------------------------------------------------------------------------
// Authorisation
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_join_gets_forbidden_and_nothing_of_the_room() -> anyhow::Result<()> {
    let c = token_cluster("a_forbidden_join_gets_forbidden_and_nothing_of_the_room")
        .start()
        .await?;
    let ann_token = hs256(&json!({
        "sub": "ann", "exp": now_secs() + 60, "rooms": ["team-42-*", "lobby"]
    }));
    let mut ann = connect_token(&c, &ann_token).await?;
    let mut boss = connect_token(&c, &hs256(&claims("boss", 60))).await?;
    joined(&mut boss, "secret").await?;
    send(&mut boss, "secret", "before", "b0").await?;
    ack(&mut boss, "b0").await?;

    for room in ["secret", "team-43-x", "lobby2", "team-4"] {
        ann.send_json(json!({"type": "join", "room": room, "since": 0}))
            .await?;
        let e = next_error(&mut ann).await?;
        ensure!(e["code"] == "forbidden", "join {room}: {e}");
    }
    ann.send_json(json!({"type": "history", "room": "secret"}))
        .await?;
    let e = next_error(&mut ann).await?;
    ensure!(e["code"] == "forbidden", "history: {e}");
    send(&mut ann, "secret", "let me in", "a0").await?;
    let e = answer(&mut ann, "a0").await?;
    ensure!(e["code"] == "not_joined", "send: {e}");

    // Allowed rooms, exact and by prefix.
    joined(&mut ann, "lobby").await?;
    joined(&mut ann, "team-42-general").await?;

    // The room lives on; ann sees none of it: no backlog, no message, no
    // presence. A message in an allowed room, sent after, is the marker.
    joined(&mut boss, "lobby").await?;
    send(&mut boss, "secret", "after", "b1").await?;
    ack(&mut boss, "b1").await?;
    send(&mut boss, "lobby", "marker", "b2").await?;
    ack(&mut boss, "b2").await?;
    take(&mut ann, |f| {
        f["type"] == "message" && f["client_id"] == "b2"
    })
    .await?;
    barrier(&mut ann).await?;
    let leaked: Vec<&Value> = ann
        .skipped
        .iter()
        .filter(|f| f["room"] == "secret")
        .collect();
    ensure!(
        leaked.is_empty(),
        "frames of a forbidden room reached ann: {leaked:?}"
    );
    let acl = gateway_metric(&c, "chat_gateway_limited_total{limit=\"room_acl\"}").await?;
    ensure!(acl >= 5.0, "room_acl refusals counted: {acl}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Server API
// ---------------------------------------------------------------------------

async fn api(
    c: &TestCluster,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    http_request(c.gateway_addr(0), method, path, &headers, body).await
}

fn api_error(r: &HttpResponse, status: u16, code: &str) -> anyhow::Result<()> {
    ensure!(
        r.status == status,
        "expected {status}, got {} {}",
        r.status,
        r.body
    );
    let v = r.json()?;
    ensure!(
        v["error"]["code"] == code
            && v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
        "expected error {code}, got {v}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_publishes_idempotently_and_answers_json_errors() -> anyhow::Result<()> {
    let c = dev_cluster("the_server_api_publishes_idempotently_and_answers_json_errors")
        .env("CHAT_API_KEY", API_KEY)
        .env("CHAT_MAX_MESSAGE_BYTES", "1024")
        .env("CHAT_MAX_FRAME_BYTES", "4096")
        .start()
        .await?;
    let mut ann = Client::connect(&c.ws_url(0, "ann")).await?;
    joined(&mut ann, "api").await?;
    let path = "/api/rooms/api/messages";
    let body =
        json!({"user": "system", "text": "deploy done 🚀", "client_id": "job-1"}).to_string();

    // Authentication first.
    api_error(
        &api(&c, "POST", path, None, Some(&body)).await?,
        401,
        "unauthorized",
    )?;
    api_error(
        &api(
            &c,
            "POST",
            path,
            Some("wrong-key-of-enough-length"),
            Some(&body),
        )
        .await?,
        401,
        "unauthorized",
    )?;
    api_error(
        &api(&c, "GET", path, Some(&API_KEY[1..]), None).await?,
        401,
        "unauthorized",
    )?;

    let first = api(&c, "POST", path, Some(API_KEY), Some(&body)).await?;
    ensure!(first.status == 201, "{} {}", first.status, first.body);
    let first = first.json()?;
    ensure!(
        first["seq"].as_u64().is_some() && first["id"].is_string(),
        "{first}"
    );
    let again = api(&c, "POST", path, Some(API_KEY), Some(&body)).await?;
    ensure!(again.status == 200, "{} {}", again.status, again.body);
    ensure!(
        again.json()? == first,
        "the retry did not return the original"
    );

    let m = take(&mut ann, |f| {
        f["type"] == "message" && f["client_id"] == "job-1"
    })
    .await?;
    ensure!(
        m["user"] == "system" && m["text"] == "deploy done 🚀" && m["seq"] == first["seq"],
        "{m}"
    );
    barrier(&mut ann).await?;
    let copies = ann
        .skipped
        .iter()
        .filter(|f| f["client_id"] == "job-1")
        .count();
    ensure!(copies == 0, "the retried publish was broadcast again");

    let h = api(
        &c,
        "GET",
        &format!("{path}?after=0&limit=10"),
        Some(API_KEY),
        None,
    )
    .await?;
    ensure!(h.status == 200, "{} {}", h.status, h.body);
    let h = h.json()?;
    let msgs = h["messages"].as_array().context("messages")?;
    ensure!(
        msgs.len() == 1 && msgs[0] == m && h["has_more"] == false,
        "{h}"
    );
    let h = api(
        &c,
        "GET",
        &format!("{path}?before={}", first["seq"]),
        Some(API_KEY),
        None,
    )
    .await?;
    ensure!(
        h.json()?["messages"].as_array().is_some_and(Vec::is_empty),
        "{}",
        h.body
    );

    // JSON errors with stable codes.
    let bad_room = "/api/rooms/no%20spaces/messages";
    api_error(
        &api(&c, "POST", bad_room, Some(API_KEY), Some(&body)).await?,
        400,
        "bad_room",
    )?;
    api_error(
        &api(&c, "GET", bad_room, Some(API_KEY), None).await?,
        400,
        "bad_room",
    )?;
    api_error(
        &api(&c, "POST", path, Some(API_KEY), Some("{not json")).await?,
        400,
        "bad_frame",
    )?;
    api_error(
        &api(
            &c,
            "POST",
            path,
            Some(API_KEY),
            Some(r#"{"user":"x","text":"y"}"#),
        )
        .await?,
        400,
        "bad_frame",
    )?;
    let nul = json!({"user": "system", "text": "a\u{0}b", "client_id": "job-2"}).to_string();
    api_error(
        &api(&c, "POST", path, Some(API_KEY), Some(&nul)).await?,
        400,
        "bad_frame",
    )?;
    let empty_cid = json!({"user": "system", "text": "x", "client_id": ""}).to_string();
    api_error(
        &api(&c, "POST", path, Some(API_KEY), Some(&empty_cid)).await?,
        400,
        "bad_frame",
    )?;
    let big = json!({"user": "system", "text": "x".repeat(1025), "client_id": "job-3"}).to_string();
    api_error(
        &api(&c, "POST", path, Some(API_KEY), Some(&big)).await?,
        413,
        "too_large",
    )?;
    api_error(
        &api(&c, "GET", &format!("{path}?limit=ten"), Some(API_KEY), None).await?,
        400,
        "bad_frame",
    )?;
    api_error(
        &api(&c, "GET", &format!("{path}?before=-1"), Some(API_KEY), None).await?,
        400,
        "bad_frame",
    )?;

    let metrics = c.metrics(0).await?;
    let created = metric(
        &metrics,
        "chat_gateway_api_requests_total{route=\"publish\",status=\"201\"}",
    );
    let unauthorized = metric(
        &metrics,
        "chat_gateway_api_requests_total{route=\"publish\",status=\"401\"}",
    );
    ensure!(
        created == 1.0 && unauthorized == 2.0,
        "api metrics: {created} {unauthorized}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Frame limits and bad input
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_closes_1009_and_a_long_text_gets_too_large() -> anyhow::Result<()> {
    let c = dev_cluster("an_oversize_frame_closes_1009_and_a_long_text_gets_too_large")
        .env("CHAT_MAX_FRAME_BYTES", "4096")
        .env("CHAT_MAX_MESSAGE_BYTES", "2048")
        .start()
        .await?;
    let mut ann = Client::connect(&c.ws_url(0, "ann")).await?;
    ensure!(
        ann.hello["limits"]["max_frame_bytes"] == 4096,
        "{}",
        ann.hello
    );
    ensure!(
        ann.hello["limits"]["max_message_bytes"] == 2048,
        "{}",
        ann.hello
    );
    joined(&mut ann, "big").await?;
    // Over the text limit, under the frame limit: an error, nothing more.
    send(&mut ann, "big", &"x".repeat(2049), "t1").await?;
    let e = answer(&mut ann, "t1").await?;
    ensure!(e["code"] == "too_large", "{e}");
    send(&mut ann, "big", &"x".repeat(2048), "t2").await?;
    ack(&mut ann, "t2").await?;

    // Over the frame limit: the connection closes with 1009.
    ann.send_text(&format!(
        r#"{{"type":"send","room":"big","text":"{}","client_id":"t3"}}"#,
        "x".repeat(200_000)
    ))
    .await?;
    let code = ann.expect_close(WAIT).await?;
    ensure!(code == 1009, "close code {code}");
    ensure!(ann
        .frames_of_type("ack")
        .iter()
        .all(|a| a["client_id"] != "t3"));
    wait_metric(&c, "chat_gateway_limited_total{limit=\"frame_size\"}", 1.0).await?;
    wait_metric(
        &c,
        "chat_gateway_limited_total{limit=\"message_size\"}",
        1.0,
    )
    .await?;

    // Others are unaffected.
    let mut bob = Client::connect(&c.ws_url(0, "bob")).await?;
    joined(&mut bob, "big").await?;
    send(&mut bob, "big", "fine", "b1").await?;
    ack(&mut bob, "b1").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_text_frame_closes_1007() -> anyhow::Result<()> {
    let c = dev_cluster("invalid_utf8_in_a_text_frame_closes_1007")
        .env("CHAT_MAX_FRAME_BYTES", "65536")
        .start()
        .await?;
    let mut ann = Client::connect(&c.ws_url(0, "ann")).await?;
    joined(&mut ann, "utf8").await?;
    let mut payload = br#"{"type":"send","room":"utf8","text":""#.to_vec();
    payload.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    payload.extend_from_slice(br#"","client_id":"u1"}"#);
    let frame = Frame::message(payload, OpCode::Data(Data::Text), true);
    ann.send_raw(Message::Frame(frame)).await?;
    let code = ann.expect_close(WAIT).await?;
    ensure!(code == 1007, "close code {code}");
    wait_metric(
        &c,
        "chat_gateway_limited_total{limit=\"invalid_utf8\"}",
        1.0,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_bad_frame_and_the_connection_stays_usable() -> anyhow::Result<()> {
    let c = dev_cluster("malformed_frames_get_bad_frame_and_the_connection_stays_usable")
        .env("CHAT_MAX_FRAME_BYTES", "65536")
        .env("CHAT_MAX_MESSAGE_BYTES", "16384")
        .start()
        .await?;
    let mut ann = Client::connect(&c.ws_url(0, "ann")).await?;
    let long_cid = "c".repeat(129);
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "bad_frame"),
        ("".into(), "bad_frame"),
        ("{}".into(), "bad_frame"),
        ("null".into(), "bad_frame"),
        ("[1,2,3]".into(), "bad_frame"),
        (r#""join""#.into(), "bad_frame"),
        (r#"{"type":"join","room":"r""#.into(), "bad_frame"),
        (r#"{"type":"fly","room":"r"}"#.into(), "bad_frame"),
        (r#"{"type":5}"#.into(), "bad_frame"),
        (r#"{"type":"JOIN","room":"r"}"#.into(), "bad_frame"),
        (r#"{"type":"join"}"#.into(), "bad_frame"),
        (r#"{"type":"join","room":5}"#.into(), "bad_frame"),
        (
            r#"{"type":"join","room":"r","since":-1}"#.into(),
            "bad_frame",
        ),
        (
            r#"{"type":"join","room":"r","since":"1"}"#.into(),
            "bad_frame",
        ),
        (r#"{"type":"join","room":"no spaces"}"#.into(), "bad_room"),
        (r#"{"type":"join","room":""}"#.into(), "bad_room"),
        (
            r#"{"type":"send","room":"r","text":5,"client_id":"c"}"#.into(),
            "bad_frame",
        ),
        (
            r#"{"type":"send","room":"r","text":"x"}"#.into(),
            "bad_frame",
        ),
        (
            r#"{"type":"send","room":"r","text":"x","client_id":""}"#.into(),
            "bad_frame",
        ),
        (
            format!(r#"{{"type":"send","room":"r","text":"x","client_id":"{long_cid}"}}"#),
            "bad_frame",
        ),
        (
            r#"{"type":"history","room":"r","limit":"ten"}"#.into(),
            "bad_frame",
        ),
        (
            r#"{"type":"history","room":"r","before":1.5}"#.into(),
            "bad_frame",
        ),
        (r#"{"type":"refresh"}"#.into(), "bad_frame"),
        (r#"{"type":"leave","room":["r"]}"#.into(), "bad_frame"),
        // An unknown type whose text mimics the room-name error.
        (
            r#"{"type":"room names are 1-128 characters"}"#.into(),
            "bad_frame",
        ),
        (
            r#"{"type":"join","room":"r","since":"room names are"}"#.into(),
            "bad_frame",
        ),
    ];
    for (frame, code) in &cases {
        ann.send_text(frame).await?;
        let e = next_error(&mut ann)
            .await
            .with_context(|| format!("frame {frame:?}"))?;
        ensure!(
            e["code"] == *code,
            "frame {frame:?}: expected {code}, got {e}"
        );
        ensure!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    // Binary frames, empty or not.
    for bytes in [
        vec![],
        br#"{"type":"ping"}"#.to_vec(),
        vec![0, 159, 146, 150],
    ] {
        ann.send_raw(Message::binary(bytes)).await?;
        let e = next_error(&mut ann).await?;
        ensure!(e["code"] == "bad_frame", "binary: {e}");
    }
    // Still fully usable.
    barrier(&mut ann).await?;
    joined(&mut ann, "r").await?;
    send(&mut ann, "r", "after all that", "ok1").await?;
    ack(&mut ann, "ok1").await?;
    ensure!(ann.close_code.is_none());
    let invalid = gateway_metric(&c, "chat_gateway_frames_in_total{type=\"invalid\"}").await?;
    ensure!(
        invalid >= cases.len() as f64,
        "invalid frames counted: {invalid}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_is_byte_identical_and_nul_is_refused_without_blocking_the_batch(
) -> anyhow::Result<()> {
    let c = dev_cluster("unicode_is_byte_identical_and_nul_is_refused_without_blocking_the_batch")
        .env("CHAT_MAX_FRAME_BYTES", "65536")
        .env("CHAT_MAX_MESSAGE_BYTES", "16384")
        // A long alarm and a large batch put all sends of the burst below
        // into one batch.
        .env("CHAT_FLUSH_BATCH", "50")
        .env("CHAT_FLUSH_INTERVAL_MS", "200")
        .start()
        .await?;
    let texts = [
        "plain ascii",
        "emoji 😀🎉",
        "family 👩‍👩‍👧‍👦 (ZWJ sequence)",
        "flag 🏳️‍🌈 and skin tone 👋🏽",
        "\u{200F}שלום\u{200E} עולם", // RTL and LTR marks
        "e\u{301} vs \u{e9}",        // combining acute vs precomposed
        "Z\u{0351}\u{0358}a\u{0324}l\u{0317}g\u{0336}o\u{0489}",
        "\u{FEFF}BOM, \u{200B}zero width, \u{2028}line sep\u{2029}",
        "tab\tnewline\nreturn\r quote\" backslash\\ slash/",
        "\u{1F600}\u{10FFFF}\u{E000} astral and private use",
        "   leading and trailing spaces   ",
        "日本語のテキスト、한국어 텍스트",
    ];
    let mut ann = Client::connect(&c.ws_url(0, "ann")).await?;
    let mut bob = Client::connect(&c.ws_url(0, "bob")).await?;
    joined(&mut ann, "uni").await?;
    joined(&mut bob, "uni").await?;
    // One burst: NUL-bearing texts (raw and escaped) in the middle.
    for (i, t) in texts.iter().enumerate() {
        send(&mut ann, "uni", t, &format!("u{i}")).await?;
        if i == 3 {
            send(&mut ann, "uni", "nul \u{0} inside", "nul1").await?;
            ann.send_text(r#"{"type":"send","room":"uni","text":"\u0000","client_id":"nul2"}"#)
                .await?;
        }
    }
    for cid in ["nul1", "nul2"] {
        let e = answer(&mut ann, cid).await?;
        ensure!(
            e["type"] == "error" && e["code"] == "bad_frame",
            "{cid}: {e}"
        );
    }
    for (i, t) in texts.iter().enumerate() {
        let cid = format!("u{i}");
        ack(&mut ann, &cid).await?;
        let m = take(&mut bob, |f| {
            f["type"] == "message" && f["client_id"] == cid.as_str()
        })
        .await?;
        ensure!(
            m["text"].as_str() == Some(*t),
            "delivered {:?}, sent {t:?}",
            m["text"]
        );
    }
    barrier(&mut bob).await?;
    ensure!(
        bob.skipped.iter().all(|f| !f["client_id"]
            .as_str()
            .is_some_and(|c| c.starts_with("nul"))),
        "a refused message was delivered"
    );
    // History and the database hold the same bytes.
    ann.send_json(json!({"type": "history", "room": "uni", "limit": 100}))
        .await?;
    let h = ann.recv_type(WAIT, "history").await?;
    let stored: Vec<&str> = h["messages"]
        .as_array()
        .context("messages")?
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    ensure!(stored == texts, "history: {stored:?}");
    let pool = c.pool().await?;
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT body FROM messages WHERE room = 'uni' ORDER BY seq")
            .fetch_all(&pool)
            .await?;
    let bodies: Vec<&[u8]> = rows.iter().map(|(b,)| b.as_bytes()).collect();
    let sent: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
    ensure!(bodies == sent, "database bodies differ from what was sent");
    Ok(())
}

// ---------------------------------------------------------------------------
// Rate limits and per-connection limits
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_rate_limit_answers_rate_limited_with_retry_after() -> anyhow::Result<()> {
    let c = TestCluster::builder("the_send_rate_limit_answers_rate_limited_with_retry_after")
        .env("CHAT_RATE_LIMIT_PER_SEC", "1")
        .env("CHAT_RATE_LIMIT_BURST", "2")
        .env("CHAT_JOIN_RATE_PER_SEC", "0")
        .start()
        .await?;
    let mut ann = Client::connect(&c.ws_url(0, "ann")).await?;
    joined(&mut ann, "rate").await?;
    for i in 0..5 {
        send(&mut ann, "rate", "hi", &format!("r{i}")).await?;
    }
    let mut acked = Vec::new();
    let mut limited = Vec::new();
    for i in 0..5 {
        let cid = format!("r{i}");
        let a = answer(&mut ann, &cid).await?;
        if a["type"] == "ack" {
            acked.push(cid);
        } else {
            ensure!(a["code"] == "rate_limited", "{a}");
            let retry = a["retry_after_ms"].as_u64().context("retry_after_ms")?;
            ensure!((1..=2000).contains(&retry), "retry_after_ms {retry}");
            limited.push((cid, retry));
        }
    }
    // The burst passes; the rest is told when to come back (a slow
    // machine may have refilled one token meanwhile).
    ensure!(
        acked.len() >= 2 && acked.len() <= 3 && acked[..2] == ["r0", "r1"],
        "acked {acked:?}"
    );
    ensure!(!limited.is_empty());
    // Resending after the hint, with the same client_id, gets through
    // (within a few tries: the hint is a lower bound on a busy machine).
    let (cid, retry) = limited[0].clone();
    tokio::time::sleep(Duration::from_millis(retry)).await;
    let end = Instant::now() + WAIT;
    let mut tries = 0;
    loop {
        tries += 1;
        send(&mut ann, "rate", "hi", &cid).await?;
        let a = answer(&mut ann, &cid).await?;
        if a["type"] == "ack" {
            break;
        }
        ensure!(
            a["code"] == "rate_limited" && Instant::now() < end,
            "resend: {a}"
        );
        let wait = a["retry_after_ms"].as_u64().context("retry_after_ms")?;
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    ensure!(tries <= 3, "the resend took {tries} tries");
    let node = c.node_metrics(0).await?;
    ensure!(metric(&node, "chat_room_rate_limited_total") >= 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_joins_at_most_max_rooms() -> anyhow::Result<()> {
    let c = dev_cluster("a_connection_joins_at_most_max_rooms")
        .env("CHAT_MAX_ROOMS_PER_CONN", "2")
        .start()
        .await?;
    let mut ann = Client::connect(&c.ws_url(0, "ann")).await?;
    ensure!(ann.hello["limits"]["max_rooms"] == 2, "{}", ann.hello);
    joined(&mut ann, "a").await?;
    joined(&mut ann, "b").await?;
    let e = join(&mut ann, "c").await?;
    ensure!(e["type"] == "error" && e["code"] == "forbidden", "{e}");
    // Leaving frees a place.
    ann.send_json(json!({"type": "leave", "room": "a"})).await?;
    ann.recv_type(WAIT, "left").await?;
    joined(&mut ann, "c").await?;
    // The limit is per connection, not per user.
    let mut ann2 = Client::connect(&c.ws_url(0, "ann")).await?;
    joined(&mut ann2, "d").await?;
    joined(&mut ann2, "e").await?;
    wait_metric(
        &c,
        "chat_gateway_limited_total{limit=\"rooms_per_conn\"}",
        1.0,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_history_requests_are_rate_limited() -> anyhow::Result<()> {
    let c = dev_cluster("join_and_history_requests_are_rate_limited")
        .env("CHAT_JOIN_RATE_PER_SEC", "1")
        .env("CHAT_HISTORY_RATE_PER_SEC", "1")
        .env("CHAT_MAX_ROOMS_PER_CONN", "100")
        .start()
        .await?;
    let mut ann = Client::connect(&c.ws_url(0, "ann")).await?;
    // Burst is twice the rate: two joins pass, the third is limited at
    // once (its answer may overtake the other two's `joined`).
    for room in ["j1", "j2", "j3"] {
        ann.send_json(json!({"type": "join", "room": room})).await?;
    }
    let mut joins = Vec::new();
    for _ in 0..3 {
        joins.push(take(&mut ann, |f| f["type"] == "joined" || f["type"] == "error").await?);
    }
    let ok: Vec<&Value> = joins.iter().filter(|f| f["type"] == "joined").collect();
    let limited: Vec<&Value> = joins
        .iter()
        .filter(|f| f["code"] == "rate_limited")
        .collect();
    ensure!(ok.len() == 2 && limited.len() == 1, "{joins:?}");
    ensure!(ok.iter().all(|f| f["room"] != "j3"), "{joins:?}");
    let retry = limited[0]["retry_after_ms"]
        .as_u64()
        .context("retry_after_ms")?;
    ensure!((1..=1000).contains(&retry), "retry {retry}");

    for _ in 0..3 {
        ann.send_json(json!({"type": "history", "room": "j1"}))
            .await?;
    }
    let mut replies = Vec::new();
    for _ in 0..3 {
        let f = take(&mut ann, |f| f["type"] == "history" || f["type"] == "error").await?;
        replies.push(f);
    }
    let histories = replies.iter().filter(|f| f["type"] == "history").count();
    let limited: Vec<&Value> = replies
        .iter()
        .filter(|f| f["code"] == "rate_limited")
        .collect();
    ensure!(histories == 2 && limited.len() == 1, "{replies:?}");
    ensure!(limited[0]["retry_after_ms"].as_u64().is_some_and(|r| r > 0));

    // The connection stays, and after the hint the join goes through
    // (the history replies above took tokens of their own bucket only).
    tokio::time::sleep(Duration::from_millis(retry)).await;
    let end = Instant::now() + WAIT;
    loop {
        let f = join(&mut ann, "j3").await?;
        if f["type"] == "joined" {
            break;
        }
        ensure!(
            f["code"] == "rate_limited" && Instant::now() < end,
            "join j3: {f}"
        );
        let wait = f["retry_after_ms"].as_u64().context("retry_after_ms")?;
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    wait_metric(&c, "chat_gateway_limited_total{limit=\"join_rate\"}", 1.0).await?;
    wait_metric(
        &c,
        "chat_gateway_limited_total{limit=\"history_rate\"}",
        1.0,
    )
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Edge limits: connections per address, origins
// ---------------------------------------------------------------------------

async fn expect_open(url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Client> {
    Client::connect_with_headers(url, headers).await
}

async fn expect_4029(url: &str, headers: &[(&str, &str)], what: &str) -> anyhow::Result<()> {
    match try_upgrade(url, headers).await? {
        Upgrade::Closed(4029) => Ok(()),
        other => bail!("{what}: expected close 4029, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_count_the_peer_unless_it_is_a_trusted_proxy() -> anyhow::Result<()>
{
    let c = dev_cluster("connections_per_address_count_the_peer_unless_it_is_a_trusted_proxy")
        .env("CHAT_MAX_CONNS_PER_IP", "2")
        .start()
        .await?;
    let url = c.ws_url(0, "ann");
    // No trusted proxy: X-Forwarded-For is the client's word, and ignored.
    let a = expect_open(&url, &[("x-forwarded-for", "203.0.113.1")]).await?;
    let b = expect_open(&url, &[("x-forwarded-for", "203.0.113.2")]).await?;
    expect_4029(
        &url,
        &[("x-forwarded-for", "203.0.113.3")],
        "third from 127.0.0.1",
    )
    .await?;
    // A closed connection frees its place.
    a.close().await?;
    let url2 = url.clone();
    wait_for("a place to free up", WAIT, || {
        let url = url2.clone();
        async move {
            match try_upgrade(&url, &[]).await? {
                Upgrade::Open(hello) if hello["type"] == "hello" => Ok(Some(())),
                _ => Ok(None),
            }
        }
    })
    .await?;
    drop(b);
    wait_metric(
        &c,
        "chat_gateway_limited_total{limit=\"conns_per_ip\"}",
        1.0,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_forwarded_address_counts() -> anyhow::Result<()> {
    let c = dev_cluster("behind_a_trusted_proxy_the_forwarded_address_counts")
        .env("CHAT_MAX_CONNS_PER_IP", "2")
        .env("CHAT_TRUSTED_PROXIES", "127.0.0.1/32")
        .start()
        .await?;
    let url = c.ws_url(0, "ann");
    let xff = |v: &'static str| [("x-forwarded-for", v)];
    let _a1 = expect_open(&url, &xff("203.0.113.7")).await?;
    // The right-most address not of a trusted proxy is the client.
    let _a2 = expect_open(&url, &xff("198.51.100.1, 203.0.113.7, 127.0.0.1")).await?;
    expect_4029(&url, &xff("203.0.113.7"), "third from 203.0.113.7").await?;
    // A client cannot escape by prepending addresses of its own.
    expect_4029(&url, &xff("10.9.9.9, 203.0.113.7"), "spoofed prefix").await?;
    // Other clients behind the same proxy are not affected.
    let _b = expect_open(&url, &xff("203.0.113.8")).await?;
    let _p1 = expect_open(&url, &[]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_browser_origins_may_connect() -> anyhow::Result<()> {
    let c = dev_cluster("only_allowed_browser_origins_may_connect")
        .env(
            "CHAT_ALLOWED_ORIGINS",
            "https://app.example, https://admin.example/",
        )
        .start()
        .await?;
    let url = c.ws_url(0, "ann");
    for origin in [
        "https://evil.example",
        "http://app.example",
        "https://app.example.evil.example",
        "https://app.example:8443",
        "null",
    ] {
        match try_upgrade(&url, &[("origin", origin)]).await? {
            Upgrade::Refused(403, body) => {
                let v: Value = serde_json::from_str(&body)?;
                ensure!(v["error"]["code"] == "forbidden", "{origin}: {v}");
            }
            other => bail!("origin {origin}: expected 403, got {other:?}"),
        }
    }
    expect_open(&url, &[("origin", "https://app.example")]).await?;
    expect_open(&url, &[("origin", "https://admin.example")]).await?;
    // Not a browser: no Origin, no check.
    expect_open(&url, &[]).await?;
    let refused = gateway_metric(&c, "chat_gateway_limited_total{limit=\"origin\"}").await?;
    ensure!(refused == 5.0, "origin refusals counted: {refused}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Slow consumers
// ---------------------------------------------------------------------------

/// Sockets the process `pid` holds open (Linux `/proc`).
fn open_sockets(pid: u32) -> anyhow::Result<usize> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd"))?;
    Ok(dir
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count())
}

/// A member that stops reading: its socket's receive buffer is made tiny so
/// the gateway's outbound queue for it fills after a few messages.
struct Stalled {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
}

impl Stalled {
    async fn join(c: &TestCluster, user: &str, room: &str) -> anyhow::Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let stream = socket.connect(c.gateway_addr(0)).await?;
        let (mut ws, _) = tokio_tungstenite::client_async(c.ws_url(0, user), stream).await?;
        ws.send(Message::text(
            json!({"type": "join", "room": room}).to_string(),
        ))
        .await?;
        let end = Instant::now() + WAIT;
        loop {
            let m = tokio::time::timeout_at(end, ws.next())
                .await
                .context("no joined in time")?
                .context("connection ended")??;
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(t.as_str())?;
                if v["type"] == "joined" {
                    return Ok(Self { ws });
                }
            }
        }
    }

    /// Reads (fast, now) until the close frame and returns its code.
    async fn close_code(mut self) -> anyhow::Result<u16> {
        let end = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(end, self.ws.next()).await {
                Err(_) => bail!("no close frame in time"),
                Ok(None) => bail!("connection ended without a close frame"),
                Ok(Some(Err(e))) => bail!("connection failed before a close frame: {e}"),
                Ok(Some(Ok(Message::Close(f)))) => return Ok(f.map_or(1005, |f| u16::from(f.code))),
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_4008_while_other_members_keep_up() -> anyhow::Result<()> {
    let mut c = dev_cluster("a_slow_consumer_is_closed_4008_while_other_members_keep_up")
        .env("CHAT_OUTBOUND_QUEUE", "16")
        .env("CHAT_MAX_FRAME_BYTES", "65536")
        .env("CHAT_MAX_MESSAGE_BYTES", "32768")
        .start()
        .await?;
    let room = "slow";
    let mut fast = Client::connect(&c.ws_url(0, "fast")).await?;
    let mut sender = Client::connect(&c.ws_url(0, "sender")).await?;
    joined(&mut fast, room).await?;
    joined(&mut sender, room).await?;
    let pid = c.gateway(0).pid().context("gateway pid")?;
    let sockets_before = open_sockets(pid)?;
    let stalled = Stalled::join(&c, "sloth", room).await?;
    // A second one never reads again, not even its close frame.
    let _gone = Stalled::join(&c, "sloth2", room).await?;
    let text = "y".repeat(32_000);
    let closes = "chat_gateway_slow_consumer_closes_total";
    let mut worst = Duration::ZERO;
    let mut closed_after = None;
    // Big messages fill the stalled member's socket buffers and then its
    // queue; the fast member must get every one promptly throughout.
    for i in 0..400u32 {
        let cid = format!("m{i}");
        let sent = Instant::now();
        send(&mut sender, room, &text, &cid).await?;
        ack(&mut sender, &cid).await?;
        sender.skipped.clear();
        let m = fast
            .recv_until(Duration::from_secs(2), |f| f["client_id"] == cid.as_str())
            .await
            .with_context(|| format!("the fast member did not get {cid} within 2 s"))?;
        ensure!(m["type"] == "message");
        fast.skipped
            .retain(|f| f["type"] != "message" && f["type"] != "presence");
        worst = worst.max(sent.elapsed());
        if i % 10 == 9 && gateway_metric(&c, closes).await? >= 1.0 {
            closed_after = Some(i + 1);
            break;
        }
    }
    let n = closed_after.context("the stalled member was never closed")?;
    let code = stalled.close_code().await?;
    ensure!(code == 4008, "close code {code}");
    // And the room goes on for everyone else.
    for i in 0..5 {
        let cid = format!("after{i}");
        send(&mut sender, room, "still flowing", &cid).await?;
        ack(&mut sender, &cid).await?;
        take(&mut fast, |f| f["client_id"] == cid.as_str()).await?;
    }
    let slow = gateway_metric(
        &c,
        "chat_gateway_disconnects_total{reason=\"slow_consumer\"}",
    )
    .await?;
    ensure!(slow == 2.0, "slow_consumer disconnects: {slow}");
    // The member that never reads again must not keep its socket (and the
    // task writing to it) forever: the gateway lets go within its bound.
    wait_for(
        "the stalled sockets to be released",
        Duration::from_secs(20),
        || async move { Ok((open_sockets(pid)? <= sockets_before).then_some(())) },
    )
    .await?;
    eprintln!("stalled member closed after {n} messages; worst send-to-delivery {worst:?}");
    Ok(())
}
