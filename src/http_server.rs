//! Serving a hyper 1 handler on a Pingora listener, so the admin API and the event hub take part in Pingora's listeners, graceful shutdown and upgrades.

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
