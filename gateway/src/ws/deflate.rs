//! permessage-deflate (RFC 7692) without per-connection compressor state.
//!
//! The gateway accepts an offer only as `server_no_context_takeover;
//! client_no_context_takeover`: every message is compressed on its own, in
//! both directions. That costs some ratio on small messages (none are
//! compressed below `CHAT_COMPRESS_MIN_BYTES` anyway) and buys two things
//! that matter more for a chat fan-out:
//! - a message is compressed **once** and the same bytes go to every member
//!   that negotiated the extension ([`crate::ws::Payload`] caches them);
//! - an idle connection holds no zlib state at all. The compressor is per
//!   worker thread, reset before each message; inflating needs no state
//!   between messages.
//!
//! Inflating is bounded: output past the frame limit fails the read with
//! 1009, so a small compressed frame cannot expand into a large allocation.

use std::cell::RefCell;

use flate2::{Compress, Compression, FlushCompress};

/// The extension's name in `Sec-WebSocket-Extensions`.
const NAME: &str = "permessage-deflate";
/// What the gateway answers to an offer it accepts.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// The answer to an offer that asked for `server_max_window_bits=15`
/// (accepting a parameter means echoing it, RFC 7692 §7.1.2.1).
pub const RESPONSE_WINDOW_15: &str = "permessage-deflate; server_no_context_takeover; \
    client_no_context_takeover; server_max_window_bits=15";
/// Every compressed message ends with this, removed on the wire (§7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];
/// An empty final block: ends the DEFLATE stream after the tail.
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];
/// Compression level: fast. Chat JSON compresses about as well at 1 as at
/// 6 for the sizes this is used for, at a third of the CPU.
const LEVEL: u32 = 1;

/// The `Sec-WebSocket-Extensions` answer to the first offer in the client's
/// values that the gateway can accept (see the module docs), or `None`.
/// Offers asking for a server window under 15 bits are declined: the
/// compressor always uses 15, and the client then gets plain frames.
pub fn response<'a>(offers: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    offers
        .into_iter()
        .flat_map(|v| v.split(','))
        .find_map(answer)
}

/// The answer to one offer, if acceptable.
fn answer(offer: &str) -> Option<&'static str> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next().is_some_and(|n| n.eq_ignore_ascii_case(NAME)) {
        return None;
    }
    let mut seen: Vec<&str> = Vec::new();
    let mut window_15 = false;
    for p in parts {
        let (key, value) = match p.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        if seen.iter().any(|s| s.eq_ignore_ascii_case(key)) {
            return None; // RFC 7692 §7: a repeated parameter declines the offer.
        }
        seen.push(key);
        let ok = match key.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
            // The client says it can limit its window; we do not ask it to.
            "client_max_window_bits" => value.is_none_or(|v| window_bits(v).is_some()),
            "server_max_window_bits" => {
                window_15 = true;
                value.and_then(window_bits) == Some(15)
            }
            _ => false,
        };
        if !ok {
            return None;
        }
    }
    Some(if window_15 {
        RESPONSE_WINDOW_15
    } else {
        RESPONSE
    })
}

fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

thread_local! {
    static COMPRESS: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(LEVEL), false));
}

/// Compresses one message, or `None` when that would not make it smaller.
pub fn compress(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESS.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        loop {
            let consumed = c.total_in() as usize;
            c.compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
                .ok()?;
            // Done when every byte went in and the flush did not fill the
            // output (a full output may hide more of the flush).
            if c.total_in() as usize == data.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        // A sync flush ends with the empty stored block the wire omits.
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        (out.len() < data.len()).then_some(out)
    })
}

/// Why a compressed message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates past the limit (close 1009).
    #[error("message inflates past the frame limit")]
    TooBig,
    /// It is not valid DEFLATE data (close 1002).
    #[error("invalid compressed data")]
    Corrupt,
}

