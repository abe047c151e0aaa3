//! One channel: its replay ring, its subscribers' outboxes, and the publish / subscribe steps
//! that keep ids, buffer and live delivery consistent.
//!
//! Everything happens under the channel's `parking_lot::Mutex`, held for a handful of pointer
//! moves and never across an `.await`: publishing assigns the next id, appends to the ring and
//! offers the shared `Arc<Message>` to every outbox (`try_send`, never waiting); subscribing
//! takes the replay backlog and registers the outbox in the same critical section, so a new
//! subscriber sees every message exactly once, with no gap between replay and live.

use super::message::{Message, MessageId};
use super::replay::{self, GapReason, Window};
use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// Replay buffer bounds.
#[derive(Debug, Clone, Copy)]
pub struct BufferLimits {
    /// Most messages kept.
    pub messages: usize,
    /// Most bytes kept (by [`Message::cost`]).
    pub bytes: usize,
    /// Oldest message kept.
    pub age: Duration,
}

/// What an outbox carries to its connection.
pub enum Item {
    /// A message to deliver.
    Message(Arc<Message>),
    /// This channel was deleted: end the subscription.
    Deleted(Arc<str>),
}

/// Why an outbox stopped taking messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Still open.
    Open,
    /// Its queue overflowed: the subscriber was too slow.
    Overflow,
    /// A channel it subscribed to was deleted.
    Deleted,
}

/// A subscriber's bounded queue, shared by every channel the subscriber listens to.
pub struct Outbox {
    id: u64,
    tx: mpsc::Sender<Item>,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    ended: AtomicU8,
    /// Signalled (one permit) when the outbox overflows.
    overflowed: Notify,
}

impl Outbox {
    /// A queue of at most `messages` items and `bytes` bytes, and its receiving end.
    pub fn new(id: u64, messages: usize, bytes: usize) -> (Arc<Self>, mpsc::Receiver<Item>) {
        let (tx, rx) = mpsc::channel(messages.max(1));
        let outbox = Arc::new(Self {
            id,
            tx,
            queued_bytes: AtomicUsize::new(0),
            max_bytes: bytes,
            ended: AtomicU8::new(0),
            overflowed: Notify::new(),
        });
        (outbox, rx)
    }

    /// Its id, unique in the hub.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Why it ended, if it did.
    pub fn ended(&self) -> Ended {
        match self.ended.load(Ordering::Acquire) {
            0 => Ended::Open,
            1 => Ended::Overflow,
            _ => Ended::Deleted,
        }
    }

    fn end(&self, why: Ended) {
        let code = match why {
            Ended::Open => return,
            Ended::Overflow => 1,
            Ended::Deleted => 2,
        };
        let first = self
            .ended
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first && why == Ended::Overflow {
            // A permit: the writer may be blocked in a write and not waiting yet.
            self.overflowed.notify_one();
        }
    }

    /// Resolves once the outbox has overflowed (never for a healthy or deleted one). A writer
    /// blocked on a slow client races its write against this, so the connection is cut at
    /// once instead of at the write timeout.
    pub async fn overflow(&self) {
        loop {
            if self.ended() == Ended::Overflow {
                return;
            }
            self.overflowed.notified().await;
        }
    }

    /// Queue `msg`; false (and the outbox ends) when the subscriber is too far behind.
    fn offer(&self, msg: &Arc<Message>) -> bool {
        if self.ended() != Ended::Open {
            return false;
        }
        let cost = msg.cost();
        let queued = self.queued_bytes.fetch_add(cost, Ordering::AcqRel) + cost;
        if queued > self.max_bytes || self.tx.try_send(Item::Message(msg.clone())).is_err() {
            self.queued_bytes.fetch_sub(cost, Ordering::AcqRel);
            self.end(Ended::Overflow);
            return false;
        }
        true
    }

    /// The consumer took `msg` off the queue.
    pub fn taken(&self, msg: &Message) {
        self.queued_bytes.fetch_sub(msg.cost(), Ordering::AcqRel);
    }
}

/// Channel state shown by `GET /pub/...` and returned by publishing (Nchan's channel info).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChannelInfo {
    /// Messages in the replay buffer.
    pub messages: usize,
    /// Seconds since a subscriber last joined (-1: never).
    pub requested: i64,
    /// Subscribers now (connections and webhook subscriptions).
    pub subscribers: usize,
    /// Newest message id, if any.
    pub last_message_id: Option<String>,
}

