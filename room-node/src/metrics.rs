//! Every room-node metric, declared once and registered in the process's
//! default Prometheus registry (in the embedded mode the gateway's
//! `/metrics` shows them too). No room or user ids as labels.

use std::sync::LazyLock;

use prometheus::{
    register_histogram, register_int_counter, register_int_counter_vec, register_int_gauge,
    Histogram, IntCounter, IntCounterVec, IntGauge,
};

/// The room node's metrics.
#[derive(Debug)]
pub struct NodeMetrics {
    /// Room actors running.
    pub active_rooms: IntGauge,
    /// Connections registered in rooms on this node.
    pub members: IntGauge,
    /// Messages sequenced but not yet committed.
    pub buffered_messages: IntGauge,
    /// Room alarms armed (at most one per room at a time).
    pub alarms_armed: IntCounter,
    /// Group commit duration.
    pub flush_seconds: Histogram,
    /// Rows per group commit.
    pub flush_batch_rows: Histogram,
    /// Group commits retried after a database failure.
    pub flush_retries: IntCounter,
    /// Failed attempts of the group commit now being retried; 0 once a
    /// commit gets through. Unlike the retry counter it says whether the
    /// database is failing *now*, which is what an alert needs.
    pub flush_failing: IntGauge,
    /// Room batches the database rejected (then reconciled and retried).
    pub flush_rejected: IntCounter,
    /// Room batches sent back unwritten because an earlier batch of the
    /// same room was rejected; they are renumbered and written again.
    pub flush_cancelled: IntCounter,
    /// Rows committed.
    pub rows_persisted: IntCounter,
    /// Time from a send reaching its room actor to its commit (the ack
    /// follows at once): the room node's share of send→ack latency.
    pub send_ack_seconds: Histogram,
    /// Room batches not written because another node holds the lease.
    pub flush_fenced: IntCounter,
    /// Room leases held by this node.
    pub leases_held: IntGauge,
    /// Rooms handed to another node (ring change) or lost to a fence.
    pub handoffs: IntCounterVec,
    /// Sends refused by the per-user rate limit.
    pub rate_limited: IntCounter,
    /// Sends refused because the room's buffer passed its high-water mark.
    pub overloaded: IntCounter,
    /// Resends answered from the dedup window or the database.
    pub duplicates: IntCounter,
    /// Live room nodes in this node's ring.
    pub ring_size: IntGauge,
    /// Commands by outcome: `ok`, `not_owner`, `busy`, `bad`.
    pub commands: IntCounterVec,
    /// `commands{outcome="ok"}`, resolved once: every command counts it.
    pub commands_ok: IntCounter,
    /// Rooms sequenced here that are split into member shards.
    pub sharded_rooms: IntGauge,
    /// Member shard actors running on this node.
    pub member_shards: IntGauge,
    /// Splits (a room split, or split into more shards).
    pub splits: IntCounter,
    /// Time a split took at the sequencer (record, hand over, announce).
    pub split_seconds: Histogram,
    /// Users present per member shard, at each shard's report.
    pub shard_members: Histogram,
    /// Sends member shards forwarded to sequencers.
    pub forwarded: IntCounter,
    /// Sends per batch received from a gateway: how much the batching
    /// saves the bus (1 would be one message per send each way).
    pub batch_sends: Histogram,
}

