//! Client frames (JSON text over WebSocket), as fixed in the contract.
//!
//! Decoding is strict about what matters (types, ids, required fields) and
//! lenient about what does not (unknown fields are ignored), so old clients
//! keep working when frames grow.

use serde::{Deserialize, Serialize};

use crate::ids::{RoomId, UserId};

/// Version of the client protocol, sent in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Most messages a `history` reply or a join backlog carries by default.
pub const DEFAULT_BACKLOG: u32 = 50;
/// Largest `limit` a `history` request may ask for.
pub const MAX_HISTORY_LIMIT: u32 = 100;
/// Most users a `members` answer lists (a big room's full roster would
/// not fit in a frame; the count is always exact).
pub const MAX_MEMBER_LIST: usize = 1000;
/// Longest accepted `client_id`, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 128;

/// WebSocket close codes of the contract.
pub mod close {
    /// A text frame held invalid UTF-8.
    pub const INVALID_UTF8: u16 = 1007;
    /// The client broke RFC 6455 (unmasked frame, reserved bits or opcode,
    /// malformed control frame).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A frame was larger than the configured limit.
    pub const TOO_BIG: u16 = 1009;
    /// The server failed; reconnect.
    pub const INTERNAL: u16 = 1011;
    /// The server is draining: reconnect elsewhere and resume with `since`.
    pub const RESTART: u16 = 1012;
    /// No pong within the ping timeout.
    pub const PING_TIMEOUT: u16 = 4000;
    /// The token expired.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// A refresh token named another subject.
    pub const TOKEN_INVALID: u16 = 4003;
    /// The outbound queue overflowed.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Too many connections from one address.
    pub const TOO_MANY_CONNECTIONS: u16 = 4029;
}

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Join a room; the backlog starts after `since` (or is the last 50).
    Join {
        /// The room to join.
        room: RoomId,
        /// Last seq the client has; everything after it is delivered.
        #[serde(default)]
        since: Option<u64>,
    },
    /// Leave a room.
    Leave {
        /// The room to leave.
        room: RoomId,
    },
    /// Send a message; answered by `ack` after commit.
    Send {
        /// The room to send to (must be joined).
        room: RoomId,
        /// The message text.
        text: String,
        /// The client's id for this message; resends with the same id are
        /// stored once.
        client_id: String,
    },
    /// Page back through a room's history.
    History {
        /// The room.
        room: RoomId,
        /// Only messages with a smaller seq.
        #[serde(default)]
        before: Option<u64>,
        /// At most this many (capped at 100).
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Who is present in a joined room: answered by `members` with the
    /// users (at most [`MAX_MEMBER_LIST`]) and the count.
    Members {
        /// The room (must be joined).
        room: RoomId,
    },
    /// Replace the connection's token.
    Refresh {
        /// The new token.
        token: String,
    },
    /// Liveness check; answered by `pong`.
    Ping,
}

/// Error codes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be decoded or broke a rule.
    BadFrame,
    /// The room name is invalid.
    BadRoom,
    /// No valid credentials.
    Unauthorized,
    /// Not allowed in this room.
    Forbidden,
    /// The room has not been joined on this connection.
    NotJoined,
    /// The text is larger than the limit.
    TooLarge,
    /// Too many messages; retry after `retry_after_ms`.
    RateLimited,
    /// The room's buffer is full; retry after `retry_after_ms`.
    Overloaded,
    /// No owner reachable; retry.
    Unavailable,
    /// The server failed.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadFrame => "bad_frame",
            Self::BadRoom => "bad_room",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotJoined => "not_joined",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// Limits announced in `hello` so clients can respect them up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest WebSocket frame accepted.
    pub max_frame_bytes: usize,
    /// Largest `text` accepted.
    pub max_message_bytes: usize,
    /// Most rooms one connection may join.
    pub max_rooms: usize,
    /// Largest `history` limit.
    pub max_history: u32,
}

/// A chat message as stored and delivered. Serialised once by the room
/// owner into a [`ServerFrame::Message`]; those bytes are what every member
/// and every history reply receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The room.
    pub room: RoomId,
    /// Gap-free position in the room.
    pub seq: u64,
    /// Cluster-unique id.
    pub id: String,
    /// The sender, from authentication only.
    pub user: UserId,
    /// The text, byte-identical to what was sent.
    pub text: String,
    /// Commit time in milliseconds since the Unix epoch.
    pub ts: i64,
    /// The sender's id for the message.
    pub client_id: String,
}

