//! Messages, their ids, and their per-transport encodings (made once per message, shared by
//! every subscriber as `Bytes`).

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use tokio::time::Instant;

/// A message id: the channel's epoch and a per-channel sequence number, written `{epoch}:{seq}`.
///
/// The epoch is fixed when a channel is created (creation time in Unix milliseconds, unique per
/// process), so ids from a deleted and recreated channel, or from before a restart, are told
/// apart from current ones. Sequence numbers start at 1; `{epoch}:0` means "before the first".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// Channel epoch.
    pub epoch: u64,
    /// Sequence number within the epoch.
    pub seq: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

/// A malformed message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a message id like `1733250000123:42`")]
pub struct BadId(pub String);

impl FromStr for MessageId {
    type Err = BadId;
    fn from_str(s: &str) -> Result<Self, BadId> {
        let bad = || BadId(s.chars().take(64).collect());
        let (e, q) = s.trim().split_once(':').ok_or_else(bad)?;
        let digits =
            |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(e) || !digits(q) {
            return Err(bad());
        }
        Ok(Self {
            epoch: e.parse().map_err(|_| bad())?,
            seq: q.parse().map_err(|_| bad())?,
        })
    }
}

/// One published message.
pub struct Message {
    /// Its id.
    pub id: MessageId,
    /// Full channel name, `{app}/{channel}`.
    pub channel: Arc<str>,
    /// The body as published.
    pub data: Bytes,
    /// The publisher's content type, if any.
    pub content_type: Option<Box<str>>,
    /// SSE event name (`X-Event-Type` / `X-EventSource-Event`), if any.
    pub event: Option<Box<str>>,
    /// When it was published.
    pub published: Instant,
    /// Unix milliseconds at publish, for meta frames and webhooks.
    pub published_unix_ms: u64,
    utf8: bool,
    sse_plain: OnceLock<Bytes>,
    sse_meta: OnceLock<Bytes>,
    json_meta: OnceLock<Bytes>,
}

#[derive(Serialize)]
struct MetaFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: String,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    published_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
}

impl Message {
    /// A message; `now` and `unix_ms` stamp it.
    pub fn new(
        id: MessageId,
        channel: Arc<str>,
        data: Bytes,
        content_type: Option<&str>,
        event: Option<&str>,
        now: Instant,
        unix_ms: u64,
    ) -> Self {
        let utf8 = std::str::from_utf8(&data).is_ok();
        Self {
            id,
            channel,
            data,
            content_type: content_type.map(Into::into),
            event: event.map(Into::into),
            published: now,
            published_unix_ms: unix_ms,
            utf8,
            sse_plain: OnceLock::new(),
            sse_meta: OnceLock::new(),
            json_meta: OnceLock::new(),
        }
    }

    /// The data is valid UTF-8 (sent as a WebSocket text frame; otherwise binary).
    pub fn is_utf8(&self) -> bool {
        self.utf8
    }

    /// Bytes this message accounts for in buffers and queues: its body plus what the
    /// message itself takes in memory (the struct, its `Arc`, the content type).
    pub fn cost(&self) -> usize {
        self.data.len() + std::mem::size_of::<Self>() + 64
    }

    /// The meta JSON: `{"type":"message","id":..,"channel":..,"event":..,"data":..}`, with
    /// `data_base64` instead of `data` when the body is not UTF-8.
    pub fn json_meta(&self) -> &Bytes {
        self.json_meta.get_or_init(|| {
            let text = std::str::from_utf8(&self.data).ok();
            let frame = MetaFrame {
                kind: "message",
                id: self.id.to_string(),
                channel: &self.channel,
                event: self.event.as_deref(),
                content_type: self.content_type.as_deref(),
                published_ms: self.published_unix_ms,
                data: text,
                data_base64: text.is_none().then(|| base64_encode(&self.data)),
            };
            Bytes::from(serde_json::to_vec(&frame).unwrap_or_default())
        })
    }

    /// The SSE event without its `id:` line (`event:` and `data:` lines and the blank line);
    /// `meta` sends the meta JSON as data instead of the raw body.
    pub fn sse_body(&self, meta: bool) -> &Bytes {
        if meta {
            self.sse_meta
                .get_or_init(|| sse_event(self.event.as_deref(), self.json_meta()))
        } else {
            self.sse_plain
                .get_or_init(|| sse_event(self.event.as_deref(), &self.data))
        }
    }
}

/// `event: NAME` (if any), one `data:` line per line of `data` (CR, LF and CRLF all end a
/// line, as the SSE parser reads them), then the blank line that dispatches the event.
pub fn sse_event(event: Option<&str>, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 32);
    if let Some(e) = event {
        out.put_slice(b"event: ");
        out.put_slice(e.as_bytes());
        out.put_u8(b'\n');
    }
    let mut rest = data;
    loop {
        let end = rest.iter().position(|&b| b == b'\n' || b == b'\r');
        let (line, next) = match end {
            Some(i) => {
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                (&rest[..i], Some(&rest[i + skip..]))
            }
            None => (rest, None),
        };
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_junk() {
        let id: MessageId = "1733250000123:42".parse().expect("id");
        assert_eq!(
            id,
            MessageId {
                epoch: 1733250000123,
                seq: 42
            }
        );
        assert_eq!(id.to_string(), "1733250000123:42");
        for bad in [
            "",
            "1",
            "1:",
            ":1",
            "a:1",
            "1:b",
            "1:2:3",
            "-1:2",
            "1: 2",
            "99999999999999999999999:1",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sse_data_lines_split_on_every_line_ending() {
        let cases: [(&[u8], Option<&str>, &str); 5] = [
            (b"hello", None, "data: hello\n\n"),
            (b"a\nb", Some("tick"), "event: tick\ndata: a\ndata: b\n\n"),
            (b"a\r\nb\rc", None, "data: a\ndata: b\ndata: c\n\n"),
            (b"", None, "data: \n\n"),
            (b"end\n", None, "data: end\ndata: \n\n"),
        ];
        for (data, event, want) in cases {
            assert_eq!(sse_event(event, data), Bytes::from(want), "{data:?}");
        }
    }

    #[test]
    fn meta_is_json_and_binary_goes_base64() {
        let now = Instant::now();
        let m = Message::new(
            MessageId { epoch: 7, seq: 1 },
            "a/b".into(),
            Bytes::from_static(b"hi\n"),
            Some("text/plain"),
            Some("x"),
            now,
            5,
        );
        let v: serde_json::Value = serde_json::from_slice(m.json_meta()).expect("json");
        assert_eq!(v["id"], "7:1");
        assert_eq!(v["channel"], "a/b");
        assert_eq!(v["data"], "hi\n");
        assert_eq!(v["event"], "x");
        assert!(m.is_utf8());
        let b = Message::new(
            MessageId { epoch: 7, seq: 2 },
            "a/b".into(),
            Bytes::from_static(&[0xff, 0]),
            None,
            None,
            now,
            5,
        );
        let v: serde_json::Value = serde_json::from_slice(b.json_meta()).expect("json");
        assert_eq!(v["data_base64"], "/wA=");
        assert!(v.get("data").is_none());
        assert!(!b.is_utf8());
        // The meta SSE body is one data line: JSON escapes its newlines.
        assert_eq!(m.sse_body(true).iter().filter(|&&c| c == b'\n').count(), 3);
    }
}
