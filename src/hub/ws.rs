//! WebSocket transports (fastwebsockets on a hyper upgrade): subscribers, and publishers that
//! send one message per frame.
//!
//! A subscriber connection is split: a reader task answers pings and notices the close, the
//! writer drains the outbox, writes every queued frame into one buffer and flushes it with a
//! single write (under a write timeout), and pings on the heartbeat.

use super::channel::{Ended, Item};
use super::message::Message;
use super::sse::gap_json;
use super::{ChannelName, Hub, Subscription};
use bytes::Bytes;
use fastwebsockets::{
    FragmentCollectorRead, Frame, OpCode, Payload, Role, WebSocket, WebSocketError,
};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::WriteHalf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// Close code for a subscriber dropped as too slow.
pub const CLOSE_OVERFLOW: u16 = 1008;
/// Close code for a deleted channel.
pub const CLOSE_DELETED: u16 = 4404;
/// Close code when the gateway shuts down.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Most queued messages written per flush.
const BATCH: usize = 256;

type Io = TokioIo<Upgraded>;

/// An `AsyncWrite` that collects writes in memory until `flush`, so many frames leave in one
/// system call. It holds no buffer while idle.
pub struct BatchWriter<W> {
    inner: W,
    buf: Vec<u8>,
    written: usize,
}

impl<W> BatchWriter<W> {
    /// Wrap `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for BatchWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut n = 0;
        for b in bufs {
            this.buf.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.written < this.buf.len() {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &this.buf[this.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.written += n;
        }
        this.written = 0;
        this.buf.clear();
        if this.buf.capacity() > 64 * 1024 {
            this.buf = Vec::new();
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What the reader task hands to the writer.
enum Inbound {
    /// Answer a ping.
    Pong(Vec<u8>),
    /// Echo the client's close and stop.
    Close(Vec<u8>),
    /// A whole text or binary message.
    Message(Bytes, OpCode),
}

/// Yields one byte read ahead, then reads from `inner`.
struct Prefixed<R> {
    first: Option<u8>,
    inner: R,
}

impl<R: AsyncRead + Unpin> AsyncRead for Prefixed<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(b) = self.first.take() {
            if buf.remaining() > 0 {
                buf.put_slice(&[b]);
                return Poll::Ready(Ok(()));
            }
            self.first = Some(b);
        }
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

/// Upgrade and split; a reader task collects whole messages (up to `max_message`) and the
/// control frames that need an answer, and ends its channel when the client goes away.
///
/// fastwebsockets gives every reader an 8 KiB buffer. Most subscribers never send a frame,
/// so the reader waits for the client's first byte before it makes one: an idle subscriber
/// holds no read buffer (README, Event hub: memory per idle subscriber).
async fn accept(
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    max_message: usize,
) -> Option<(Writer, mpsc::Receiver<Inbound>, tokio::task::JoinHandle<()>)> {
    let ws: WebSocket<Io> = match upgrade.await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            return None;
        }
    };
    let (mut r, w) = tokio::io::split(ws.into_inner());
    let (_, mut wr) = fastwebsockets::after_handshake_split(
        tokio::io::empty(),
        BatchWriter::new(w),
        Role::Server,
    );
    wr.set_writev(true);
    wr.set_writev_threshold(0);
    let (tx, rx) = mpsc::channel::<Inbound>(16);
    let reader = tokio::spawn(async move {
        let mut first = [0u8; 1];
        match r.read(&mut first).await {
            Ok(1) => {}
            _ => return,
        }
        let prefixed = Prefixed {
            first: Some(first[0]),
            inner: r,
        };
        let (mut rd, _) =
            fastwebsockets::after_handshake_split(prefixed, tokio::io::sink(), Role::Server);
        rd.set_max_message_size(max_message.saturating_add(1));
        let mut rd = FragmentCollectorRead::new(rd);
        loop {
            let control = tx.clone();
            let mut send = move |f: Frame<'_>| {
                let c = match f.opcode {
                    OpCode::Close => Inbound::Close(f.payload.to_vec()),
                    _ => Inbound::Pong(f.payload.to_vec()),
                };
                let _ = control.try_send(c);
                std::future::ready(Ok::<(), std::convert::Infallible>(()))
            };
            match rd.read_frame(&mut send).await {
                Ok(f) if matches!(f.opcode, OpCode::Text | OpCode::Binary) => {
                    let m = Inbound::Message(Bytes::copy_from_slice(&f.payload), f.opcode);
                    if tx.send(m).await.is_err() {
                        break;
                    }
                }
                Ok(f) if f.opcode == OpCode::Close => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "websocket read ended");
                    break;
                }
            }
        }
    });
    Some((wr, rx, reader))
}

