//! What travels between gateways and room nodes over the bus.
//!
//! Requests are JSON. Replies and events are line-framed: a first line of
//! metadata, then zero or more client frames, one per line. Client frames
//! are JSON, whose encoder escapes every newline inside strings, so a raw
//! `\n` only ever separates frames. That lets a gateway slice the frames out
//! of the payload (`Bytes::slice`, no copy) and forward them unchanged.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::frames::ErrorCode;
use crate::ids::{NodeId, RoomId, UserId};

/// Largest reply payload a room node builds. NATS's default `max_payload`
/// is 1 MiB; half of it leaves room for headers and a later lower limit.
pub const MAX_REPLY_BYTES: usize = 512 * 1024;

/// A command for a room's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum NodeRequest {
    /// A connection joins a room.
    Join {
        /// The room.
        room: RoomId,
        /// The connection's user.
        user: UserId,
        /// The gateway holding the connection.
        gateway: NodeId,
        /// The connection, unique within its gateway.
        conn: u64,
        /// Deliver the backlog after this seq (else the last 50).
        since: Option<u64>,
        /// A re-registration of a member the room already had (after an
        /// owner change or a reconnect): no presence event, no backlog.
        #[serde(default)]
        quiet: bool,
    },
    /// A connection leaves a room.
    Leave {
        /// The room.
        room: RoomId,
        /// The connection's user.
        user: UserId,
        /// The gateway holding the connection.
        gateway: NodeId,
        /// The connection.
        conn: u64,
    },
    /// A message to sequence and persist; answered after commit.
    Send {
        /// The room.
        room: RoomId,
        /// The sender, from authentication.
        user: UserId,
        /// The text.
        text: String,
        /// The sender's id for the message.
        client_id: String,
    },
    /// Sends a member shard of a big room accepted (authorised, rate
    /// limited, validated), handed to the room's sequencer in the order the
    /// shard took them. The sequencer numbers and stores them like direct
    /// sends and answers each one at its own `reply` after commit; the
    /// request itself is answered [`ReplyHead::Forwarded`] at once.
    Forward {
        /// The room (the sequencer's placement key).
        room: RoomId,
        /// The sends, in the shard's order.
        sends: Vec<ForwardedSend>,
    },
    /// A member request (`join`, `leave` or `send`) for member shard
    /// `shard` of a room split into `shards`; placed on the ring under the
    /// shard's key, not the room's.
    Shard {
        /// The member shard (`crate::shard::user_shard` of the user).
        shard: u32,
        /// The shard count the sender routed by.
        shards: u32,
        /// The member request itself.
        req: Box<NodeRequest>,
    },
    /// What a member shard needs to answer a `join`: the room's `last_seq`,
    /// member count and backlog after `since`, without registering anyone.
    /// Answered like a join.
    Backlog {
        /// The room.
        room: RoomId,
        /// Deliver the backlog after this seq (else the last 50).
        since: Option<u64>,
    },
    /// A member shard's count of users present, for the sequencer's total
    /// (published without a reply).
    Count {
        /// The room.
        room: RoomId,
        /// The shard.
        shard: u32,
        /// The shard count it counts under.
        shards: u32,
        /// Distinct users present in the shard.
        members: u64,
    },
    /// The users present in a room (or, wrapped in [`NodeRequest::Shard`],
    /// in one member shard), answered [`ReplyHead::Users`].
    Users {
        /// The room.
        room: RoomId,
    },
    /// A page of committed messages: `after < seq < before`, newest
    /// `limit` of them when only `before` is given, oldest otherwise.
    History {
        /// The room.
        room: RoomId,
        /// Upper bound (exclusive).
        before: Option<u64>,
        /// Lower bound (exclusive).
        after: Option<u64>,
        /// Most messages wanted.
        limit: u32,
    },
}

impl NodeRequest {
    /// The room the request is about.
    pub fn room(&self) -> &RoomId {
        match self {
            Self::Join { room, .. }
            | Self::Leave { room, .. }
            | Self::Send { room, .. }
            | Self::Forward { room, .. }
            | Self::Backlog { room, .. }
            | Self::Count { room, .. }
            | Self::Users { room }
            | Self::History { room, .. } => room,
            Self::Shard { req, .. } => req.room(),
        }
    }

