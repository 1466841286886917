//! The WebSocket wire itself, against a real gateway over TCP, with a raw
//! client written here (independent of the gateway's codec):
//! permessage-deflate negotiation, a frame compressed once for every member
//! that negotiated it, bounded inflate, 1002 on protocol violations, and
//! the HTTP edge's header timeout and per-address cap on pending sockets.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use chat_tests::{metric, wait_for, Client, TestCluster, TestClusterBuilder};
use flate2::write::DeflateEncoder;
use flate2::Compression;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);
const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";
const DEFLATE_ANSWER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// Opcodes.
const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;

fn dev_cluster(test: &str) -> TestClusterBuilder {
    TestCluster::builder(test)
        .env("CHAT_RATE_LIMIT_PER_SEC", "0")
        .env("CHAT_JOIN_RATE_PER_SEC", "0")
        .env("CHAT_HISTORY_RATE_PER_SEC", "0")
        .env("CHAT_MAX_FRAME_BYTES", "65536")
        .env("CHAT_MAX_MESSAGE_BYTES", "16384")
}

/// Raw DEFLATE without the trailing empty block, as RFC 7692 sends it.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).expect("in memory");
    // A sync flush ends the data on a byte boundary with 00 00 FF FF.
    e.flush().expect("in memory");
    let mut out = e.finish().expect("in memory");
    // finish() appends a final empty block (03 00) after the sync marker.
    if out.ends_with(&[0x03, 0x00]) {
        out.truncate(out.len() - 2);
    }
    if out.ends_with(&[0x00, 0x00, 0xFF, 0xFF]) {
        out.truncate(out.len() - 4);
    }
    out
}

fn inflate(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let input = [data, &[0x00, 0x00, 0xFF, 0xFF, 0x03, 0x00][..]].concat();
    let mut d = flate2::read::DeflateDecoder::new(input.as_slice());
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut d, &mut out).context("inflate")?;
    Ok(out)
}

/// A frame from the server.
#[derive(Debug)]
struct Frame {
    compressed: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// A WebSocket client that writes every byte itself.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// The server's `Sec-WebSocket-Extensions` answer.
    extensions: Option<String>,
}

