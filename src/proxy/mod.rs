//! The request forwarder: a Pingora [`ProxyHttp`] that routes each request by registered app
//! name to that app's load-balanced, health-checked backends, and times every request.
//!
//! Per request it reads one registry snapshot (no locks), picks a backend that is healthy and
//! not yet tried, retries connection failures (and idempotent requests that failed before any
//! response byte reached the client) on another backend, marks failing backends passively, and
//! answers every failure with a JSON body.
//!
//! Timing: each request counts into its app, its route key and the backend of each attempt
//! (atomics only, [`crate::cost::counters`]): in flight while it runs, then its total time,
//! backend time (connect start to the end of the response: the request's cost), connect and
//! first-byte times, status, bytes and retries. The backend's peak-EWMA latency, which the
//! balancer reads, is fed on the same step; a failed attempt is charged `fail_penalty`.

pub mod route;

use crate::cost::counters::{self as cost, RouteStats, Sample};
use crate::error::json_error_body;
use crate::registry::{App, Registry};
use crate::upstream::{self, BackendInfo};
use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use route::{Route, RouteConfig};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Seconds a client is told to wait when an app has no healthy backend.
const RETRY_AFTER_SECS: &str = "2";

/// Request-id header.
pub const REQUEST_ID: &str = "x-request-id";

/// Proxy settings taken from [`crate::config::Settings`].
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Routing.
    pub route: RouteConfig,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Upstream read timeout (lifted for upgrades and event streams).
    pub read_timeout: Duration,
    /// Upstream write timeout.
    pub write_timeout: Duration,
    /// Upstream keepalive idle timeout.
    pub idle_timeout: Duration,
    /// Backends tried after the first one fails.
    pub max_retries: usize,
    /// Passive failure cooldown.
    pub fail_cooldown: Duration,
    /// Client header block limit.
    pub max_header_bytes: usize,
    /// Access log lines.
    pub access_log: bool,
    /// The event hub's listener, where `{prefix}/events/` requests are forwarded.
    pub hub_addr: SocketAddr,
    /// Latency charged to a backend for a failed attempt.
    pub fail_penalty: Duration,
    /// Most requests held per scaled app while it has no backend (scale from zero).
    pub hold_max: usize,
    /// Longest a request is held.
    pub hold_timeout: Duration,
    /// The scaler's status, whose `wake` a held request rings.
    pub scaler: Arc<crate::scaler::controller::ScalerStatus>,
    /// Time constant of the balancer's latency estimate.
    pub balance_decay: Duration,
}

/// A request held for a replica: counted in the upstream's `held` until dropped, so a request
/// whose future is dropped mid-wait (a client gone, a shutdown) is not left counted.
struct Held<'a>(usize, &'a std::sync::atomic::AtomicUsize);