    /// Where the request is placed on the ring: the room, or for a member
    /// shard request the shard's key.
    pub fn placement_key(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Self::Shard { shard, req, .. } => {
                std::borrow::Cow::Owned(crate::shard::shard_key(req.room(), *shard))
            }
            other => std::borrow::Cow::Borrowed(other.room().as_str()),
        }
    }

    /// The user a member request is for (`join`, `leave`, `send`).
    pub fn member(&self) -> Option<&UserId> {
        match self {
            Self::Join { user, .. } | Self::Leave { user, .. } | Self::Send { user, .. } => {
                Some(user)
            }
            Self::Shard { req, .. } => req.member(),
            _ => None,
        }
    }
}

/// One send inside a [`NodeRequest::Forward`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedSend {
    /// The sender, from authentication at the gateway.
    pub user: UserId,
    /// The text.
    pub text: String,
    /// The sender's id for the message.
    pub client_id: String,
    /// Where the sender's gateway waits for the `ack` (or error), if
    /// anywhere.
    #[serde(default)]
    pub reply: Option<String>,
}

/// Where a presence change stands among its room's presence changes: the
/// lease epoch of the owner that announced it, then its count within that
/// epoch (each new owner takes a higher epoch). A gateway compares the mark
/// of a change that reached it while a member's join was in flight with the
/// mark of the join's answer: a later change is not yet in the answer's
/// `members` and must still reach the member; an earlier one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PresenceMark {
    /// The owner's lease epoch.
    pub epoch: u64,
    /// Presence changes the owner announced in that epoch, this one included.
    pub n: u64,
}

/// The metadata line of a reply from a room node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum ReplyHead {
    /// Join done; the frames that follow are the first part of the backlog.
    Joined {
        /// Last committed seq.
        last_seq: u64,
        /// Distinct users present.
        members: u64,
        /// Whether the frames reach `last_seq`; when false, fetch the rest
        /// with `History { after }`.
        complete: bool,
        /// The last presence change that `members` counts (absent from
        /// member shards and from releases before marks).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        presence: Option<PresenceMark>,
    },
    /// Leave done.
    Left,
    /// Send committed.
    Ack {
        /// The message's seq.
        seq: u64,
        /// The message's id.
        id: String,
        /// Whether this was a resend of an already stored message.
        duplicate: bool,
    },
    /// A [`NodeRequest::Forward`] was taken in order; each send is
    /// answered at its own reply subject.
    Forwarded {
        /// Sends taken.
        accepted: u32,
    },
    /// The room is split into `shards` member shards: send member requests
    /// to the user's shard (or, from a shard, the count changed).
    Sharded {
        /// The current shard count.
        shards: u32,
    },
    /// The users present (sorted, at most `MAX_MEMBER_LIST`).
    Users {
        /// The users.
        users: Vec<UserId>,
        /// How many there are in all.
        count: u64,
    },
    /// History page; message frames follow in seq order.
    History {
        /// Whether more messages exist in the direction asked for.
        has_more: bool,
    },
    /// This node does not own the room: refresh placement and retry.
    NotOwner,
    /// In a batch reply only: the send is taken but not committed yet.
    /// A batch's reply does not wait longer than [`BATCH_DEADLINE`] for
    /// its slowest send, so one stalled room cannot hold the acks of the
    /// others; the gateway asks again for this one (the room answers the
    /// resend at commit, as for any resend).
    Pending,
    /// The command failed.
    Error {
        /// Contract error code.
        code: ErrorCode,
        /// Explanation for the client.
        message: String,
        /// Retry hint for retryable errors.
        retry_after_ms: Option<u64>,
    },
}

/// Why a bus payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The metadata line is not valid JSON of the expected shape.
    #[error("bad metadata: {0}")]
    Json(#[from] serde_json::Error),
    /// The payload breaks the line framing.
    #[error("bad framing")]
    Framing,
}

/// Encodes a reply: the head line, then each frame on its own line.
pub fn encode_reply(head: &ReplyHead, frames: &[Bytes]) -> Bytes {
    let head = serde_json::to_vec(head).expect("reply heads always serialise");
    let len = head.len() + frames.iter().map(|f| f.len() + 1).sum::<usize>();
    let mut out = BytesMut::with_capacity(len);
    out.put_slice(&head);
    for f in frames {
        out.put_u8(b'\n');
        out.put_slice(f);
    }
    out.freeze()
}

