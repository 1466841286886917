//! Fan-out of one event to N local connections through the gateway's real
//! delivery path: the frame's bytes are cloned (not copied) into each
//! connection's bounded queue (`ConnTx::try_deliver`), and each
//! connection's writer (`ConnRx::run`) drains its queue into its sink.
//! Sinks here only count frames, so this measures the gateway's own work
//! per delivery without the kernel's socket writes (which dominate in
//! production: see docs/BENCHMARKS.md).
//!
//! Run with `cargo bench -p chat-gateway`; CI only compiles it.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes};
use chat_gateway::conn::{self, ConnTx};
use chat_gateway::metrics::FrameKind;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// The gateway's default outbound queue (`CHAT_OUTBOUND_QUEUE`).
const QUEUE: usize = 1024;

/// A `message` frame of the size a 100-byte text makes.
fn frame() -> Utf8Bytes {
    Utf8Bytes::from(format!(
        r#"{{"type":"message","room":"lobby","seq":123456,"id":"01939a4e-5c1b-7cc0-8c3e-5a1f4d2e9b10","user":"ann","text":"{}","ts":1764790000123,"client_id":"c-123456"}}"#,
        "x".repeat(100)
    ))
}

/// N connections whose writers count what they write.
fn connections(rt: &tokio::runtime::Runtime, n: usize) -> (Vec<ConnTx>, Arc<AtomicU64>) {
    let written = Arc::new(AtomicU64::new(0));
    let mut txs = Vec::with_capacity(n);
    for id in 0..n {
        let (tx, rx) = conn::channel(id as u64, QUEUE);
        let count = written.clone();
        let sink = Box::pin(futures::sink::unfold(count, |c, _m: Message| async move {
            c.fetch_add(1, Ordering::Relaxed);
            Ok::<_, Infallible>(c)
        }));
        rt.spawn(rx.run(sink));
        txs.push(tx);
    }
    (txs, written)
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
                        let target = written.load(Ordering::Relaxed) + n as u64;
                        for tx in &txs {
                            black_box(tx.try_deliver(frame.clone(), FrameKind::Message));
                        }
                        // Every writer has drained the event before the
                        // next one: one event's full fan-out per iteration.
                        while written.load(Ordering::Relaxed) < target {
                            tokio::task::yield_now().await;
                        }
                    }
                    start.elapsed()
                })
            })
        });
        assert!(txs.iter().all(|t| !t.is_closed()), "a queue overflowed");
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
