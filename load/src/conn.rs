//! One simulated client: a task per connection that connects from its own
//! loopback source address, joins its room, sends on a schedule when it is
//! a sender, and checks every `message` it receives against the seq it
//! expects next.
//!
//! All per-connection state is a few integers plus the WebSocket itself
//! (whose read buffer is `--read-buffer` bytes), so a run can hold 100,000
//! connections; statistics go straight to the shared [`Stats`].

use std::borrow::Cow;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::config::{source_for, LoadConfig, Target};
use crate::stats::Stats;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a connect (TCP, upgrade, hello) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Connect attempts of a connection before it gives up.
const CONNECT_TRIES: u32 = 5;
/// Connect errors printed as they happen; the rest are only counted.
const PRINTED_CONNECT_ERRORS: u64 = 10;
/// How long a closing connection waits for the server's close reply.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// Width of the send timestamp at the start of every message text.
const STAMP_DIGITS: usize = 16;

/// Where a run is; every connection task follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Connecting and joining; nobody sends.
    Connecting,
    /// The measured phase: senders send.
    Running,
    /// Senders stop and wait for their outstanding acks.
    Stopping,
    /// Members wait until they hold their room's final seq.
    Verifying,
    /// Everyone closes.
    Closing,
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cfg: LoadConfig,
    pub(crate) stats: Stats,
    pub(crate) phase: watch::Sender<Phase>,
    /// Room names, by room index (unique per run).
    pub(crate) rooms: Vec<String>,
    /// Gateway addresses and their `/ws` paths, by URL index.
    pub(crate) targets: Vec<Target>,
    /// Prefix of user names and room names of this run.
    pub(crate) run_id: String,
    /// Limits connects in flight during ramp-up.
    pub(crate) gate: Semaphore,
    /// Senders that finished their first join.
    pub(crate) ready_senders: AtomicU64,
    /// Padding that brings a timestamp up to `--message-bytes`.
    pub(crate) pad: String,
    /// Signing algorithm and key for `?token=` (dev auth `?user=`
    /// without them).
    pub(crate) jwt_key: Option<(jsonwebtoken::Algorithm, jsonwebtoken::EncodingKey)>,
    /// TLS settings for `wss://` targets (`None` when every target is
    /// `ws://`).
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

/// Microseconds since the Unix epoch: the send stamp in every message
/// text. Sender and receivers live in this process, so one clock serves
/// both and latency needs no clock sync.
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// The fixed part of one connection's life.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Connection index (names the user and picks the source address).
    pub(crate) idx: usize,
    /// Room index.
    pub(crate) room: usize,
    /// Messages per second this connection sends (0 with `sender`: as fast
    /// as the window allows).
    pub(crate) rate: f64,
    /// Whether it sends at all.
    pub(crate) sender: bool,
    /// Mean seconds between deliberate disconnects (churn), if it churns.
    pub(crate) churn_mean_secs: Option<f64>,
}

/// A frame from the server; only the fields the tool reads.
#[derive(Deserialize)]
struct In<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default, rename = "ref", borrow)]
    reference: Option<Cow<'a, str>>,
    #[serde(default)]
    last_seq: Option<u64>,
}

/// How a session (one WebSocket connection) ended.
enum End {
    /// The run is over.
    Finished,
    /// Connect again and resume with `since`.
    Reconnect,
}

/// What woke the session loop.
enum Wake {
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    SendTick,
    Ping,
    Phase,
    Churn,
}

