//! The gateway: terminates WebSockets, places rooms on room nodes, and fans
//! committed events out to local members. Stateless: any client may use any
//! gateway. With `--standalone` it also runs a room node, an in-process bus
//! and SQLite, so the whole chat runs as one process.
//!
//! # Layout
//! - [`config`]: flags and environment.
//! - [`auth`]: identity of new connections, behind a trait.
//! - [`http`]: routes (`/ws`, `/`, probes, metrics).
//! - [`api`]: the server HTTP API (`/api/rooms/...`).
//! - [`limits`]: per-address connection limits, origins, proxies.
//! - [`session`]: one connection's frames.
//! - [`conn`]: a connection's bounded outbound queue and batching writer.
//! - [`ws`]: the WebSocket protocol itself (RFC 6455, permessage-deflate).
//! - [`fanout`]: per-room subscriptions, gap repair, backlog merge.
//! - [`serve`]: the HTTP/1.1 accept loop (header timeout, pending limit).
//! - [`route`]: requests to room owners with bounded retries.
//! - [`batch`]: sends to the same room node, batched into one request.
//! - [`metrics`], [`state`].

pub mod api;
pub mod auth;
pub mod batch;
pub mod config;
pub mod conn;
pub mod fanout;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod route;
pub mod serve;
pub mod session;
pub mod state;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chat_protocol::subjects::Subjects;
use chat_protocol::NodeId;
use chat_room_node::bus::memory::MemoryBus;
use chat_room_node::bus::nats::NatsBus;
use chat_room_node::bus::{Bus, BusError};
use chat_room_node::membership;
use chat_room_node::node::{self, NodeSettings};
use chat_room_node::store::sqlite::SqliteStore;
use chat_room_node::store::StoreError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{Auth, Authenticator};
use crate::config::{Config, ConfigError, SessionLimits};
use crate::fanout::RoomHub;
use crate::metrics::METRICS;
use crate::route::NodeClient;
use crate::state::AppState;

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The bus refused us.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The embedded store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A socket failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The embedded room node failed.
    #[error("embedded room node: {0}")]
    Node(String),
}

