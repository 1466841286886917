//! The room node: owns rooms, sequences and persists their messages, and
//! publishes committed events for the gateways to fan out.
//!
//! # Layout
//! - [`config`]: flags and environment.
//! - [`bus`]: the transport trait, over NATS or in memory.
//! - [`store`]: the storage trait, over Postgres or SQLite.
//! - [`membership`]: heartbeats, liveness and the placement ring.
//! - [`node`]: the inbox dispatcher that owns the room actors.
//! - [`room`]: the room actor.
//! - [`reply`]: where answers go (a subject, or a slot in a batch reply).
//! - [`writer`]: the node-level group commit.
//! - [`lease`]: bulk renewal of the room leases that fence ownership.
//! - [`ratelimit`]: per-user token buckets.
//! - [`metrics`], [`admin`], [`telemetry`]: operations.

pub mod admin;
pub mod bus;
pub mod config;
pub mod lease;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod ratelimit;
pub mod reply;
pub mod room;
pub mod shard;
pub mod store;
pub mod telemetry;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use chat_protocol::subjects::Subjects;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bus::nats::NatsBus;
use crate::bus::{Bus, BusError};
use crate::config::{Config, ConfigError};
use crate::node::NodeSettings;
use crate::store::postgres::PgStore;
use crate::store::StoreError;

/// Why the room node could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The bus refused us (old server, duplicate id, ...).
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The database refused us.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A socket failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of this crate's fallible calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs a room node on NATS and Postgres until `shutdown`, serving the
/// admin endpoints on `admin`.
///
/// # Errors
/// See [`Error`].
pub async fn run(config: Config, admin: TcpListener, shutdown: CancellationToken) -> Result<()> {
    config.validate()?;
    let node_id = config.node_id()?;
    let subjects = Subjects::new(&config.subject_prefix).map_err(|e| ConfigError(e.to_string()))?;
    let (ready_tx, ready_rx) = watch::channel(false);
    let admin_cancel = CancellationToken::new();
    let admin_task = {
        let cancel = admin_cancel.clone();
        tokio::spawn(async move {
            let app = admin::app(ready_rx);
            if let Err(e) = axum::serve(admin, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "admin server failed");
            }
        })
    };
    let bus: Arc<dyn Bus> = Arc::new(
        NatsBus::connect(
            &config.nats_url,
            &format!("room-node {node_id}"),
            &config.nats_auth(),
        )
        .await?,
    );
    let store =
        Arc::new(PgStore::connect(&config.database_url, config.database_max_connections).await?);
    let settings = NodeSettings {
        node_id,
        subjects,
        room: config.room_config(),
        node_ttl: Duration::from_millis(config.node_ttl_ms),
        shutdown_grace: Duration::from_secs(config.shutdown_grace_secs),
    };
    let span = tracing::info_span!("node", node.id = %settings.node_id);
    let res = tracing::Instrument::instrument(
        node::serve(settings, bus, store, shutdown, ready_tx),
        span,
    )
    .await;
    admin_cancel.cancel();
    // The admin server only serves probes; its end result does not matter.
    let _ = admin_task.await;
    res
}
