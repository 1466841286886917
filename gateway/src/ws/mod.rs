//! The gateway's own WebSocket server side (RFC 6455 with RFC 7692
//! permessage-deflate), in place of axum's tungstenite-based one.
//!
//! Why our own: the fan-out sends one prepared frame to thousands of
//! sockets, and with compression that frame must be compressed once, not
//! once per recipient. That needs a writer that takes already-compressed
//! bytes, which neither axum's WebSocket (no permessage-deflate at all) nor
//! the crates that add it (they compress inside each connection, with a
//! compressor per socket) offer. The server side of RFC 6455 is small and
//! fully specified; owning it also lets us refuse an oversize frame from
//! its header (1009 before reading it), fail protocol violations with 1002,
//! and keep an idle connection to a small read buffer.
//!
//! - [`frame`]: header parsing and writing, masking.
//! - [`deflate`]: offer negotiation, compress and bounded inflate.
//! - [`upgrade`]: the HTTP/1.1 upgrade handshake as an axum extractor.
//! - [`Reader`] and [`Writer`]: the two halves of an upgraded socket.

pub mod deflate;
pub mod frame;
pub mod source;
pub mod upgrade;

use std::io;
use std::sync::{Arc, OnceLock};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use chat_protocol::frames::close;
use frame::{OpCode, ProtocolError};

pub use source::{AnyIo, Source};
pub use upgrade::{Socket, WsUpgrade};

/// First read buffer of a connection: client frames are small (a `send` of
/// 100 bytes is about 150 on the wire). A larger frame grows the buffer of
/// its own connection, which shrinks back once it is read.
const READ_BUFFER: usize = 1024;
/// A write buffer larger than this is dropped once flushed.
const KEEP_WRITE_BUFFER: usize = 64 * 1024;
/// A write buffer larger than this is dropped when the queue runs dry.
const IDLE_WRITE_BUFFER: usize = 2 * 1024;

/// A text frame ready to send: the JSON, and (made at most once, by the
/// first writer that wants it) its permessage-deflate form, shared by every
/// connection it goes to. Cloning is one reference count.
#[derive(Debug, Clone)]
pub struct Payload(Arc<PayloadInner>);

#[derive(Debug)]
struct PayloadInner {
    text: Bytes,
    deflated: OnceLock<Option<Bytes>>,
}

impl Payload {
    /// A payload of `text`, or `None` when it is not UTF-8 (a text frame
    /// must be).
    pub fn from_utf8(text: Bytes) -> Option<Self> {
        std::str::from_utf8(&text).ok()?;
        Some(Self::checked(text))
    }

    /// A payload of a string.
    pub fn from_string(text: String) -> Self {
        Self::checked(Bytes::from(text))
    }

    /// A payload of a constant.
    pub fn from_static(text: &'static str) -> Self {
        Self::checked(Bytes::from_static(text.as_bytes()))
    }

    fn checked(text: Bytes) -> Self {
        Self(Arc::new(PayloadInner {
            text,
            deflated: OnceLock::new(),
        }))
    }

    /// The frame's JSON.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0.text
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.text.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.text.is_empty()
    }

    /// The compressed form, made on first use; `None` when compressing does
    /// not make it smaller.
    pub fn deflated(&self) -> Option<&Bytes> {
        self.0
            .deflated
            .get_or_init(|| {
                crate::metrics::METRICS.compressions.inc();
                deflate::compress(&self.0.text).map(Bytes::from)
            })
            .as_ref()
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.0.text == other.0.text
    }
}

/// A message read from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (UTF-8 checked, inflated when it was compressed).
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping; the session queues the pong.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// The client's close frame, with its code when it gave one.
    Close(Option<u16>),
}

/// Why reading from a client failed. Every variant but [`ReadError::Io`]
/// closes the connection with the code of [`ReadError::close_code`].
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A frame or message over the limit (1009), seen from its header or
    /// while inflating.
    #[error("message over the frame limit")]
    TooBig,
    /// A text message that is not UTF-8 (1007).
    #[error("text message is not UTF-8")]
    InvalidUtf8,
    /// A violation of RFC 6455 or 7692 (1002).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl ReadError {
    /// The close code the client is told, if the socket still works.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            Self::TooBig => Some(close::TOO_BIG),
            Self::InvalidUtf8 => Some(close::INVALID_UTF8),
            Self::Protocol(_) => Some(close::PROTOCOL_ERROR),
            Self::Io(_) => None,
        }
    }
}