impl ChannelInfo {
    /// Nchan's plain-text form.
    pub fn to_text(&self) -> String {
        format!(
            "queued messages: {}\nlast requested: {} sec. ago\nactive subscribers: {}\nlast message id: {}\n",
            self.messages,
            self.requested,
            self.subscribers,
            self.last_message_id.as_deref().unwrap_or("none")
        )
    }
}

/// Where a subscriber starts on one channel.
pub struct Start {
    /// Buffered messages to deliver first, oldest first.
    pub backlog: Vec<Arc<Message>>,
    /// Set when the resume id could not be honoured exactly.
    pub gap: Option<Gap>,
    /// The channel's newest id at the moment of joining (`{epoch}:0` before any message).
    pub position: MessageId,
}

/// A gap to report before the backlog.
#[derive(Debug, Clone)]
pub struct Gap {
    /// Why.
    pub reason: GapReason,
    /// The id the subscriber asked to resume after.
    pub requested: MessageId,
    /// The oldest id it will now get, if any is buffered.
    pub first_available: Option<MessageId>,
}

struct State {
    next_seq: u64,
    ring: VecDeque<Arc<Message>>,
    ring_bytes: usize,
    subs: Vec<Arc<Outbox>>,
    deleted: bool,
    last_requested: Option<Instant>,
    last_activity: Instant,
}

impl State {
    fn evict(&mut self, now: Instant, limits: &BufferLimits) {
        while let Some(front) = self.ring.front() {
            let too_many = self.ring.len() > limits.messages;
            let too_big = self.ring_bytes > limits.bytes;
            let too_old = now.saturating_duration_since(front.published) > limits.age;
            if !(too_many || too_big || too_old) {
                break;
            }
            self.ring_bytes -= front.cost();
            self.ring.pop_front();
        }
    }

    fn window(&self, epoch: u64) -> Window {
        let last = self.next_seq - 1;
        Window {
            epoch,
            first: self.ring.front().map_or(last + 1, |m| m.id.seq),
            last,
        }
    }

    fn info(&self, epoch: u64, now: Instant, holders: usize) -> ChannelInfo {
        ChannelInfo {
            messages: self.ring.len(),
            requested: self
                .last_requested
                .map_or(-1, |t| now.saturating_duration_since(t).as_secs() as i64),
            subscribers: self.subs.len() + holders,
            last_message_id: (self.next_seq > 1).then(|| {
                MessageId {
                    epoch,
                    seq: self.next_seq - 1,
                }
                .to_string()
            }),
        }
    }
}

/// What a publish did.
pub struct Published {
    /// The new message.
    pub message: Arc<Message>,
    /// Subscribers it was offered to (connections and webhook readers).
    pub offered: usize,
    /// Subscribers dropped because their queue overflowed.
    pub overflowed: usize,
    /// Channel state afterwards.
    pub info: ChannelInfo,
}

/// A channel `{app}/{channel}`.
pub struct Channel {
    /// Full name.
    pub name: Arc<str>,
    /// Its epoch.
    pub epoch: u64,
    app_len: usize,
    limits: BufferLimits,
    state: Mutex<State>,
    /// Woken on every publish and on delete, for cursor readers (webhook delivery).
    pub changed: Notify,
    /// Cursor readers holding the channel (it is not swept while held).
    pub holders: AtomicUsize,
}

impl Channel {
    /// A new, empty channel.
    pub fn new(
        name: Arc<str>,
        app_len: usize,
        epoch: u64,
        limits: BufferLimits,
        now: Instant,
    ) -> Self {
        Self {
            name,
            epoch,
            app_len,
            limits,
            state: Mutex::new(State {
                next_seq: 1,
                ring: VecDeque::new(),
                ring_bytes: 0,
                subs: Vec::new(),
                deleted: false,
                last_requested: None,
                last_activity: now,
            }),
            changed: Notify::new(),
            holders: AtomicUsize::new(0),
        }
    }

    /// The owning app.
    pub fn app(&self) -> &str {
        &self.name[..self.app_len]
    }