/// Splits a reply into its head and its frames (slices of `payload`).
///
/// # Errors
/// When the head is not a valid [`ReplyHead`].
pub fn decode_reply(payload: &Bytes) -> Result<(ReplyHead, Vec<Bytes>), DecodeError> {
    let mut lines = split_lines(payload);
    let head = lines.next().ok_or(DecodeError::Framing)?;
    let head = match decode_ack(&head) {
        Some(ack) => ack,
        None => serde_json::from_slice(&head)?,
    };
    Ok((head, lines.filter(|l| !l.is_empty()).collect()))
}

/// The reply to every send, parsed without the buffering serde needs for
/// an internally tagged enum (`ReplyHead` is tagged by `r`), which was
/// most of the cost of reading an ack. `None` when the head is anything
/// else, for the general parse.
fn decode_ack(head: &[u8]) -> Option<ReplyHead> {
    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Tag {
        Ack,
    }
    #[derive(Deserialize)]
    struct Ack {
        #[serde(rename = "r")]
        _tag: Tag,
        seq: u64,
        id: String,
        duplicate: bool,
    }
    if !head.starts_with(br#"{"r":"ack","#) {
        return None;
    }
    let Ack {
        seq, id, duplicate, ..
    } = serde_json::from_slice(head).ok()?;
    Some(ReplyHead::Ack { seq, id, duplicate })
}

fn split_lines(payload: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    let mut start = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        match payload[start..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line = payload.slice(start..start + i);
                start += i + 1;
                Some(line)
            }
            None => {
                done = true;
                Some(payload.slice(start..))
            }
        }
    })
}

/// Most sends one batch carries. A room node refuses larger batches.
pub const MAX_BATCH_SENDS: usize = 256;

/// Longest a room node holds a batch's reply for its slowest send; past
/// it the sends not yet answered answer [`ReplyHead::Pending`].
pub const BATCH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

/// Sends bound for the same room node, as one request: a JSON array of
/// [`NodeRequest::Send`]s, built from their own encodings without parsing
/// them again (`payloads` are `serde_json` encodings of requests). The
/// node answers with [`encode_batch_reply`]. A batch is what makes the bus
/// carry one message per batch instead of one per send, each way.
pub fn encode_batch<'a>(payloads: impl IntoIterator<Item = &'a Bytes>) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(b'[');
    for (i, p) in payloads.into_iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(p);
    }
    out.put_u8(b']');
    out.freeze()
}

/// Whether a request payload is a batch (a JSON array), not one request.
pub fn is_batch(payload: &[u8]) -> bool {
    payload.first() == Some(&b'[')
}

/// Decodes a batch made by [`encode_batch`].
///
/// # Errors
/// When the payload is not an array of sends (anything else in a batch
/// makes the whole batch bad: gateways batch nothing else).
pub fn decode_batch(payload: &[u8]) -> Result<Vec<NodeRequest>, DecodeError> {
    // A batch holds only sends, so its items parse as a plain struct,
    // without the buffering of the internally tagged `NodeRequest`.
    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Op {
        Send,
    }
    #[derive(Deserialize)]
    struct Send {
        #[serde(rename = "op")]
        _op: Op,
        room: RoomId,
        user: UserId,
        text: String,
        client_id: String,
    }
    let sends: Vec<Send> = serde_json::from_slice(payload)?;
    Ok(sends
        .into_iter()
        .map(|s| NodeRequest::Send {
            room: s.room,
            user: s.user,
            text: s.text,
            client_id: s.client_id,
        })
        .collect())
}

/// Encodes the reply to a batch: one reply head per line, in the batch's
/// order. A single head (with no newline) answers every send alike: that
/// is how a node refuses a whole batch.
pub fn encode_batch_reply<'a>(heads: impl IntoIterator<Item = &'a ReplyHead>) -> Bytes {
    let mut out = Vec::new();
    for (i, head) in heads.into_iter().enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        serde_json::to_writer(&mut out, head).expect("reply heads always serialise");
    }
    Bytes::from(out)
}

/// Whether one send's reply (a part of [`decode_batch_reply`]) is
/// [`ReplyHead::Pending`], without parsing it.
pub fn is_pending(reply: &[u8]) -> bool {
    reply == br#"{"r":"pending"}"#
}

/// Splits the reply to a batch of `n` sends into one reply per send (each
/// a slice of `payload`, decoded with [`decode_reply`]).
///
/// # Errors
/// When the reply holds neither `n` answers nor one for all.
pub fn decode_batch_reply(payload: &Bytes, n: usize) -> Result<Vec<Bytes>, DecodeError> {
    let lines: Vec<Bytes> = split_lines(payload).collect();
    match lines.len() {
        len if len == n => Ok(lines),
        1 => Ok(vec![lines[0].clone(); n]),
        _ => Err(DecodeError::Framing),
    }
}

