//! App-to-app delivery: every message of a channel is POSTed, in order and at least once, to
//! the subscribing app's load-balanced backends at a path the app chose.
//!
//! One task per subscription reads the channel's replay ring with its own cursor (so a slow
//! or failing receiver never holds up subscribers or publishers). A failed attempt is retried
//! with exponential backoff, on another backend when there is one, for as long as the message
//! is still buffered; a message that falls out of the buffer first is logged and counted as
//! lost to this subscription. Each request is signed: `X-Nextgate-Signature: t={unix},v1={hex}`
//! where `hex` is HMAC-SHA256 under the subscription's signing secret of
//! `{t}.{message id}.{channel}.{body}`.

use super::channel::Channel;
use super::message::Message;
use super::ticket::Signer;
use super::{ChannelName, Hub};
use crate::upstream;
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// First retry pause; it doubles up to the configured maximum.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Idle keepalive for connections to receiving backends.
const IDLE: Duration = Duration::from_secs(60);

/// A stored webhook subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRecord {
    /// Subscription id.
    pub id: String,
    /// The receiving app.
    pub app: String,
    /// Channel `{owner}/{channel}`.
    pub channel: String,
    /// Path on the receiving app's backends.
    pub path: String,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
}

/// Commands from the API to the delivery service.
pub enum Command {
    /// Start delivering a new subscription from the position its [`Hold`] took.
    Start(WebhookRecord, Hold),
    /// Stop one.
    Stop(String),
}

/// Delivery settings.
#[derive(Debug, Clone, Copy)]
pub struct WebhookSettings {
    /// One attempt's timeout.
    pub timeout: Duration,
    /// Longest pause between attempts.
    pub max_backoff: Duration,
}

/// Runs every subscription's delivery task.
pub struct Webhooks {
    hub: Arc<Hub>,
    signer: Signer,
    settings: WebhookSettings,
    initial: Vec<WebhookRecord>,
    commands: parking_lot::Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
}

impl Webhooks {
    /// The service, with the stored subscriptions to resume and the API's command channel.
    pub fn new(
        hub: Arc<Hub>,
        signer: Signer,
        settings: WebhookSettings,
        initial: Vec<WebhookRecord>,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Self {
        Self {
            hub,
            signer,
            settings,
            initial,
            commands: parking_lot::Mutex::new(Some(commands)),
        }
    }

    fn spawn(
        &self,
        connector: &Arc<Connector>,
        r: WebhookRecord,
        hold: Option<Hold>,
    ) -> Option<JoinHandle<()>> {
        let name = match self.hub.channel_name(&r.channel) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(subscription = %r.id, channel = %r.channel, error = %e, "webhook subscription skipped");
                return None;
            }
        };
        let worker = Worker {
            hub: self.hub.clone(),
            secret: Signer::new(self.signer.derive(&format!("webhook:{}", r.id)).as_bytes()),
            connector: connector.clone(),
            settings: self.settings,
            name,
            record: r,
        };
        Some(tokio::spawn(worker.run(hold)))
    }
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for Webhooks {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        let Some(mut commands) = self.commands.lock().take() else {
            return;
        };
        let connector = Arc::new(Connector::new(None));
        let mut tasks: HashMap<String, JoinHandle<()>> = HashMap::new();
        for r in self.initial.clone() {
            let id = r.id.clone();
            if let Some(t) = self.spawn(&connector, r, None) {
                tasks.insert(id, t);
            }
        }
        loop {
            tokio::select! {
                c = commands.recv() => match c {
                    Some(Command::Start(r, hold)) => {
                        let id = r.id.clone();
                        if let Some(t) = self.spawn(&connector, r, Some(hold)) {
                            if let Some(old) = tasks.insert(id, t) {
                                old.abort();
                            }
                        }
                    }
                    Some(Command::Stop(id)) => {
                        if let Some(t) = tasks.remove(&id) {
                            t.abort();
                        }
                    }
                    None => break,
                },
                _ = shutdown.changed() => break,
            }
        }
        for t in tasks.into_values() {
            t.abort();
        }
    }
}

/// Keeps a channel from being swept while a worker reads it, and counts the worker as a
/// subscriber; it also fixes where a new subscription starts (after the newest message).
pub struct Hold(Arc<Channel>, u64);