/// The mutable state of one simulated client, across reconnects.
struct Conn {
    shared: Arc<Shared>,
    plan: Plan,
    phase_rx: watch::Receiver<Phase>,
    phase: Phase,
    /// Highest seq received with no gap below (0: none yet).
    last_seq: u64,
    /// Whether the first join finished (counted in `ready`).
    ready: bool,
    /// Whether the current session's join finished.
    joined: bool,
    /// Sends written (over the whole run; also numbers the client ids).
    sent: u64,
    /// Sends answered by an ack or an error frame.
    answered: u64,
    /// Sends written since the running phase began (for the rate).
    sent_in_run: u64,
    run_started: Option<Instant>,
    /// Where in its period this sender's sends fall, in [0, 1): senders
    /// share one start instant, and without an offset of their own every
    /// sender's n-th send would be due at the same moment (bursts of one
    /// message per sender instead of an even rate).
    send_phase: f64,
    done_sending: bool,
    verified: bool,
    rng: u64,
}

/// Runs one simulated client until the run closes.
pub(crate) async fn run(shared: Arc<Shared>, plan: Plan) {
    let phase_rx = shared.phase.subscribe();
    let phase = *phase_rx.borrow();
    let rng =
        0x9E37_79B9_7F4A_7C15u64 ^ ((plan.idx as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    let mut c = Conn {
        shared,
        plan,
        phase_rx,
        phase,
        last_seq: 0,
        ready: false,
        joined: false,
        sent: 0,
        answered: 0,
        sent_in_run: 0,
        run_started: None,
        send_phase: 0.0,
        done_sending: false,
        verified: false,
        rng,
    };
    // Draw once, so the offset is the sender's own and stays put.
    c.send_phase = c.random();
    c.life().await;
    Stats::inc(&c.shared.stats.finished, 1);
}

impl Conn {
    fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// A pseudo-random number in [0, 1) (xorshift; good enough to spread
    /// timers).
    fn random(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn life(&mut self) {
        loop {
            let shared = self.shared.clone();
            let permit = if self.ready {
                None
            } else {
                // The semaphore is never closed, so acquire cannot fail.
                shared.gate.acquire().await.ok()
            };
            let Some(ws) = self.connect().await else {
                if !self.ready {
                    Stats::inc(&self.stats().failed, 1);
                }
                return;
            };
            Stats::inc(&self.stats().open, 1);
            let end = self.session(ws, permit).await;
            self.stats().open.fetch_sub(1, Ordering::Relaxed);
            match end {
                End::Finished => break,
                End::Reconnect => Stats::inc(&self.stats().reconnects, 1),
            }
        }
        let fin = self.room_final();
        if fin > self.last_seq {
            Stats::inc(&self.stats().missing, fin - self.last_seq);
        }
    }

    fn room_final(&self) -> u64 {
        self.shared.stats.room_final[self.plan.room].load(Ordering::Relaxed)
    }

    fn user(&self) -> String {
        format!("{}-u{}", self.shared.run_id, self.plan.idx)
    }

    /// TCP connect from this connection's source address, WebSocket
    /// upgrade, `hello`; retried a few times. `None` once it gives up (or
    /// the run is closing).
    async fn connect(&mut self) -> Option<Ws> {
        let cfg_timeout = self.shared.cfg.connect_timeout;
        for attempt in 0..CONNECT_TRIES {
            if self.phase == Phase::Closing {
                return None;
            }
            // One attempt never outlasts the whole ramp-up's deadline.
            let limit = CONNECT_TIMEOUT.min(Duration::from_secs(cfg_timeout.max(1)));
            let (failure, again) = match tokio::time::timeout(limit, self.try_connect()).await {
                Ok(Ok(ws)) => return Some(ws),
                Ok(Err(e)) => describe(&e),
                Err(_) => (
                    format!(
                        "no answer within {} s (TCP connect, upgrade and hello)",
                        limit.as_secs()
                    ),
                    true,
                ),
            };
            self.connect_failed(failure);
            if !again {
                // The same request would get the same answer.
                return None;
            }
            let backoff = 100u64 << attempt.min(5);
            tokio::time::sleep(Duration::from_millis(backoff)).await;
            self.phase = *self.phase_rx.borrow();
        }
        None
    }

    /// Counts a failed connect attempt by its reason, and prints the first
    /// few: a thousand connections failing alike would otherwise print a
    /// thousand identical lines.
    fn connect_failed(&self, failure: String) {
        let stats = self.stats();
        Stats::inc(&stats.connect_errors, 1);
        let printed = stats.connect_errors.load(Ordering::Relaxed);
        if printed <= PRINTED_CONNECT_ERRORS {
            eprintln!("chat-load: connection {}: {failure}", self.plan.idx);
            if printed == PRINTED_CONNECT_ERRORS {
                eprintln!(
                    "chat-load: further connect errors are counted in the results, not printed"
                );
            }
        }
        *stats
            .connect_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(failure.chars().take(160).collect())
            .or_default() += 1;
    }

    async fn try_connect(&self) -> anyhow::Result<Ws> {
        let cfg = &self.shared.cfg;
        let target = &self.shared.targets[self.plan.idx % self.shared.targets.len()];
        let sock = TcpSocket::new_v4()?;
        // Ports in TIME_WAIT from churned connections may be reused for
        // new connections to the same gateway (the 4-tuple still differs).
        sock.set_reuseaddr(true)?;
        let k = self.plan.idx / cfg.conns_per_source;
        if let Some(src) = source_for(cfg.source_base, target.addr, k) {
            sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
        }
        let stream = sock.connect(target.addr).await?;
        stream.set_nodelay(true)?;
        let user = self.user();
        let cred = match &self.shared.jwt_key {
            None => format!("user={user}"),
            Some((alg, key)) => {
                let claims = serde_json::json!({
                    "sub": user,
                    "exp": now_us() / 1_000_000 + 24 * 3600,
                });
                let token = jsonwebtoken::encode(&jsonwebtoken::Header::new(*alg), &claims, key)?;
                format!("token={token}")
            }
        };
        let url = target.with_credential(&cred);
        let mut req = url.into_client_request()?;
        if cfg.offer_deflate {
            req.headers_mut().insert(
                "sec-websocket-extensions",
                HeaderValue::from_static("permessage-deflate; client_max_window_bits"),
            );
        }
        let ws_cfg = WebSocketConfig::default()
            .read_buffer_size(cfg.read_buffer)
            .write_buffer_size(0)
            .max_write_buffer_size(1 << 20);
        let connector = match (&self.shared.tls, target.tls) {
            (Some(tls), true) => Connector::Rustls(tls.clone()),
            _ => Connector::Plain,
        };
        let (mut ws, _) = tokio_tungstenite::client_async_tls_with_config(
            req,
            stream,
            Some(ws_cfg),
            Some(connector),
        )
        .await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str().contains("\"hello\"") => Ok(ws),
            other => anyhow::bail!("{}", no_hello(other)),
        }
    }

    /// One connection's life from join to close.
    async fn session(
        &mut self,
        mut ws: Ws,
        mut permit: Option<tokio::sync::SemaphorePermit<'_>>,
    ) -> End {
        self.joined = false;
        let join = format!(
            r#"{{"type":"join","room":"{}","since":{}}}"#,
            self.shared.rooms[self.plan.room], self.last_seq
        );
        if ws.send(Message::text(join)).await.is_err() {
            return self.lost(None);
        }
        let cfg = &self.shared.cfg;
        let ping_every = Duration::from_secs(cfg.ping_secs.max(1));
        let mut ping = tokio::time::interval_at(
            Instant::now() + ping_every.mul_f64(self.random().max(0.01)),
            ping_every,
        );
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut churn_at: Option<Instant> = None;
        loop {
            if churn_at.is_none() && self.phase == Phase::Running && self.joined {
                if let Some(mean) = self.plan.churn_mean_secs {
                    let life = -mean * (1.0 - self.random()).ln();
                    churn_at = Some(Instant::now() + Duration::from_secs_f64(life.min(3600.0)));
                }
            }
            let churn_armed = churn_at.is_some() && self.phase == Phase::Running;
            let churn_deadline = churn_at.unwrap_or_else(Instant::now);
            let sending = self.plan.sender && self.phase == Phase::Running && self.joined;
            // Each send is timed on its own schedule, not on whatever frame
            // happens to wake the connection: waking on deliveries made
            // senders send in step with the server's commits, a convoy of
            // the tool's own making.
            let send_at = if sending { self.next_send_at() } else { None };
            let wake = tokio::select! {
                m = ws.next() => Wake::Frame(m),
                _ = tokio::time::sleep_until(send_at.unwrap_or_else(Instant::now)), if send_at.is_some() => Wake::SendTick,
                _ = ping.tick() => Wake::Ping,
                // The sender lives in `Shared`, which outlives this task.
                _ = self.phase_rx.changed() => Wake::Phase,
                _ = tokio::time::sleep_until(churn_deadline), if churn_armed => Wake::Churn,
            };
            match wake {
                Wake::Frame(None) | Wake::Frame(Some(Err(_))) => return self.lost(None),
                Wake::Frame(Some(Ok(msg))) => match msg {
                    Message::Text(t) => {
                        self.on_frame(t.as_str());
                        if self.joined {
                            // The first join of this connection is done:
                            // let the next one connect.
                            permit.take();
                        }
                    }
                    // tungstenite queued the pong; push it out now.
                    Message::Ping(_) if ws.flush().await.is_err() => return self.lost(None),
                    Message::Close(frame) => {
                        let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                        if self.phase == Phase::Closing {
                            return End::Finished;
                        }
                        return self.lost(Some(code));
                    }
                    _ => {}
                },
                Wake::SendTick => {}
                Wake::Ping => {
                    if ws.send(Message::text(r#"{"type":"ping"}"#)).await.is_err() {
                        return self.lost(None);
                    }
                }
                Wake::Phase => {
                    self.phase = *self.phase_rx.borrow_and_update();
                    if self.phase == Phase::Running && self.run_started.is_none() {
                        self.run_started = Some(Instant::now());
                    }
                    if self.phase == Phase::Closing {
                        close(&mut ws).await;
                        return End::Finished;
                    }
                }
                Wake::Churn => {
                    close(&mut ws).await;
                    Stats::inc(&self.stats().churn_disconnects, 1);
                    return End::Reconnect;
                }
            }
            if self.plan.sender
                && self.phase == Phase::Running
                && self.joined
                && self.pump(&mut ws).await.is_err()
            {
                return self.lost(None);
            }
            self.check_progress();
        }
    }

    /// The connection ended without us closing it: counted, then resumed
    /// unless the run is closing.
    fn lost(&mut self, code: Option<u16>) -> End {
        if self.phase == Phase::Closing {
            return End::Finished;
        }
        Stats::inc(&self.stats().unexpected_closes, 1);
        self.stats().close_code(code.unwrap_or(0));
        // Unanswered sends of a lost connection never get an answer.
        self.answered = self.sent;
        End::Reconnect
    }

    /// Counts the sender done and the member verified when they are.
    fn check_progress(&mut self) {
        if self.plan.sender
            && !self.done_sending
            && self.phase >= Phase::Stopping
            && self.answered >= self.sent
        {
            self.done_sending = true;
            Stats::inc(&self.stats().senders_done, 1);
        }
        if !self.verified && self.phase >= Phase::Verifying && self.last_seq >= self.room_final() {
            self.verified = true;
            Stats::inc(&self.stats().verified, 1);
        }
    }

    /// When the next send falls due by the rate, if one may go out (none
    /// while the window is full: an ack wakes the connection then, and
    /// none at an unbounded rate, where acks drive the sends).
    fn next_send_at(&self) -> Option<Instant> {
        let rate = self.plan.rate;
        let start = self.run_started?;
        let outstanding = self.sent - self.answered;
        if rate <= 0.0 || outstanding >= self.shared.cfg.window as u64 {
            return None;
        }
        // `pump` sends message k once rate * elapsed + phase >= k.
        let k = (self.sent_in_run + 1) as f64;
        let after = ((k - self.send_phase) / rate).max(0.0);
        // A microsecond late, so the rounding in `pump` sees it due.
        Some(start + Duration::from_secs_f64(after) + Duration::from_micros(1))
    }

    /// Writes the sends that are due (by the rate, within the window).
    async fn pump(&mut self, ws: &mut Ws) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let outstanding = self.sent - self.answered;
        let room_left = (self.shared.cfg.window as u64).saturating_sub(outstanding);
        let due = if self.plan.rate > 0.0 {
            let elapsed = self
                .run_started
                .map(|s| s.elapsed().as_secs_f64())
                .unwrap_or(0.0);
            ((self.plan.rate * elapsed + self.send_phase) as u64).saturating_sub(self.sent_in_run)
        } else {
            u64::MAX
        };
        let n = due.min(room_left);
        if n == 0 {
            return Ok(());
        }
        let room = &self.shared.rooms[self.plan.room];
        for _ in 0..n {
            let text = format!(
                "{:0width$}{}",
                now_us(),
                self.shared.pad,
                width = STAMP_DIGITS
            );
            let frame = format!(
                r#"{{"type":"send","room":"{room}","text":"{text}","client_id":"{}-{}"}}"#,
                self.plan.idx, self.sent
            );
            ws.feed(Message::text(frame)).await?;
            self.sent += 1;
            self.sent_in_run += 1;
        }
        Stats::inc(&self.shared.stats.sent, n);
        ws.flush().await
    }

    fn on_frame(&mut self, text: &str) {
        let Ok(f) = serde_json::from_str::<In<'_>>(text) else {
            self.stats().error("bad_json_from_server");
            return;
        };
        match f.kind.as_ref() {
            "message" => {
                let stats = &self.shared.stats;
                Stats::inc(&stats.delivered, 1);
                let seq = f.seq.unwrap_or(0);
                if seq == self.last_seq + 1 {
                    self.last_seq = seq;
                } else if seq <= self.last_seq {
                    Stats::inc(&stats.duplicates, 1);
                } else {
                    Stats::inc(&stats.gaps, seq - self.last_seq - 1);
                    self.last_seq = seq;
                }
                if let Some(sent_us) = f
                    .text
                    .as_deref()
                    .and_then(|t| t.get(..STAMP_DIGITS))
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    stats.record_latency(now_us().saturating_sub(sent_us));
                }
            }
            "ack" => {
                Stats::inc(&self.stats().acked, 1);
                self.answered += 1;
                if let Some(seq) = f.seq {
                    self.shared.stats.room_final[self.plan.room].fetch_max(seq, Ordering::Relaxed);
                }
            }
            "joined" => {
                if f.last_seq.unwrap_or(0) < self.last_seq {
                    self.stats().error("joined_behind_since");
                }
                self.joined = true;
                if !self.ready {
                    self.ready = true;
                    Stats::inc(&self.stats().ready, 1);
                    if self.plan.sender {
                        Stats::inc(&self.shared.ready_senders, 1);
                    }
                }
            }
            "error" => {
                self.stats().error(f.code.as_deref().unwrap_or("unknown"));
                if f.reference.is_some() {
                    self.answered += 1;
                }
            }
            _ => {}
        }
    }
}

