//! The event hub (what the original design built with Nginx + Nchan): channels namespaced by
//! app, publish over HTTP and WebSocket, subscribe over WebSocket and SSE, replay on resume,
//! tickets for browsers, and app-to-app delivery by webhook.
//!
//! - [`message`]: ids and messages, encoded once per transport.
//! - [`replay`]: pure resume planning (gap or exact).
//! - [`channel`]: one channel's ring buffer and subscribers' bounded outboxes.
//! - [`ticket`]: signed, expiring subscribe tickets.
//! - [`sse`] and [`ws`]: the two subscriber transports (and WebSocket publishing).
//! - [`webhook`]: delivery of a channel to an app's backends by HTTP POST.
//! - [`store`]: durable hub state (public channels, webhook subscriptions).
//! - [`api`]: the HTTP surface under `{prefix}/events/`.

pub mod api;
pub mod channel;
pub mod message;
pub mod replay;
pub mod sse;
pub mod store;
pub mod ticket;
pub mod webhook;
pub mod ws;

use crate::config::HubSettings;
use crate::registry::Registry;
use bytes::Bytes;
use channel::{BufferLimits, Channel, ChannelInfo, Item, Outbox, Published, Start};
use message::MessageId;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long an empty channel without subscribers lingers before it is swept.
pub const IDLE_CHANNEL: Duration = Duration::from_secs(30);

/// Hub errors; [`api`] maps each to a status and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// A malformed input (400).
    #[error("{message}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The app owning the namespace is not registered (404).
    #[error("no app named `{0}` is registered")]
    UnknownApp(String),
    /// No such channel (404).
    #[error("no channel `{0}`")]
    NoChannel(String),
    /// The message is larger than `hub.max_message_bytes` (413).
    #[error("message is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The app already has `hub.max_channels_per_app` channels (429).
    #[error("app `{app}` already has {limit} channels, the most allowed")]
    TooManyChannels {
        /// The app.
        app: String,
        /// The limit.
        limit: usize,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> HubError {
    HubError::Invalid {
        field,
        message: message.into(),
    }
}

/// A validated channel name `{app}/{channel}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelName {
    full: Arc<str>,
    app_len: usize,
}

impl ChannelName {
    /// Parse and check `{app}/{channel}`: the app part is an app name, the channel part 1 to
    /// `max_len` characters of `A-Z a-z 0-9 . _ ~ : -`.
    pub fn parse(s: &str, max_len: usize) -> Result<Self, HubError> {
        let Some((app, chan)) = s.split_once('/') else {
            return Err(invalid(
                "channel",
                format!("`{}` is not `app/channel`", clip(s)),
            ));
        };
        crate::registry::validate::name(app)
            .map_err(|e| invalid("channel", format!("app part: {e}")))?;
        Self::check_channel(chan, max_len)?;
        Ok(Self {
            full: Arc::from(s),
            app_len: app.len(),
        })
    }

    fn check_channel(chan: &str, max_len: usize) -> Result<(), HubError> {
        if chan.is_empty() || chan.len() > max_len {
            return Err(invalid(
                "channel",
                format!("channel names are 1 to {max_len} characters"),
            ));
        }
        if let Some(c) = chan
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | ':' | '-')))
        {
            return Err(invalid(
                "channel",
                format!("channel names use A-Z a-z 0-9 . _ ~ : - only; found {c:?}"),
            ));
        }
        Ok(())
    }

    /// `{app}/{channel}`.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The owning app.
    pub fn app(&self) -> &str {
        &self.full[..self.app_len]
    }

    /// The part after `{app}/`.
    pub fn channel(&self) -> &str {
        &self.full[self.app_len + 1..]
    }
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Where a subscription resumes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Resume {
    /// New messages only.
    #[default]
    Live,
    /// After these ids, one per channel in subscription order.
    After(Vec<MessageId>),
}

