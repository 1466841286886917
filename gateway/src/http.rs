//! The gateway's HTTP surface: `/ws`, the demo page, probes and metrics.

use std::collections::HashMap;
use std::sync::Arc;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::metrics::METRICS;
use crate::session::Session;
use crate::state::AppState;
use crate::ws::{Outbound, Socket, Writer, WsUpgrade};

/// The demo page and reference client: plain HTML and JS, no build step.
const INDEX_HTML: &str = include_str!("../static/index.html");
/// The router; tests can call it without a network.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/ws", get(ws))
        .route(
            "/api/rooms/{room}/messages",
            get(crate::api::history).post(crate::api::publish),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    chat_room_node::metrics::render(),
                )
            }),
        )
        .with_state(state)
}

/// A JSON error body of the contract: `{"error":{"code","message"}}`.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Closes a socket over the per-address limit with 4029.
async fn refuse(socket: Socket) {
    async fn close<W: tokio::io::AsyncWrite + Unpin>(w: W) {
        let mut w = Writer::new(w, None);
        w.push(&Outbound::Close(
            chat_protocol::frames::close::TOO_MANY_CONNECTIONS,
        ));
        // The peer may already be gone; nothing else to do.
        let _ = w.flush().await;
        w.shutdown().await;
    }
    match socket {
        Socket::Tcp(tcp, _) => close(tcp).await,
        Socket::Other(io) => close(io).await,
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    if state.client.placement().is_empty() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no room node is live").into_response();
    }
    (StatusCode::OK, "ready").into_response()
}

async fn ws(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WsUpgrade,
) -> Response {
    if state.is_draining() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "gateway is draining; connect to another",
        );
    }
    if !state.edge.origin_allowed(&headers) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "origin not allowed (CHAT_ALLOWED_ORIGINS)",
        );
    }
    let identity = match state.auth.authenticate(&headers, &query) {
        Ok(i) => i,
        Err(e) => {
            METRICS.auth_failures.inc();
            return error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
        }
    };
    let ip = state.edge.client_ip(peer, &headers);
    let slot = state.edge.admit(ip);
    let tracker = state.sessions.clone();
    let deflate = state.config.compress_min_bytes > 0;
    upgrade.on_upgrade(deflate, move |socket, deflate| async move {
        let Some(slot) = slot else {
            // Over the per-address limit: say so in a close frame the
            // client can act on, and never start a session.
            refuse(socket).await;
            return;
        };
        tracker
            .track_future(Session::run(state, identity, socket, deflate))
            .await;
        drop(slot);
    })
}