impl Hold {
    /// Hold `c` from its newest message on.
    pub fn new(c: Arc<Channel>) -> Self {
        c.holders.fetch_add(1, Ordering::AcqRel);
        let last = c.last_seq();
        Self(c, last)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.holders.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Worker {
    hub: Arc<Hub>,
    secret: Signer,
    connector: Arc<Connector>,
    settings: WebhookSettings,
    name: ChannelName,
    record: WebhookRecord,
}

/// The outcome of one attempt.
enum Attempt {
    Delivered,
    Failed(String),
}

impl Worker {
    async fn run(self, first: Option<Hold>) {
        // (epoch, last delivered seq). A subscription resumed at startup meets fresh channels
        // and takes them from their first message; a new one starts where its hold was taken.
        let mut cursor: Option<(u64, u64)> = None;
        let resumed = first.is_none();
        let mut first = first;
        loop {
            let hold = match first.take() {
                Some(h) => h,
                None => match self.hub.get_or_create(&self.name) {
                    Ok(c) => Hold::new(c),
                    Err(e) => {
                        tracing::debug!(subscription = %self.record.id, error = %e, "webhook channel unavailable");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
            };
            let ch = &hold.0;
            // The same epoch continues; a channel made again after a delete starts at 0.
            let mut last = match cursor {
                Some((epoch, seq)) if epoch == ch.epoch => seq,
                Some(_) => 0,
                None if resumed => 0,
                None => hold.1,
            };
            cursor = Some((ch.epoch, last));
            loop {
                let changed = ch.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if ch.is_deleted() {
                    break;
                }
                let Some(m) = ch.message_from(last + 1, Instant::now()) else {
                    changed.await;
                    continue;
                };
                if m.id.seq > last + 1 {
                    let missed = m.id.seq - last - 1;
                    self.hub
                        .stats
                        .webhook_lost
                        .fetch_add(missed, Ordering::Relaxed);
                    tracing::warn!(subscription = %self.record.id, channel = %self.name.as_str(), missed, "webhook: messages left the buffer before delivery");
                }
                self.deliver(ch, &m).await;
                last = m.id.seq;
                cursor = Some((ch.epoch, last));
            }
        }
    }

    /// Deliver one message, retrying while it is still buffered.
    async fn deliver(&self, ch: &Channel, m: &Arc<Message>) {
        let mut backoff = FIRST_BACKOFF;
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            match self.attempt(m, &mut tried).await {
                Attempt::Delivered => {
                    self.hub
                        .stats
                        .webhook_delivered
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Attempt::Failed(why) => {
                    self.hub
                        .stats
                        .webhook_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(subscription = %self.record.id, app = %self.record.app, id = %m.id, error = %why, retry_in_ms = backoff.as_millis() as u64, "webhook attempt failed");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.settings.max_backoff);
            let still_buffered = ch
                .message_from(m.id.seq, Instant::now())
                .is_some_and(|b| b.id == m.id);
            if !still_buffered || ch.is_deleted() {
                self.hub.stats.webhook_lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(subscription = %self.record.id, id = %m.id, "webhook: message left the buffer before it could be delivered");
                return;
            }
        }
    }

    async fn attempt(&self, m: &Message, tried: &mut Vec<SocketAddr>) -> Attempt {
        let Some(app) = self.hub.registry.get(&self.record.app) else {
            return Attempt::Failed(format!("app `{}` is not registered", self.record.app));
        };
        let backend = app
            .upstream
            .select(m.id.to_string().as_bytes(), tried, Duration::from_secs(5))
            .or_else(|| {
                tried.clear();
                app.upstream.select(b"", tried, Duration::from_secs(5))
            });
        let Some(backend) = backend else {
            return Attempt::Failed("no healthy backend".into());
        };
        let Some(addr) = backend.addr.as_inet().copied() else {
            return Attempt::Failed("backend is not an inet address".into());
        };
        tried.push(addr);
        let info = upstream::info(&backend).cloned();
        let (tls, sni, host) =
            info.as_ref()
                .map_or((false, String::new(), addr.to_string()), |i| {
                    let host = i
                        .endpoint
                        .split_once("://")
                        .map_or(i.endpoint.as_str(), |(_, h)| h)
                        .to_string();
                    (i.tls, i.sni.clone(), host)
                });
        let mut peer = HttpPeer::new(addr, tls, sni);
        peer.options.connection_timeout = Some(self.settings.timeout);
        peer.options.read_timeout = Some(self.settings.timeout);
        peer.options.write_timeout = Some(self.settings.timeout);
        match tokio::time::timeout(self.settings.timeout, self.post(&peer, &host, m)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => Attempt::Delivered,
            Ok(Ok(status)) => Attempt::Failed(format!("{addr} answered {status}")),
            Ok(Err(e)) => Attempt::Failed(format!("{addr}: {e}")),
            Err(_) => Attempt::Failed(format!("{addr}: timed out")),
        }
    }

    async fn post(&self, peer: &HttpPeer, host: &str, m: &Message) -> pingora_core::Result<u16> {
        let (mut session, _reused) = self.connector.get_http_session(peer).await?;
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .to_string();
        let id = m.id.to_string();
        let sig =
            self.secret
                .sign_hex(&[t.as_bytes(), id.as_bytes(), m.channel.as_bytes(), &m.data]);
        let mut req = RequestHeader::build("POST", self.record.path.as_bytes(), Some(10))?;
        req.insert_header("host", host)?;
        req.insert_header("content-length", m.data.len().to_string())?;
        req.insert_header(
            "content-type",
            m.content_type
                .as_deref()
                .unwrap_or("application/octet-stream"),
        )?;
        req.insert_header("x-nextgate-event-id", id.as_str())?;
        req.insert_header("x-nextgate-channel", &*m.channel)?;
        if let Some(e) = &m.event {
            req.insert_header("x-nextgate-event", &**e)?;
        }
        req.insert_header("x-nextgate-subscription", self.record.id.as_str())?;
        req.insert_header("x-nextgate-signature", format!("t={t},v1={sig}"))?;
        session.write_request_header(Box::new(req)).await?;
        session.write_request_body(m.data.clone(), true).await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        let status = session.response_header().map_or(0, |r| r.status.as_u16());
        while session.read_response_body().await?.is_some() {}
        self.connector
            .release_http_session(session, peer, Some(IDLE))
            .await;
        Ok(status)
    }
}