impl Resume {
    /// Parse a `Last-Event-ID` for `channels` channels: one id, or for a multiplexed
    /// subscription the comma-separated ids the hub sent.
    pub fn parse(s: &str, channels: usize) -> Result<Self, HubError> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Resume::Live);
        }
        let ids = s
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<MessageId>, _>>()
            .map_err(|e| invalid("last_event_id", e.to_string()))?;
        if ids.len() != channels {
            return Err(invalid(
                "last_event_id",
                format!("{} ids given for {channels} channels", ids.len()),
            ));
        }
        Ok(Resume::After(ids))
    }
}

/// Counters the hub keeps (exported as metrics by a later part).
#[derive(Debug, Default)]
pub struct HubStats {
    /// Messages published.
    pub published: AtomicU64,
    /// Messages written to subscribers.
    pub delivered: AtomicU64,
    /// Subscribers disconnected because their queue overflowed.
    pub slow_disconnects: AtomicU64,
    /// Messages those subscribers did not get: the one their full queue refused and the ones
    /// still queued when they were disconnected (they can resume from their last id).
    pub dropped: AtomicU64,
    /// Subscriptions opened.
    pub subscribed: AtomicU64,
    /// Webhook deliveries that succeeded.
    pub webhook_delivered: AtomicU64,
    /// Webhook attempts that failed (each attempt).
    pub webhook_failures: AtomicU64,
    /// Messages a webhook subscription never got (they left the buffer first).
    pub webhook_lost: AtomicU64,
}

#[derive(Default)]
struct Channels {
    map: HashMap<Arc<str>, Arc<Channel>>,
    per_app: HashMap<String, usize>,
}

/// A live subscription: the queue and the channels it is registered in. Dropping it leaves
/// every channel.
pub struct Subscription {
    /// The shared outbox (its `ended` flag says why it stopped).
    pub outbox: Arc<Outbox>,
    /// Receiving end of the outbox.
    pub rx: mpsc::Receiver<Item>,
    /// Per channel, in request order: where it starts.
    pub starts: Vec<(ChannelName, Start)>,
    channels: Vec<Arc<Channel>>,
    pub(crate) hub: Arc<Hub>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let now = Instant::now();
        for c in &self.channels {
            c.unsubscribe(self.outbox.id(), now);
        }
        self.hub.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The hub: every channel of every app, in memory.
pub struct Hub {
    /// Settings.
    pub settings: HubSettings,
    /// The registry (only registered apps have channels).
    pub registry: Arc<Registry>,
    /// Counters.
    pub stats: HubStats,
    channels: RwLock<Channels>,
    last_epoch: AtomicU64,
    next_outbox: AtomicU64,
    subscribers: AtomicU64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Hub {
    /// An empty hub.
    pub fn new(settings: HubSettings, registry: Arc<Registry>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            registry,
            stats: HubStats::default(),
            channels: RwLock::new(Channels::default()),
            last_epoch: AtomicU64::new(0),
            next_outbox: AtomicU64::new(1),
            subscribers: AtomicU64::new(0),
        })
    }

    /// Parse a channel name with the configured length limit.
    pub fn channel_name(&self, s: &str) -> Result<ChannelName, HubError> {
        ChannelName::parse(s, self.settings.max_channel_name)
    }

    fn limits(&self) -> BufferLimits {
        BufferLimits {
            messages: self.settings.buffer_messages,
            bytes: self.settings.buffer_bytes,
            age: self.settings.buffer_age,
        }
    }

    /// A fresh epoch: Unix milliseconds, strictly increasing within this process.
    fn new_epoch(&self) -> u64 {
        let now = unix_ms();
        let prev = self
            .last_epoch
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(0);
        now.max(prev + 1)
    }

    fn require_app(&self, app: &str) -> Result<(), HubError> {
        match self.registry.get(app) {
            Some(_) => Ok(()),
            None => Err(HubError::UnknownApp(app.to_string())),
        }
    }

    /// The channel if it exists.
    pub fn get(&self, name: &ChannelName) -> Option<Arc<Channel>> {
        self.channels.read().map.get(name.as_str()).cloned()
    }