/// A frame sent by the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every connection.
    Hello {
        /// Who the server thinks the client is.
        user: UserId,
        /// Protocol version.
        protocol: u32,
        /// Limits the server enforces.
        limits: Limits,
    },
    /// The join succeeded; the backlog follows.
    Joined {
        /// The room.
        room: RoomId,
        /// Last committed seq when the join was served.
        last_seq: u64,
        /// Distinct users present.
        members: u64,
    },
    /// The leave succeeded.
    Left {
        /// The room.
        room: RoomId,
    },
    /// A committed message.
    Message(Message),
    /// A `send` was committed.
    Ack {
        /// The room.
        room: RoomId,
        /// The client's id of the message.
        client_id: String,
        /// The seq the message got (the original one for a resend).
        seq: u64,
    },
    /// Someone arrived or left.
    Presence {
        /// The room.
        room: RoomId,
        /// The user.
        user: UserId,
        /// `join` or `leave`.
        state: PresenceState,
    },
    /// How many users are present in a big (sharded) room, sent instead
    /// of every member's presence: when the count changes, at most once a
    /// second.
    Members {
        /// The room.
        room: RoomId,
        /// Distinct users present.
        count: u64,
        /// The users, sorted, when a client asked (at most
        /// [`MAX_MEMBER_LIST`]; fewer than `count` means the list is cut).
        #[serde(skip_serializing_if = "Option::is_none")]
        users: Option<Vec<UserId>>,
    },
    /// Reply to `refresh`.
    Refreshed {
        /// New expiry, seconds since the Unix epoch.
        exp: u64,
    },
    /// Reply to `ping`.
    Pong,
    /// Something went wrong; the connection stays open.
    Error {
        /// Stable machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
        /// The `client_id` of the `send` this answers.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// When to retry, for retryable errors.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// Whether a user arrived or left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceState {
    /// The user's first connection joined.
    Join,
    /// The user's last connection left.
    Leave,
}

impl ServerFrame {
    /// Serialises the frame to JSON bytes.
    pub fn to_bytes(&self) -> bytes::Bytes {
        // Serialising these types cannot fail: every map key is a string and
        // no custom Serialize impl returns an error.
        bytes::Bytes::from(serde_json::to_vec(self).expect("server frames always serialise"))
    }

    /// An error frame without a `ref`.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
            reference: None,
            retry_after_ms: None,
        }
    }
}

/// Why a text frame could not become a [`ClientFrame`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not JSON, no known `type`, a field missing or of the wrong kind, or
    /// a value the database cannot store.
    #[error("{reason}")]
    BadFrame {
        /// What was wrong, for the client.
        reason: String,
        /// The frame's `client_id`, when it had a usable one, so a sender
        /// can match the error to its `send`.
        reference: Option<String>,
    },
    /// The room name is invalid.
    #[error("invalid room name: room names are 1-128 characters of A-Z, a-z, 0-9, '_' or '-'")]
    BadRoom {
        /// The frame's `client_id`, as for [`FrameError::BadFrame`].
        reference: Option<String>,
    },
}

impl FrameError {
    /// The error code the client gets for this.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadFrame { .. } => ErrorCode::BadFrame,
            Self::BadRoom { .. } => ErrorCode::BadRoom,
        }
    }

    /// The `client_id` of the refused frame, for the error's `ref`.
    pub fn reference(&self) -> Option<&str> {
        match self {
            Self::BadFrame { reference, .. } | Self::BadRoom { reference } => reference.as_deref(),
        }
    }

    /// The error frame the client gets.
    pub fn to_frame(&self) -> ServerFrame {
        ServerFrame::Error {
            code: self.code(),
            message: self.to_string(),
            reference: self.reference().map(str::to_owned),
            retry_after_ms: None,
        }
    }
}

/// The fields a refused frame is probed for, to tell a bad room from any
/// other fault and to find the `client_id` an error refers to. Only used on
/// the error path, so valid frames are parsed once.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(default, borrow)]
    room: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    client_id: Option<std::borrow::Cow<'a, str>>,
}

/// A `client_id` fit to echo back in `ref`.
fn usable_client_id(id: Option<&str>) -> Option<String> {
    id.filter(|c| !c.is_empty() && c.len() <= MAX_CLIENT_ID_BYTES && !c.contains('\0'))
        .map(str::to_owned)
}

/// Classifies a frame serde refused: `bad_room` when it names a room that
/// breaks the grammar, `bad_frame` otherwise.
fn refused(text: &str, err: &serde_json::Error) -> FrameError {
    // A frame that is not even a JSON object has no fields to probe; a
    // field of the wrong kind (`"room": 5`) makes the probe fail too, and
    // is a bad frame either way.
    let probe = serde_json::from_str::<Probe<'_>>(text).ok();
    let reference = probe
        .as_ref()
        .and_then(|p| usable_client_id(p.client_id.as_deref()));
    match probe.as_ref().and_then(|p| p.room.as_deref()) {
        Some(room) if RoomId::new(room).is_err() => FrameError::BadRoom { reference },
        _ => FrameError::BadFrame {
            reason: err.to_string(),
            reference,
        },
    }
}

