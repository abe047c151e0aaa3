//! Serving a hyper 1 handler on a Pingora listener, so the admin API and the event hub take
//! part in Pingora's listeners, graceful shutdown and upgrades.

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// Response body type of handlers.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Time a client has to send a complete request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP request handler.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Answer one request; `shutdown` flips when the gateway stops (for long-lived responses).
    async fn handle(&self, req: Request<Incoming>, shutdown: &ShutdownWatch) -> Response<Body>;

    /// Whether a connection's first request head is read before hyper sees it and offered to
    /// [`Handler::claims`] (for long-lived responses that are cheaper without hyper).
    fn peeks(&self) -> bool {
        false
    }

    /// Whether this handler serves the connection of `head` itself, with [`Handler::serve`].
    fn claims(&self, _head: &Request<()>) -> bool {
        false
    }

    /// Serve a claimed connection whose request head `head` was already read from `stream`.
    async fn serve(&self, _head: Request<()>, _stream: Stream, _shutdown: &ShutdownWatch) {}
}

/// Longest time one write to a claimed connection may take.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// `write` under [`WRITE_TIMEOUT`], with the timeout built only when the write does not finish
/// on its first poll. A write to a client keeping up finishes at once; building and dropping
/// a `Sleep` for each one (a clock read, a handle clone, the timer driver's lock on drop) was
/// about 1% of the hub's CPU at 100k deliveries/s (`perf`).
pub async fn timed_write<F: std::future::Future>(
    write: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut write = std::pin::pin!(write);
    // Polled once with a no-op waker; a pending write is polled again at once below, with the
    // task's own waker, so no wake-up is lost.
    if let Some(done) = futures_util::FutureExt::now_or_never(write.as_mut()) {
        return Ok(done);
    }
    tokio::time::timeout(WRITE_TIMEOUT, write).await
}

/// A stream that first replays bytes already read from it.
struct Rewind {
    prefix: Bytes,
    inner: Stream,
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Read a request head; `Ok(None)` when the bytes do not parse as one (hyper answers those).
async fn read_head(
    stream: &mut Stream,
    max: usize,
) -> std::io::Result<(bytes::BytesMut, Option<Request<()>>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(2048);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok((buf, None));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let mut b = Request::builder()
                    .method(req.method.unwrap_or("GET"))
                    .uri(req.path.unwrap_or("/"));
                for h in req.headers.iter() {
                    b = b.header(h.name, h.value);
                }
                Some(b.body(()).ok())
            }
            Ok(httparse::Status::Partial) if buf.len() < max => None,
            _ => Some(None),
        };
        if let Some(head) = parsed {
            return Ok((buf, head));
        }
    }
}

/// The credential of `Authorization: Bearer ...`, if any.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A Pingora [`ServerApp`] running a [`Handler`] with hyper's HTTP/1 server.
pub struct HyperApp<H> {
    handler: Arc<H>,
    max_header_bytes: usize,
    connections: Arc<tokio::sync::Semaphore>,
}

impl<H: Handler> HyperApp<H> {
    /// Wrap a handler; `max_header_bytes` bounds the request head, `max_connections` the
    /// connections served at once (more are closed at once).
    pub fn new(handler: Arc<H>, max_header_bytes: usize, max_connections: usize) -> Self {
        Self {
            handler,
            max_header_bytes,
            connections: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        }
    }
}

#[async_trait]
impl<H: Handler> ServerApp for HyperApp<H> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Ok(_permit) = self.connections.clone().try_acquire_owned() else {
            tracing::warn!("connection limit reached: closing a new connection");
            return None;
        };
        let mut session = session;
        let mut prefix = Bytes::new();
        if self.handler.peeks() {
            let max = self.max_header_bytes.max(8192);
            let head = tokio::time::timeout(HEADER_READ_TIMEOUT, read_head(&mut session, max));
            let (buf, head) = match head.await {
                Ok(Ok(x)) => x,
                _ => return None,
            };
            match head {
                Some(head) if self.handler.claims(&head) => {
                    drop(buf);
                    self.handler.serve(head, session, shutdown).await;
                    return None;
                }
                _ => prefix = buf.freeze(),
            }
        }
        let session = Rewind {
            prefix,
            inner: session,
        };
        let handler = self.handler.clone();
        let watch = shutdown.clone();
        let service = hyper::service::service_fn(move |req| {
            let handler = handler.clone();
            let watch = watch.clone();
            async move { Ok::<_, Infallible>(handler.handle(req, &watch).await) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(self.max_header_bytes.max(8192));
        let conn = builder
            .serve_connection(TokioIo::new(session), service)
            .with_upgrades();
        tokio::pin!(conn);
        let mut shutdown = shutdown.clone();
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "http connection ended with an error");
                }
            }
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "http connection ended with an error during shutdown");
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn timed_write_finishes_at_once_wakes_later_and_times_out() {
        // Ready on the first poll: no time passes.
        let t0 = tokio::time::Instant::now();
        assert_eq!(timed_write(async { 7 }).await, Ok(7));
        assert_eq!(t0.elapsed(), Duration::ZERO);

        // Pending first, ready when another task sends: the wake-up reaches it.
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = tx.send(5);
        });
        assert_eq!(timed_write(rx).await.map(Result::ok), Ok(Some(5)));
        assert_eq!(t0.elapsed(), Duration::from_secs(1));

        // Never ready: cut at the write timeout.
        let t1 = tokio::time::Instant::now();
        assert!(timed_write(std::future::pending::<()>()).await.is_err());
        assert_eq!(t1.elapsed(), WRITE_TIMEOUT);
    }
}
