//! Fan-out of one event to N local connections through the gateway's real
//! delivery path: the frame's bytes are cloned (not copied) into each
//! connection's bounded queue (`ConnTx::try_deliver`), and each
//! connection's writer (`ConnRx::run`) encodes its queue into WebSocket
//! frames and writes them. The sockets here only count bytes, so this
//! measures the gateway's own work per delivery without the kernel's socket
//! writes (which dominate in production: see docs/BENCHMARKS.md).
//!
//! Run with `cargo bench -p chat-gateway`; CI only compiles it.

use std::hint::black_box;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use chat_gateway::conn::{self, ConnTx};
use chat_gateway::metrics::FrameKind;
use chat_gateway::ws::{Payload, Writer};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// The gateway's default outbound queue (`CHAT_OUTBOUND_QUEUE`).
const QUEUE: usize = 1024;

/// A `message` frame of the size a 100-byte text makes.
fn frame() -> Payload {
    Payload::from_string(format!(
        r#"{{"type":"message","room":"lobby","seq":123456,"id":"01939a4e-5c1b-7cc0-8c3e-5a1f4d2e9b10","user":"ann","text":"{}","ts":1764790000123,"client_id":"c-123456"}}"#,
        "x".repeat(100)
    ))
}

/// A socket that only counts the bytes written to it.
struct Counter(Arc<AtomicU64>);

impl tokio::io::AsyncWrite for Counter {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Bytes one frame of `payload` bytes takes on the wire (a 4-byte header
/// for 126 to 65,535 bytes).
fn wire_len(payload: usize) -> u64 {
    payload as u64 + if payload < 126 { 2 } else { 4 }
}

/// A `message` frame with a text of `text_bytes` bytes of chat-like prose:
/// words drawn at random (fixed seed) from a small vocabulary, so it
/// compresses about as well as real text, not as well as a repeated line.
fn big_frame(text_bytes: usize) -> Payload {
    const WORDS: &[&str] = &[
        "the",
        "gateway",
        "now",
        "compresses",
        "large",
        "frames",
        "once",
        "for",
        "every",
        "member",
        "release",
        "notes",
        "launch",
        "tonight",
        "room",
        "shard",
        "deploy",
        "rolled",
        "back",
        "because",
        "latency",
        "went",
        "up",
        "after",
        "we",
        "merged",
        "it",
        "please",
        "check",
        "dashboard",
        "alert",
        "fired",
        "at",
        "nine",
        "thirty",
        "metrics",
        "look",
        "fine",
        "again",
        "who",
        "owns",
        "this",
        "ticket",
        "I",
        "think",
        "Ana",
        "does",
        "ok",
        "thanks",
        "see",
        "you",
        "tomorrow",
        "standup",
        "moved",
        "to",
        "ten",
        "docs",
        "updated",
        "with",
        "new",
        "numbers",
        "and",
        "a",
        "plot",
        "of",
        "p99",
        "under",
        "load",
        "😀",
        "ünïcode",
        "works",
        "too",
        "1234",
        "5678",
        "#general",
        "@here",
        "https://example.com",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut text = String::with_capacity(text_bytes + 16);
    while text.len() < text_bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        text.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
        text.push(if state.is_multiple_of(11) { '.' } else { ' ' });
    }
    Payload::from_string(format!(
        r#"{{"type":"message","room":"launch","seq":123456,"id":"01939a4e-5c1b-7cc0-8c3e-5a1f4d2e9b10","user":"ann","text":"{text}","ts":1764790000123,"client_id":"c-123456"}}"#
    ))
}

/// N connections whose writers count the bytes they write.
fn connections(rt: &tokio::runtime::Runtime, n: usize) -> (Vec<ConnTx>, Arc<AtomicU64>) {
    connections_with(rt, n, None)
}

/// Like [`connections`], compressing frames of at least `compress_min`.
fn connections_with(
    rt: &tokio::runtime::Runtime,
    n: usize,
    compress_min: Option<usize>,
) -> (Vec<ConnTx>, Arc<AtomicU64>) {
    let written = Arc::new(AtomicU64::new(0));
    let mut txs = Vec::with_capacity(n);
    for id in 0..n {
        let (tx, rx) = conn::channel(id as u64, QUEUE);
        rt.spawn(rx.run(Writer::new(Counter(written.clone()), compress_min)));
        txs.push(tx);
    }
    (txs, written)
}

/// Queues `frame` to every connection and waits until the writers have
/// written `bytes` more: one event's full fan-out.
async fn fan_out_once(txs: &[ConnTx], written: &AtomicU64, frame: &Payload, bytes: u64) {
    let target = written.load(Ordering::Relaxed) + bytes;
    for tx in txs {
        black_box(tx.try_deliver(frame.clone(), FrameKind::Message));
    }
    while written.load(Ordering::Relaxed) < target {
        tokio::task::yield_now().await;
    }
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let frame = frame();
    let mut g = c.benchmark_group("fanout_one_event");
    g.measurement_time(Duration::from_secs(5));
    for n in [100usize, 1_000, 10_000] {
        let (txs, written) = connections(&rt, n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let wire = n as u64 * wire_len(frame.len());
                        fan_out_once(&txs, &written, &frame, wire).await;
                    }
                    start.elapsed()
                })
            })
        });
        assert!(txs.iter().all(|t| !t.is_closed()), "a queue overflowed");
    }
    g.finish();
}

/// One 4 KiB message to 1,000 connections, plain and with permessage-deflate
/// (a new payload each iteration, so each one is compressed once, as a new
/// message is): what compression costs the gateway per message, and the
/// bytes it writes.
fn fanout_compressed(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let n = 1_000;
    let sample = big_frame(4096);
    let deflated = sample.deflated().expect("prose compresses").len();
    eprintln!(
        "4 KiB message: {} B plain, {} B deflated ({:.1}% of plain)",
        sample.len(),
        deflated,
        100.0 * deflated as f64 / sample.len() as f64
    );
    let mut g = c.benchmark_group("fanout_4kib_to_1000");
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(n as u64));
    for (name, min, wire) in [
        ("plain", None, wire_len(sample.len())),
        ("deflate", Some(1024), wire_len(deflated)),
    ] {
        let (txs, written) = connections_with(&rt, n, min);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        fan_out_once(&txs, &written, &big_frame(4096), n as u64 * wire).await;
                    }
                    start.elapsed()
                })
            })
        });
        assert!(txs.iter().all(|t| !t.is_closed()), "a queue overflowed");
    }
    g.finish();
}

/// Compressing one message (done once per message, for all members).
fn compress_once(c: &mut Criterion) {
    let mut g = c.benchmark_group("deflate_one_message");
    for size in [1024usize, 4096, 16_384] {
        let sample = big_frame(size);
        g.throughput(Throughput::Bytes(sample.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &sample, |b, s| {
            b.iter(|| black_box(chat_gateway::ws::deflate::compress(s.as_bytes())))
        });
    }
    g.finish();
}

criterion_group!(benches, fanout, fanout_compressed, compress_once);
criterion_main!(benches);