impl<'a> Held<'a> {
    /// Enter; `.0` is this request's place in the count (1 = the first held).
    fn enter(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        Self(count.fetch_add(1, Ordering::AcqRel) + 1, count)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One attempt on one backend: counted in flight on it until dropped.
pub struct Attempt {
    /// The backend.
    pub info: Arc<BackendInfo>,
    /// When the backend was chosen (the attempt's start).
    pub started: Instant,
    /// When the connection was ready.
    pub connected: Option<Instant>,
}

impl Attempt {
    fn new(info: Arc<BackendInfo>) -> Self {
        info.counters.begin();
        Self {
            info,
            started: Instant::now(),
            connected: None,
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.info.counters.abandon();
    }
}

/// The app-side counters a request was entered into.
pub struct Counted {
    /// Its route key.
    pub route: Arc<RouteStats>,
    /// Index in [`cost::METHODS`].
    pub method: usize,
}

/// Per-request state.
#[derive(Default)]
pub struct RequestCtx {
    /// When the filter phase started.
    pub started: Option<Instant>,
    /// Total time from the filter phase to the end of logging; set in `logging`.
    pub elapsed: Option<Duration>,
    /// The app this request is for.
    pub app: Option<Arc<App>>,
    /// Path and query to send upstream, if rewritten.
    pub upstream_path: Option<String>,
    /// Request id (kept from the client or generated).
    pub request_id: Option<String>,
    /// Backends tried, in order.
    pub tried: Vec<SocketAddr>,
    /// The current attempt.
    pub attempt: Option<Attempt>,
    /// Entered into its app's counters (in flight until `logging`).
    pub counted: Option<Counted>,
    /// When the first response header arrived from the backend.
    pub first_byte: Option<Instant>,
    /// Upgrade or event-stream request: no upstream read timeout.
    pub long_lived: bool,
    /// For the gateway's own event hub.
    pub hub: bool,
}

/// The gateway's proxy logic.
pub struct Gateway {
    registry: Arc<Registry>,
    cfg: ProxyConfig,
    id_prefix: u64,
    id_counter: AtomicU64,
    unrouted: Arc<AtomicU64>,
}

impl Gateway {
    /// A proxy over `registry`.
    pub fn new(registry: Arc<Registry>, cfg: ProxyConfig) -> Self {
        Self {
            registry,
            cfg,
            id_prefix: u64::from_le_bytes(crate::registry::token::random_bytes::<8>()),
            id_counter: AtomicU64::new(0),
            unrouted: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Requests that matched no route or no registered app (a counter for metrics).
    pub fn unrouted(&self) -> Arc<AtomicU64> {
        self.unrouted.clone()
    }

    /// The current attempt failed: it counts on its backend as a failure, charged the penalty
    /// latency, and ends there (a retry starts a new attempt).
    fn charge_failed_attempt(&self, ctx: &mut RequestCtx) {
        if let Some(a) = ctx.attempt.take() {
            let sample = Sample {
                failed: true,
                total: a.started.elapsed(),
                upstream: Some(a.started.elapsed()),
                ..Sample::default()
            };
            a.info.counters.finish(&sample);
            a.info.peak.observe(
                self.cfg.fail_penalty.as_secs_f64() * 1000.0,
                crate::balance::clock_ms(),
                self.cfg.balance_decay,
            );
        }
    }

    /// Close a request's timing: app, route key and backend counters, and the balancer's
    /// latency estimate.
    fn record(&self, session: &Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let attempt = ctx.attempt.take();
        let (Some(app), Some(counted)) = (ctx.app.as_ref(), ctx.counted.take()) else {
            return;
        };
        let status = session
            .as_ref()
            .response_written()
            .map_or(0, |r| r.status.as_u16());
        let stats = &app.upstream.stats;
        if ctx.long_lived {
            // A stream's duration is not a request's latency: count it, keep it out of the maths
            // (it was never counted in flight either).
            stats.count_status(counted.method, status);
            return;
        }
        let now = Instant::now();
        let failed = status >= 500
            || (status == 0 && e.is_some_and(|e| e.esource() != &ErrorSource::Downstream));
        let sample = Sample {
            status,
            failed,
            total: ctx
                .started
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s)),
            upstream: attempt
                .as_ref()
                .map(|a| now.saturating_duration_since(a.started)),
            connect: attempt
                .as_ref()
                .and_then(|a| a.connected.map(|c| c.saturating_duration_since(a.started))),
            first_byte: attempt.as_ref().and_then(|a| {
                let c = a.connected?;
                ctx.first_byte.map(|f| f.saturating_duration_since(c))
            }),
            bytes_in: session.as_ref().body_bytes_read() as u64,
            bytes_out: session.as_ref().body_bytes_sent() as u64,
            retries: ctx.tried.len().saturating_sub(1) as u32,
        };
        stats.end(counted.method, &counted.route, &sample);
        if let Some(a) = &attempt {
            a.info.counters.finish(&sample);
            // The balancer's latency starts once the connection is ready: a new connection's
            // setup says nothing about how fast the backend serves, and counting it would
            // favour backends that happen to have pooled connections.
            let from = a.connected.unwrap_or(a.started);
            let mut ms = now.saturating_duration_since(from).as_secs_f64() * 1000.0;
            if failed {
                ms = ms.max(self.cfg.fail_penalty.as_secs_f64() * 1000.0);
            }
            a.info
                .peak
                .observe(ms, crate::balance::clock_ms(), self.cfg.balance_decay);
        }
    }

    fn new_request_id(&self) -> String {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{:016x}", self.id_prefix, n)
    }

    /// Write a complete JSON response (with a content length) from a filter.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        body: Bytes,
        retry_after: bool,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(4))?;
        resp.insert_header(header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        if let Some(id) = &ctx.request_id {
            resp.insert_header(REQUEST_ID, id.as_str())?;
        }
        if retry_after {
            resp.insert_header(header::RETRY_AFTER, RETRY_AFTER_SECS)?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }

    fn app_has_untried(&self, ctx: &RequestCtx) -> bool {
        ctx.app.as_ref().is_some_and(|app| {
            let backends = app.upstream.backends();
            backends.iter().any(|b| {
                b.addr
                    .as_inet()
                    .is_some_and(|a| !ctx.tried.contains(a) && app.upstream.healthy(b))
            })
        })
    }

    fn may_retry(&self, ctx: &RequestCtx) -> bool {
        ctx.tried.len() <= self.cfg.max_retries && self.app_has_untried(ctx)
    }
}

fn header_bytes(req: &RequestHeader) -> usize {
    req.headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum()
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx::default()
    }

    /// No downstream modules: Pingora's default adds a (disabled) response compression module
    /// whose per-request context and filter calls cost CPU on every request.
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    async fn early_request_filter(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        ctx.started = Some(Instant::now());
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let req = session.req_header();
        ctx.request_id = Some(match req.headers.get(REQUEST_ID).map(|v| v.to_str()) {
            Some(Ok(id)) if !id.is_empty() && id.len() <= 128 => id.to_string(),
            _ => self.new_request_id(),
        });
        if header_bytes(req) > self.cfg.max_header_bytes {
            let body = json_error_body("request headers are too large", None);
            self.respond(session, ctx, 431, body, false).await?;
            return Ok(true);
        }
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.host());
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let long_lived = session.is_upgrade_req()
            || req
                .headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("text/event-stream"));
        let (name, upstream_path) = match route::route(host, path, &self.cfg.route) {
            Route::App {
                name,
                upstream_path,
            } => (name.to_ascii_lowercase(), upstream_path),
            Route::Events => {
                ctx.hub = true;
                ctx.long_lived = long_lived;
                if long_lived {
                    session.set_read_timeout(None);
                }
                return Ok(false);
            }
            Route::NotFound => {
                self.unrouted.fetch_add(1, Ordering::Relaxed);
                let body = json_error_body("no route matches this request", None);
                self.respond(session, ctx, 404, body, false).await?;
                return Ok(true);
            }
        };
        let Some(app) = self.registry.get(&name) else {
            self.unrouted.fetch_add(1, Ordering::Relaxed);
            let body = json_error_body(&format!("no app named `{name}` is registered"), None);
            self.respond(session, ctx, 404, body, false).await?;
            return Ok(true);
        };
        let method = req.method.as_str();
        let app_path = upstream_path.as_deref().unwrap_or(path);
        let stats = &app.upstream.stats;
        let route = stats.routes.get(method, app_path);
        // Streams (WebSocket, SSE) are counted by status only: an open stream is not a request
        // in flight for the model or the scaler.
        if !long_lived {
            stats.counters.begin();
            route.counters.begin();
        }
        ctx.counted = Some(Counted {
            route,
            method: cost::method_index(method),
        });
        ctx.long_lived = long_lived;
        if ctx.long_lived {
            // An open WebSocket or event stream may be quiet for long: no client idle cut-off.
            session.set_read_timeout(None);
        }
        ctx.upstream_path = upstream_path;
        ctx.app = Some(app);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        if ctx.hub {
            let mut peer = HttpPeer::new(self.cfg.hub_addr, false, String::new());
            let o = &mut peer.options;
            o.connection_timeout = Some(self.cfg.connect_timeout);
            o.read_timeout = (!ctx.long_lived).then_some(self.cfg.read_timeout);
            o.write_timeout = Some(self.cfg.write_timeout);
            o.idle_timeout = Some(self.cfg.idle_timeout);
            ctx.tried.push(self.cfg.hub_addr);
            return Ok(Box::new(peer));
        }
        let Some(app) = ctx.app.as_ref() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no app in context",
            ));
        };
        let key = session.req_header().uri.path().as_bytes();
        let mut chosen = app.upstream.select(key, &ctx.tried, self.cfg.fail_cooldown);
        if chosen.is_none() && ctx.tried.is_empty() {
            // A scaled app gets its request held until a replica is ready (bounded in count
            // and time); the held count is the scaler's cold-start signal.
            if app.scaling().is_some() {
                let held = Held::enter(&app.upstream.held);
                if held.0 <= self.cfg.hold_max {
                    // Cold start: the scaler decides now, not at its next tick.
                    self.cfg.scaler.wake.notify_one();
                    chosen = app
                        .upstream
                        .select_when_ready(
                            key,
                            &ctx.tried,
                            self.cfg.fail_cooldown,
                            self.cfg.hold_timeout,
                        )
                        .await;
                }
                drop(held);
            }
        }
        let Some(backend) = chosen else {
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "no healthy backend",
            ));
        };
        let Some(addr) = backend.addr.as_inet().copied() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "backend is not an inet address",
            ));
        };
        let info = upstream::info(&backend).cloned();
        let (tls, sni) = info
            .as_ref()
            .map_or((false, String::new()), |i| (i.tls, i.sni.clone()));
        ctx.tried.push(addr);
        // Replacing the previous attempt ends it on its backend.
        ctx.attempt = info.map(Attempt::new);
        let mut peer = HttpPeer::new(addr, tls, sni);
        let o = &mut peer.options;
        o.connection_timeout = Some(self.cfg.connect_timeout);
        o.read_timeout = (!ctx.long_lived).then_some(self.cfg.read_timeout);
        o.write_timeout = Some(self.cfg.write_timeout);
        o.idle_timeout = Some(self.cfg.idle_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(path) = &ctx.upstream_path {
            let uri = http::Uri::builder()
                .path_and_query(path.as_str())
                .build()
                .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "rewritten path", e))?;
            upstream_request.set_uri(uri);
        }
        if let Some(client) = session.client_addr().and_then(|a| a.as_inet()) {
            let ip = client.ip().to_string();
            let xff = match upstream_request
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
                _ => ip,
            };
            upstream_request.insert_header("x-forwarded-for", xff)?;
        }
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        upstream_request.insert_header("x-forwarded-proto", if tls { "https" } else { "http" })?;
        if let Some(host) = session.req_header().headers.get(header::HOST).cloned() {
            upstream_request.insert_header("x-forwarded-host", host)?;
        }
        if let Some(id) = &ctx.request_id {
            upstream_request.insert_header(REQUEST_ID, id.as_str())?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if ctx.first_byte.is_none() {
            ctx.first_byte = Some(Instant::now());
        }
        if let Some(a) = &ctx.attempt {
            a.info.mark_ok();
        }
        if let Some(id) = &ctx.request_id {
            if !upstream_response.headers.contains_key(REQUEST_ID) {
                upstream_response.insert_header(REQUEST_ID, id.as_str())?;
            }
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(b) = ctx.attempt.as_ref() {
            b.info.mark_failed();
        }
        self.charge_failed_attempt(ctx);
        // Nothing reached the backend: safe to try another one for any method.
        e.set_retry(self.may_retry(ctx));
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // The backend failed after connecting (reset, timeout): it is charged whether or not
        // the request is replayed elsewhere. A client that went away is not its fault.
        if e.esource() == &ErrorSource::Upstream {
            self.charge_failed_attempt(ctx);
        }
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        if !replayable {
            e.set_retry(false);
        } else if session.as_ref().response_written().is_none() && self.may_retry(ctx) {
            // The backend failed before the client saw a byte: replay on another backend.
            e.set_retry(true);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        use ErrorType::*;
        let (code, message) = match e.etype() {
            HTTPStatus(503) => (
                503,
                "no healthy backend is available for this app".to_string(),
            ),
            HTTPStatus(code) => (*code, format!("request failed: {}", e.etype().as_str())),
            ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout => {
                (504, format!("upstream timed out: {}", e.etype().as_str()))
            }
            _ => match e.esource() {
                ErrorSource::Upstream => (502, format!("upstream error: {}", e.etype().as_str())),
                ErrorSource::Downstream => match e.etype() {
                    WriteError | ReadError | ConnectionClosed => (0, String::new()),
                    _ => (400, format!("bad request: {}", e.etype().as_str())),
                },
                ErrorSource::Internal | ErrorSource::Unset => {
                    (500, "internal gateway error".to_string())
                }
            },
        };
        if code > 0 && session.as_ref().response_written().is_none() {
            let body = json_error_body(&message, None);
            if let Err(err) = self.respond(session, ctx, code, body, code == 503).await {
                tracing::debug!(error = %err, "could not send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(a) = &mut ctx.attempt {
            a.connected = Some(Instant::now());
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        let elapsed = ctx.started.map(|s| s.elapsed());
        ctx.elapsed = elapsed;
        let backend = ctx.attempt.as_ref().map(|a| a.info.clone());
        self.record(session, e, ctx);
        if self.cfg.access_log {
            let req = session.req_header();
            let status = session
                .as_ref()
                .response_written()
                .map_or(0, |r| r.status.as_u16());
            tracing::info!(
                target: "nextgate::access",
                app = ctx.app.as_ref().map_or("", |a| a.name()),
                method = %req.method,
                path = %req.uri,
                status,
                duration_us = elapsed.map_or(0, |d| d.as_micros() as u64),
                backend = backend.as_ref().map_or("", |b| b.endpoint.as_str()),
                attempts = ctx.tried.len(),
                request_id = ctx.request_id.as_deref().unwrap_or(""),
                error = e.map(|e| e.to_string()),
                "request"
            );
        }
    }
}
