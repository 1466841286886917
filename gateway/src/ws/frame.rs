//! RFC 6455 frame headers: parsing what clients send (masked, checked
//! against every rule the RFC makes a protocol error) and writing what the
//! server sends (unmasked). Pure functions over byte slices, so every rule
//! is unit- and property-tested without a socket.

/// Frame opcodes (RFC 6455 §5.2); every other value is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// The next fragment of a fragmented message.
    Continuation,
    /// A UTF-8 text message (or its first fragment).
    Text,
    /// A binary message (or its first fragment).
    Binary,
    /// Close handshake.
    Close,
    /// Ping: the peer answers with a pong carrying the same payload.
    Ping,
    /// Pong.
    Pong,
}

impl OpCode {
    fn from_bits(b: u8) -> Option<Self> {
        Some(match b {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Control frames: close, ping, pong.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Last fragment of its message.
    pub fin: bool,
    /// RSV1: the message is compressed (permessage-deflate).
    pub compressed: bool,
    /// What the frame carries.
    pub opcode: OpCode,
    /// The masking key (clients must mask every frame).
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub len: u64,
    /// Header length in bytes (2 to 14).
    pub header_len: usize,
}

/// A header that breaks RFC 6455: the connection fails with 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// RSV2 or RSV3 set, or RSV1 without a negotiated extension.
    #[error("reserved bits set")]
    ReservedBits,
    /// An opcode RFC 6455 reserves.
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A client frame without a mask.
    #[error("client frame not masked")]
    Unmasked,
    /// A fragmented control frame, or one longer than 125 bytes.
    #[error("malformed control frame")]
    BadControl,
    /// A 64-bit length with its most significant bit set.
    #[error("frame length out of range")]
    BadLength,
    /// RSV1 on a continuation or control frame.
    #[error("compression bit on a frame that cannot carry it")]
    MisplacedCompression,
}

/// Parses the header at the start of `buf`, a client's frame. `deflate`
/// says whether permessage-deflate was negotiated (RSV1 allowed on the
/// first frame of a data message). `Ok(None)` means more bytes are needed.
pub fn parse_client(buf: &[u8], deflate: bool) -> Result<Option<Header>, ProtocolError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    let rsv1 = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (rsv1 && !deflate) {
        return Err(ProtocolError::ReservedBits);
    }
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(ProtocolError::ReservedOpcode(b0 & 0x0F))?;
    if rsv1 && (opcode.is_control() || opcode == OpCode::Continuation) {
        return Err(ProtocolError::MisplacedCompression);
    }
    if b1 & 0x80 == 0 {
        return Err(ProtocolError::Unmasked);
    }
    let short = b1 & 0x7F;
    let (len, mut at) = match short {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            let len = u64::from_be_bytes(a);
            if len >> 63 != 0 {
                return Err(ProtocolError::BadLength);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(ProtocolError::BadControl);
    }
    let Some(m) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    let mask = [m[0], m[1], m[2], m[3]];
    at += 4;
    Ok(Some(Header {
        fin,
        compressed: rsv1,
        opcode,
        mask: Some(mask),
        len,
        header_len: at,
    }))
}

/// Unmasks (or masks: the operation is its own inverse) `payload` with
/// `key`.
pub fn apply_mask(payload: &mut [u8], key: [u8; 4]) {
    let word = u32::from_ne_bytes(key);
    let mut chunks = payload.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i];
    }
}

/// The longest header of an unmasked (server) frame: 2 bytes and a 64-bit
/// length.
pub const MAX_SERVER_HEADER: usize = 10;

