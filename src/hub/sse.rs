//! Server-Sent Events: a hyper response body that reads a [`Subscription`]'s outbox directly
//! (no task or channel in between), batches whatever is queued into one chunk, and sends a
//! comment heartbeat when idle.
//!
//! Each event carries `id:` (for a multiplexed stream, the comma-separated ids of every
//! channel, so `Last-Event-ID` resumes all of them), `event:` when the publisher named one, and
//! the message's `data:` lines, encoded once per message and shared by all subscribers. The
//! stream opens with any `gap` event, the replayed backlog, and an id-only record that sets
//! the client's `Last-Event-ID` even before the first live message.

use super::channel::{Ended, Item, Start};
use super::message::{Message, MessageId};
use super::replay::GapReason;
use super::{ChannelName, Subscription};
use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body, Frame};
use serde::Serialize;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Most queued messages put in one chunk.
const BATCH: usize = 256;
/// Chunk size after which a batch is sent.
const BATCH_BYTES: usize = 256 * 1024;

/// The JSON of a gap notice (SSE `gap` event data, WebSocket meta frame).
#[derive(Serialize)]
pub struct GapNotice<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    channel: &'a str,
    reason: &'static str,
    requested: String,
    first_available: Option<String>,
}

/// Gap notice JSON for one channel start, if it has a gap.
pub fn gap_json(name: &ChannelName, start: &Start) -> Option<Vec<u8>> {
    let gap = start.gap.as_ref()?;
    let notice = GapNotice {
        kind: "gap",
        channel: name.as_str(),
        reason: GapReason::as_str(gap.reason),
        requested: gap.requested.to_string(),
        first_available: gap.first_available.map(|id| id.to_string()),
    };
    serde_json::to_vec(&notice).ok()
}

/// An SSE response body over a subscription.
pub struct SseBody {
    sub: Subscription,
    meta: bool,
    positions: Vec<(Arc<str>, MessageId)>,
    opening: Option<Bytes>,
    heartbeat: tokio::time::Interval,
    shutdown: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    done: bool,
}

impl SseBody {
    /// The subscriber's outbox.
    pub fn outbox(&self) -> Arc<super::channel::Outbox> {
        self.sub.outbox.clone()
    }

    /// Count what an overflowed subscriber did not get: the refused message and its queue.
    fn count_dropped(&self) {
        let lost = 1 + self.sub.rx.len() as u64;
        self.sub
            .hub
            .stats
            .dropped
            .fetch_add(lost, Ordering::Relaxed);
    }

    /// The stream for `sub`; `meta` sends meta JSON as data (always for multiplexed streams).
    pub fn new(
        mut sub: Subscription,
        meta: bool,
        heartbeat: Duration,
        mut shutdown: pingora_core::server::ShutdownWatch,
    ) -> Self {
        let meta = meta || sub.starts.len() > 1;
        let starts = std::mem::take(&mut sub.starts);
        let mut positions = Vec::with_capacity(starts.len());
        let mut out = BytesMut::new();
        let mut backlog = 0u64;
        for (name, start) in &starts {
            // Until its backlog is replayed, a channel stands just before its first replayed
            // message; a channel with nothing to replay stands at its newest id.
            let before = start.backlog.first().map_or(start.position, |m| MessageId {
                epoch: m.id.epoch,
                seq: m.id.seq - 1,
            });
            positions.push((Arc::<str>::from(name.as_str()), before));
            if let Some(json) = gap_json(name, start) {
                out.put_slice(b"event: gap\ndata: ");
                out.put_slice(&json);
                out.put_slice(b"\n\n");
            }
        }
        for (i, (_, start)) in starts.iter().enumerate() {
            for m in &start.backlog {
                positions[i].1 = m.id;
                write_event(&mut out, &positions, m, meta);
                backlog += 1;
            }
            positions[i].1 = start.position;
        }
        out.put_slice(b"id: ");
        write_ids(&mut out, &positions);
        out.put_slice(b"\n\n");
        sub.hub
            .stats
            .delivered
            .fetch_add(backlog, Ordering::Relaxed);
        let mut heartbeat = tokio::time::interval(heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the opening chunk stands for it.
        heartbeat.reset();
        Self {
            sub,
            meta,
            positions,
            opening: Some(out.freeze()),
            heartbeat,
            shutdown: Box::pin(async move {
                let _ = shutdown.changed().await;
            }),
            done: false,
        }
    }

    fn push(&mut self, m: &Message, out: &mut BytesMut) {
        if let Some(p) = self.positions.iter_mut().find(|(c, _)| **c == *m.channel) {
            p.1 = m.id;
        }
        write_event(out, &self.positions, m, self.meta);
    }
}

fn write_ids(out: &mut BytesMut, ids: &[(Arc<str>, MessageId)]) {
    let mut s = String::with_capacity(ids.len() * 24);
    for (i, (_, id)) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{id}");
    }
    out.put_slice(s.as_bytes());
}

