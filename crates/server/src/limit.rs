//! Connection accounting shared by every endpoint: one limit (`--max-connections`) on the
//! connections of all endpoints together.
//!
//! Invariant: a connection holds a [`Slot`] from accept to close, however it closes (the slot is
//! given back on drop), so the count never leaks; a connection over the limit is refused before
//! any request on it is read (RESP: an error reply; HTTP: a 503 response; gRPC: closed).

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The open connections of a server and their limit.
#[derive(Debug)]
pub(crate) struct Connections {
    open: AtomicUsize,
    max: usize,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Connections {
    /// At most `max` connections at once.
    pub(crate) fn new(max: usize) -> Arc<Connections> {
        Arc::new(Connections { open: AtomicUsize::new(0), max })
    }

    /// A slot, or `None` when `max` connections are open.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Slot> {
        let n = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        let slot = Slot(self.clone());
        (n <= self.max).then_some(slot)
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// A TCP connection that holds a [`Slot`] and, with an idle limit, fails its reads once
/// nothing was read or written for that long (so the endpoint closes it).
#[derive(Debug)]
pub(crate) struct Counted {
    inner: TcpStream,
    _slot: Slot,
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

impl Counted {
    fn active(&mut self) {
        if let Some((d, sleep)) = &mut self.idle {
            sleep.as_mut().reset(tokio::time::Instant::now() + *d);
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.active();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = match &mut self.idle {
                    Some((_, sleep)) => sleep.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection idle for too long",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A listener that admits connections up to the limit; `refusal` is written to the others
/// before they are closed.
#[derive(Debug)]
pub(crate) struct Limited {
    listener: TcpListener,
    connections: Arc<Connections>,
    refusal: &'static [u8],
    idle: Option<Duration>,
}

impl Limited {
    /// Wraps `listener`; connections idle for `idle` are closed.
    pub(crate) fn new(
        listener: TcpListener,
        connections: Arc<Connections>,
        refusal: &'static [u8],
        idle: Option<Duration>,
    ) -> Limited {
        Limited { listener, connections, refusal, idle }
    }

    /// The next admitted connection.
    pub(crate) async fn next(&mut self) -> io::Result<Counted> {
        loop {
            let (sock, _) = self.listener.accept().await?;
            let _ = sock.set_nodelay(true);
            match self.connections.admit() {
                Some(slot) => {
                    let idle = self.idle.map(|d| (d, Box::pin(tokio::time::sleep(d))));
                    return Ok(Counted { inner: sock, _slot: slot, idle });
                }
                None => {
                    let refusal = self.refusal;
                    tokio::spawn(async move {
                        let mut sock = sock;
                        let _ = sock.write_all(refusal).await;
                        let _ = sock.shutdown().await;
                    });
                }
            }
        }
    }

    /// The connections as a stream (for tonic).
    pub(crate) fn into_stream(self) -> impl futures::Stream<Item = io::Result<Counted>> {
        futures::stream::unfold(self, |mut l| async move {
            loop {
                match l.next().await {
                    Ok(c) => return Some((Ok(c), l)),
                    // A failed accept (out of descriptors, a reset) is logged, not fatal.
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            }
        })
    }
}

impl axum::serve::Listener for Limited {
    type Io = Counted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Counted, std::net::SocketAddr) {
        loop {
            match self.next().await {
                Ok(c) => {
                    let addr = c.inner.peer_addr().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
                    return (c, addr);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_given_back() {
        let c = Connections::new(2);
        let a = c.admit().unwrap();
        let b = c.admit().unwrap();
        assert!(c.admit().is_none(), "third is refused");
        assert_eq!(c.open(), 2, "a refused admission gives its place back");
        drop(a);
        let _d = c.admit().unwrap();
        drop(b);
        assert_eq!(c.open(), 1);
    }
}