    /// The channel, created if missing (within the app's channel limit).
    pub fn get_or_create(&self, name: &ChannelName) -> Result<Arc<Channel>, HubError> {
        if let Some(c) = self.get(name) {
            if !c.is_deleted() {
                return Ok(c);
            }
        }
        self.require_app(name.app())?;
        let mut chans = self.channels.write();
        if let Some(c) = chans.map.get(name.as_str()) {
            if !c.is_deleted() {
                return Ok(c.clone());
            }
        }
        let count = chans.per_app.get(name.app()).copied().unwrap_or(0);
        if count >= self.settings.max_channels_per_app {
            return Err(HubError::TooManyChannels {
                app: name.app().to_string(),
                limit: self.settings.max_channels_per_app,
            });
        }
        let c = Arc::new(Channel::new(
            name.full.clone(),
            name.app_len,
            self.new_epoch(),
            self.limits(),
            Instant::now(),
        ));
        if chans.map.insert(name.full.clone(), c.clone()).is_none() {
            *chans.per_app.entry(name.app().to_string()).or_default() += 1;
        }
        Ok(c)
    }

    /// Publish into `name` (created if missing).
    pub fn publish(
        &self,
        name: &ChannelName,
        data: Bytes,
        content_type: Option<&str>,
        event: Option<&str>,
    ) -> Result<Published, HubError> {
        if data.len() > self.settings.max_message_bytes {
            return Err(HubError::TooLarge {
                size: data.len(),
                limit: self.settings.max_message_bytes,
            });
        }
        if let Some(e) = event {
            check_event_name(e)?;
        }
        self.require_app(name.app())?;
        // A concurrent DELETE can retire the channel between lookup and publish: take the new one.
        for _ in 0..3 {
            let c = self.get_or_create(name)?;
            if let Some(p) = c.publish(data.clone(), content_type, event, Instant::now(), unix_ms())
            {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                if p.overflowed > 0 {
                    self.stats
                        .slow_disconnects
                        .fetch_add(p.overflowed as u64, Ordering::Relaxed);
                    tracing::info!(channel = %name.as_str(), dropped = p.overflowed, "slow subscribers disconnected: queue overflow");
                }
                return Ok(p);
            }
        }
        Err(HubError::NoChannel(name.as_str().to_string()))
    }

    /// Channel info, if the channel exists.
    pub fn info(&self, name: &ChannelName) -> Option<ChannelInfo> {
        self.get(name)
            .filter(|c| !c.is_deleted())
            .map(|c| c.info(Instant::now()))
    }

    /// Delete a channel and end its subscribers; false when there was none.
    pub fn delete(&self, name: &ChannelName) -> bool {
        let removed = {
            let mut chans = self.channels.write();
            let removed = chans.map.remove(name.as_str());
            if removed.is_some() {
                decrement(&mut chans.per_app, name.app());
            }
            removed
        };
        match removed {
            Some(c) => {
                c.delete();
                tracing::info!(channel = %name.as_str(), "channel deleted");
                true
            }
            None => false,
        }
    }