/// The process-wide instance.
pub static METRICS: LazyLock<NodeMetrics> = LazyLock::new(|| {
    let flush_buckets = vec![
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    ];
    let size_buckets = vec![
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
    ];
    let members_buckets = vec![
        1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 7500.0, 10000.0,
    ];
    let commands = register_int_counter_vec!(
        "chat_room_commands_total",
        "Commands received by outcome",
        &["outcome"]
    )
    .unwrap();
    NodeMetrics {
        sharded_rooms: register_int_gauge!(
            "chat_room_sharded_rooms",
            "Rooms sequenced on this node that are split into member shards"
        )
        .unwrap(),
        member_shards: register_int_gauge!(
            "chat_room_member_shards",
            "Member shard actors running on this node"
        )
        .unwrap(),
        splits: register_int_counter!(
            "chat_room_splits_total",
            "Rooms split into member shards, or into more of them"
        )
        .unwrap(),
        split_seconds: register_histogram!(
            "chat_room_split_duration_seconds",
            "Time a split took at the sequencer (record, hand over, announce)",
            flush_buckets.clone()
        )
        .unwrap(),
        shard_members: register_histogram!(
            "chat_room_shard_members",
            "Users present per member shard, at each shard's report",
            members_buckets
        )
        .unwrap(),
        forwarded: register_int_counter!(
            "chat_room_forwarded_sends_total",
            "Sends member shards forwarded to sequencers"
        )
        .unwrap(),
        batch_sends: register_histogram!(
            "chat_room_batch_sends",
            "Sends per batch received from a gateway",
            vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]
        )
        .unwrap(),
        active_rooms: register_int_gauge!("chat_room_active_rooms", "Room actors running").unwrap(),
        members: register_int_gauge!(
            "chat_room_members",
            "Connections registered in rooms on this node"
        )
        .unwrap(),
        buffered_messages: register_int_gauge!(
            "chat_room_buffered_messages",
            "Messages sequenced and not yet committed"
        )
        .unwrap(),
        alarms_armed: register_int_counter!(
            "chat_room_alarms_armed_total",
            "Room flush alarms armed"
        )
        .unwrap(),
        flush_seconds: register_histogram!(
            "chat_room_flush_duration_seconds",
            "Group commit duration",
            flush_buckets
        )
        .unwrap(),
        flush_batch_rows: register_histogram!(
            "chat_room_flush_batch_rows",
            "Rows per group commit",
            size_buckets
        )
        .unwrap(),
        flush_retries: register_int_counter!(
            "chat_room_flush_retries_total",
            "Group commits retried after a database failure"
        )
        .unwrap(),
        flush_failing: register_int_gauge!(
            "chat_room_flush_consecutive_failures",
            "Failed attempts of the group commit being retried; 0 after a commit"
        )
        .unwrap(),
        flush_rejected: register_int_counter!(
            "chat_room_flush_rejected_total",
            "Room batches rejected by the database and reconciled"
        )
        .unwrap(),
        flush_cancelled: register_int_counter!(
            "chat_room_flush_cancelled_total",
            "Room batches sent back unwritten behind a rejected batch of the same room"
        )
        .unwrap(),
        rows_persisted: register_int_counter!(
            "chat_room_rows_persisted_total",
            "Messages committed"
        )
        .unwrap(),
        send_ack_seconds: register_histogram!(
            "chat_room_send_ack_seconds",
            "Time from a send reaching its room to its commit",
            vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
        )
        .unwrap(),
        flush_fenced: register_int_counter!(
            "chat_room_flush_fenced_total",
            "Room batches not written because another node holds the lease"
        )
        .unwrap(),
        leases_held: register_int_gauge!(
            "chat_room_leases_held",
            "Leases held by this node (rooms and member shards)"
        )
        .unwrap(),
        handoffs: register_int_counter_vec!(
            "chat_room_handoffs_total",
            "Rooms given up by reason",
            &["reason"]
        )
        .unwrap(),
        rate_limited: register_int_counter!(
            "chat_room_rate_limited_total",
            "Sends refused by the per-user rate limit"
        )
        .unwrap(),
        overloaded: register_int_counter!(
            "chat_room_overloaded_total",
            "Sends refused because a room buffer is full"
        )
        .unwrap(),
        duplicates: register_int_counter!(
            "chat_room_duplicate_sends_total",
            "Resends answered with the original seq"
        )
        .unwrap(),
        ring_size: register_int_gauge!(
            "chat_room_ring_nodes",
            "Live room nodes in the placement ring"
        )
        .unwrap(),
        commands_ok: commands.with_label_values(&["ok"]),
        commands,
    }
});

/// Renders the default registry in the Prometheus text format.
pub fn render() -> String {
    let families = prometheus::gather();
    let mut out = String::new();
    // Encoding into a String cannot fail.
    let _ = prometheus::TextEncoder::new().encode_utf8(&families, &mut out);
    out
}