type Writer = fastwebsockets::WebSocketWrite<BatchWriter<WriteHalf<Io>>>;

fn message_frame<'a>(m: &'a Message, meta: bool) -> Frame<'a> {
    if meta {
        Frame::text(Payload::Borrowed(m.json_meta()))
    } else if m.is_utf8() {
        Frame::text(Payload::Borrowed(&m.data))
    } else {
        Frame::binary(Payload::Borrowed(&m.data))
    }
}

async fn flush(wr: &mut Writer) -> Result<(), WebSocketError> {
    match crate::http_server::timed_write(wr.flush()).await {
        Ok(r) => r,
        Err(_) => Err(WebSocketError::IoError(io::ErrorKind::TimedOut.into())),
    }
}

async fn close(wr: &mut Writer, code: u16, reason: &str) {
    let _ = wr.write_frame(Frame::close(code, reason.as_bytes())).await;
    let _ = flush(wr).await;
}

/// Serve a subscriber on an upgraded connection until it leaves, overflows, its channel is
/// deleted, or the gateway shuts down.
pub async fn serve_subscriber(
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    mut sub: Subscription,
    meta: bool,
    heartbeat: Duration,
    mut shutdown: pingora_core::server::ShutdownWatch,
) {
    let Some((mut wr, mut ctl_rx, reader)) = accept(upgrade, 64 * 1024).await else {
        return;
    };
    let hub = sub.hub.clone();
    let starts = std::mem::take(&mut sub.starts);
    let mut opening = 0u64;
    for (name, start) in &starts {
        if let Some(json) = gap_json(name, start) {
            let _ = wr.write_frame(Frame::text(Payload::Owned(json))).await;
        }
        for m in &start.backlog {
            let _ = wr.write_frame(message_frame(m, meta)).await;
            opening += 1;
        }
    }
    drop(starts);
    if flush(&mut wr).await.is_err() {
        reader.abort();
        return;
    }
    hub.stats.delivered.fetch_add(opening, Ordering::Relaxed);

    let mut ping = tokio::time::interval(heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.reset();
    // Made once: a new `changed()` per pass registers and drops a waiter on every message.
    let stopping = shutdown.changed();
    tokio::pin!(stopping);
    let outbox = sub.outbox.clone();
    loop {
        tokio::select! {
            biased;
            c = ctl_rx.recv() => match c {
                Some(Inbound::Pong(p)) => {
                    let _ = wr.write_frame(Frame::pong(Payload::Owned(p))).await;
                }
                Some(Inbound::Close(p)) => {
                    let _ = wr.write_frame(Frame::close_raw(Payload::Owned(p))).await;
                    let _ = flush(&mut wr).await;
                    break;
                }
                // Subscribers do not publish; frames they send are ignored.
                Some(Inbound::Message(..)) => {}
                None => break,
            },
            item = sub.rx.recv() => {
                let mut next = item;
                let mut n = 0u64;
                let mut deleted = false;
                while let Some(it) = next.take() {
                    match it {
                        Item::Message(m) => {
                            sub.outbox.taken(&m);
                            if wr.write_frame(message_frame(&m, meta)).await.is_err() {
                                break;
                            }
                            n += 1;
                        }
                        Item::Deleted(_) => {
                            deleted = true;
                            break;
                        }
                    }
                    if (n as usize) < BATCH {
                        next = sub.rx.try_recv().ok();
                    }
                }
                hub.stats.delivered.fetch_add(n, Ordering::Relaxed);
                if deleted {
                    close(&mut wr, CLOSE_DELETED, "channel deleted").await;
                    break;
                }
            }
            _ = ping.tick() => {
                let _ = wr.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b""))).await;
            }
            _ = &mut stopping => {
                close(&mut wr, CLOSE_GOING_AWAY, "gateway shutting down").await;
                break;
            }
        }
        match sub.outbox.ended() {
            Ended::Open => {}
            Ended::Overflow => {
                let lost = 1 + sub.rx.len() as u64;
                hub.stats.dropped.fetch_add(lost, Ordering::Relaxed);
                close(
                    &mut wr,
                    CLOSE_OVERFLOW,
                    "subscriber queue overflow (too slow); resume from your last id",
                )
                .await;
                break;
            }
            Ended::Deleted => {
                close(&mut wr, CLOSE_DELETED, "channel deleted").await;
                break;
            }
        }
        tokio::select! {
            // Biased: a flush that completes at once never registers the overflow waiter.
            biased;
            r = flush(&mut wr) => if r.is_err() {
                break;
            },
            // Too slow: its write is stuck and its queue full. Cut it now (no close frame can
            // get through a full socket); it can resume from its last id.
            _ = outbox.overflow() => {
                let lost = 1 + sub.rx.len() as u64;
                hub.stats.dropped.fetch_add(lost, Ordering::Relaxed);
                tracing::debug!(outbox = outbox.id(), "slow WebSocket subscriber cut while a write was blocked");
                break;
            }
        }
    }
    reader.abort();
}