/// Inflates one message of at most `max` bytes once inflated.
///
/// The whole message is inflated in one call into a non-wrapping output
/// buffer, so a back-reference to before the message's first byte (a
/// client that kept its compression context despite
/// `client_no_context_takeover`) is an error, not zeros; and the stream must
/// end cleanly, so data cut off inside a block is an error too.
pub fn inflate(data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    use miniz_oxide::inflate::{decompress_to_vec_with_limit, TINFLStatus};
    if data.is_empty() {
        // No DEFLATE data at all: an empty message, as lenient peers send it.
        return Ok(Vec::new());
    }
    // The sync-flush tail the wire omits, then an empty final block (fixed
    // Huffman, end of block) so a well-formed message ends the stream.
    let mut input = Vec::with_capacity(data.len() + TAIL.len() + FINAL_BLOCK.len());
    input.extend_from_slice(data);
    input.extend_from_slice(&TAIL);
    input.extend_from_slice(&FINAL_BLOCK);
    match decompress_to_vec_with_limit(&input, max.saturating_add(1)) {
        Ok(out) if out.len() > max => Err(InflateError::TooBig),
        Ok(out) => Ok(out),
        Err(e) if e.status == TINFLStatus::HasMoreOutput => Err(InflateError::TooBig),
        Err(_) => Err(InflateError::Corrupt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts<'a>(offers: impl IntoIterator<Item = &'a str>) -> bool {
        response(offers).is_some()
    }

    #[test]
    fn accepts_the_offers_browsers_make() {
        assert!(accepts(["permessage-deflate; client_max_window_bits"]));
        assert!(accepts(["permessage-deflate"]));
        assert!(accepts([
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ]));
        assert!(accepts(["x-webkit-deflate-frame, permessage-deflate"]));
        assert!(accepts(["permessage-deflate; server_max_window_bits=15"]));
    }

    #[test]
    fn an_accepted_window_parameter_is_echoed() {
        assert_eq!(response(["permessage-deflate"]), Some(RESPONSE));
        assert_eq!(
            response(["permessage-deflate; server_max_window_bits=\"15\""]),
            Some(RESPONSE_WINDOW_15)
        );
        assert_eq!(
            response(["permessage-deflate; server_max_window_bits=9"]),
            None
        );
    }

    #[test]
    fn declines_offers_it_cannot_honour() {
        assert!(!accepts([]));
        assert!(!accepts(["x-webkit-deflate-frame"]));
        assert!(!accepts(["permessage-deflate; server_max_window_bits=10"]));
        assert!(!accepts(["permessage-deflate; server_max_window_bits"]));
        assert!(!accepts(["permessage-deflate; client_max_window_bits=99"]));
        assert!(!accepts(["permessage-deflate; unknown"]));
        assert!(!accepts([
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover"
        ]));
        // A declined first offer does not stop an acceptable second one.
        assert!(accepts([
            "permessage-deflate; server_max_window_bits=9, permessage-deflate"
        ]));
    }

    #[test]
    fn round_trips_and_only_compresses_when_it_helps() {
        let text =
            r#"{"type":"message","room":"lobby","text":"hello hello hello hello"}"#.repeat(40);
        let z = compress(text.as_bytes()).expect("repetitive text compresses");
        assert!(z.len() < text.len() / 4);
        assert_eq!(inflate(&z, 1 << 20).unwrap(), text.as_bytes());
        // Random bytes do not get smaller.
        let noise: Vec<u8> = (0..512u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        if let Some(z) = compress(&noise) {
            assert!(z.len() < noise.len());
            assert_eq!(inflate(&z, 1 << 20).unwrap(), noise);
        }
        // Empty input.
        let z = compress(b"").unwrap_or_default();
        assert_eq!(inflate(&z, 10).unwrap(), b"");
    }

    #[test]
    fn inflate_is_bounded() {
        // 10 MB of zeros compresses to about 10 KB: a decompression bomb.
        let bomb = compress(&vec![0u8; 10 << 20]).unwrap();
        assert!(bomb.len() < 64 << 10);
        assert_eq!(inflate(&bomb, 64 << 10), Err(InflateError::TooBig));
        // Exactly at the limit is fine, one byte over is not.
        let z = compress(&[b'a'; 1000]).unwrap();
        assert_eq!(inflate(&z, 1000).unwrap().len(), 1000);
        assert_eq!(inflate(&z, 999), Err(InflateError::TooBig));
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        assert_eq!(inflate(&[0xFF; 32], 1000), Err(InflateError::Corrupt));
    }

    #[test]
    fn a_reference_to_before_the_message_is_corrupt() {
        // Fixed-Huffman block: literal 'a', then a match of length 3 at
        // distance 2 (one byte before the message began), then end.
        // Bits, LSB first: BFINAL=0 BTYPE=01; 'a' = 0x61+0x30 (8 bits);
        // length 3 = code 257 (7 bits 0000001); distance 2 = code 1 (5 bits
        // 00001); end of block = 256 (7 bits 0000000).
        let block = |distance_code: u32| {
            let mut bits: Vec<u8> = vec![0, 1, 0];
            let push = |bits: &mut Vec<u8>, v: u32, n: u32| {
                for i in (0..n).rev() {
                    bits.push(((v >> i) & 1) as u8); // Huffman codes: MSB first
                }
            };
            push(&mut bits, 0x61 + 0x30, 8);
            push(&mut bits, 1, 7);
            push(&mut bits, distance_code, 5);
            push(&mut bits, 0, 7);
            // The sync flush: an empty stored block's header, then padding
            // (its LEN/NLEN are the 4 bytes the wire omits).
            bits.extend([0, 0, 0]);
            let mut bytes = vec![0u8; bits.len().div_ceil(8)];
            for (i, b) in bits.iter().enumerate() {
                bytes[i / 8] |= b << (i % 8);
            }
            bytes
        };
        // Distance 1 (code 0) is valid: "a" then "aaa".
        assert_eq!(inflate(&block(0), 1000).unwrap(), b"aaaa");
        // Distance 2 (code 1) reaches before the message.
        assert_eq!(inflate(&block(1), 1000), Err(InflateError::Corrupt));
    }

    #[test]
    fn data_cut_inside_a_block_is_corrupt() {
        // A stored block announcing 16 bytes that carries 2.
        assert_eq!(
            inflate(&[0x00, 0x10, 0x00, 0xEF, 0xFF, b'h', b'i'], 1000),
            Err(InflateError::Corrupt)
        );
        // A message that ends with its own final block is fine.
        let mut z = compress(&[b'q'; 300]).unwrap();
        z.extend_from_slice(&TAIL);
        z.extend_from_slice(&FINAL_BLOCK);
        assert_eq!(inflate(&z, 1000).unwrap(), vec![b'q'; 300]);
    }
}