impl Raw {
    async fn connect(addr: SocketAddr, user: &str, offer: Option<&str>) -> anyhow::Result<Self> {
        let mut tcp = TcpStream::connect(addr).await?;
        let mut req = format!(
            "GET /ws?user={user} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        );
        if let Some(o) = offer {
            req.push_str(&format!("Sec-WebSocket-Extensions: {o}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk)).await??;
            ensure!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        ensure!(head.starts_with("HTTP/1.1 101"), "no upgrade: {head}");
        ensure!(
            head.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "accept key: {head}"
        );
        let extensions = head
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-extensions: "))
            .map(|s| s.trim().to_string());
        buf.drain(..head_end);
        Ok(Self {
            tcp,
            buf,
            extensions,
        })
    }

    /// Sends one masked frame; `b0` is the first header byte as given.
    async fn send_raw(&mut self, b0: u8, masked: bool, payload: &[u8]) -> anyhow::Result<()> {
        let key = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![b0];
        let m = if masked { 0x80 } else { 0 };
        match payload.len() {
            n @ 0..=125 => out.push(m | n as u8),
            n @ 126..=65535 => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        self.tcp.write_all(&out).await?;
        Ok(())
    }

    async fn send_text(&mut self, text: &str, compressed: bool) -> anyhow::Result<()> {
        if compressed {
            self.send_raw(0x80 | 0x40 | TEXT, true, &deflate(text.as_bytes()))
                .await
        } else {
            self.send_raw(0x80 | TEXT, true, text.as_bytes()).await
        }
    }

    async fn recv(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some((frame, used)) = parse_server(&self.buf)? {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
                .await
                .context("no frame in time")??;
            ensure!(n > 0, "socket closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next text frame's JSON (inflated if it came compressed), and
    /// whether it was compressed, with its wire length.
    async fn recv_json(&mut self) -> anyhow::Result<(Value, bool, usize)> {
        loop {
            let f = self.recv().await?;
            match f.opcode {
                TEXT => {
                    let wire = f.payload.len();
                    let body = if f.compressed {
                        inflate(&f.payload)?
                    } else {
                        f.payload
                    };
                    return Ok((serde_json::from_slice(&body)?, f.compressed, wire));
                }
                CLOSE => bail!("closed: {:?}", close_code(&f)),
                _ => {}
            }
        }
    }

    async fn recv_type(&mut self, ty: &str) -> anyhow::Result<(Value, bool, usize)> {
        loop {
            let r = self.recv_json().await?;
            if r.0["type"] == ty {
                return Ok(r);
            }
        }
    }

    /// Reads until the server's close frame; its code.
    async fn expect_close(&mut self) -> anyhow::Result<u16> {
        loop {
            let f = self.recv().await?;
            if f.opcode == CLOSE {
                return close_code(&f).context("close frame without a code");
            }
        }
    }
}

fn close_code(f: &Frame) -> Option<u16> {
    (f.payload.len() >= 2).then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]))
}

fn parse_server(b: &[u8]) -> anyhow::Result<Option<(Frame, usize)>> {
    if b.len() < 2 {
        return Ok(None);
    }
    ensure!(b[0] & 0x80 != 0, "server frames here are never fragmented");
    ensure!(b[1] & 0x80 == 0, "server frames must not be masked");
    let (len, at) = match b[1] & 0x7F {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (
            u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize,
            10,
        ),
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if b.len() < at + len {
        return Ok(None);
    }
    Ok(Some((
        Frame {
            compressed: b[0] & 0x40 != 0,
            opcode: b[0] & 0x0F,
            payload: b[at..at + len].to_vec(),
        },
        at + len,
    )))
}

async fn join(c: &mut Raw, room: &str) -> anyhow::Result<()> {
    c.send_text(&format!(r#"{{"type":"join","room":"{room}"}}"#), false)
        .await?;
    c.recv_type("joined").await.map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permessage_deflate_compresses_a_message_once_for_every_member() -> anyhow::Result<()> {
    let c = dev_cluster("permessage_deflate_compresses_a_message_once_for_every_member")
        .env("CHAT_COMPRESS_MIN_BYTES", "512")
        .start()
        .await?;
    let addr = c.gateway_addr(0);
    let mut ann = Raw::connect(addr, "ann", Some(DEFLATE_OFFER)).await?;
    let mut bob = Raw::connect(addr, "bob", Some(DEFLATE_OFFER)).await?;
    let mut cid = Raw::connect(addr, "cid", None).await?;
    // An offer the gateway cannot honour (a smaller server window) is declined.
    let dee = Raw::connect(
        addr,
        "dee",
        Some("permessage-deflate; server_max_window_bits=10"),
    )
    .await?;
    ensure!(
        ann.extensions.as_deref() == Some(DEFLATE_ANSWER),
        "{:?}",
        ann.extensions
    );
    ensure!(cid.extensions.is_none(), "{:?}", cid.extensions);
    ensure!(dee.extensions.is_none(), "{:?}", dee.extensions);
    for (who, r) in [("ann", &mut ann), ("bob", &mut bob), ("cid", &mut cid)] {
        r.recv_type("hello")
            .await
            .with_context(|| format!("{who} hello"))?;
        join(r, "zip")
            .await
            .with_context(|| format!("{who} join"))?;
    }
    let before = metric(&c.metrics(0).await?, "chat_gateway_compressed_frames_total");

    // ann sends compressed; the gateway inflates it.
    let text = "the quick brown fox jumps over the lazy dog; ".repeat(80);
    let send = serde_json::json!({"type":"send","room":"zip","text":text,"client_id":"z1"});
    ann.send_text(&send.to_string(), true).await?;
    // ann's own copy and the ack may come in either order.
    let mut ack = None;
    let mut own = None;
    while ack.is_none() || own.is_none() {
        let r = ann.recv_json().await.context("ann's ack and message")?;
        match r.0["type"].as_str() {
            Some("ack") => ack = Some(r.0),
            Some("message") => own = Some(r),
            _ => {}
        }
    }
    let seq = ack.context("ack")?["seq"].as_u64().context("ack seq")?;

    let mut plain_len = 0;
    let mut compressed_len = 0;
    let bobs = bob.recv_type("message").await.context("bob's message")?;
    let cids = cid.recv_type("message").await.context("cid's message")?;
    for (who, (m, compressed, wire), deflated) in [
        ("ann", own.context("own")?, true),
        ("bob", bobs, true),
        ("cid", cids, false),
    ] {
        ensure!(
            m["seq"] == seq && m["text"] == text.as_str(),
            "{who} got {m}"
        );
        ensure!(compressed == deflated, "{who}: compressed {compressed}");
        if compressed {
            compressed_len = wire;
        } else {
            plain_len = wire;
        }
    }
    ensure!(
        compressed_len * 4 < plain_len,
        "compressed {compressed_len} B vs plain {plain_len} B"
    );
    // Two members got it compressed; it was compressed once.
    let body = c.metrics(0).await?;
    let after = metric(&body, "chat_gateway_compressed_frames_total");
    ensure!(after - before == 1.0, "compressions: {before} -> {after}");
    ensure!(
        metric(&body, "chat_gateway_compression_saved_bytes_total")
            >= 2.0 * (plain_len - compressed_len) as f64
    );
    ensure!(metric(&body, "chat_gateway_deflate_connections_total") >= 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decompression_bomb_closes_1009_and_spares_the_others() -> anyhow::Result<()> {
    let c = dev_cluster("a_decompression_bomb_closes_1009_and_spares_the_others")
        .start()
        .await?;
    let addr = c.gateway_addr(0);
    let mut bomber = Raw::connect(addr, "bomber", Some(DEFLATE_OFFER)).await?;
    let mut bob = Client::connect(&c.ws_url(0, "bob")).await?;
    bob.send_json(serde_json::json!({"type":"join","room":"safe"}))
        .await?;
    bob.recv_type(WAIT, "joined").await?;
    // 20 MB of one byte: about 20 KB compressed, well under the 64 KiB
    // frame limit; it may only inflate to 64 KiB.
    let bomb = deflate(&vec![b'a'; 20 << 20]);
    ensure!(bomb.len() < 65536, "bomb is {} B", bomb.len());
    bomber.recv_type("hello").await?;
    bomber.send_raw(0x80 | 0x40 | TEXT, true, &bomb).await?;
    let code = bomber.expect_close().await?;
    ensure!(code == 1009, "close code {code}");
    // Everyone else is fine.
    bob.send_json(
        serde_json::json!({"type":"send","room":"safe","text":"still here","client_id":"s1"}),
    )
    .await?;
    bob.recv_type(WAIT, "ack").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_1002() -> anyhow::Result<()> {
    let c = dev_cluster("protocol_violations_close_1002")
        .start()
        .await?;
    let addr = c.gateway_addr(0);
    let cases: [(&str, u8, bool, &[u8]); 6] = [
        ("unmasked frame", 0x80 | TEXT, false, br#"{"type":"ping"}"#),
        ("reserved opcode", 0x80 | 0x3, true, b"x"),
        ("RSV2 set", 0x80 | 0x20 | TEXT, true, b"x"),
        ("RSV1 without the extension", 0x80 | 0x40 | TEXT, true, b"x"),
        ("fragmented ping", 0x9, true, b"x"),
        ("continuation without a message", 0x80, true, b"x"),
    ];
    for (what, b0, masked, payload) in cases {
        let mut r = Raw::connect(addr, "ann", None).await?;
        r.recv_type("hello").await?;
        r.send_raw(b0, masked, payload).await?;
        let code = r.expect_close().await.with_context(|| what.to_string())?;
        ensure!(code == 1002, "{what}: close code {code}");
    }
    wait_for("six protocol closes counted", WAIT, || async {
        let body = c.metrics(0).await?;
        Ok((metric(&body, "chat_gateway_limited_total{limit=\"protocol\"}") >= 6.0).then_some(()))
    })
    .await?;
    // A well-behaved raw client works, pings included.
    let mut r = Raw::connect(addr, "ann", None).await?;
    r.recv_type("hello").await?;
    r.send_raw(0x80 | 0x9, true, b"hi").await?;
    let pong = r.recv().await?;
    ensure!(pong.opcode == 0xA && pong.payload == b"hi", "{pong:?}");
    Ok(())
}

/// Whether the server closed `tcp` (EOF or reset) within `within`.
async fn closed_by_server(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 256];
    loop {
        match tokio::time::timeout(within, tcp.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {} // e.g. a 408 response before the close
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_time_out_and_are_capped_per_address() -> anyhow::Result<()> {
    let c = dev_cluster("half_sent_requests_time_out_and_are_capped_per_address")
        .env("CHAT_HEADER_TIMEOUT_SECS", "2")
        .env("CHAT_MAX_CONNS_PER_IP", "4")
        .start()
        .await?;
    let addr = c.gateway_addr(0);
    // Four sockets hold every pending place: three with half a request,
    // one with nothing at all.
    let mut held = Vec::new();
    for i in 0..4 {
        let mut tcp = TcpStream::connect(addr).await?;
        if i < 3 {
            tcp.write_all(b"GET /ws?user=slow HTTP/1.1\r\nHost: x\r\n")
                .await?;
        }
        held.push(tcp);
    }
    // A fifth is closed at once, without waiting for the timeout.
    let fifth_refused = wait_for("a fifth pending socket is refused", WAIT, || async {
        let mut tcp = TcpStream::connect(addr).await?;
        Ok(closed_by_server(&mut tcp, Duration::from_millis(500))
            .await
            .then_some(()))
    })
    .await;
    fifth_refused?;
    // The held ones are closed by the header timeout.
    for (i, tcp) in held.iter_mut().enumerate() {
        ensure!(
            closed_by_server(tcp, WAIT).await,
            "held socket {i} still open after {WAIT:?}"
        );
    }
    // And the address can connect again.
    let mut ann = Client::connect(&c.ws_url(0, "ann")).await?;
    ann.send_json(serde_json::json!({"type":"ping"})).await?;
    ann.recv_type(WAIT, "pong").await?;
    let body = c.metrics(0).await?;
    ensure!(
        metric(
            &body,
            "chat_gateway_limited_total{limit=\"pending_per_ip\"}"
        ) >= 1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_ping_is_answered_after_a_flood() -> anyhow::Result<()> {
    let c = dev_cluster("the_latest_ping_is_answered_after_a_flood")
        .start()
        .await?;
    let mut r = Raw::connect(c.gateway_addr(0), "ann", None).await?;
    r.recv_type("hello").await?;
    // More pings in one write than the outbound queue holds (1024 frames).
    let mut flood = Vec::new();
    let key = [1u8, 2, 3, 4];
    for i in 0..5000u32 {
        let p = format!("{i:07}");
        flood.extend_from_slice(&[0x89, 0x80 | p.len() as u8]);
        flood.extend_from_slice(&key);
        flood.extend(p.bytes().enumerate().map(|(j, b)| b ^ key[j % 4]));
    }
    r.tcp.write_all(&flood).await?;
    r.send_raw(0x80 | 0x9, true, b"LAST").await?;
    loop {
        let f = r.recv().await.context("waiting for the pong of LAST")?;
        ensure!(f.opcode != CLOSE, "closed: {:?}", close_code(&f));
        if f.opcode == 0xA && f.payload == b"LAST" {
            break;
        }
    }
    Ok(())
}
