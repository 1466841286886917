//! Property tests of the WebSocket reader: arbitrary bytes never panic it,
//! and any message, split into any fragments (compressed or not, with
//! control frames between them, delivered in any TCP chunking) reads back
//! exactly. Cases per property: `PROPTEST_CASES` (default 512).

use bytes::Bytes;
use chat_gateway::ws::frame::{apply_mask, write_header, OpCode};
use chat_gateway::ws::{deflate, AnyIo, Message, Reader};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

const MAX: usize = 64 * 1024;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

/// One masked client frame; `fin` false leaves the message open.
fn frame(
    out: &mut Vec<u8>,
    opcode: OpCode,
    fin: bool,
    compressed: bool,
    payload: &[u8],
    key: [u8; 4],
) {
    let start = out.len();
    write_header(out, opcode, compressed, payload.len(), Some(key));
    if !fin {
        out[start] &= 0x7F;
    }
    let mut p = payload.to_vec();
    apply_mask(&mut p, key);
    out.extend_from_slice(&p);
}

/// Feeds `wire` to a reader in `chunks`-sized writes and collects what it
/// reads until the stream ends or an error.
fn read_all(wire: Vec<u8>, chunk: usize, deflate: bool) -> Vec<Result<Message, Option<u16>>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            for c in wire.chunks(chunk.max(1)) {
                if a.write_all(c).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Reader::new(AnyIo(b), Bytes::new(), deflate, MAX);
        let mut out = Vec::new();
        while let Some(m) = r.next().await {
            match m {
                Ok(m) => out.push(Ok(m)),
                Err(e) => {
                    out.push(Err(e.close_code()));
                    break;
                }
            }
        }
        writer.abort();
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), chunk in 1usize..64, deflate in any::<bool>()) {
        let _ = read_all(bytes, chunk, deflate);
    }

    #[test]
    fn fragmented_messages_read_back_exactly(
        texts in proptest::collection::vec("\\PC{0,300}", 1..6),
        cuts in proptest::collection::vec(0usize..400, 0..4),
        compress in any::<bool>(),
        pings in any::<bool>(),
        chunk in 1usize..97,
        key in any::<[u8; 4]>(),
    ) {
        let mut wire = Vec::new();
        for t in &texts {
            let body = if compress {
                deflate::compress(t.as_bytes()).unwrap_or_else(|| {
                    // Compressing made it bigger: send it compressed anyway
                    // (a client may), using a stored block.
                    let mut z = flate2::Compress::new(flate2::Compression::none(), false);
                    let mut out = Vec::with_capacity(t.len() + 64);
                    z.compress_vec(t.as_bytes(), &mut out, flate2::FlushCompress::Sync).unwrap();
                    out.truncate(out.len() - 4);
                    out
                })
            } else {
                t.as_bytes().to_vec()
            };
            // Split the body at the cut points (sorted, within bounds).
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
            points.sort_unstable();
            points.dedup();
            let mut pieces = Vec::new();
            let mut last = 0;
            for p in points {
                pieces.push(&body[last..p]);
                last = p;
            }
            pieces.push(&body[last..]);
            let n = pieces.len();
            for (i, piece) in pieces.into_iter().enumerate() {
                let opcode = if i == 0 { OpCode::Text } else { OpCode::Continuation };
                frame(&mut wire, opcode, i + 1 == n, compress && i == 0, piece, key);
                if pings && i + 1 < n {
                    frame(&mut wire, OpCode::Ping, true, false, b"p", key);
                }
            }
        }
        let got = read_all(wire, chunk, compress);
        let texts_back: Vec<String> = got
            .iter()
            .filter_map(|m| match m {
                Ok(Message::Text(t)) => Some(t.clone()),
                _ => None,
            })
            .collect();
        prop_assert!(got.iter().all(|m| m.is_ok()), "errors: {:?}", got);
        prop_assert_eq!(texts_back, texts);
    }
}