/// A room event as published on the room subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A committed message with its seq; `frame` is the client frame.
    Message {
        /// The message's seq.
        seq: u64,
        /// The `message` frame.
        frame: Bytes,
    },
    /// Committed messages with consecutive seqs from `first`, in order:
    /// what one commit of several messages of a room publishes, as one bus
    /// message instead of one per message.
    Messages {
        /// The first message's seq; the others follow it one by one.
        first: u64,
        /// The `message` frames.
        frames: Vec<Bytes>,
    },
    /// The room has a new owner (or the same one restarted): gateways
    /// re-register their members with it.
    Resync,
    /// The room is now split into `count` member shards: gateways route
    /// its members' requests by shard and re-register their members there.
    Shards {
        /// The shard count.
        count: u32,
    },
    /// A frame for every member (a big room's `members` count).
    ToAll {
        /// The frame.
        frame: Bytes,
    },
    /// A presence change (not sequenced); `frame` is the client frame.
    Presence {
        /// Whose presence changed, so gateways need not parse the frame to
        /// keep it from that user's own connections.
        user: UserId,
        /// The `presence` frame.
        frame: Bytes,
        /// Its place among the room's presence changes; sent only while
        /// every live gateway reads it ([`NodeHeartbeat::presence_marks`]).
        mark: Option<PresenceMark>,
    },
}

impl Event {
    /// Encodes the event: `m <seq>\n<frame>`, `M <first>\n<frame>\n<frame>...`,
    /// `p <user>\n<frame>`, `r\n`, `s <count>\n` or `a\n<frame>`.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            Self::Message { seq, frame } => {
                out.reserve(frame.len() + 24);
                out.put_slice(b"m ");
                out.put_slice(seq.to_string().as_bytes());
                out.put_u8(b'\n');
                out.put_slice(frame);
            }
            Self::Messages { first, frames } => {
                out.reserve(frames.iter().map(|f| f.len() + 1).sum::<usize>() + 24);
                out.put_slice(b"M ");
                out.put_slice(first.to_string().as_bytes());
                for f in frames {
                    out.put_u8(b'\n');
                    out.put_slice(f);
                }
            }
            Self::Resync => out.put_slice(b"r\n"),
            Self::Shards { count } => {
                out.put_slice(b"s ");
                out.put_slice(count.to_string().as_bytes());
                out.put_u8(b'\n');
            }
            Self::ToAll { frame } => {
                out.reserve(frame.len() + 2);
                out.put_slice(b"a\n");
                out.put_slice(frame);
            }
            Self::Presence { user, frame, mark } => {
                out.reserve(frame.len() + user.as_str().len() + 48);
                if let Some(m) = mark {
                    out.put_slice(format!("P {} {} ", m.epoch, m.n).as_bytes());
                } else {
                    out.put_slice(b"p ");
                }
                out.put_slice(user.as_str().as_bytes());
                out.put_u8(b'\n');
                out.put_slice(frame);
            }
        }
        out.freeze()
    }

    /// Decodes an event; the frame is a slice of `payload`.
    ///
    /// # Errors
    /// When the payload is not an event.
    pub fn decode(payload: &Bytes) -> Result<Self, DecodeError> {
        let nl = payload
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(DecodeError::Framing)?;
        let head = &payload[..nl];
        let frame = payload.slice(nl + 1..);
        match head {
            b"r" => Ok(Self::Resync),
            b"a" => Ok(Self::ToAll { frame }),
            [b's', b' ', digits @ ..] => {
                let count = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(DecodeError::Framing)?;
                Ok(Self::Shards { count })
            }
            [kind @ (b'p' | b'P'), b' ', rest @ ..] => {
                let rest = std::str::from_utf8(rest).map_err(|_| DecodeError::Framing)?;
                // `P <epoch> <n> <user>`: the numbers hold no space, a user may.
                let (mark, user) = if *kind == b'P' {
                    let mut parts = rest.splitn(3, ' ');
                    let mut number = || parts.next().and_then(|p| p.parse::<u64>().ok());
                    let (Some(epoch), Some(n)) = (number(), number()) else {
                        return Err(DecodeError::Framing);
                    };
                    let user = parts.next().ok_or(DecodeError::Framing)?;
                    (Some(PresenceMark { epoch, n }), user)
                } else {
                    (None, rest)
                };
                let user = UserId::new(user).map_err(|_| DecodeError::Framing)?;
                Ok(Self::Presence { user, frame, mark })
            }
            [b'M', b' ', digits @ ..] => {
                let first = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(DecodeError::Framing)?;
                let frames: Vec<Bytes> = split_lines(&frame).collect();
                if frames.iter().any(Bytes::is_empty) {
                    return Err(DecodeError::Framing);
                }
                Ok(Self::Messages { first, frames })
            }
            [b'm', b' ', digits @ ..] => {
                let seq = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(DecodeError::Framing)?;
                Ok(Self::Message { seq, frame })
            }
            _ => Err(DecodeError::Framing),
        }
    }
}