impl From<ProtocolError> for ReadError {
    fn from(e: ProtocolError) -> Self {
        Self::Protocol(match e {
            ProtocolError::ReservedBits => "reserved bits set",
            ProtocolError::ReservedOpcode(_) => "reserved opcode",
            ProtocolError::Unmasked => "client frame not masked",
            ProtocolError::BadControl => "malformed control frame",
            ProtocolError::BadLength => "frame length out of range",
            ProtocolError::MisplacedCompression => "compression bit misplaced",
        })
    }
}

/// A data message being assembled from fragments.
#[derive(Debug)]
struct Partial {
    text: bool,
    compressed: bool,
    data: Vec<u8>,
}

/// The read half of a client socket: frames in, whole messages out.
/// Cancel-safe: every byte read stays in the buffer until its frame is
/// complete, so dropping a pending [`Reader::next`] loses nothing.
#[derive(Debug)]
pub struct Reader<R> {
    io: R,
    buf: BytesMut,
    deflate: bool,
    max: usize,
    partial: Option<Partial>,
    /// Bytes the next frame needs before it can be parsed further.
    want: usize,
}

impl<R: Source> Reader<R> {
    /// Reads frames from `io`, after `prefix` (bytes read with the
    /// handshake); `deflate` is whether permessage-deflate was negotiated;
    /// messages over `max` bytes (wire or inflated) fail with
    /// [`ReadError::TooBig`].
    pub fn new(io: R, prefix: Bytes, deflate: bool, max: usize) -> Self {
        Self {
            io,
            buf: BytesMut::from(&prefix[..]),
            deflate,
            max,
            partial: None,
            want: 2,
        }
    }