    /// Publish a message. `None` when the channel was deleted meanwhile (the caller makes a
    /// new one).
    pub fn publish(
        &self,
        data: Bytes,
        content_type: Option<&str>,
        event: Option<&str>,
        now: Instant,
        unix_ms: u64,
    ) -> Option<Published> {
        let mut st = self.state.lock();
        if st.deleted {
            return None;
        }
        let id = MessageId {
            epoch: self.epoch,
            seq: st.next_seq,
        };
        st.next_seq += 1;
        let message = Arc::new(Message::new(
            id,
            self.name.clone(),
            data,
            content_type,
            event,
            now,
            unix_ms,
        ));
        st.ring_bytes += message.cost();
        st.ring.push_back(message.clone());
        st.evict(now, &self.limits);
        st.last_activity = now;
        let live = st.subs.len();
        st.subs.retain(|o| o.offer(&message));
        let overflowed = live - st.subs.len();
        let holders = self.holders.load(Ordering::Acquire);
        let info = st.info(self.epoch, now, holders);
        drop(st);
        self.changed.notify_waiters();
        Some(Published {
            message,
            offered: live + holders,
            overflowed,
            info,
        })
    }

    /// Join with `outbox`, resuming after `resume` if given. `None` when deleted meanwhile.
    pub fn subscribe(
        &self,
        outbox: &Arc<Outbox>,
        resume: Option<MessageId>,
        now: Instant,
    ) -> Option<Start> {
        let mut st = self.state.lock();
        if st.deleted {
            return None;
        }
        st.evict(now, &self.limits);
        let plan = replay::plan(st.window(self.epoch), resume);
        let backlog: Vec<Arc<Message>> = st
            .ring
            .iter()
            .filter(|m| m.id.seq >= plan.from)
            .cloned()
            .collect();
        let gap = plan.gap.zip(resume).map(|(reason, requested)| Gap {
            reason,
            requested,
            first_available: backlog.first().map(|m| m.id),
        });
        st.subs.push(outbox.clone());
        st.last_requested = Some(now);
        st.last_activity = now;
        Some(Start {
            backlog,
            gap,
            position: MessageId {
                epoch: self.epoch,
                seq: st.next_seq - 1,
            },
        })
    }

    /// Remove a subscriber (its connection ended).
    pub fn unsubscribe(&self, outbox_id: u64, now: Instant) {
        let mut st = self.state.lock();
        if let Some(i) = st.subs.iter().position(|o| o.id == outbox_id) {
            st.subs.swap_remove(i);
            st.last_activity = now;
        }
    }

    /// Mark deleted and end every subscriber.
    pub fn delete(&self) {
        let mut st = self.state.lock();
        st.deleted = true;
        for o in st.subs.drain(..) {
            o.end(Ended::Deleted);
            // A full queue is woken by its own backlog and reads `ended` after it.
            let _ = o.tx.try_send(Item::Deleted(self.name.clone()));
        }
        st.ring.clear();
        st.ring_bytes = 0;
        drop(st);
        self.changed.notify_waiters();
    }