fn write_event(out: &mut BytesMut, ids: &[(Arc<str>, MessageId)], m: &Message, meta: bool) {
    out.put_slice(b"id: ");
    write_ids(out, ids);
    out.put_u8(b'\n');
    out.put_slice(m.sse_body(meta));
}

/// Comment sent to a subscriber dropped for being too slow.
pub const OVERFLOW_COMMENT: &[u8] =
    b": disconnected: subscriber queue overflow (too slow); reconnect with Last-Event-ID to resume\n\n";

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(b) = this.opening.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if this.shutdown.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b": gateway shutting down\n\n",
            )))));
        }
        if this.sub.outbox.ended() == Ended::Overflow {
            this.done = true;
            this.count_dropped();
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(OVERFLOW_COMMENT)))));
        }
        let mut out = BytesMut::new();
        let mut n = 0u64;
        while (n as usize) < BATCH && out.len() < BATCH_BYTES {
            match this.sub.rx.poll_recv(cx) {
                Poll::Ready(Some(Item::Message(m))) => {
                    this.sub.outbox.taken(&m);
                    this.push(&m, &mut out);
                    n += 1;
                }
                Poll::Ready(Some(Item::Deleted(ch))) => {
                    out.put_slice(b"event: deleted\ndata: ");
                    out.put_slice(
                        serde_json::json!({"type": "deleted", "channel": &*ch})
                            .to_string()
                            .as_bytes(),
                    );
                    out.put_slice(b"\n\n");
                    this.done = true;
                    break;
                }
                Poll::Ready(None) => {
                    this.done = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if n > 0 {
            this.sub.hub.stats.delivered.fetch_add(n, Ordering::Relaxed);
        }
        if !out.is_empty() {
            this.heartbeat.reset();
            return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if this.heartbeat.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b":\n\n")))));
        }
        Poll::Pending
    }
}

/// Serve an SSE body on a raw connection (claimed from hyper): the response head, then each
/// frame as one HTTP/1.1 chunk, until the stream ends, the client leaves or a write stalls
/// for [`crate::http_server::WRITE_TIMEOUT`].
pub async fn serve_raw(stream: pingora_core::protocols::Stream, body: SseBody) {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nx-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n";
    let timeout = crate::http_server::WRITE_TIMEOUT;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut body = body;
    let mut out: Vec<u8> = Vec::with_capacity(HEAD.len() + 256);
    out.extend_from_slice(HEAD);
    let mut probe = [0u8; 1];
    let outbox = body.outbox();
    loop {
        tokio::select! {
            frame = body.frame() => {
                let data = match frame {
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => d,
                        Err(_) => continue,
                    },
                    Some(Err(never)) => match never {},
                    None => {
                        out.extend_from_slice(b"0\r\n\r\n");
                        let _ = tokio::time::timeout(timeout, wr.write_all(&out)).await;
                        return;
                    }
                };
                let _ = write!(ChunkHead(&mut out), "{:x}\r\n", data.len());
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
                tokio::select! {
                    // Biased: a write that completes at once never registers the waiter.
                    biased;
                    r = crate::http_server::timed_write(wr.write_all(&out)) => match r {
                        Ok(Ok(())) => {}
                        _ => return,
                    },
                    // Too slow: its write is stuck and its queue full. Cut it now; it can
                    // resume from its last id.
                    _ = outbox.overflow() => {
                        body.count_dropped();
                        tracing::debug!(outbox = outbox.id(), "slow SSE subscriber cut while a write was blocked");
                        return;
                    }
                }
                out.clear();
                if out.capacity() > 64 * 1024 {
                    out = Vec::new();
                }
            }
            r = rd.read(&mut probe) => match r {
                // The client has nothing to say on an event stream but its leaving.
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

/// `fmt::Write` into a byte buffer.
struct ChunkHead<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for ChunkHead<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Refuse a claimed subscribe request: the JSON error and close.
pub async fn refuse_raw(mut stream: pingora_core::protocols::Stream, e: &crate::error::ApiError) {
    use tokio::io::AsyncWriteExt;
    let body = e.body();
    let retry = if e.status == http::StatusCode::SERVICE_UNAVAILABLE {
        "retry-after: 5\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}connection: close\r\n\r\n",
        e.status.as_u16(),
        e.status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let timeout = crate::http_server::WRITE_TIMEOUT;
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(timeout, write).await;
}