/// Appends a whole, unfragmented frame header for a payload of `len`
/// bytes to `out`; with `mask`, a client frame (tests and tools).
pub fn write_header(
    out: &mut Vec<u8>,
    opcode: OpCode,
    compressed: bool,
    len: usize,
    mask: Option<[u8; 4]>,
) {
    let b0 = 0x80 | if compressed { 0x40 } else { 0 } | opcode.bits();
    let m = if mask.is_some() { 0x80 } else { 0 };
    out.push(b0);
    match len {
        0..=125 => out.push(m | len as u8),
        126..=0xFFFF => {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(m | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(opcode: OpCode, compressed: bool, payload: &[u8]) -> Vec<u8> {
        let key = [1, 2, 3, 4];
        let mut out = Vec::new();
        write_header(&mut out, opcode, compressed, payload.len(), Some(key));
        let mut p = payload.to_vec();
        apply_mask(&mut p, key);
        out.extend_from_slice(&p);
        out
    }

    #[test]
    fn round_trips_every_length_class() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 100_000] {
            let bytes = client(OpCode::Text, false, &vec![b'x'; len]);
            let h = parse_client(&bytes, false).unwrap().unwrap();
            assert_eq!(h.len, len as u64);
            assert_eq!(h.opcode, OpCode::Text);
            assert!(h.fin);
            let mut body = bytes[h.header_len..].to_vec();
            apply_mask(&mut body, h.mask.unwrap());
            assert!(body.iter().all(|b| *b == b'x'));
        }
    }

    #[test]
    fn needs_more_bytes_for_a_partial_header() {
        let bytes = client(OpCode::Text, false, &[b'x'; 300]);
        for cut in 0..8 {
            assert_eq!(parse_client(&bytes[..cut], false), Ok(None), "cut {cut}");
        }
        assert!(parse_client(&bytes[..8], false).unwrap().is_some());
    }

    #[test]
    fn refuses_what_the_rfc_calls_a_protocol_error() {
        // Unmasked.
        let mut out = Vec::new();
        write_header(&mut out, OpCode::Text, false, 1, None);
        assert_eq!(parse_client(&out, false), Err(ProtocolError::Unmasked));
        // Reserved opcodes.
        for op in [0x3u8, 0x7, 0xB, 0xF] {
            let b = [0x80 | op, 0x80, 0, 0, 0, 0];
            assert_eq!(
                parse_client(&b, false),
                Err(ProtocolError::ReservedOpcode(op))
            );
        }
        // RSV2/RSV3, and RSV1 without the extension.
        assert_eq!(
            parse_client(&[0x81 | 0x20, 0x80, 0, 0, 0, 0], true),
            Err(ProtocolError::ReservedBits)
        );
        let compressed = client(OpCode::Text, true, b"x");
        assert_eq!(
            parse_client(&compressed, false),
            Err(ProtocolError::ReservedBits)
        );
        assert!(parse_client(&compressed, true).unwrap().unwrap().compressed);
        // RSV1 on a ping.
        let ping = client(OpCode::Ping, true, b"x");
        assert_eq!(
            parse_client(&ping, true),
            Err(ProtocolError::MisplacedCompression)
        );
        // Fragmented or long control frames.
        assert_eq!(
            parse_client(&[0x09, 0x80, 0, 0, 0, 0], false),
            Err(ProtocolError::BadControl)
        );
        let long = client(OpCode::Ping, false, &[0; 126]);
        assert_eq!(parse_client(&long, false), Err(ProtocolError::BadControl));
        // 64-bit length with the top bit set.
        let mut b = vec![0x82, 0xFF];
        b.extend_from_slice(&u64::MAX.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        assert_eq!(parse_client(&b, false), Err(ProtocolError::BadLength));
    }

    #[test]
    fn masking_is_its_own_inverse_at_any_length() {
        for len in 0..19 {
            let orig: Vec<u8> = (0..len as u8).collect();
            let mut p = orig.clone();
            apply_mask(&mut p, [9, 8, 7, 6]);
            if len > 0 {
                assert_ne!(p, orig);
            }
            apply_mask(&mut p, [9, 8, 7, 6]);
            assert_eq!(p, orig);
        }
    }
}
