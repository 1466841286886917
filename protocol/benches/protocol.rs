//! Hot paths of the protocol crate: decoding a client `send`, encoding the
//! `message` frame an owner serialises once per message, the bus event
//! that carries it, and the placement lookup every request makes.
//!
//! Run with `cargo bench -p chat-protocol`; CI only compiles it.

use std::hint::black_box;

use bytes::Bytes;
use chat_protocol::bus::Event;
use chat_protocol::frames::decode_client;
use chat_protocol::placement::Placement;
use chat_protocol::{Message, NodeId, RoomId, ServerFrame, UserId};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// A 100-byte text, the size the benchmark goals use.
fn text() -> String {
    "x".repeat(100)
}

fn message() -> Message {
    Message {
        room: RoomId::new("lobby").expect("valid room"),
        seq: 123_456,
        id: "01939a4e-5c1b-7cc0-8c3e-5a1f4d2e9b10".into(),
        user: UserId::new("ann").expect("valid user"),
        text: text(),
        ts: 1_764_790_000_123,
        client_id: "c-123456".into(),
    }
}

fn frames(c: &mut Criterion) {
    let send = format!(
        r#"{{"type":"send","room":"lobby","text":"{}","client_id":"c-123456"}}"#,
        text()
    );
    let mut g = c.benchmark_group("frames");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_send", |b| {
        b.iter(|| decode_client(black_box(&send)).expect("valid frame"))
    });
    let frame = ServerFrame::Message(message());
    g.bench_function("encode_message", |b| {
        b.iter(|| black_box(&frame).to_bytes())
    });
    let bytes: Bytes = frame.to_bytes();
    g.bench_function("decode_message", |b| {
        b.iter(|| serde_json::from_slice::<ServerFrame>(black_box(&bytes)).expect("valid frame"))
    });
    g.finish();
}

fn bus_event(c: &mut Criterion) {
    let ev = Event::Message {
        seq: 123_456,
        frame: ServerFrame::Message(message()).to_bytes(),
    };
    let encoded = ev.encode();
    let mut g = c.benchmark_group("bus_event");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| b.iter(|| black_box(&ev).encode()));
    g.bench_function("decode", |b| {
        b.iter(|| Event::decode(black_box(&encoded)).expect("valid event"))
    });
    g.finish();
}

fn placement(c: &mut Criterion) {
    let rooms: Vec<RoomId> = (0..1024)
        .map(|i| RoomId::new(&format!("room-{i}")).expect("valid room"))
        .collect();
    let mut g = c.benchmark_group("placement_owner");
    g.throughput(Throughput::Elements(1));
    for n in [3usize, 16, 64] {
        let ring = Placement::new((0..n).map(|i| NodeId::new(&format!("node-{i}")).expect("id")));
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::from_parameter(n), &ring, |b, ring| {
            b.iter(|| {
                i = (i + 1) % rooms.len();
                ring.owner(black_box(&rooms[i]))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, frames, bus_event, placement);
criterion_main!(benches);
