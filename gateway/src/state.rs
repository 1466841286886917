//! What every request handler and session shares.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::SessionLimits;
use crate::fanout::RoomHub;
use crate::limits::Edge;
use crate::route::NodeClient;

/// Shared gateway state.
pub struct AppState {
    /// Limits sessions enforce.
    pub config: Arc<SessionLimits>,
    /// Per-room subscriptions and fan-out.
    pub hub: RoomHub,
    /// Requests to room owners.
    pub client: NodeClient,
    /// Identity of new connections.
    pub auth: Arc<dyn Authenticator>,
    /// Origin, per-address and API-key policy.
    pub edge: Edge,
    /// Fires when the gateway drains: sessions close with 1012.
    pub shutdown: CancellationToken,
    /// Upgraded connections, which axum's graceful shutdown does not track.
    pub sessions: TaskTracker,
    draining: AtomicBool,
    next_conn: AtomicU64,
}

impl AppState {
    /// New state.
    pub fn new(
        config: SessionLimits,
        hub: RoomHub,
        client: NodeClient,
        auth: Arc<dyn Authenticator>,
        edge: Edge,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            config: Arc::new(config),
            hub,
            client,
            auth,
            edge,
            shutdown,
            sessions: TaskTracker::new(),
            draining: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        }
    }

    /// A connection id unique within this gateway process.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Marks the gateway draining: `/readyz` fails, upgrades are refused.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether the gateway is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
