//! Batch insert: one group commit of many rooms' batches through the real
//! `Store::commit` (fenced by the rooms' leases, rows inserted with array
//! parameters). Against Postgres when `CHAT_BENCH_DATABASE_URL` names a
//! database (its tables are created by the migrations; rows go to rooms
//! named uniquely per run), against SQLite in a temporary directory
//! otherwise.
//!
//! Run with `cargo bench -p chat-room-node`; CI only compiles it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chat_protocol::{NodeId, RoomId, UserId};
use chat_room_node::store::postgres::PgStore;
use chat_room_node::store::sqlite::SqliteStore;
use chat_room_node::store::{RoomRows, Row, Store};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Rows per room batch: the default `CHAT_FLUSH_BATCH`.
const BATCH: usize = 50;
/// Lease length while the benchmark runs.
const TTL: Duration = Duration::from_secs(3600);

fn run_tag() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

async fn open_store() -> (Arc<dyn Store>, &'static str) {
    match std::env::var("CHAT_BENCH_DATABASE_URL") {
        Ok(url) if !url.is_empty() => (
            Arc::new(PgStore::connect(&url, 8).await.expect("Postgres store")),
            "postgres",
        ),
        _ => {
            let dir = std::env::temp_dir().join(format!("chat-bench-store-{}", run_tag()));
            (
                Arc::new(SqliteStore::open(&dir).await.expect("SQLite store")),
                "sqlite",
            )
        }
    }
}

fn batch_insert(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (store, kind) = rt.block_on(open_store());
    let owner = NodeId::new("bench-node").expect("node id");
    let user = UserId::new("bench-user").expect("user id");
    let text = "x".repeat(100);
    let tag = run_tag();
    let mut g = c.benchmark_group(format!("batch_insert_{kind}"));
    g.sample_size(20);
    for rooms in [1usize, 10, 40] {
        let names: Vec<RoomId> = (0..rooms)
            .map(|i| RoomId::new(&format!("bench-{tag:x}-{rooms}-{i}")).expect("room"))
            .collect();
        let epochs: Vec<u64> = rt.block_on(async {
            let mut e = Vec::new();
            for r in &names {
                e.push(
                    store
                        .acquire_lease(r.as_str(), &owner, TTL)
                        .await
                        .expect("lease")
                        .expect("lease free"),
                );
            }
            e
        });
        let mut next_seq = 1u64;
        g.throughput(Throughput::Elements((rooms * BATCH) as u64));
        g.bench_with_input(BenchmarkId::new("rooms", rooms), &rooms, |b, _| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let rows: Vec<Row> = (0..BATCH as u64)
                            .map(|k| Row {
                                seq: next_seq + k,
                                id: format!("{tag:x}-{}", next_seq + k),
                                user: user.clone(),
                                text: text.clone(),
                                client_id: format!("c{}", next_seq + k),
                            })
                            .collect();
                        next_seq += BATCH as u64;
                        let batches: Vec<RoomRows<'_>> = names
                            .iter()
                            .zip(&epochs)
                            .map(|(room, epoch)| RoomRows {
                                room,
                                epoch: *epoch,
                                rows: &rows,
                            })
                            .collect();
                        let start = Instant::now();
                        let fenced = store
                            .commit(&owner, &batches, TTL, 1_764_790_000_000)
                            .await
                            .expect("commit");
                        spent += start.elapsed();
                        assert!(fenced.is_empty(), "no room may be fenced");
                    }
                    spent
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, batch_insert);
criterion_main!(benches);