/// Closes normally and waits briefly for the server's close reply.
async fn close(ws: &mut Ws) {
    // The peer may already be gone; then there is nothing to close.
    let _ = ws.close(None).await;
    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
    // A server that never replies only costs the wait.
    let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
}

/// What a failed connect attempt says, and whether trying again can help:
/// an HTTP answer other than 5xx (401, 403, 404: the credentials or the
/// path) and a refused certificate would be the same on every try. An
/// HTTP answer shows the start of its body (the gateway says why it
/// refused) and where a redirect points.
fn describe(e: &anyhow::Error) -> (String, bool) {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match e.downcast_ref::<WsError>() {
        Some(WsError::Http(resp)) => {
            let status = resp.status();
            let mut text = format!("HTTP {status}");
            if let Some(to) = resp.headers().get("location").and_then(|v| v.to_str().ok()) {
                text.push_str(&format!(" to {to}"));
            }
            if let Some(body) = resp.body().as_deref().filter(|b| !b.is_empty()) {
                // One line: an HTML page's newlines and indents would
                // spread one reason over dozens of lines.
                let body = String::from_utf8_lossy(body);
                let body: String = body
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .take(120)
                    .collect();
                text.push_str(&format!(": {body}"));
            }
            if status.is_success() {
                text.push_str(" (an answer, not an upgrade: is the path the gateway's /ws?)");
            }
            (text, status.is_server_error())
        }
        Some(WsError::Tls(t)) => (format!("TLS: {t}"), false),
        Some(WsError::Io(io)) if io.to_string().contains("certificate") => {
            (format!("TLS: {io}"), false)
        }
        // rustls reading a plain HTTP answer as a TLS record.
        Some(WsError::Io(io)) if io.to_string().contains("InvalidContentType") => (
            format!("TLS: {io} (the server does not speak TLS here: ws:// instead of wss://?)"),
            false,
        ),
        _ => (e.to_string(), true),
    }
}

