//! A cap on the bytes a connection may read, armed on an agent socket until its
//! handshake is done. The WebSocket layer buffers a whole message before anyone can
//! look at it (up to the 8 MiB an authenticated agent may send), so a limit on
//! messages alone let every unauthenticated socket make the controller buffer 8 MiB;
//! under the cap the socket itself stops yielding bytes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const UNCAPPED: usize = usize::MAX;

/// The bytes a connection may still read; shared by its stream and its request handlers.
#[derive(Debug, Clone)]
pub struct ReadCap(Arc<AtomicUsize>);

impl Default for ReadCap {
    fn default() -> Self {
        ReadCap(Arc::new(AtomicUsize::new(UNCAPPED)))
    }
}

impl ReadCap {
    /// From now on, at most `bytes` more are read.
    pub fn arm(&self, bytes: usize) {
        self.0.store(bytes.min(UNCAPPED - 1), Ordering::Relaxed);
    }

    pub fn lift(&self) {
        self.0.store(UNCAPPED, Ordering::Relaxed);
    }

    fn consume(&self, n: usize) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
            (left != UNCAPPED).then(|| left.saturating_sub(n))
        });
    }
}

/// A stream whose reads obey a [`ReadCap`].
#[derive(Debug)]
pub struct Capped<S> {
    pub inner: S,
    pub cap: ReadCap,
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let left = this.cap.0.load(Ordering::Relaxed);
        if left == UNCAPPED {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if left == 0 {
            return Poll::Ready(Err(io::Error::other(format!(
                "the peer sent more than {} bytes before its handshake: this exceeds the limit",
                thymis_proto::MAX_HANDSHAKE_BYTES
            ))));
        }
        let want = buf.remaining().min(left);
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(want));
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.advance(n);
        this.cap.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_armed_cap_stops_reads_and_a_lifted_one_lets_them_through() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let cap = ReadCap::default();
        let mut capped = Capped { inner: rx, cap: cap.clone() };
        tx.write_all(&[7u8; 100_000]).await.expect("write");
        cap.arm(1000);
        let mut got = vec![0u8; 100_000];
        let mut read = 0;
        let err = loop {
            match capped.read(&mut got[read..]).await {
                Ok(n) => read += n,
                Err(e) => break e,
            }
        };
        assert_eq!(read, 1000, "read past the cap");
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        cap.lift();
        capped.read_exact(&mut got[read..]).await.expect("uncapped");
    }
}