    /// Sequence number of the newest message (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.state.lock().next_seq - 1
    }

    /// Whether it was deleted.
    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    /// Current state.
    pub fn info(&self, now: Instant) -> ChannelInfo {
        let mut st = self.state.lock();
        st.evict(now, &self.limits);
        st.info(self.epoch, now, self.holders.load(Ordering::Acquire))
    }

    /// The buffered message with sequence `seq`, or the oldest after it when `seq` is gone;
    /// `None` when nothing at or after `seq` is buffered yet.
    pub fn message_from(&self, seq: u64, now: Instant) -> Option<Arc<Message>> {
        let mut st = self.state.lock();
        st.evict(now, &self.limits);
        let first = st.ring.front()?.id.seq;
        let index = seq.saturating_sub(first) as usize;
        st.ring.get(index).cloned()
    }

    /// Nothing buffered, nobody subscribed or holding it, idle for `idle`: safe to drop.
    pub fn is_idle(&self, now: Instant, idle: Duration) -> bool {
        if self.holders.load(Ordering::Acquire) > 0 {
            return false;
        }
        let mut st = self.state.lock();
        st.evict(now, &self.limits);
        st.subs.is_empty()
            && st.ring.is_empty()
            && now.saturating_duration_since(st.last_activity) >= idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BufferLimits = BufferLimits {
        messages: 3,
        bytes: 1 << 20,
        age: Duration::from_secs(60),
    };

    fn chan(now: Instant) -> Channel {
        Channel::new("app/c".into(), 3, 9, LIMITS, now)
    }

    fn drain(rx: &mut mpsc::Receiver<Item>) -> Vec<u64> {
        let mut out = Vec::new();
        while let Ok(Item::Message(m)) = rx.try_recv() {
            out.push(m.id.seq);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn replay_then_live_without_gap_or_duplicate() {
        let now = Instant::now();
        let c = chan(now);
        assert_eq!(c.app(), "app");
        for i in 0..5u8 {
            c.publish(Bytes::from(vec![i]), None, None, now, 0)
                .expect("open");
        }
        let (o, mut rx) = Outbox::new(1, 16, 1 << 20);
        let start = c
            .subscribe(&o, Some(MessageId { epoch: 9, seq: 3 }), now)
            .expect("open");
        assert!(start.gap.is_none());
        assert_eq!(
            start.backlog.iter().map(|m| m.id.seq).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(start.position, MessageId { epoch: 9, seq: 5 });
        c.publish(Bytes::from_static(b"x"), None, None, now, 0)
            .expect("open");
        assert_eq!(drain(&mut rx), vec![6]);
        // Resuming from 1: 2 was evicted (buffer of 3 holds 4..=6): a gap, then 4, 5, 6.
        let (o2, _rx2) = Outbox::new(2, 16, 1 << 20);
        let s2 = c
            .subscribe(&o2, Some(MessageId { epoch: 9, seq: 1 }), now)
            .expect("open");
        let gap = s2.gap.expect("gap");
        assert_eq!(gap.reason, GapReason::Expired);
        assert_eq!(gap.first_available, Some(MessageId { epoch: 9, seq: 4 }));
        assert_eq!(c.info(now).subscribers, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn age_eviction_uses_the_clock() {
        let now = Instant::now();
        let c = chan(now);
        c.publish(Bytes::from_static(b"a"), None, None, now, 0)
            .expect("open");
        assert_eq!(c.info(now).messages, 1);
        let later = now + Duration::from_secs(61);
        assert_eq!(c.info(later).messages, 0);
        assert_eq!(c.info(later).last_message_id.as_deref(), Some("9:1"));
        assert!(c.is_idle(later, Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_outbox_overflows_alone() {
        let now = Instant::now();
        let c = chan(now);
        let (slow, _slow_rx) = Outbox::new(1, 2, 1 << 20);
        let (fast, mut fast_rx) = Outbox::new(2, 100, 1 << 20);
        c.subscribe(&slow, None, now).expect("open");
        c.subscribe(&fast, None, now).expect("open");
        let mut got = Vec::new();
        for _ in 0..10 {
            let p = c
                .publish(Bytes::from_static(b"m"), None, None, now, 0)
                .expect("open");
            got.extend(drain(&mut fast_rx));
            if p.overflowed > 0 {
                assert_eq!(p.message.id.seq, 3);
            }
        }
        assert_eq!(slow.ended(), Ended::Overflow);
        assert_eq!(fast.ended(), Ended::Open);
        assert_eq!(got, (1..=10).collect::<Vec<_>>());
        assert_eq!(c.info(now).subscribers, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn byte_limit_overflows() {
        let now = Instant::now();
        let c = chan(now);
        let (o, _rx) = Outbox::new(1, 100, 1000);
        c.subscribe(&o, None, now).expect("open");
        c.publish(Bytes::from(vec![0; 500]), None, None, now, 0)
            .expect("open");
        assert_eq!(o.ended(), Ended::Open);
        c.publish(Bytes::from(vec![0; 500]), None, None, now, 0)
            .expect("open");
        assert_eq!(o.ended(), Ended::Overflow);
    }

    #[tokio::test(start_paused = true)]
    async fn delete_ends_subscribers() {
        let now = Instant::now();
        let c = chan(now);
        let (o, mut rx) = Outbox::new(1, 4, 1 << 20);
        c.subscribe(&o, None, now).expect("open");
        c.delete();
        assert!(matches!(rx.try_recv(), Ok(Item::Deleted(_))));
        assert_eq!(o.ended(), Ended::Deleted);
        assert!(c.publish(Bytes::new(), None, None, now, 0).is_none());
        assert!(c.subscribe(&o, None, now).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn message_from_follows_the_ring() {
        let now = Instant::now();
        let c = chan(now);
        assert!(c.message_from(1, now).is_none());
        for _ in 0..5 {
            c.publish(Bytes::new(), None, None, now, 0).expect("open");
        }
        // Ring holds 3..=5.
        assert_eq!(c.message_from(1, now).map(|m| m.id.seq), Some(3));
        assert_eq!(c.message_from(4, now).map(|m| m.id.seq), Some(4));
        assert!(c.message_from(6, now).is_none());
    }
}
