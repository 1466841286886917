//! Property tests of the client-frame decoder and the server-frame encoder.
//!
//! The decoder is the first code that touches untrusted input, so it must
//! answer every string, however broken, with a frame or a [`FrameError`],
//! never a panic; and whatever the protocol accepts must survive an
//! encode/decode round trip byte for byte. Case counts are fixed so CI time
//! stays bounded (`PROPTEST_CASES` raises them for a longer local run).

use chat_protocol::frames::{decode_client, ClientFrame, ErrorCode, Message, ServerFrame};
use chat_protocol::ids::{RoomId, UserId};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 2048;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES);
    ProptestConfig {
        cases,
        // Failures print a minimal input; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn room() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,128}"
}

/// Any text the protocol accepts: every Unicode scalar value but NUL,
/// with emoji, joiners and direction marks made likely.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        any::<char>().prop_filter("no NUL", |c| *c != '\0'),
        Just('\u{200d}'),  // zero-width joiner
        Just('\u{200f}'),  // right-to-left mark
        Just('\u{202e}'),  // right-to-left override
        Just('\u{1f469}'), // woman
        Just('\u{fe0f}'),  // variation selector
        Just('"'),
        Just('\\'),
        Just('\n'),
    ];
    proptest::collection::vec(piece, 0..64).prop_map(|v| v.into_iter().collect())
}

fn client_id() -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 1..32)
        .prop_map(|v| v.into_iter().collect::<String>())
        .prop_filter("at most 128 bytes", |s| s.len() <= 128)
}

fn user() -> impl Strategy<Value = UserId> {
    "[a-z][a-z0-9_.-]{0,30}".prop_map(|s| UserId::new(&s).expect("valid user id"))
}

/// A valid client frame and the JSON a client would send for it.
fn client_frame() -> impl Strategy<Value = (ClientFrame, Value)> {
    prop_oneof![
        (room(), proptest::option::of(any::<u64>())).prop_map(|(r, since)| {
            let mut v = json!({"type": "join", "room": r});
            if let Some(s) = since {
                v["since"] = json!(s);
            }
            let room = RoomId::new(&r).expect("valid room");
            (ClientFrame::Join { room, since }, v)
        }),
        room().prop_map(|r| {
            let v = json!({"type": "leave", "room": r});
            let room = RoomId::new(&r).expect("valid room");
            (ClientFrame::Leave { room }, v)
        }),
        (room(), text(), client_id()).prop_map(|(r, text, client_id)| {
            let v = json!({"type": "send", "room": r, "text": text, "client_id": client_id});
            let room = RoomId::new(&r).expect("valid room");
            (
                ClientFrame::Send {
                    room,
                    text,
                    client_id,
                },
                v,
            )
        }),
        (
            room(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(r, before, limit)| {
                let v = json!({"type": "history", "room": r, "before": before, "limit": limit});
                let room = RoomId::new(&r).expect("valid room");
                (
                    ClientFrame::History {
                        room,
                        before,
                        limit,
                    },
                    v,
                )
            }),
        text().prop_map(|token| {
            let v = json!({"type": "refresh", "token": token});
            (ClientFrame::Refresh { token }, v)
        }),
        Just((ClientFrame::Ping, json!({"type": "ping"}))),
    ]
}

/// One way of breaking a frame's text.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Insert(usize, char),
    Remove(usize),
    Replace(usize, char),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let c = prop_oneof![
        any::<char>(),
        Just('"'),
        Just('{'),
        Just('}'),
        Just(':'),
        Just(','),
        Just('\\'),
        Just('\0'),
    ];
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), c.clone()).prop_map(|(i, c)| Mutation::Insert(i, c)),
        any::<usize>().prop_map(Mutation::Remove),
        (any::<usize>(), c).prop_map(|(i, c)| Mutation::Replace(i, c)),
    ]
}