    /// The next message; `None` once the client closed its socket.
    pub async fn next(&mut self) -> Option<Result<Message, ReadError>> {
        loop {
            match self.parse() {
                Ok(Some(m)) => return Some(Ok(m)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if self.buf.is_empty() {
                // Between frames an idle connection holds no buffer: a
                // socket source allocates only once data is there to read.
                self.buf = BytesMut::new();
            }
            let need = self.want.saturating_sub(self.buf.len()).max(READ_BUFFER);
            match self.io.read_into(&mut self.buf, need).await {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(e.into())),
            }
        }
    }

    /// Reads and discards what the client still sends, until it closes its
    /// socket or `deadline` passes. Closing a socket with unread bytes makes
    /// the kernel answer with a reset, which can destroy the close frame
    /// before the client reads it; draining first lets it see why it was
    /// closed. Nothing is buffered past one read.
    pub async fn drain(&mut self, deadline: tokio::time::Instant) {
        loop {
            self.buf.clear();
            match tokio::time::timeout_at(deadline, self.io.read_into(&mut self.buf, 512)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
    }

    /// Takes whole frames off the buffer until a message is complete or the
    /// buffer holds only part of a frame.
    fn parse(&mut self) -> Result<Option<Message>, ReadError> {
        loop {
            let Some(h) = frame::parse_client(&self.buf, self.deflate)? else {
                self.want = 14;
                return Ok(None);
            };
            if !h.opcode.is_control() {
                let so_far = self.partial.as_ref().map_or(0, |p| p.data.len()) as u64;
                if so_far + h.len > self.max as u64 {
                    return Err(ReadError::TooBig);
                }
            }
            let total = h.header_len + h.len as usize;
            if self.buf.len() < total {
                self.want = total;
                return Ok(None);
            }
            let mut body = self.buf.split_to(total);
            body.advance(h.header_len);
            if let Some(key) = h.mask {
                frame::apply_mask(&mut body, key);
            }
            match h.opcode {
                OpCode::Ping => return Ok(Some(Message::Ping(body.freeze()))),
                OpCode::Pong => return Ok(Some(Message::Pong)),
                OpCode::Close => return close_frame(&body).map(|c| Some(Message::Close(c))),
                OpCode::Text | OpCode::Binary => {
                    if self.partial.is_some() {
                        return Err(ReadError::Protocol("new message inside a fragmented one"));
                    }
                    let text = h.opcode == OpCode::Text;
                    if h.fin {
                        return self.finish(text, h.compressed, body.to_vec()).map(Some);
                    }
                    self.partial = Some(Partial {
                        text,
                        compressed: h.compressed,
                        data: body.to_vec(),
                    });
                }
                OpCode::Continuation => {
                    let Some(p) = self.partial.as_mut() else {
                        return Err(ReadError::Protocol("continuation without a message"));
                    };
                    p.data.extend_from_slice(&body);
                    if h.fin {
                        let p = self.partial.take().expect("checked above");
                        return self.finish(p.text, p.compressed, p.data).map(Some);
                    }
                }
            }
        }
    }

    fn finish(&self, text: bool, compressed: bool, data: Vec<u8>) -> Result<Message, ReadError> {
        let data = if compressed {
            deflate::inflate(&data, self.max).map_err(|e| match e {
                deflate::InflateError::TooBig => ReadError::TooBig,
                deflate::InflateError::Corrupt => ReadError::Protocol("invalid compressed data"),
            })?
        } else {
            data
        };
        if text {
            String::from_utf8(data)
                .map(Message::Text)
                .map_err(|_| ReadError::InvalidUtf8)
        } else {
            Ok(Message::Binary(data))
        }
    }
}

/// A close frame's code, checked as RFC 6455 §7.4 says.
fn close_frame(body: &[u8]) -> Result<Option<u16>, ReadError> {
    match body {
        [] => Ok(None),
        [_] => Err(ReadError::Protocol("close frame of one byte")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            // 1012-1014 are registered with IANA (restart, try again
            // later, bad gateway) and sent by real proxies.
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(ReadError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(ReadError::InvalidUtf8);
            }
            Ok(Some(code))
        }
    }
}

/// A frame for the writer. Kept to 16 bytes: every connection's queue
/// holds a block of these even when idle (a rare pong's payload is boxed).
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// A text frame.
    Text(Payload),
    /// A ping with no payload.
    Ping,
    /// The answer to a client's ping.
    Pong(Box<Bytes>),
    /// The close frame with this code (and its standard reason).
    Close(u16),
}

/// The reason text sent with a close code.
fn close_reason(code: u16) -> &'static str {
    match code {
        close::SLOW_CONSUMER => "slow consumer",
        close::RESTART => "server restarting; reconnect and resume with since",
        close::PING_TIMEOUT => "ping timeout",
        close::TOO_BIG => "frame too big",
        close::INVALID_UTF8 => "invalid UTF-8",
        close::PROTOCOL_ERROR => "protocol error",
        close::TOKEN_EXPIRED => "token expired",
        close::TOKEN_INVALID => "token no longer valid",
        close::TOO_MANY_CONNECTIONS => "too many connections from this address",
        _ => "closing",
    }
}

/// The write half of a client socket. Frames are encoded into one buffer
/// and written with one `write_all` per batch.
#[derive(Debug)]
pub struct Writer<W> {
    io: W,
    buf: Vec<u8>,
    /// Smallest text frame compressed, when the client negotiated
    /// permessage-deflate.
    compress_min: Option<usize>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    /// Writes to `io`; with `compress_min`, text frames of at least that
    /// many bytes go compressed (when that makes them smaller).
    pub fn new(io: W, compress_min: Option<usize>) -> Self {
        Self {
            io,
            buf: Vec::new(),
            compress_min,
        }
    }

    /// Encodes a frame into the batch; returns the payload bytes it puts on
    /// the wire.
    pub fn push(&mut self, frame: &Outbound) -> usize {
        let (opcode, compressed, body): (OpCode, bool, &[u8]) = match frame {
            Outbound::Text(p) => match self.compress_min {
                Some(min) if p.len() >= min => match p.deflated() {
                    Some(z) => {
                        crate::metrics::METRICS
                            .compression_saved
                            .inc_by((p.len() - z.len()) as u64);
                        (OpCode::Text, true, z)
                    }
                    None => (OpCode::Text, false, p.as_bytes()),
                },
                _ => (OpCode::Text, false, p.as_bytes()),
            },
            Outbound::Ping => (OpCode::Ping, false, &[]),
            Outbound::Pong(b) => (OpCode::Pong, false, &b[..b.len().min(125)]),
            Outbound::Close(code) => {
                let reason = close_reason(*code);
                let mut body = code.to_be_bytes().to_vec();
                body.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
                frame::write_header(&mut self.buf, OpCode::Close, false, body.len(), None);
                self.buf.extend_from_slice(&body);
                return body.len();
            }
        };
        // One reservation for header and body: pushed byte by byte into an
        // empty buffer (a new or trimmed one) they took three reallocations
        // per frame, which showed in profiles of the write path.
        self.buf.reserve(frame::MAX_SERVER_HEADER + body.len());
        frame::write_header(&mut self.buf, opcode, compressed, body.len(), None);
        self.buf.extend_from_slice(body);
        body.len()
    }

