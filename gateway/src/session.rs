//! One WebSocket connection: decode each client frame, act on it, answer.
//! The session owns the connection's joined-room set; fan-out and replies
//! reach the socket only through the connection's bounded queue.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_protocol::bus::{NodeRequest, ReplyHead};
use chat_protocol::frames::{
    close, decode_client, Limits, DEFAULT_BACKLOG, MAX_HISTORY_LIMIT, PROTOCOL_VERSION,
};
use chat_protocol::{ClientFrame, ErrorCode, RoomId, ServerFrame, UserId};
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{Future, StreamExt};
use tokio::io::AsyncWrite;

use chat_room_node::ratelimit::{RateLimit, TokenBucket};

use crate::auth::{now_secs, Identity};
use crate::conn::{self, ConnTx};
use crate::metrics::{FrameKind, METRICS};
use crate::state::AppState;
use crate::ws::{AnyIo, Message, Reader, Socket, Source, Writer};

/// Sends a connection may have waiting for their ack before the gateway
/// stops reading from it (back-pressure instead of unbounded buffering).
const MAX_PENDING_SENDS: usize = 256;

type SendFuture = Pin<Box<dyn Future<Output = ServerFrame> + Send>>;
type JoinFuture = Pin<Box<dyn Future<Output = (RoomId, crate::fanout::JoinResult)> + Send>>;

/// A connection's session.
pub struct Session {
    state: Arc<AppState>,
    user: UserId,
    identity: Identity,
    conn: ConnTx,
    joins_limit: Option<(RateLimit, TokenBucket)>,
    history_limit: Option<(RateLimit, TokenBucket)>,
    joined: HashSet<RoomId>,
    /// Rooms whose join is still in flight (registered with the room task
    /// only when it completes).
    joining: HashSet<RoomId>,
    /// Rooms left while their join was in flight: the leave runs when the
    /// join completes, so it can never overtake the registration and leave
    /// a member behind that the client believes gone.
    leaving: HashSet<RoomId>,
    sends: FuturesOrdered<SendFuture>,
    /// Per joined room, the last send's trail: the next send goes out
    /// behind it or waits for it, so one connection's sends keep their
    /// order across retries, moves and splits.
    lanes: HashMap<RoomId, crate::route::Trail>,
    joins: FuturesUnordered<JoinFuture>,
}

/// Longest a closing connection's writer may take to send what is queued
/// and the close frame, before the socket is dropped regardless.
const WRITER_GRACE: Duration = Duration::from_secs(5);

/// Longest a connection closed for cause (1002, 1007, 1009) is still read
/// from, so its client sees the close frame (see [`crate::ws::Reader::drain`]).
const LINGER: Duration = Duration::from_secs(2);

impl Session {
    /// Runs the connection until the client leaves, the server drains, or
    /// the connection is closed for cause. `deflate` says whether
    /// permessage-deflate was negotiated.
    pub async fn run(state: Arc<AppState>, identity: Identity, socket: Socket, deflate: bool) {
        match socket {
            Socket::Tcp(tcp, prefix) => {
                let (read, write) = tcp.into_split();
                Self::run_on(state, identity, read, prefix, write, deflate).await;
            }
            Socket::Other(io) => {
                let (read, write) = tokio::io::split(io);
                Self::run_on(state, identity, AnyIo(read), Bytes::new(), write, deflate).await;
            }
        }
    }