/// Why a connection's first frame was not the gateway's hello, in words
/// a user can act on (the raw frame's debug text is not).
fn no_hello(first: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> String {
    match first {
        None => "the connection ended before the gateway's hello".to_string(),
        Some(Err(e)) => format!("before the gateway's hello: {e}"),
        Some(Ok(Message::Close(Some(f)))) => format!(
            "closed before the hello: code {} {:?}",
            u16::from(f.code),
            f.reason.as_str()
        ),
        Some(Ok(Message::Close(None))) => "closed before the hello, no code".to_string(),
        Some(Ok(Message::Text(t))) => format!(
            "first frame is not the gateway's hello (not a chat gateway?): {:?}",
            t.as_str().chars().take(120).collect::<String>()
        ),
        Some(Ok(other)) => format!(
            "first frame is not the gateway's hello (not a chat gateway?): a {} frame",
            match other {
                Message::Binary(_) => "binary",
                Message::Ping(_) => "ping",
                Message::Pong(_) => "pong",
                _ => "raw",
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    use super::*;

    #[test]
    fn a_missing_hello_is_said_in_words() {
        let closed = no_hello(Some(Ok(Message::Close(Some(CloseFrame {
            code: CloseCode::from(4008),
            reason: "slow consumer".into(),
        })))));
        assert_eq!(
            closed,
            "closed before the hello: code 4008 \"slow consumer\""
        );
        let other = no_hello(Some(Ok(Message::text("HTTP/1.1 200 OK"))));
        assert!(
            other.contains("not the gateway's hello") && other.contains("HTTP/1.1"),
            "{other}"
        );
        assert!(no_hello(None).contains("ended before"));
    }

    #[test]
    fn a_refusal_is_one_line_and_a_page_says_where_the_endpoint_is() {
        use tokio_tungstenite::tungstenite::{http, Error as WsError};
        let page = http::Response::builder()
            .status(200)
            .body(Some(b"<!doctype html>\n<html>\n  <head>".to_vec()))
            .unwrap();
        let (text, retry) = describe(&anyhow::Error::new(WsError::Http(Box::new(page))));
        assert_eq!(
            text,
            "HTTP 200 OK: <!doctype html> <html> <head> (an answer, not an upgrade: is the \
             path the gateway's /ws?)"
        );
        assert!(!retry);
        let full = http::Response::builder()
            .status(503)
            .body(Some(b"draining".to_vec()))
            .unwrap();
        let (text, retry) = describe(&anyhow::Error::new(WsError::Http(Box::new(full))));
        assert_eq!(text, "HTTP 503 Service Unavailable: draining");
        assert!(retry);
    }
}