/// Applies `m` at a char boundary of `s` (positions wrap around).
fn mutate(s: &str, m: &Mutation) -> String {
    let chars: Vec<char> = s.chars().collect();
    let at = |i: usize, extra: usize| i % (chars.len() + extra).max(1);
    let mut out = chars.clone();
    match *m {
        Mutation::Truncate(i) => out.truncate(at(i, 1)),
        Mutation::Insert(i, c) => out.insert(at(i, 1).min(out.len()), c),
        Mutation::Remove(i) => {
            if !out.is_empty() {
                out.remove(at(i, 0));
            }
        }
        Mutation::Replace(i, c) => {
            if !out.is_empty() {
                let i = at(i, 0);
                out[i] = c;
            }
        }
    }
    out.into_iter().collect()
}

/// What the decoder may answer: a frame, or one of the two decode codes.
fn assert_answered(input: &str) -> Result<(), TestCaseError> {
    match decode_client(input) {
        Ok(_) => Ok(()),
        Err(e) => {
            prop_assert!(
                matches!(e.code(), ErrorCode::BadFrame | ErrorCode::BadRoom),
                "decode error with code {:?}",
                e.code()
            );
            prop_assert!(!e.to_string().is_empty(), "an error must say why");
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// Any string at all gets an answer, not a panic.
    #[test]
    fn any_text_is_answered(input in any::<String>()) {
        assert_answered(&input)?;
    }

    /// JSON-looking noise (objects with a `type` and random fields).
    #[test]
    fn json_noise_is_answered(
        ty in prop_oneof![
            Just("join"), Just("leave"), Just("send"), Just("history"),
            Just("refresh"), Just("ping"), Just("fly"), Just(""),
        ],
        fields in proptest::collection::vec(
            (
                prop_oneof![
                    Just("room".to_string()), Just("text".to_string()),
                    Just("client_id".to_string()), Just("since".to_string()),
                    Just("before".to_string()), Just("limit".to_string()),
                    Just("token".to_string()), "[a-z]{1,8}",
                ],
                prop_oneof![
                    Just(Value::Null),
                    any::<bool>().prop_map(Value::from),
                    any::<i64>().prop_map(Value::from),
                    any::<f64>().prop_map(|f| json!(f)),
                    any::<String>().prop_map(Value::from),
                    Just(json!([1, "a"])),
                    Just(json!({"nested": {}})),
                ],
            ),
            0..6,
        ),
    ) {
        let mut v = json!({"type": ty});
        for (k, val) in fields {
            v[k] = val;
        }
        assert_answered(&v.to_string())?;
    }

    /// Valid frames broken in one place still get an answer.
    #[test]
    fn mutated_frames_are_answered(
        (_, v) in client_frame(),
        ms in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut s = v.to_string();
        for m in &ms {
            s = mutate(&s, m);
        }
        assert_answered(&s)?;
    }

    /// Everything a client may send decodes to exactly the frame it means,
    /// text byte-identical.
    #[test]
    fn valid_client_frames_round_trip((frame, v) in client_frame()) {
        let decoded = decode_client(&v.to_string());
        prop_assert_eq!(decoded, Ok(frame));
    }

    /// A message frame encoded once by the owner decodes to the same
    /// message (what history and live delivery both rely on).
    #[test]
    fn message_frames_round_trip(
        r in room(),
        seq in any::<u64>(),
        u in user(),
        text in text(),
        client_id in client_id(),
        ts in any::<i64>(),
        id in "[0-9a-f-]{1,40}",
    ) {
        let frame = ServerFrame::Message(Message {
            room: RoomId::new(&r).expect("valid room"),
            seq,
            id,
            user: u,
            text,
            ts,
            client_id,
        });
        let bytes = frame.to_bytes();
        prop_assert!(!bytes.contains(&b'\n'), "a frame must not hold a raw newline (bus framing)");
        let back: ServerFrame = serde_json::from_slice(&bytes).expect("own frames decode");
        prop_assert_eq!(back, frame);
    }
}