    /// [`Session::run`] on the two halves of a socket (any, so tests can
    /// use an in-memory pipe); `prefix` is what was read past the
    /// handshake.
    pub async fn run_on<R, W>(
        state: Arc<AppState>,
        identity: Identity,
        read: R,
        prefix: Bytes,
        write: W,
        deflate: bool,
    ) where
        R: Source,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let id = state.next_conn_id();
        let user = identity.user.clone();
        let (tx, rx) = conn::channel(id, state.config.outbound_queue);
        let compress_min = (deflate && state.config.compress_min_bytes > 0)
            .then_some(state.config.compress_min_bytes);
        if deflate {
            METRICS.deflate_connections.inc();
        }
        let writer = tokio::spawn(rx.run(Writer::new(write, compress_min)));
        let mut reader = Reader::new(read, prefix, deflate, state.config.max_frame_bytes);
        METRICS.connections.inc();
        METRICS.connects.inc();
        let span = tracing::info_span!("conn", conn.id = id, user.id = %user);
        let bucket = |per_sec: f64| {
            (per_sec > 0.0).then(|| {
                let limit = RateLimit {
                    per_sec,
                    burst: (per_sec * 2.0).max(1.0),
                };
                (limit, TokenBucket::new(limit, tokio::time::Instant::now()))
            })
        };
        let mut session = Session {
            state: state.clone(),
            user,
            identity,
            conn: tx.clone(),
            joins_limit: bucket(state.config.join_rate),
            history_limit: bucket(state.config.history_rate),
            joined: HashSet::new(),
            joining: HashSet::new(),
            leaving: HashSet::new(),
            sends: FuturesOrdered::new(),
            lanes: HashMap::new(),
            joins: FuturesUnordered::new(),
        };
        let reason = tracing::Instrument::instrument(session.serve(&mut reader), span).await;
        METRICS.disconnects.with_label_values(&[reason]).inc();
        for room in session.joined.drain().chain(session.leaving.drain()) {
            state.hub.leave(&room, id).await;
        }
        // Give the writer the chance to send its close frame.
        if !tx.is_closed() {
            tx.close(1000);
        }
        drop(session);
        drop(tx);
        // The writer ends once the close frame is out or the socket failed.
        // A peer that stopped reading can block its write forever: past the
        // bound the writer is aborted, which drops the socket.
        let mut writer = writer;
        let end = tokio::time::timeout(WRITER_GRACE, &mut writer).await;
        if end.is_err() {
            writer.abort();
        }
        tracing::debug!(conn.id = id, reason, writer = ?end, "connection closed");
        METRICS.connections.dec();
    }

    async fn serve<R: Source>(&mut self, stream: &mut Reader<R>) -> &'static str {
        let cfg = self.state.config.clone();
        let limits = Limits {
            max_frame_bytes: cfg.max_frame_bytes,
            max_message_bytes: cfg.max_message_bytes,
            max_rooms: cfg.max_rooms_per_conn,
            max_history: MAX_HISTORY_LIMIT,
        };
        let hello = ServerFrame::Hello {
            user: self.user.clone(),
            protocol: PROTOCOL_VERSION,
            limits,
        };
        if !self.conn.reply(&hello).await {
            return "closed";
        }
        let mut last_seen = Instant::now();
        let mut ping = tokio::time::interval(cfg.ping_interval);
        ping.reset();
        let shutdown = self.state.shutdown.clone();
        loop {
            let expires = self.expiry();
            tokio::select! {
                _ = tokio::time::sleep_until(expires.unwrap_or_else(tokio::time::Instant::now)), if expires.is_some() => {
                    self.conn.close(close::TOKEN_EXPIRED);
                    return "token_expired";
                }
                msg = stream.next(), if self.sends.len() < MAX_PENDING_SENDS => {
                    last_seen = Instant::now();
                    match msg {
                        Some(Ok(Message::Text(t))) => {
                            if let Some(reason) = self.on_text(&t).await {
                                return reason;
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            METRICS.frames_in.with_label_values(&["binary"]).inc();
                            self.conn.reply(&ServerFrame::error(ErrorCode::BadFrame, "frames are JSON text, not binary")).await;
                        }
                        Some(Ok(Message::Ping(payload))) => self.conn.pong(payload),
                        Some(Ok(Message::Pong)) => {} // liveness only
                        Some(Ok(Message::Close(_))) | None => return "client",
                        Some(Err(e)) => {
                            let Some(code) = e.close_code() else {
                                return "error";
                            };
                            tracing::debug!(error = %e, code, "closing for cause");
                            let (limit, reason) = match code {
                                close::TOO_BIG => ("frame_size", "too_big"),
                                close::INVALID_UTF8 => ("invalid_utf8", "invalid_utf8"),
                                _ => ("protocol", "protocol_error"),
                            };
                            // Counted when decided, before the linger.
                            METRICS.limited.with_label_values(&[limit]).inc();
                            self.conn.close(code);
                            stream.drain(tokio::time::Instant::now() + LINGER).await;
                            return reason;
                        }
                    }
                }
                Some(frame) = self.sends.next(), if !self.sends.is_empty() => {
                    self.conn.reply(&frame).await;
                }
                Some((room, res)) = self.joins.next(), if !self.joins.is_empty() => {
                    self.on_joined(room, res).await;
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > cfg.ping_timeout {
                        self.conn.close(close::PING_TIMEOUT);
                        return "ping_timeout";
                    }
                    self.conn.ping();
                }
                _ = self.conn.closed() => {
                    return match self.conn.close_code() {
                        Some(close::SLOW_CONSUMER) => "slow_consumer",
                        _ => "closed",
                    };
                }
                _ = shutdown.cancelled() => {
                    self.conn.close(close::RESTART);
                    return "draining";
                }
            }
        }
    }

    /// When the connection's credentials expire, as a timer deadline.
    fn expiry(&self) -> Option<tokio::time::Instant> {
        let exp = self.identity.exp?;
        let left = exp.saturating_sub(now_secs());
        Some(tokio::time::Instant::now() + Duration::from_secs(left))
    }

    /// Takes a token from a per-connection limit, or answers
    /// `rate_limited` (naming the request refused, `what`) and says no.
    async fn allow(&mut self, which: &'static str, what: &'static str, room: &RoomId) -> bool {
        let slot = if which == "join_rate" {
            &mut self.joins_limit
        } else {
            &mut self.history_limit
        };
        let Some((limit, bucket)) = slot else {
            return true;
        };
        match bucket.take(*limit, tokio::time::Instant::now()) {
            Ok(()) => true,
            Err(wait) => {
                METRICS.limited.with_label_values(&[which]).inc();
                let kind = if which == "join_rate" {
                    "join"
                } else {
                    "history and member-list"
                };
                let frame = ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    message: format!("too many {kind} requests; slow down ({what} {room} refused)"),
                    reference: None,
                    retry_after_ms: Some(
                        u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
                    ),
                };
                self.conn.reply(&frame).await;
                false
            }
        }
    }

    /// Handles one text frame; returns a disconnect reason when the
    /// connection must end.
    async fn on_text(&mut self, text: &str) -> Option<&'static str> {
        let frame = match decode_client(text) {
            Ok(f) => f,
            Err(e) => {
                METRICS.frames_in.with_label_values(&["invalid"]).inc();
                self.conn.reply(&e.to_frame()).await;
                return None;
            }
        };
        let kind = match &frame {
            ClientFrame::Join { .. } => "join",
            ClientFrame::Leave { .. } => "leave",
            ClientFrame::Send { .. } => "send",
            ClientFrame::History { .. } => "history",
            ClientFrame::Refresh { .. } => "refresh",
            ClientFrame::Members { .. } => "members",
            ClientFrame::Ping => "ping",
        };
        METRICS.frames_in.with_label_values(&[kind]).inc();
        match frame {
            ClientFrame::Ping => {
                self.conn.reply(&ServerFrame::Pong).await;
            }
            ClientFrame::Join { room, since } => self.on_join(room, since).await,
            ClientFrame::Leave { room } => {
                if self.joined.remove(&room) {
                    self.lanes.remove(&room);
                    if self.joining.contains(&room) {
                        // `left` follows `joined` once the join completes.
                        self.leaving.insert(room);
                    } else {
                        self.state.hub.leave(&room, self.conn.id).await;
                        self.conn.reply(&ServerFrame::Left { room }).await;
                    }
                } else {
                    self.conn
                        .reply(&ServerFrame::error(
                            ErrorCode::NotJoined,
                            format!("not joined to {room}"),
                        ))
                        .await;
                }
            }
            ClientFrame::Send {
                room,
                text,
                client_id,
            } => self.on_send(room, text, client_id).await,
            ClientFrame::History {
                room,
                before,
                limit,
            } => {
                if !self.identity.may_access(&room) {
                    forbidden(&self.conn, &room).await;
                } else if self.allow("history_rate", "history of", &room).await {
                    self.on_history(room, before, limit);
                }
            }
            ClientFrame::Refresh { token } => return self.on_refresh(&token).await,
            ClientFrame::Members { room } => {
                if !self.identity.may_access(&room) {
                    forbidden(&self.conn, &room).await;
                } else if !self.joined.contains(&room) {
                    let msg = format!("join {room} to see who is there");
                    self.conn
                        .reply(&ServerFrame::error(ErrorCode::NotJoined, msg))
                        .await;
                } else if self.allow("history_rate", "members of", &room).await {
                    // As costly as a history page, so limited like one.
                    let client = self.state.client.clone();
                    let conn = self.conn.clone();
                    tokio::spawn(async move {
                        let frame = match client.users(&room).await {
                            Ok((users, count)) => ServerFrame::Members {
                                room,
                                count,
                                users: Some(users),
                            },
                            Err(e) => crate::route::failure_frame(Err(e), None, "members"),
                        };
                        conn.reply(&frame).await;
                    });
                }
            }
        }
        None
    }

    /// A new token for the same user extends the connection; one for
    /// another user ends it (4003).
    async fn on_refresh(&mut self, token: &str) -> Option<&'static str> {
        let identity = match self.state.auth.verify_token(token) {
            Ok(i) => i,
            Err(e) => {
                METRICS.auth_failures.inc();
                self.conn
                    .reply(&ServerFrame::error(ErrorCode::Unauthorized, e.to_string()))
                    .await;
                return None;
            }
        };
        if identity.user != self.user {
            METRICS.auth_failures.inc();
            self.conn.close(close::TOKEN_INVALID);
            return Some("token_invalid");
        }
        self.identity = identity;
        // Rooms the new token no longer allows are left.
        let lost: Vec<RoomId> = self
            .joined
            .iter()
            .filter(|r| !self.identity.may_access(r))
            .cloned()
            .collect();
        for room in lost {
            self.joined.remove(&room);
            self.lanes.remove(&room);
            self.state.hub.leave(&room, self.conn.id).await;
            forbidden(&self.conn, &room).await;
            self.conn.reply(&ServerFrame::Left { room }).await;
        }
        let exp = self.identity.exp.unwrap_or(0);
        self.conn.reply(&ServerFrame::Refreshed { exp }).await;
        None
    }

    /// A join finished: a failed one is forgotten and its error sent; one
    /// whose room was left meanwhile is left now, after its `joined`.
    async fn on_joined(&mut self, room: RoomId, res: crate::fanout::JoinResult) {
        self.joining.remove(&room);
        let left = self.leaving.remove(&room);
        match res {
            Ok(_) if left => self.state.hub.leave(&room, self.conn.id).await,
            Ok(_) => {}
            Err(frame) => {
                self.joined.remove(&room);
                self.lanes.remove(&room);
                self.conn.reply(&frame).await;
            }
        }
        if left {
            self.conn.reply(&ServerFrame::Left { room }).await;
        }
    }

    async fn on_join(&mut self, room: RoomId, since: Option<u64>) {
        if self.joined.contains(&room) {
            let msg = format!("already joined to {room}; leave first to join again");
            self.conn
                .reply(&ServerFrame::error(ErrorCode::BadFrame, msg))
                .await;
            return;
        }
        if self.leaving.contains(&room) {
            let msg = format!("still leaving {room}; join again after `left`");
            self.conn
                .reply(&ServerFrame::error(ErrorCode::BadFrame, msg))
                .await;
            return;
        }
        if !self.identity.may_access(&room) {
            forbidden(&self.conn, &room).await;
            return;
        }
        if !self.allow("join_rate", "join", &room).await {
            return;
        }
        let max = self.state.config.max_rooms_per_conn;
        if self.joined.len() + self.leaving.len() >= max {
            METRICS.limited.with_label_values(&["rooms_per_conn"]).inc();
            let msg = format!("a connection may join at most {max} rooms");
            self.conn
                .reply(&ServerFrame::error(ErrorCode::Forbidden, msg))
                .await;
            return;
        }
        self.joined.insert(room.clone());
        self.joining.insert(room.clone());
        let hub = self.state.hub.clone();
        let conn = self.conn.clone();
        let user = self.user.clone();
        self.joins.push(Box::pin(async move {
            let res = hub.join(room.clone(), conn, user, since).await;
            (room, res)
        }));
    }

    async fn on_send(&mut self, room: RoomId, text: String, client_id: String) {
        let error = |code: ErrorCode, message: String, client_id: String| ServerFrame::Error {
            code,
            message,
            reference: Some(client_id),
            retry_after_ms: None,
        };
        if !self.joined.contains(&room) {
            let frame = error(
                ErrorCode::NotJoined,
                format!("join {room} before sending to it"),
                client_id,
            );
            self.conn.reply(&frame).await;
            return;
        }
        let max = self.state.config.max_message_bytes;
        if text.len() > max {
            METRICS.limited.with_label_values(&["message_size"]).inc();
            let frame = error(
                ErrorCode::TooLarge,
                format!("text is {} bytes; the limit is {max}", text.len()),
                client_id,
            );
            self.conn.reply(&frame).await;
            return;
        }
        let client = self.state.client.clone();
        let req = NodeRequest::Send {
            room: room.clone(),
            user: self.user.clone(),
            text,
            client_id: client_id.clone(),
        };
        let started = Instant::now();
        // Requests are published when first polled, and FuturesOrdered
        // first polls them in push order, so one connection's sends reach
        // the owner in the order they were sent; acks come back in that
        // order. `unconstrained`: with tokio's cooperative budget spent, a
        // first poll would return Pending before publishing and a later
        // send could be published first (seen in bursts of ~130 sends).
        // Each send of this connection to this room goes out behind the
        // one before it, or waits until that one is done (its route
        // changed, or it is being retried): see `NodeClient::call_after`.
        let (mark, trail) = crate::route::trail();
        let earlier = self.lanes.insert(room.clone(), trail);
        self.sends
            .push_back(Box::pin(tokio::task::unconstrained(async move {
                match client.call_after(&req, earlier, Some(&mark)).await {
                    Ok((ReplyHead::Ack { seq, .. }, _)) => {
                        METRICS
                            .send_ack_seconds
                            .observe(started.elapsed().as_secs_f64());
                        ServerFrame::Ack {
                            room,
                            client_id,
                            seq,
                        }
                    }
                    other => crate::route::failure_frame(other, Some(client_id), "send"),
                }
            })));
    }

    fn on_history(&mut self, room: RoomId, before: Option<u64>, limit: Option<u32>) {
        let limit = limit.unwrap_or(DEFAULT_BACKLOG).clamp(1, MAX_HISTORY_LIMIT);
        let client = self.state.client.clone();
        let conn = self.conn.clone();
        // History does not need the room joined: it is read-only, and
        // authorisation (when configured) applies to it like to joins.
        tokio::spawn(async move {
            let req = NodeRequest::History {
                room: room.clone(),
                before,
                after: None,
                limit,
            };
            let reply = client.call(&req).await;
            match reply {
                Ok((ReplyHead::History { has_more }, frames)) => {
                    let mut out =
                        Vec::with_capacity(frames.iter().map(|f| f.len() + 1).sum::<usize>() + 96);
                    out.extend_from_slice(br#"{"type":"history","room":"#);
                    out.extend_from_slice(
                        &serde_json::to_vec(room.as_str()).expect("strings serialise"),
                    );
                    out.extend_from_slice(br#","messages":["#);
                    for (i, f) in frames.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(f);
                    }
                    out.extend_from_slice(br#"],"has_more":"#);
                    out.extend_from_slice(if has_more { b"true}" } else { b"false}" });
                    if let Some(t) = crate::ws::Payload::from_utf8(bytes::Bytes::from(out)) {
                        conn.deliver(t, FrameKind::Reply).await;
                    }
                }
                other => {
                    conn.reply(&crate::route::failure_frame(other, None, "history"))
                        .await;
                }
            }
        });
    }
}

/// Tells the client its token does not allow `room`.
async fn forbidden(conn: &ConnTx, room: &RoomId) {
    METRICS.limited.with_label_values(&["room_acl"]).inc();
    let frame = ServerFrame::error(
        ErrorCode::Forbidden,
        format!("your token does not allow room {room}"),
    );
    conn.reply(&frame).await;
}
