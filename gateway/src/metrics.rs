//! Every gateway metric, declared once in the process's default registry.
//! Labels stay low-cardinality: never a room or user id.

use std::sync::LazyLock;

use prometheus::{
    register_histogram, register_int_counter, register_int_counter_vec, register_int_gauge,
    Histogram, IntCounter, IntCounterVec, IntGauge,
};

/// The gateway's metrics.
#[derive(Debug)]
pub struct GatewayMetrics {
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// Accepted WebSocket connections.
    pub connects: IntCounter,
    /// Closed connections by reason.
    pub disconnects: IntCounterVec,
    /// Client frames received by type.
    pub frames_in: IntCounterVec,
    /// Frames queued to clients by kind (`message`, `presence`, `reply`),
    /// resolved once: the fan-out path counts every delivery, and a label
    /// lookup per delivery (hash and lock) would cost more than the count.
    pub frames_out: FramesOut,
    /// Bytes written to clients.
    pub bytes_out: IntCounter,
    /// Connections closed because their outbound queue overflowed.
    pub slow_consumers: IntCounter,
    /// Upgrade requests refused for missing or bad credentials.
    pub auth_failures: IntCounter,
    /// Time from a `send` frame to its `ack`.
    pub send_ack_seconds: Histogram,
    /// Sends per bus request to a room node (see `batch`): 1 at low load,
    /// growing with it.
    pub node_batch_sends: Histogram,
    /// Failed tries of requests to room nodes by kind (one request may
    /// fail several tries and still succeed).
    pub node_request_errors: IntCounterVec,
    /// Requests to room nodes by final outcome (`ok`, `unavailable`): the
    /// denominator of an error ratio, and what clients saw.
    pub node_requests: IntCounterVec,
    /// `node_requests{outcome="ok"}`, resolved once: every send counts it.
    pub node_requests_ok: IntCounter,
    /// Rooms with a subscription on this gateway.
    pub rooms: IntGauge,
    /// Live room nodes in this gateway's ring.
    pub ring_nodes: IntGauge,
    /// Missing seq ranges fetched from a room's owner.
    pub gap_repairs: IntCounter,
    /// Requests refused by a limit, by limit.
    pub limited: IntCounterVec,
    /// Server API requests by route and status.
    pub api_requests: IntCounterVec,
    /// Connections that negotiated permessage-deflate.
    pub deflate_connections: IntCounter,
    /// Frames compressed (once each, however many members receive them).
    pub compressions: IntCounter,
    /// Payload bytes compression kept off the wire, summed over every
    /// compressed frame written.
    pub compression_saved: IntCounter,
}

/// `chat_gateway_frames_out_total`, one counter per kind.
#[derive(Debug)]
pub struct FramesOut {
    /// Live messages (fan-out and backlogs).
    pub message: IntCounter,
    /// Presence events.
    pub presence: IntCounter,
    /// Replies to the connection's own requests.
    pub reply: IntCounter,
}

impl FramesOut {
    /// The counter of `kind`.
    pub fn of(&self, kind: FrameKind) -> &IntCounter {
        match kind {
            FrameKind::Message => &self.message,
            FrameKind::Presence => &self.presence,
            FrameKind::Reply => &self.reply,
        }
    }
}

/// What a frame queued to a client is, for `chat_gateway_frames_out_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A committed message.
    Message,
    /// A presence event.
    Presence,
    /// A reply to the connection's own request.
    Reply,
}

/// The process-wide instance.
pub static METRICS: LazyLock<GatewayMetrics> = LazyLock::new(|| {
    let latency = vec![
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
    ];
    let node_requests = register_int_counter_vec!(
        "chat_gateway_node_requests_total",
        "Requests to room nodes by final outcome",
        &["outcome"]
    )
    .unwrap();
    GatewayMetrics {
        connections: register_int_gauge!("chat_gateway_connections", "Open WebSocket connections")
            .unwrap(),
        connects: register_int_counter!(
            "chat_gateway_connects_total",
            "Accepted WebSocket connections"
        )
        .unwrap(),
        disconnects: register_int_counter_vec!(
            "chat_gateway_disconnects_total",
            "Closed connections by reason",
            &["reason"]
        )
        .unwrap(),
        frames_in: register_int_counter_vec!(
            "chat_gateway_frames_in_total",
            "Client frames received by type",
            &["type"]
        )
        .unwrap(),
        frames_out: {
            let v = register_int_counter_vec!(
                "chat_gateway_frames_out_total",
                "Frames queued to clients by kind",
                &["kind"]
            )
            .unwrap();
            FramesOut {
                message: v.with_label_values(&["message"]),
                presence: v.with_label_values(&["presence"]),
                reply: v.with_label_values(&["reply"]),
            }
        },
        bytes_out: register_int_counter!(
            "chat_gateway_bytes_out_total",
            "Bytes written to clients"
        )
        .unwrap(),
        slow_consumers: register_int_counter!(
            "chat_gateway_slow_consumer_closes_total",
            "Connections closed for a full outbound queue"
        )
        .unwrap(),
        auth_failures: register_int_counter!(
            "chat_gateway_auth_failures_total",
            "Upgrades refused for bad credentials"
        )
        .unwrap(),
        send_ack_seconds: register_histogram!(
            "chat_gateway_send_ack_seconds",
            "Time from send to ack",
            latency
        )
        .unwrap(),
        node_batch_sends: register_histogram!(
            "chat_gateway_node_batch_sends",
            "Sends per bus request to a room node",
            vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]
        )
        .unwrap(),
        node_request_errors: register_int_counter_vec!(
            "chat_gateway_node_request_errors_total",
            "Failed requests to room nodes by kind",
            &["kind"]
        )
        .unwrap(),
        node_requests_ok: node_requests.with_label_values(&["ok"]),
        node_requests,
        rooms: register_int_gauge!("chat_gateway_rooms", "Rooms subscribed on this gateway")
            .unwrap(),
        ring_nodes: register_int_gauge!(
            "chat_gateway_ring_nodes",
            "Live room nodes in the placement ring"
        )
        .unwrap(),
        limited: register_int_counter_vec!(
            "chat_gateway_limited_total",
            "Requests refused by a limit",
            &["limit"]
        )
        .unwrap(),
        api_requests: register_int_counter_vec!(
            "chat_gateway_api_requests_total",
            "Server API requests by route and status",
            &["route", "status"]
        )
        .unwrap(),
        gap_repairs: register_int_counter!(
            "chat_gateway_gap_repairs_total",
            "Missing seq ranges fetched from owners"
        )
        .unwrap(),
        deflate_connections: register_int_counter!(
            "chat_gateway_deflate_connections_total",
            "Connections that negotiated permessage-deflate"
        )
        .unwrap(),
        compressions: register_int_counter!(
            "chat_gateway_compressed_frames_total",
            "Frames compressed, once each for all their recipients"
        )
        .unwrap(),
        compression_saved: register_int_counter!(
            "chat_gateway_compression_saved_bytes_total",
            "Payload bytes compression kept off the wire"
        )
        .unwrap(),
    }
});