    /// Subscribe one outbox to `names` (created if missing), resuming as asked.
    pub fn subscribe(
        self: &Arc<Self>,
        names: Vec<ChannelName>,
        resume: &Resume,
    ) -> Result<Subscription, HubError> {
        if names.is_empty() {
            return Err(invalid("channels", "no channel given"));
        }
        if names.len() > self.settings.max_multiplex {
            return Err(invalid(
                "channels",
                format!(
                    "at most {} channels per subscription",
                    self.settings.max_multiplex
                ),
            ));
        }
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(invalid(
                    "channels",
                    format!("`{}` is listed twice", n.as_str()),
                ));
            }
        }
        let ids: Vec<Option<MessageId>> = match resume {
            Resume::Live => vec![None; names.len()],
            Resume::After(ids) if ids.len() == names.len() => {
                ids.iter().copied().map(Some).collect()
            }
            Resume::After(ids) => {
                return Err(invalid(
                    "last_event_id",
                    format!("{} ids given for {} channels", ids.len(), names.len()),
                ))
            }
        };
        let id = self.next_outbox.fetch_add(1, Ordering::Relaxed);
        let (outbox, rx) = Outbox::new(id, self.settings.queue_messages, self.settings.queue_bytes);
        let mut sub = Subscription {
            outbox: outbox.clone(),
            rx,
            starts: Vec::with_capacity(names.len()),
            channels: Vec::with_capacity(names.len()),
            hub: self.clone(),
        };
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        self.stats.subscribed.fetch_add(1, Ordering::Relaxed);
        for (name, resume) in names.into_iter().zip(ids) {
            let mut joined = None;
            for _ in 0..3 {
                let c = self.get_or_create(&name)?;
                if let Some(start) = c.subscribe(&outbox, resume, Instant::now()) {
                    joined = Some((c, start));
                    break;
                }
            }
            let Some((c, start)) = joined else {
                return Err(HubError::NoChannel(name.as_str().to_string()));
            };
            sub.channels.push(c);
            sub.starts.push((name, start));
        }
        Ok(sub)
    }

    /// Subscribers connected now.
    pub fn subscriber_count(&self) -> u64 {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Channels now.
    pub fn channel_count(&self) -> usize {
        self.channels.read().map.len()
    }

    /// Drop idle channels and the channels of apps no longer registered (ending their
    /// subscribers). Returns how many were removed.
    pub fn sweep(&self, now: Instant) -> usize {
        let candidates: Vec<Arc<Channel>> = self
            .channels
            .read()
            .map
            .values()
            .filter(|c| self.registry.get(c.app()).is_none() || c.is_idle(now, IDLE_CHANNEL))
            .cloned()
            .collect();
        let mut removed = 0;
        for c in candidates {
            let gone = self.registry.get(c.app()).is_none();
            let mut chans = self.channels.write();
            // Re-check under the write lock: a subscriber may have joined meanwhile.
            if !(gone || c.is_idle(now, IDLE_CHANNEL)) {
                continue;
            }
            if chans.map.get(&c.name).is_some_and(|x| Arc::ptr_eq(x, &c)) {
                chans.map.remove(&c.name);
                decrement(&mut chans.per_app, c.app());
                drop(chans);
                c.delete();
                removed += 1;
            }
        }
        removed
    }
}

fn decrement(per_app: &mut HashMap<String, usize>, app: &str) {
    if let Some(n) = per_app.get_mut(app) {
        *n -= 1;
        if *n == 0 {
            per_app.remove(app);
        }
    }
}

/// SSE event names: 1 to 64 visible ASCII characters.
pub fn check_event_name(e: &str) -> Result<(), HubError> {
    if e.is_empty() || e.len() > 64 || !e.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "x-event-type",
            "event names are 1 to 64 visible ASCII characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        let n = ChannelName::parse("billing/invoices.v2", 128).expect("valid");
        assert_eq!((n.app(), n.channel()), ("billing", "invoices.v2"));
        for bad in [
            "billing",
            "billing/",
            "/x",
            "Bad/x",
            "a/b/c",
            "a/b c",
            "a/é",
            "events?/x",
        ] {
            assert!(ChannelName::parse(bad, 128).is_err(), "{bad}");
        }
        assert!(ChannelName::parse(&format!("a/{}", "x".repeat(129)), 128).is_err());
        assert!(ChannelName::parse(&format!("a/{}", "x".repeat(128)), 128).is_ok());
    }

    #[test]
    fn resume_ids() {
        assert_eq!(Resume::parse("", 1), Ok(Resume::Live));
        assert_eq!(
            Resume::parse("5:1,6:0", 2),
            Ok(Resume::After(vec![
                MessageId { epoch: 5, seq: 1 },
                MessageId { epoch: 6, seq: 0 }
            ]))
        );
        assert!(Resume::parse("5:1", 2).is_err());
        assert!(Resume::parse("5:x", 1).is_err());
        assert!(Resume::parse("garbage", 1).is_err());
    }

    #[test]
    fn event_names() {
        assert!(check_event_name("price.update").is_ok());
        for bad in ["", "a b", "a\nb", &"x".repeat(65)] {
            assert!(check_event_name(bad).is_err(), "{bad:?}");
        }
    }
}
