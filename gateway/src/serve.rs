//! The HTTP/1.1 accept loop, in place of `axum::serve`, which has no
//! header-read timeout: a client that sends half a request and then
//! nothing held its socket forever, and about 20,000 such sockets used up
//! every file descriptor of the process. Here:
//! - each connection must send its whole request head within
//!   `CHAT_HEADER_TIMEOUT_SECS` (hyper's `header_read_timeout`);
//! - one address holds at most `CHAT_MAX_CONNS_PER_IP` connections that are
//!   not yet WebSockets ([`crate::limits::Edge::admit_pending`]); past that, new ones are
//!   closed at once and counted as `limited{limit="pending_per_ip"}`;
//! - sockets get `TCP_NODELAY`: small frames (acks, messages) must leave at
//!   once, not wait for the client's delayed ACK (up to 200 ms on Linux).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::AppState;

/// Pause after a failed `accept` (out of file descriptors, say), so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `app` on `listener` until `shutdown`, then waits for the plain
/// HTTP connections still open to finish (upgraded WebSockets are the
/// sessions' business, drained by their own shutdown).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    state: Arc<AppState>,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let conns = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(slot) = state.edge.admit_pending(peer.ip()) else {
            tracing::debug!(%peer, "too many pending connections from this address");
            drop(tcp);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(tcp), service(app.clone(), peer))
            .with_upgrades();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let end = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    // Finish the request in progress, take no more.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = end {
                tracing::debug!(error = %e, %peer, "http connection ended");
            }
            // Upgraded or done: no longer pending.
            drop(slot);
        });
    }
    conns.close();
    conns.wait().await;
}

/// The router as a hyper service that knows the peer's address (what the
/// `ConnectInfo` extractor reads).
fn service(
    app: Router,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        tower::ServiceExt::oneshot(app.clone(), req)
    })
}