/// The heartbeat a room node writes to the nodes bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHeartbeat {
    /// The node.
    pub node: NodeId,
    /// Random per process start, to tell a restart or a duplicate id apart.
    pub instance: String,
    /// Whether the node is leaving the ring.
    pub draining: bool,
    /// Sender's wall clock, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// Speaks batches: takes several sends in one request
    /// ([`encode_batch`]) and reads a commit of several messages as one
    /// event ([`Event::Messages`]). Absent, so false, in the heartbeats of
    /// releases before batches: peers keep to single requests and events
    /// while such a process runs, so a rolling upgrade mixes both.
    #[serde(default)]
    pub batches: bool,
    /// Reads presence events with a [`PresenceMark`] (gateways). Absent, so
    /// false, in releases before marks: room nodes send unmarked presence
    /// while such a gateway runs, so a rolling upgrade mixes both.
    #[serde(default)]
    pub presence_marks: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_the_array_of_its_sends_and_its_reply_one_head_per_send() {
        let send = |n: u32| NodeRequest::Send {
            room: RoomId::new("r").unwrap(),
            user: UserId::new("u").unwrap(),
            text: format!("line\nbreak {n}"),
            client_id: format!("c{n}"),
        };
        let sends: Vec<NodeRequest> = (0..3).map(send).collect();
        let payloads: Vec<Bytes> = sends
            .iter()
            .map(|r| Bytes::from(serde_json::to_vec(r).unwrap()))
            .collect();
        let batch = encode_batch(&payloads);
        assert!(is_batch(&batch));
        assert!(!is_batch(&payloads[0]));
        assert_eq!(decode_batch(&batch).unwrap(), sends);

        let heads = [
            ReplyHead::Ack {
                seq: 1,
                id: "a".into(),
                duplicate: false,
            },
            ReplyHead::NotOwner,
            ReplyHead::Error {
                code: ErrorCode::RateLimited,
                message: "slow\ndown".into(),
                retry_after_ms: Some(5),
            },
        ];
        let reply = encode_batch_reply(&heads);
        let parts = decode_batch_reply(&reply, 3).unwrap();
        let back: Vec<ReplyHead> = parts.iter().map(|p| decode_reply(p).unwrap().0).collect();
        assert_eq!(back, heads);
        // One head answers all; any other count is an error.
        let all = decode_batch_reply(&encode_reply(&ReplyHead::NotOwner, &[]), 3).unwrap();
        assert_eq!(all.len(), 3);
        assert!(decode_batch_reply(&reply, 2).is_err());
        assert!(is_pending(&encode_reply(&ReplyHead::Pending, &[])));
        assert!(!is_pending(&encode_reply(&ReplyHead::NotOwner, &[])));
    }

    #[test]
    fn reply_round_trip_keeps_frames_byte_identical() {
        let frames = vec![
            Bytes::from_static(br#"{"type":"message","text":"a\nb"}"#),
            Bytes::from_static(br#"{"type":"message","text":"c"}"#),
        ];
        let head = ReplyHead::History { has_more: true };
        let bytes = encode_reply(&head, &frames);
        let (h, f) = decode_reply(&bytes).unwrap();
        assert_eq!(h, head);
        assert_eq!(f, frames);
        let (h, f) = decode_reply(&encode_reply(&ReplyHead::Left, &[])).unwrap();
        assert_eq!((h, f.len()), (ReplyHead::Left, 0));
    }

    #[test]
    fn joined_carries_a_presence_mark_both_releases_read() {
        let head = ReplyHead::Joined {
            last_seq: 5,
            members: 2,
            complete: true,
            presence: Some(PresenceMark { epoch: 4, n: 9 }),
        };
        let (h, _) = decode_reply(&encode_reply(&head, &[])).unwrap();
        assert_eq!(h, head);
        // From a node before marks: no mark.
        let old = r#"{"r":"joined","last_seq":5,"members":2,"complete":true}"#;
        let h: ReplyHead = serde_json::from_str(old).unwrap();
        assert!(
            matches!(h, ReplyHead::Joined { presence: None, .. }),
            "{h:?}"
        );
        // Read by a gateway before marks: the field is ignored.
        #[derive(Deserialize)]
        #[serde(tag = "r", rename_all = "snake_case")]
        enum OldHead {
            Joined {
                last_seq: u64,
                members: u64,
                complete: bool,
            },
        }
        let OldHead::Joined {
            last_seq,
            members,
            complete,
        } = serde_json::from_str(&serde_json::to_string(&head).unwrap()).unwrap();
        assert_eq!((last_seq, members, complete), (5, 2, true));
    }

    #[test]
    fn event_round_trip() {
        let e = Event::Message {
            seq: 42,
            frame: Bytes::from_static(b"{}"),
        };
        assert_eq!(Event::decode(&e.encode()).unwrap(), e);
        let p = Event::Presence {
            user: UserId::new("zoë k").unwrap(),
            frame: Bytes::from_static(b"{\"x\":1}"),
            mark: None,
        };
        assert_eq!(Event::decode(&p.encode()).unwrap(), p);
        assert!(p.encode().starts_with(b"p zo"), "unmarked: as before marks");
        let marked = Event::Presence {
            user: UserId::new("zoë k 7").unwrap(),
            frame: Bytes::from_static(b"{\"x\":1}"),
            mark: Some(PresenceMark { epoch: 3, n: 17 }),
        };
        assert_eq!(Event::decode(&marked.encode()).unwrap(), marked);
        for bad in ["P 3 x zoë\n{}", "P 3\n{}", "P  17 zoë\n{}"] {
            assert!(Event::decode(&Bytes::from(bad)).is_err(), "{bad}");
        }
        assert!(PresenceMark { epoch: 2, n: 90 } < PresenceMark { epoch: 3, n: 1 });
        assert_eq!(
            Event::decode(&Event::Resync.encode()).unwrap(),
            Event::Resync
        );
        let s = Event::Shards { count: 12 };
        assert_eq!(Event::decode(&s.encode()).unwrap(), s);
        let a = Event::ToAll {
            frame: Bytes::from_static(b"{\"type\":\"members\"}"),
        };
        assert_eq!(Event::decode(&a.encode()).unwrap(), a);
        let ms = Event::Messages {
            first: 7,
            frames: vec![
                Bytes::from_static(b"{\"a\":\"x\\ny\"}"),
                Bytes::from_static(b"{}"),
            ],
        };
        assert_eq!(Event::decode(&ms.encode()).unwrap(), ms);
        assert!(Event::decode(&Bytes::from_static(b"M 7\n{}\n\n{}")).is_err());
        assert!(Event::decode(&Bytes::from_static(b"M x\n{}")).is_err());
        assert!(Event::decode(&Bytes::from_static(b"s x\n")).is_err());
        assert!(Event::decode(&Bytes::from_static(b"m x\n{}")).is_err());
        assert!(Event::decode(&Bytes::from_static(b"garbage")).is_err());
    }

    #[test]
    fn request_json_shape() {
        let r = NodeRequest::History {
            room: RoomId::new("r").unwrap(),
            before: Some(3),
            after: None,
            limit: 10,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<NodeRequest>(&s).unwrap(), r);
        assert_eq!(r.room().as_str(), "r");
        let f = NodeRequest::Forward {
            room: RoomId::new("big").unwrap(),
            sends: vec![ForwardedSend {
                user: UserId::new("ann").unwrap(),
                text: "line\nbreak ✓".into(),
                client_id: "c1".into(),
                reply: Some("_INBOX.x.1".into()),
            }],
        };
        let s = serde_json::to_string(&f).unwrap();
        assert!(s.starts_with(r#"{"op":"forward""#), "{s}");
        assert_eq!(serde_json::from_str::<NodeRequest>(&s).unwrap(), f);
        assert_eq!(f.room().as_str(), "big");
        let (h, _) =
            decode_reply(&encode_reply(&ReplyHead::Forwarded { accepted: 3 }, &[])).unwrap();
        assert_eq!(h, ReplyHead::Forwarded { accepted: 3 });
    }
}
