//! The agent's accepted connections, bounded: at most `max_connections` at once, and each closed
//! once the peer has sent nothing for `idle_timeout`.
//!
//! Invariants:
//! - A connection over the limit is closed at once, before TLS or HTTP/2 see a byte, and the
//!   refusal is logged rate-limited with the peer address.
//! - A connection's slot is held by the connection itself and freed when it is dropped, whoever
//!   drops it (a finished call, a failed TLS handshake, the idle timeout).
//! - Idle means no byte received. A live coordinator always sends within the idle timeout: HTTP/2
//!   window updates while it downloads, data while it uploads, keep-alive pings (every 20 s)
//!   otherwise.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::auth::RateLimitedLog;
use crate::config::ServerLimits;

/// One accepted connection, holding its slot and its idle deadline.
#[derive(Debug)]
pub struct Connection {
    inner: TcpStream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + this.idle;
                    this.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for longer than the agent's idle-timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other @ Poll::Ready(Err(_)) => other,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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

/// The stream of admitted connections tonic serves; the accept loop runs in its own task and
/// stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limits: ServerLimits,
) -> impl Stream<Item = io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(1);
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    tokio::spawn(async move {
        let refused = RateLimitedLog::new(Duration::from_secs(10));
        loop {
            let (stream, peer): (TcpStream, SocketAddr) = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(suppressed) = refused.allow() {
                    tracing::warn!(
                        %peer,
                        max = limits.max_connections,
                        suppressed,
                        "connection refused: the agent already serves its max-connections"
                    );
                }
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = Connection {
                inner: stream,
                idle: limits.idle_timeout,
                deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                _slot: slot,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