/// Decodes a client text frame and checks the rules that need no config:
/// `client_id` length, and text the database can store (no NUL).
///
/// # Errors
/// [`FrameError::BadRoom`] for an invalid room name, otherwise
/// [`FrameError::BadFrame`] with a reason; either carries the frame's
/// `client_id` when it had a usable one.
pub fn decode_client(text: &str) -> Result<ClientFrame, FrameError> {
    let frame: ClientFrame = serde_json::from_str(text).map_err(|e| refused(text, &e))?;
    if let ClientFrame::Send {
        text, client_id, ..
    } = &frame
    {
        if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID_BYTES {
            return Err(FrameError::BadFrame {
                reason: format!("client_id must be 1-{MAX_CLIENT_ID_BYTES} bytes"),
                reference: None,
            });
        }
        if client_id.contains('\0') {
            return Err(FrameError::BadFrame {
                reason: "client_id may not contain NUL characters".into(),
                reference: None,
            });
        }
        if text.contains('\0') {
            return Err(FrameError::BadFrame {
                reason: "text may not contain NUL characters".into(),
                reference: Some(client_id.clone()),
            });
        }
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_client_frame() {
        assert_eq!(
            decode_client(r#"{"type":"join","room":"a","since":3}"#).unwrap(),
            ClientFrame::Join {
                room: RoomId::new("a").unwrap(),
                since: Some(3)
            }
        );
        assert!(matches!(
            decode_client(r#"{"type":"send","room":"a","text":"hi","client_id":"c1","extra":1}"#),
            Ok(ClientFrame::Send { .. })
        ));
        assert_eq!(
            decode_client(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping
        );
        assert!(matches!(
            decode_client(r#"{"type":"history","room":"a"}"#),
            Ok(ClientFrame::History {
                before: None,
                limit: None,
                ..
            })
        ));
    }

    #[test]
    fn refuses_bad_frames() {
        assert_eq!(
            decode_client(r#"{"type":"join","room":"a b"}"#),
            Err(FrameError::BadRoom { reference: None })
        );
        assert!(matches!(
            decode_client("nope"),
            Err(FrameError::BadFrame { .. })
        ));
        // The grammar's wording in another field is not a bad room.
        assert_eq!(
            decode_client(r#"{"type":"room names are 1-128 characters"}"#).map_err(|e| e.code()),
            Err(ErrorCode::BadFrame)
        );
        // A refused send names its client_id, so the sender can match it.
        let e = decode_client(r#"{"type":"send","room":"a","text":"a\u0000b","client_id":"c9"}"#)
            .unwrap_err();
        assert_eq!((e.code(), e.reference()), (ErrorCode::BadFrame, Some("c9")));
        let e = decode_client(r#"{"type":"send","room":"a b","text":"x","client_id":"c8"}"#)
            .unwrap_err();
        assert_eq!((e.code(), e.reference()), (ErrorCode::BadRoom, Some("c8")));
        let e = decode_client(r#"{"type":"send","room":"a","client_id":"c7"}"#).unwrap_err();
        assert_eq!((e.code(), e.reference()), (ErrorCode::BadFrame, Some("c7")));
        assert!(matches!(
            decode_client(r#"{"type":"fly"}"#),
            Err(FrameError::BadFrame { .. })
        ));
        assert!(matches!(
            decode_client(r#"{"type":"send","room":"a","text":"x","client_id":""}"#),
            Err(FrameError::BadFrame { .. })
        ));
        assert!(matches!(
            decode_client(r#"{"type":"send","room":"a","text":"a\u0000b","client_id":"c"}"#),
            Err(FrameError::BadFrame { .. })
        ));
        assert!(matches!(
            decode_client(r#"{"type":"join","room":"a","since":-1}"#),
            Err(FrameError::BadFrame { .. })
        ));
    }

    #[test]
    fn server_frames_match_the_contract() {
        let f = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            reference: Some("c1".into()),
            retry_after_ms: Some(100),
        };
        let v: serde_json::Value = serde_json::from_slice(&f.to_bytes()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","code":"rate_limited","message":"slow down","ref":"c1","retry_after_ms":100})
        );
        let m = ServerFrame::Message(Message {
            room: RoomId::new("r").unwrap(),
            seq: 7,
            id: "x".into(),
            user: UserId::new("u").unwrap(),
            text: "héllo".into(),
            ts: 5,
            client_id: "c".into(),
        });
        let v: serde_json::Value = serde_json::from_slice(&m.to_bytes()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"message","room":"r","seq":7,"id":"x","user":"u","text":"héllo","ts":5,"client_id":"c"})
        );
        assert_eq!(&ServerFrame::Pong.to_bytes()[..], br#"{"type":"pong"}"#);
    }
}
