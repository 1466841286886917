//! Requests to room owners: find the owner on the placement ring, send over
//! the bus, and when the node says `not_owner`, is gone, or does not answer,
//! wait for the ring to settle and try again, a bounded number of times.
//! Every request is safe to repeat: sends are deduplicated by
//! `(user, client_id)`, joins and leaves are keyed by connection, history
//! only reads.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::bus::{decode_reply, NodeRequest, ReplyHead};
use chat_protocol::placement::Placement;
use chat_protocol::subjects::Subjects;
use chat_protocol::{ErrorCode, ServerFrame};
use chat_room_node::bus::{Bus, BusError};
use tokio::sync::watch;

use crate::metrics::METRICS;

/// Tries before a request is answered `unavailable`.
const ATTEMPTS: u32 = 8;
/// First wait between tries; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Why a request found no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No owner answered within the bound; retryable.
    #[error("no room node is available: {0}")]
    Unavailable(String),
}

impl RouteError {
    /// The error frame fields for the client.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Unavailable
    }
}

/// The `error` frame for a request whose reply was not the success its
/// caller expected: the owner's own error, `internal` for a reply of the
/// wrong kind (`what` names the request in the log), or `unavailable`
/// with a retry hint when no owner answered. `reference` becomes `ref`.
pub fn failure_frame(
    reply: Result<(ReplyHead, Vec<Bytes>), RouteError>,
    reference: Option<String>,
    what: &str,
) -> ServerFrame {
    let (code, message, retry_after_ms) = match reply {
        Ok((
            ReplyHead::Error {
                code,
                message,
                retry_after_ms,
            },
            _,
        )) => (code, message, retry_after_ms),
        Ok((other, _)) => {
            tracing::warn!(reply = ?other, "unexpected reply to {what}");
            (
                ErrorCode::Internal,
                "unexpected reply from the room owner".to_owned(),
                None,
            )
        }
        Err(e) => (e.code(), e.to_string(), Some(1000)),
    };
    ServerFrame::Error {
        code,
        message,
        reference,
        retry_after_ms,
    }
}

/// Sends requests to room owners.
#[derive(Clone)]
pub struct NodeClient {
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    placement: watch::Receiver<Placement>,
    timeout: Duration,
}

impl NodeClient {
    /// A client over `bus`, following `placement`; each try waits up to
    /// `timeout` for a reply.
    pub fn new(
        bus: Arc<dyn Bus>,
        subjects: Subjects,
        placement: watch::Receiver<Placement>,
        timeout: Duration,
    ) -> Self {
        Self {
            bus,
            subjects,
            placement,
            timeout,
        }
    }

    /// The current ring.
    pub fn placement(&self) -> Placement {
        self.placement.borrow().clone()
    }

    /// Sends `req` to its room's owner and returns the reply head and frames.
    /// Error replies from the node come back as `Ok` with
    /// [`ReplyHead::Error`]; only a missing owner is an `Err`.
    ///
    /// Cancel-safe: dropping the future abandons the request (which is safe
    /// to repeat).
    ///
    /// # Errors
    /// [`RouteError::Unavailable`] after [`ATTEMPTS`] tries.
    pub async fn call(&self, req: &NodeRequest) -> Result<(ReplyHead, Vec<Bytes>), RouteError> {
        let payload = Bytes::from(serde_json::to_vec(req).expect("requests serialise"));
        let room = req.room();
        let mut placement = self.placement.clone();
        let mut backoff = FIRST_BACKOFF;
        let mut last = String::from("no room node is live");
        for _ in 0..ATTEMPTS {
            let owner = placement.borrow_and_update().owner(room);
            if let Some(owner) = owner {
                let subject = self.subjects.node_inbox(&owner);
                match self
                    .bus
                    .request(subject, payload.clone(), self.timeout)
                    .await
                {
                    Ok(bytes) => match decode_reply(&bytes) {
                        Ok((ReplyHead::NotOwner, _)) => {
                            METRICS
                                .node_request_errors
                                .with_label_values(&["not_owner"])
                                .inc();
                            last = format!("node {owner} does not own the room");
                        }
                        Ok(reply) => {
                            METRICS.node_requests.with_label_values(&["ok"]).inc();
                            return Ok(reply);
                        }
                        Err(e) => {
                            METRICS
                                .node_request_errors
                                .with_label_values(&["bad_reply"])
                                .inc();
                            tracing::warn!(node = %owner, error = %e, "undecodable reply");
                            last = format!("bad reply from {owner}");
                        }
                    },
                    Err(BusError::NoResponders) => {
                        METRICS
                            .node_request_errors
                            .with_label_values(&["no_responders"])
                            .inc();
                        last = format!("node {owner} is not listening");
                    }
                    Err(BusError::TimedOut) => {
                        METRICS
                            .node_request_errors
                            .with_label_values(&["timeout"])
                            .inc();
                        last = format!("node {owner} did not answer in time");
                    }
                    Err(e) => {
                        METRICS
                            .node_request_errors
                            .with_label_values(&["bus"])
                            .inc();
                        last = e.to_string();
                    }
                }
            } else {
                METRICS
                    .node_request_errors
                    .with_label_values(&["no_nodes"])
                    .inc();
            }
            // Wait for the ring to change, or the backoff, whichever first.
            tokio::select! {
                _ = placement.changed() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        METRICS
            .node_requests
            .with_label_values(&["unavailable"])
            .inc();
        Err(RouteError::Unavailable(last))
    }
}