/// Serve a publisher: every text or binary message is published to `name`; each reply frame
/// is the channel info JSON (or an error JSON), in order.
pub async fn serve_publisher(
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    hub: Arc<Hub>,
    name: ChannelName,
    mut shutdown: pingora_core::server::ShutdownWatch,
) {
    let limit = hub.settings.max_message_bytes;
    // Up to 4x the limit gets a JSON refusal; beyond that the reader drops the connection.
    let Some((mut wr, mut inbound, reader)) = accept(upgrade, limit.saturating_mul(4)).await else {
        return;
    };
    let stopping = shutdown.changed();
    tokio::pin!(stopping);
    loop {
        let item = tokio::select! {
            i = inbound.recv() => i,
            _ = &mut stopping => {
                close(&mut wr, CLOSE_GOING_AWAY, "gateway shutting down").await;
                break;
            }
        };
        let reply = match item {
            Some(Inbound::Message(data, opcode)) => {
                let content_type = if opcode == OpCode::Text {
                    "text/plain; charset=utf-8"
                } else {
                    "application/octet-stream"
                };
                // The hub checks size, name and app; its refusal is the same JSON as over HTTP.
                match hub.publish(&name, data, Some(content_type), None) {
                    Ok(p) => serde_json::to_vec(&p.info).unwrap_or_default(),
                    Err(e) => crate::error::ApiError::from(e).body().to_vec(),
                }
            }
            Some(Inbound::Pong(p)) => {
                let _ = wr.write_frame(Frame::pong(Payload::Owned(p))).await;
                if flush(&mut wr).await.is_err() {
                    break;
                }
                continue;
            }
            Some(Inbound::Close(p)) => {
                let _ = wr.write_frame(Frame::close_raw(Payload::Owned(p))).await;
                let _ = flush(&mut wr).await;
                break;
            }
            None => break,
        };
        if wr
            .write_frame(Frame::text(Payload::Owned(reply)))
            .await
            .is_err()
            || flush(&mut wr).await.is_err()
        {
            break;
        }
    }
    reader.abort();
}
