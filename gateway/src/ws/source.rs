//! Where a [`super::Reader`] gets its bytes. A TCP socket is read by
//! readiness: the reader waits for data with no buffer at all and
//! allocates one only when there is something to read, so an idle
//! connection (the common case, by far) holds no read buffer. Any other
//! stream (tests, a non-TCP upgrade) is read through `AsyncRead`.

use std::future::Future;
use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::tcp::OwnedReadHalf;

/// A byte source for the WebSocket reader.
pub trait Source: Unpin + Send {
    /// Reads at least one byte into `buf` (reserving `want` bytes first,
    /// once data is ready); 0 means end of stream. Cancel-safe: bytes are
    /// only ever appended to `buf`.
    fn read_into(
        &mut self,
        buf: &mut BytesMut,
        want: usize,
    ) -> impl Future<Output = io::Result<usize>> + Send;
}

impl Source for OwnedReadHalf {
    async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        self.readable().await?;
        buf.reserve(want);
        // Through `AsyncRead`, not `try_read_buf`: tokio's read forgets the
        // socket's readiness when a read comes back short of the buffer (the
        // kernel had no more), so the next call waits for epoll instead of
        // making a read that can only fail with `WouldBlock`. That was one
        // wasted syscall per frame received. Readiness is rarely spurious;
        // when it is, this waits with the buffer reserved.
        self.read_buf(buf).await
    }
}

/// Any `AsyncRead`, read with a buffer reserved up front.
#[derive(Debug)]
pub struct AnyIo<R>(pub R);

impl<R: AsyncRead + Unpin + Send> Source for AnyIo<R> {
    async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        buf.reserve(want);
        self.0.read_buf(buf).await
    }
}