    /// Writes the batch and flushes the socket.
    pub async fn flush(&mut self) -> io::Result<()> {
        let r = async {
            self.io.write_all(&self.buf).await?;
            self.io.flush().await
        }
        .await;
        self.buf.clear();
        if self.buf.capacity() > KEEP_WRITE_BUFFER {
            self.buf = Vec::new();
        }
        r
    }

    /// Drops a write buffer grown past [`IDLE_WRITE_BUFFER`] by a burst;
    /// called when the queue has run dry, so a connection that once got a
    /// long backlog does not keep its size while idle.
    pub fn trim(&mut self) {
        if self.buf.capacity() > IDLE_WRITE_BUFFER {
            self.buf = Vec::new();
        }
    }

    /// Shuts the socket's write side down (after the close frame).
    pub async fn shutdown(&mut self) {
        // The peer may be gone; a failed shutdown changes nothing.
        let _ = self.io.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A client frame, masked, as a browser would send it.
    fn client_frame(opcode: OpCode, fin: bool, compressed: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let key = [0x37, 0xfa, 0x21, 0x3d];
        frame::write_header(&mut out, opcode, compressed, payload.len(), Some(key));
        if !fin {
            out[0] &= 0x7F;
        }
        let mut p = payload.to_vec();
        frame::apply_mask(&mut p, key);
        out.extend_from_slice(&p);
        out
    }

    async fn read_all(bytes: Vec<u8>, deflate: bool, max: usize) -> Vec<Result<Message, String>> {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        a.write_all(&bytes).await.unwrap();
        drop(a);
        let mut r = Reader::new(AnyIo(b), Bytes::new(), deflate, max);
        let mut out = Vec::new();
        while let Some(m) = r.next().await {
            let stop = m.is_err();
            out.push(m.map_err(|e| format!("{:?}", e.close_code())));
            if stop {
                break;
            }
        }
        out
    }

    #[tokio::test]
    async fn reads_text_fragments_and_control_frames_between_them() {
        let mut bytes = client_frame(OpCode::Text, false, false, b"hel");
        bytes.extend(client_frame(OpCode::Ping, true, false, b"p"));
        bytes.extend(client_frame(
            OpCode::Continuation,
            true,
            false,
            "lo ✓".as_bytes(),
        ));
        bytes.extend(client_frame(
            OpCode::Close,
            true,
            false,
            &1000u16.to_be_bytes(),
        ));
        let got = read_all(bytes, false, 1024).await;
        assert_eq!(
            got,
            vec![
                Ok(Message::Ping(Bytes::from_static(b"p"))),
                Ok(Message::Text("hello ✓".into())),
                Ok(Message::Close(Some(1000))),
            ]
        );
        // Registered codes a proxy may send.
        for code in [1012u16, 1013, 1014, 3000, 4999] {
            let frame = client_frame(OpCode::Close, true, false, &code.to_be_bytes());
            let got = read_all(frame, false, 64).await;
            assert_eq!(got, vec![Ok(Message::Close(Some(code)))]);
        }
    }

    #[tokio::test]
    async fn refuses_an_oversize_frame_from_its_header() {
        // Only the header is sent: the refusal cannot have waited for the body.
        let mut bytes = Vec::new();
        frame::write_header(&mut bytes, OpCode::Text, false, 1 << 20, Some([1, 2, 3, 4]));
        let got = read_all(bytes, false, 64 << 10).await;
        assert_eq!(got, vec![Err("Some(1009)".into())]);
        // Fragments adding up past the limit.
        let mut bytes = client_frame(OpCode::Text, false, false, &[b'a'; 600]);
        bytes.extend(client_frame(
            OpCode::Continuation,
            true,
            false,
            &[b'a'; 600],
        ));
        assert_eq!(
            read_all(bytes, false, 1000).await,
            vec![Err("Some(1009)".into())]
        );
    }

    #[tokio::test]
    async fn bad_utf8_is_1007_and_protocol_errors_are_1002() {
        let got = read_all(
            client_frame(OpCode::Text, true, false, &[0xff, 0xfe]),
            false,
            100,
        )
        .await;
        assert_eq!(got, vec![Err("Some(1007)".into())]);
        // UTF-8 split across fragments is fine.
        let euro = "€".as_bytes();
        let mut bytes = client_frame(OpCode::Text, false, false, &euro[..1]);
        bytes.extend(client_frame(OpCode::Continuation, true, false, &euro[1..]));
        assert_eq!(
            read_all(bytes, false, 100).await,
            vec![Ok(Message::Text("€".into()))]
        );
        for bad in [
            client_frame(OpCode::Continuation, true, false, b"x"),
            {
                let mut b = client_frame(OpCode::Text, false, false, b"x");
                b.extend(client_frame(OpCode::Text, true, false, b"y"));
                b
            },
            client_frame(OpCode::Close, true, false, &[3]),
            client_frame(OpCode::Close, true, false, &1005u16.to_be_bytes()),
            client_frame(OpCode::Close, true, false, &1015u16.to_be_bytes()),
            client_frame(OpCode::Text, true, true, b"x"), // RSV1 without deflate
        ] {
            assert_eq!(
                read_all(bad, false, 100).await,
                vec![Err("Some(1002)".into())]
            );
        }
    }

    #[tokio::test]
    async fn inflates_compressed_messages_within_the_limit() {
        let text = "ünïcode and repetition ".repeat(100);
        let z = deflate::compress(text.as_bytes()).unwrap();
        let got = read_all(client_frame(OpCode::Text, true, true, &z), true, 64 << 10).await;
        assert_eq!(got, vec![Ok(Message::Text(text.clone()))]);
        // The same message inflating past the limit.
        let got = read_all(client_frame(OpCode::Text, true, true, &z), true, 1000).await;
        assert_eq!(got, vec![Err("Some(1009)".into())]);
        // Compressed, fragmented: RSV1 on the first fragment only.
        let (a, b) = z.split_at(z.len() / 2);
        let mut bytes = client_frame(OpCode::Text, false, true, a);
        bytes.extend(client_frame(OpCode::Continuation, true, false, b));
        assert_eq!(
            read_all(bytes, true, 64 << 10).await,
            vec![Ok(Message::Text(text))]
        );
    }

    #[tokio::test]
    async fn writes_plain_and_compressed_frames_a_client_can_read() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Writer::new(a, Some(100));
        let big = Payload::from_string("{\"text\":\"".to_string() + &"abc".repeat(200) + "\"}");
        let small = Payload::from_static("{\"type\":\"pong\"}");
        w.push(&Outbound::Text(small.clone()));
        w.push(&Outbound::Text(big.clone()));
        w.push(&Outbound::Close(1000));
        w.flush().await.unwrap();
        drop(w);
        let mut wire = Vec::new();
        b.read_to_end(&mut wire).await.unwrap();
        // Frame 1: plain text.
        assert_eq!(wire[0], 0x81);
        assert_eq!(wire[1] as usize, small.len());
        let rest = &wire[2 + small.len()..];
        // Frame 2: FIN + RSV1 + text, shorter than the original.
        assert_eq!(rest[0], 0xC1);
        let len = match rest[1] {
            126 => u16::from_be_bytes([rest[2], rest[3]]) as usize,
            n => n as usize,
        };
        let start = if rest[1] == 126 { 4 } else { 2 };
        assert!(len < big.len() / 4);
        let body = &rest[start..start + len];
        assert_eq!(deflate::inflate(body, 1 << 20).unwrap(), big.as_bytes());
        // Frame 3: close 1000 "closing".
        let close = &rest[start + len..];
        assert_eq!(&close[..4], &[0x88, 9, 0x03, 0xE8]);
        assert_eq!(&close[4..], b"closing");
    }

    #[test]
    fn an_outbound_frame_is_two_words() {
        assert_eq!(std::mem::size_of::<Outbound>(), 16);
    }

    #[test]
    fn a_payload_is_compressed_once_however_many_writers_send_it() {
        let p = Payload::from_string("x".repeat(4096));
        let first = p.deflated().unwrap().as_ptr();
        let clone = p.clone();
        assert_eq!(clone.deflated().unwrap().as_ptr(), first);
    }
}