/// Result of this crate's fallible calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Binds `addr` with a large accept backlog, so hundreds of clients
/// connecting at once do not stall on the default 128.
///
/// # Errors
/// When the address cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Runs the gateway on `listener` until `shutdown`, then drains: refuses
/// new connections, closes every socket with 1012 and waits for sessions,
/// all within the grace period.
///
/// # Errors
/// See [`Error`].
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    config.validate()?;
    let subjects = Subjects::new(&config.subject_prefix).map_err(|e| ConfigError(e.to_string()))?;
    let gateway_id = config.gateway_id()?;
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let ttl = Duration::from_millis(config.node_ttl_ms);

    let node_shutdown = CancellationToken::new();
    let (bus, embedded): (
        Arc<dyn Bus>,
        Option<tokio::task::JoinHandle<chat_room_node::Result<()>>>,
    ) = if config.standalone {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let store = Arc::new(SqliteStore::open(&config.data_dir).await?);
        tracing::info!(data_dir = %config.data_dir.display(), "embedded mode: in-process bus, SQLite store");
        let settings = NodeSettings {
            node_id: NodeId::new("embedded").expect("valid id"),
            subjects: subjects.clone(),
            room: config.room_config(),
            node_ttl: ttl,
            shutdown_grace: grace,
        };
        let (ready_tx, _ready_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(node::serve(
            settings,
            bus.clone(),
            store,
            node_shutdown.clone(),
            ready_tx,
        ));
        (bus, Some(task))
    } else {
        let bus = NatsBus::connect(
            &config.nats_url,
            &format!("gateway {gateway_id}"),
            &config.nats_auth(),
        )
        .await?;
        (Arc::new(bus), None)
    };

    let bg = CancellationToken::new();
    let placement = membership::watch_placement(bus.clone(), &subjects, ttl, bg.clone()).await?;
    {
        let mut p = placement.clone();
        let bg = bg.clone();
        tokio::spawn(async move {
            loop {
                METRICS.ring_nodes.set(p.borrow_and_update().len() as i64);
                tokio::select! {
                    r = p.changed() => if r.is_err() { break },
                    _ = bg.cancelled() => break,
                }
            }
        });
    }
    let client = NodeClient::new(
        bus.clone(),
        subjects.clone(),
        placement,
        Duration::from_millis(config.request_timeout_ms),
    );
    let hub = RoomHub::new(
        bus.clone(),
        subjects.clone(),
        client.clone(),
        gateway_id.clone(),
    );
    hub.follow_reconnects();
    hub.follow_shards();
    // Room nodes watch gateway heartbeats and drop the members of a
    // gateway that died, so nobody stays online forever.
    bus.kv_ensure(&subjects.gateways_bucket(), ttl * 4).await?;
    let (draining_tx, draining_rx) = tokio::sync::watch::channel(false);
    let heartbeat = tokio::spawn(membership::heartbeat(
        bus.clone(),
        subjects.gateways_bucket(),
        gateway_id.clone(),
        uuid::Uuid::new_v4().to_string(),
        ttl,
        draining_rx,
        bg.clone(),
    ));
    let jwt = config.jwt()?;
    if let Some(j) = &jwt {
        tracing::info!(verifier = ?j, "token auth on");
    }
    if config.dev_auth() {
        if config.listen().ip().is_loopback() {
            tracing::info!(
                "dev auth is on: clients name themselves with ?user=NAME (loopback only)"
            );
        } else {
            tracing::warn!("dev auth is on beyond loopback: anyone can claim any name");
        }
    }
    let auth = Auth::new(jwt, config.dev_auth());
    if !auth.accepts_anyone() {
        tracing::warn!("no authentication configured (CHAT_JWT_SECRET, CHAT_JWT_PUBLIC_KEY_FILE or CHAT_DEV_AUTH): every connection will be refused");
    }
    let auth: Arc<dyn Authenticator> = Arc::new(auth);
    if config.api_key.is_none() {
        tracing::info!("server API off (set CHAT_API_KEY to enable /api)");
    }
    let session_shutdown = CancellationToken::new();
    let edge = limits::Edge::new(
        config.max_conns_per_ip,
        config.trusted_proxies()?,
        config.allowed_origins(),
        config.api_key.clone(),
    );
    let state = Arc::new(AppState::new(
        SessionLimits::from(&config),
        hub,
        client,
        auth,
        edge,
        session_shutdown.clone(),
    ));
    let addr = listener.local_addr()?;
    tracing::info!(%addr, gateway.id = %gateway_id, "gateway listening");

    let app = http::app(state.clone());
    let server = {
        let shutdown = shutdown.clone();
        let state = state.clone();
        let header_timeout_secs = config.header_timeout_secs;
        tokio::spawn(async move {
            serve::serve(
                listener,
                app,
                state,
                Duration::from_secs(header_timeout_secs),
                shutdown,
            )
            .await
        })
    };
    shutdown.cancelled().await;

    // Drain.
    tracing::info!("draining: closing connections with 1012");
    state.set_draining();
    draining_tx.send_replace(true);
    session_shutdown.cancel();
    state.sessions.close();
    if tokio::time::timeout(grace, state.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over with sessions still open");
    }
    if let Err(e) = tokio::time::timeout(Duration::from_secs(1), server).await {
        tracing::debug!(error = %e, "http server still finishing");
    }
    // Our members have left their rooms one by one; now leave for good.
    bg.cancel();
    // The heartbeat task deletes our entry on its way out (bounded: with
    // NATS unreachable it would wait forever).
    if tokio::time::timeout(node::FAREWELL, heartbeat)
        .await
        .is_err()
    {
        tracing::warn!("bus unreachable at shutdown: leaving without a goodbye");
    }
    node_shutdown.cancel();
    let mut result = Ok(());
    if let Some(task) = embedded {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(Error::Node(e.to_string())),
            Err(e) => result = Err(Error::Node(e.to_string())),
        }
    }
    if tokio::time::timeout(node::FAREWELL, bus.drain())
        .await
        .is_err()
    {
        tracing::warn!("bus unreachable at shutdown: pending publishes dropped");
    }
    tracing::info!("gateway stopped");
    result
}
