//! The server API: a product's backend publishes as a given user and reads
//! history over plain HTTP, authenticated with `CHAT_API_KEY`.
//!
//! - `POST /api/rooms/{room}/messages` `{"user","text","client_id"}` → 201
//!   `{"seq","id"}`; the same `client_id` again → 200 with the original.
//! - `GET /api/rooms/{room}/messages?before&after&limit` →
//!   `{"messages":[...],"has_more":B}`.
//!
//! Errors are `{"error":{"code","message"}}` with a fitting status; codes
//! are the protocol's error codes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chat_protocol::bus::{NodeRequest, ReplyHead};
use chat_protocol::frames::{DEFAULT_BACKLOG, MAX_CLIENT_ID_BYTES, MAX_HISTORY_LIMIT};
use chat_protocol::{ErrorCode, RoomId, UserId};
use serde::Deserialize;

use crate::http::error;
use crate::metrics::METRICS;
use crate::state::AppState;

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadFrame | ErrorCode::BadRoom => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden | ErrorCode::NotJoined => StatusCode::FORBIDDEN,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Overloaded | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn fail(
    route: &'static str,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) -> Response {
    let status = status_of(code);
    METRICS
        .api_requests
        .with_label_values(&[route, status.as_str()])
        .inc();
    let mut resp = error(status, code.as_str(), message);
    if let Some(ms) = retry_after_ms {
        let secs = ms.div_ceil(1000).max(1);
        if let Ok(v) = secs.to_string().parse() {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

fn ok(route: &'static str, status: StatusCode, body: Vec<u8>) -> Response {
    METRICS
        .api_requests
        .with_label_values(&[route, status.as_str()])
        .inc();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[derive(Deserialize)]
struct PublishBody {
    user: String,
    text: String,
    client_id: String,
}

/// `POST /api/rooms/{room}/messages`.
pub(crate) async fn publish(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    const ROUTE: &str = "publish";
    if let Err(why) = state.edge.api_authorized(&headers) {
        return fail(ROUTE, ErrorCode::Unauthorized, why, None);
    }
    let Ok(room) = RoomId::new(&room) else {
        return fail(
            ROUTE,
            ErrorCode::BadRoom,
            "room names are 1-128 characters of A-Z, a-z, 0-9, '_' or '-'",
            None,
        );
    };
    let body: PublishBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return fail(ROUTE, ErrorCode::BadFrame, &format!("body: {e}"), None),
    };
    let Ok(user) = UserId::new(&body.user) else {
        return fail(
            ROUTE,
            ErrorCode::BadFrame,
            "user must be 1-128 bytes of printable text",
            None,
        );
    };
    if body.client_id.is_empty()
        || body.client_id.len() > MAX_CLIENT_ID_BYTES
        || body.client_id.contains('\0')
    {
        return fail(
            ROUTE,
            ErrorCode::BadFrame,
            "client_id must be 1-128 bytes",
            None,
        );
    }
    if body.text.contains('\0') {
        return fail(
            ROUTE,
            ErrorCode::BadFrame,
            "text may not contain NUL characters",
            None,
        );
    }
    let max = state.config.max_message_bytes;
    if body.text.len() > max {
        METRICS.limited.with_label_values(&["message_size"]).inc();
        return fail(
            ROUTE,
            ErrorCode::TooLarge,
            &format!("text is {} bytes; the limit is {max}", body.text.len()),
            None,
        );
    }
    let req = NodeRequest::Send {
        room,
        user,
        text: body.text,
        client_id: body.client_id,
    };
    match state.client.call(&req).await {
        Ok((ReplyHead::Ack { seq, id, duplicate }, _)) => {
            let status = if duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let body =
                serde_json::to_vec(&serde_json::json!({"seq": seq, "id": id})).expect("json");
            ok(ROUTE, status, body)
        }
        Ok((
            ReplyHead::Error {
                code,
                message,
                retry_after_ms,
            },
            _,
        )) => fail(ROUTE, code, &message, retry_after_ms),
        Ok(_) => fail(
            ROUTE,
            ErrorCode::Internal,
            "unexpected reply from the room owner",
            None,
        ),
        Err(e) => fail(ROUTE, e.code(), &e.to_string(), Some(1000)),
    }
}

/// `GET /api/rooms/{room}/messages?before&after&limit`.
pub(crate) async fn history(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    const ROUTE: &str = "history";
    if let Err(why) = state.edge.api_authorized(&headers) {
        return fail(ROUTE, ErrorCode::Unauthorized, why, None);
    }
    let Ok(room) = RoomId::new(&room) else {
        return fail(
            ROUTE,
            ErrorCode::BadRoom,
            "room names are 1-128 characters of A-Z, a-z, 0-9, '_' or '-'",
            None,
        );
    };
    // A bad number names the parameter; the error is built once, below.
    let num = |k: &'static str| -> Result<Option<u64>, &'static str> {
        query
            .get(k)
            .map(|v| v.parse::<u64>())
            .transpose()
            .map_err(|_| k)
    };
    let (before, after, limit) = match (num("before"), num("after"), num("limit")) {
        (Ok(b), Ok(a), Ok(l)) => (b, a, l),
        (Err(k), _, _) | (_, Err(k), _) | (_, _, Err(k)) => {
            let msg = format!("{k} must be a non-negative integer");
            return fail(ROUTE, ErrorCode::BadFrame, &msg, None);
        }
    };
    let limit = limit.map_or(DEFAULT_BACKLOG, |l| {
        l.clamp(1, u64::from(MAX_HISTORY_LIMIT)) as u32
    });
    let req = NodeRequest::History {
        room,
        before,
        after,
        limit,
    };
    match state.client.call(&req).await {
        Ok((ReplyHead::History { has_more }, frames)) => {
            let mut out =
                Vec::with_capacity(frames.iter().map(|f| f.len() + 1).sum::<usize>() + 32);
            out.extend_from_slice(br#"{"messages":["#);
            for (i, f) in frames.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(f);
            }
            out.extend_from_slice(if has_more {
                br#"],"has_more":true}"#
            } else {
                br#"],"has_more":false}"#
            });
            ok(ROUTE, StatusCode::OK, out)
        }
        Ok((
            ReplyHead::Error {
                code,
                message,
                retry_after_ms,
            },
            _,
        )) => fail(ROUTE, code, &message, retry_after_ms),
        Ok(_) => fail(
            ROUTE,
            ErrorCode::Internal,
            "unexpected reply from the room owner",
            None,
        ),
        Err(e) => fail(ROUTE, e.code(), &e.to_string(), Some(1000)),
    }
}
