//! The event hub end to end: real gateway process, real HTTP, SSE and WebSocket clients on
//! loopback.

mod common;

use common::{Gateway, ADMIN_KEY};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const TOKEN_A: &str = "token-of-app-shop-0123456789";
const TOKEN_B: &str = "token-of-app-bill-0123456789";

async fn gateway(extra: &str) -> Gateway {
    let gw = Gateway::start(extra).await;
    gw.register("shop", &["http://127.0.0.1:9".into()], TOKEN_A)
        .await;
    gw.register("bill", &["http://127.0.0.1:9".into()], TOKEN_B)
        .await;
    gw
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn publish(gw: &Gateway, channel: &str, body: &str) -> (StatusCode, Value) {
    let r = client()
        .post(gw.events_url(&format!("/v3/events/pub/{channel}")))
        .bearer_auth(TOKEN_A)
        .body(body.to_string())
        .send()
        .await
        .expect("publish");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// One SSE record as read off the wire.
#[derive(Debug, Default, Clone)]
struct Event {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    comment: Option<String>,
}

/// A minimal SSE reader over a streaming reqwest response, parsing as EventSource does.
struct Sse {
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl Sse {
    async fn open(url: &str, token: Option<&str>, last_id: Option<&str>) -> Sse {
        Self::try_open(url, token, last_id).await.expect("sse 200")
    }

    async fn try_open(
        url: &str,
        token: Option<&str>,
        last_id: Option<&str>,
    ) -> Result<Sse, (StatusCode, Value)> {
        let mut req = client().get(url).header("accept", "text/event-stream");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let r = req.send().await.expect("sse request");
        if r.status() != StatusCode::OK {
            let s = r.status();
            return Err((s, r.json().await.unwrap_or(Value::Null)));
        }
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        Ok(Sse {
            stream: Box::pin(r.bytes_stream()),
            buf: String::new(),
        })
    }

    /// Next record, or `None` when the stream ends. Panics after 10 s of nothing.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = Event::default();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        ev.comment = Some(c.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        ev.id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        ev.event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        ev.data = Some(match ev.data.take() {
                            Some(d) => format!("{d}\n{v}"),
                            None => v.to_string(),
                        });
                    }
                }
                return Some(ev);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.stream.next())
                .await
                .expect("sse: nothing for 10 s");
            match chunk {
                Some(Ok(b)) => self.buf.push_str(std::str::from_utf8(&b).expect("utf-8")),
                _ => return None,
            }
        }
    }

    /// Next record that carries data (skipping id-only records and comments).
    async fn next_data(&mut self) -> Option<Event> {
        loop {
            let ev = self.next().await?;
            if ev.data.is_some() {
                return Some(ev);
            }
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(url: &str, token: Option<&str>) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().expect("ws request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    assert_eq!(resp.status(), 101);
    ws
}

/// Next text or binary payload, skipping pings; `None` on close (with its code).
async fn ws_next(ws: &mut Ws) -> Result<Vec<u8>, Option<u16>> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("ws: nothing for 10 s");
        match m {
            Some(Ok(WsMessage::Text(t))) => return Ok(t.into_bytes()),
            Some(Ok(WsMessage::Binary(b))) => return Ok(b),
            Some(Ok(WsMessage::Close(c))) => return Err(c.map(|c| u16::from(c.code))),
            Some(Ok(_)) => continue,
            _ => return Err(None),
        }
    }
}

fn ws_url(gw: &Gateway, path: &str) -> String {
    format!("ws://{}{}", gw.events, path)
}

#[tokio::test]
async fn publish_replies_info_and_permissions_hold_across_apps() {
    let gw = gateway("").await;
    let (s, info) = publish(&gw, "shop/orders", "one").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{info}");
    assert_eq!(info["messages"], 1);
    assert_eq!(info["subscribers"], 0);
    assert_eq!(info["requested"], -1);
    let last = info["last_message_id"].as_str().expect("id").to_string();
    assert!(last.ends_with(":1"), "{last}");

    let url = gw.events_url("/v3/events/pub/shop/orders");
    let r = client()
        .get(&url)
        .bearer_auth(TOKEN_A)
        .header("accept", "text/plain")
        .send()
        .await
        .expect("info");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("text");
    assert!(
        text.contains("queued messages: 1") && text.contains(&last),
        "{text}"
    );

    // Another app's token, no credential, the admin key, an unknown app.
    let r = client()
        .post(&url)
        .bearer_auth(TOKEN_B)
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    let r = client().post(&url).body("x").send().await.expect("post");
    assert_eq!(r.status(), 401);
    let r = client()
        .post(&url)
        .bearer_auth(ADMIN_KEY)
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    let r = client()
        .post(gw.events_url("/v3/events/pub/ghost/x"))
        .bearer_auth(ADMIN_KEY)
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 404);

    // Through the public proxy listener too.
    let r = client()
        .post(gw.proxy_url("/v3/events/pub/shop/orders"))
        .bearer_auth(TOKEN_A)
        .body("via proxy")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    let info: Value = r.json().await.expect("json");
    assert_eq!(info["messages"], 3);

    let r = client()
        .delete(&url)
        .bearer_auth(TOKEN_A)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 200);
    let r = client()
        .get(&url)
        .bearer_auth(TOKEN_A)
        .send()
        .await
        .expect("info");
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.expect("json error");
    assert!(body["error"].as_str().is_some());
}

#[tokio::test]
async fn sse_order_event_names_multiline_and_resume() {
    let gw = gateway("[hub]\nbuffer_messages = 10\n").await;
    let url = gw.events_url("/v3/events/sub/shop/feed");
    let mut sse = Sse::open(&url, Some(TOKEN_A), None).await;
    let opening = sse.next().await.expect("opening id record");
    let epoch_zero = opening.id.expect("id");
    assert!(epoch_zero.ends_with(":0"), "{epoch_zero}");

    let r = client()
        .post(gw.events_url("/v3/events/pub/shop/feed"))
        .bearer_auth(TOKEN_A)
        .header("x-event-type", "tick")
        .body("line one\nline two")
        .send()
        .await
        .expect("publish");
    assert_eq!(r.status(), 201);
    let ev = sse.next_data().await.expect("event");
    assert_eq!(ev.event.as_deref(), Some("tick"));
    assert_eq!(ev.data.as_deref(), Some("line one\nline two"));
    let first_id = ev.id.expect("id");

    for i in 2..=5 {
        publish(&gw, "shop/feed", &format!("m{i}")).await;
    }
    for i in 2..=5 {
        assert_eq!(
            sse.next_data().await.expect("event").data.as_deref(),
            Some(format!("m{i}").as_str())
        );
    }
    drop(sse);

    // Resume inside the buffer: exactly the messages after the id, then live.
    let mut sse = Sse::open(&url, Some(TOKEN_A), Some(&first_id)).await;
    for i in 2..=5 {
        assert_eq!(
            sse.next_data().await.expect("replay").data.as_deref(),
            Some(format!("m{i}").as_str())
        );
    }
    publish(&gw, "shop/feed", "m6").await;
    assert_eq!(
        sse.next_data().await.expect("live").data.as_deref(),
        Some("m6")
    );
    drop(sse);

    // Beyond the buffer (10 messages): a gap event, then the oldest buffered message.
    for i in 7..=30 {
        publish(&gw, "shop/feed", &format!("m{i}")).await;
    }
    let mut sse = Sse::open(&url, Some(TOKEN_A), Some(&first_id)).await;
    let gap = sse.next_data().await.expect("gap");
    assert_eq!(gap.event.as_deref(), Some("gap"));
    let g: Value = serde_json::from_str(gap.data.as_deref().expect("data")).expect("json");
    assert_eq!(g["reason"], "expired");
    assert_eq!(g["requested"], first_id.as_str());
    assert_eq!(
        sse.next_data().await.expect("oldest").data.as_deref(),
        Some("m21")
    );
    drop(sse);

    // Another epoch: the channel was deleted and made again.
    let r = client()
        .delete(gw.events_url("/v3/events/pub/shop/feed"))
        .bearer_auth(TOKEN_A)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 200);
    publish(&gw, "shop/feed", "new epoch").await;
    let mut sse = Sse::open(&url, Some(TOKEN_A), Some(&first_id)).await;
    let gap = sse.next_data().await.expect("gap");
    assert_eq!(gap.event.as_deref(), Some("gap"));
    assert!(gap.data.as_deref().expect("data").contains("\"epoch\""));
    assert_eq!(
        sse.next_data().await.expect("first").data.as_deref(),
        Some("new epoch")
    );
}

#[tokio::test]
async fn websocket_exactly_once_in_order_over_100k_deliveries() {
    let gw = gateway("").await;
    const SUBS: usize = 100;
    const MSGS: usize = 1000;
    let mut tasks = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(SUBS);
    for _ in 0..SUBS {
        let url = ws_url(&gw, "/v3/events/sub/shop/bulk?meta=1");
        let ready = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = ws_connect(&url, Some(TOKEN_A)).await;
            ready.send(()).await.expect("ready");
            let mut got = Vec::with_capacity(MSGS);
            while got.len() < MSGS {
                let frame = ws_next(&mut ws).await.expect("message");
                let v: Value = serde_json::from_slice(&frame).expect("meta json");
                assert_eq!(v["type"], "message");
                assert_eq!(v["channel"], "shop/bulk");
                got.push(
                    v["data"]
                        .as_str()
                        .expect("data")
                        .parse::<usize>()
                        .expect("n"),
                );
            }
            got
        }));
    }
    for _ in 0..SUBS {
        ready_rx.recv().await.expect("subscriber ready");
    }
    // The hub has registered every subscriber before the 101 response; publish over a
    // WebSocket publisher for speed, one reply per frame.
    let mut publisher = ws_connect(&ws_url(&gw, "/v3/events/pub/shop/bulk"), Some(TOKEN_A)).await;
    for i in 0..MSGS {
        publisher
            .send(WsMessage::Text(i.to_string()))
            .await
            .expect("send");
        let reply: Value =
            serde_json::from_slice(&ws_next(&mut publisher).await.expect("reply")).expect("json");
        assert_eq!(reply["subscribers"], SUBS);
    }
    let mut total = 0;
    for t in tasks {
        let got = t.await.expect("subscriber");
        assert_eq!(got, (0..MSGS).collect::<Vec<_>>());
        total += got.len();
    }
    assert_eq!(total, SUBS * MSGS);
}

#[tokio::test]
async fn multiplexed_subscriptions_say_which_channel_and_resume_each() {
    let gw = gateway("").await;
    let mut ws = ws_connect(
        &ws_url(&gw, "/v3/events/sub?channels=shop/a,shop/b"),
        Some(TOKEN_A),
    )
    .await;
    let url = gw.events_url("/v3/events/sub?channels=shop/a,shop/b");
    let mut sse = Sse::open(&url, Some(TOKEN_A), None).await;
    let opening = sse.next().await.expect("opening").id.expect("compound id");
    assert_eq!(opening.split(',').count(), 2, "{opening}");
    publish(&gw, "shop/a", "to a").await;
    publish(&gw, "shop/b", "to b").await;
    for (chan, data) in [("shop/a", "to a"), ("shop/b", "to b")] {
        let v: Value =
            serde_json::from_slice(&ws_next(&mut ws).await.expect("frame")).expect("json");
        assert_eq!(
            (v["channel"].as_str(), v["data"].as_str()),
            (Some(chan), Some(data))
        );
        let ev = sse.next_data().await.expect("sse");
        let v: Value = serde_json::from_str(ev.data.as_deref().expect("data")).expect("json");
        assert_eq!(
            (v["channel"].as_str(), v["data"].as_str()),
            (Some(chan), Some(data))
        );
    }
    // Resume with the compound id after "to a": only "to b" comes back.
    let after_a = {
        let mut s = Sse::open(&url, Some(TOKEN_A), Some(&opening)).await;
        let first = s.next_data().await.expect("replay a");
        assert!(first.data.as_deref().expect("d").contains("to a"));
        first.id.expect("id")
    };
    let mut s = Sse::open(&url, Some(TOKEN_A), Some(&after_a)).await;
    let ev = s.next_data().await.expect("replay b");
    assert!(ev.data.as_deref().expect("d").contains("to b"), "{ev:?}");
}

/// Status of an SSE subscribe to `shop/live`; a refusal must carry a JSON error.
async fn sub(gw: &Gateway, query: &str, token: Option<&str>) -> StatusCode {
    let url = gw.events_url(&format!("/v3/events/sub/shop/live{query}"));
    match Sse::try_open(&url, token, None).await {
        Ok(_) => StatusCode::OK,
        Err((s, body)) => {
            assert!(body["error"].as_str().is_some(), "{body}");
            s
        }
    }
}

#[tokio::test]
async fn tickets_public_channels_and_credentials_table() {
    let gw = gateway("").await;
    let mk = |channels: Value, ttl: &str, token: &str| {
        let gw_url = gw.events_url("/v3/events/tickets");
        let body = serde_json::json!({"channels": channels, "ttl": ttl});
        let token = token.to_string();
        async move {
            let r = client()
                .post(gw_url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("ticket");
            (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, t) = mk(serde_json::json!(["shop/live"]), "10m", TOKEN_A).await;
    assert_eq!(s, 201, "{t}");
    let ticket = t["ticket"].as_str().expect("ticket").to_string();
    let (s, short) = mk(serde_json::json!(["shop/live"]), "1s", TOKEN_A).await;
    assert_eq!(s, 201);
    let short = short["ticket"].as_str().expect("ticket").to_string();
    // A token cannot issue tickets for another app's channels unless it names its app.
    let (s, _) = mk(serde_json::json!(["shop/live"]), "10m", TOKEN_B).await;
    assert_eq!(s, 403);
    let (s, _) = mk(serde_json::json!(["shop/live"]), "48h", TOKEN_A).await;
    assert_eq!(s, 400);

    // Change the MAC's first character (always to a different one; the last character of a
    // base64 MAC carries only 4 bits, so changing it can leave the same bytes).
    let tampered = {
        let dot = ticket.rfind('.').expect("ticket has a MAC");
        let first = ticket.as_bytes()[dot + 1];
        let swapped = if first == b'A' { 'B' } else { 'A' };
        format!("{}{swapped}{}", &ticket[..=dot], &ticket[dot + 2..])
    };
    assert_ne!(tampered, ticket);
    let other_channel = {
        let (_, t) = mk(serde_json::json!(["shop/other"]), "10m", TOKEN_A).await;
        t["ticket"].as_str().expect("ticket").to_string()
    };
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let cases: Vec<(String, Option<String>, StatusCode)> = vec![
        (format!("?ticket={ticket}"), None, StatusCode::OK),
        (String::new(), Some(ticket.clone()), StatusCode::OK),
        (format!("?ticket={short}"), None, StatusCode::UNAUTHORIZED),
        (
            format!("?ticket={tampered}"),
            None,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "?ticket=ngt1.garbage".into(),
            None,
            StatusCode::UNAUTHORIZED,
        ),
        (
            format!("?ticket={other_channel}"),
            None,
            StatusCode::FORBIDDEN,
        ),
        (String::new(), None, StatusCode::UNAUTHORIZED),
        (String::new(), Some(TOKEN_A.into()), StatusCode::OK),
        (String::new(), Some(TOKEN_B.into()), StatusCode::FORBIDDEN),
        (
            String::new(),
            Some("wrong-token-0123456789".into()),
            StatusCode::FORBIDDEN,
        ),
        (String::new(), Some(ADMIN_KEY.into()), StatusCode::OK),
    ];
    for (query, token, want) in cases {
        assert_eq!(
            sub(&gw, &query, token.as_deref()).await,
            want,
            "{query} {token:?}"
        );
    }
    // Server to server: app `bill` subscribes to `shop`'s channel with its own token, naming itself.
    let r = client()
        .get(gw.events_url("/v3/events/sub/shop/live"))
        .header("accept", "text/event-stream")
        .header("x-nextgate-app", "bill")
        .bearer_auth(TOKEN_B)
        .send()
        .await
        .expect("sub");
    assert_eq!(r.status(), 200);

    // Public channels need no credential; declaring one survives a restart.
    let r = client()
        .put(gw.events_url("/v3/events/public/shop/live"))
        .bearer_auth(TOKEN_A)
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
    let r = client()
        .put(gw.events_url("/v3/events/public/shop/live"))
        .bearer_auth(TOKEN_B)
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 403);
    assert_eq!(sub(&gw, "", None).await, StatusCode::OK);
    let mut gw = gw;
    gw.restart().await;
    assert_eq!(sub(&gw, "", None).await, StatusCode::OK);
    // And a ticket issued before the restart is still good (the secret is kept).
    assert_eq!(
        sub(&gw, &format!("?ticket={ticket}"), None).await,
        StatusCode::OK
    );
    let r = client()
        .get(gw.events_url("/v3/events/public/shop"))
        .bearer_auth(TOKEN_A)
        .send()
        .await
        .expect("get");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["public"], serde_json::json!(["shop/live"]));
}

#[tokio::test]
async fn delete_ends_sse_and_websocket_subscribers() {
    let gw = gateway("").await;
    let mut sse = Sse::open(
        &gw.events_url("/v3/events/sub/shop/gone"),
        Some(TOKEN_A),
        None,
    )
    .await;
    let mut ws = ws_connect(&ws_url(&gw, "/v3/events/sub/shop/gone"), Some(TOKEN_A)).await;
    publish(&gw, "shop/gone", "before").await;
    assert_eq!(
        sse.next_data().await.expect("msg").data.as_deref(),
        Some("before")
    );
    assert_eq!(ws_next(&mut ws).await.expect("msg"), b"before");
    // A ping gets its pong (the subscriber's reader starts on the client's first byte).
    ws.send(WsMessage::Ping(b"are you there".to_vec()))
        .await
        .expect("ping");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("pong in 5 s")
        {
            Some(Ok(WsMessage::Pong(p))) => {
                assert_eq!(p, b"are you there");
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    let r = client()
        .delete(gw.events_url("/v3/events/pub/shop/gone"))
        .bearer_auth(TOKEN_A)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 200);
    let ev = sse.next_data().await.expect("deleted event");
    assert_eq!(ev.event.as_deref(), Some("deleted"));
    assert!(sse.next().await.is_none(), "SSE stream must end");
    assert_eq!(ws_next(&mut ws).await, Err(Some(4404)));
}

#[tokio::test]
async fn a_thousand_subscribers_on_one_channel_get_every_message() {
    let gw = gateway("").await;
    let mut subs = Vec::new();
    for _ in 0..1000 {
        subs.push(ws_connect(&ws_url(&gw, "/v3/events/sub/shop/crowd"), Some(TOKEN_A)).await);
    }
    for i in 0..10 {
        let (s, info) = publish(&gw, "shop/crowd", &format!("m{i}")).await;
        assert_eq!(s, 201);
        assert_eq!(info["subscribers"], 1000);
    }
    for ws in subs.iter_mut() {
        for i in 0..10 {
            assert_eq!(ws_next(ws).await.expect("msg"), format!("m{i}").as_bytes());
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn slow_subscriber_is_dropped_while_others_get_everything_and_memory_stays_bounded() {
    use tokio::io::AsyncWriteExt;
    let gw =
        gateway("[hub]\nsubscriber_queue_messages = 256\nsubscriber_queue_bytes = 1048576\n").await;
    // The slow one: asks for a stream and never reads, with a tiny receive buffer.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut slow = sock.connect(gw.events).await.expect("connect");
    slow.write_all(
        format!(
            "GET /v3/events/sub/shop/firehose HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Bearer {TOKEN_A}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("request");
    let mut fast = Vec::new();
    for _ in 0..10 {
        fast.push(ws_connect(&ws_url(&gw, "/v3/events/sub/shop/firehose"), Some(TOKEN_A)).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(gw.pid());
    let payload = "x".repeat(4096);
    let readers: Vec<_> = fast
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut n = 0;
                while n < 3000 {
                    let m = ws_next(&mut ws).await.expect("message");
                    assert_eq!(m.len(), 4096);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut publisher =
        ws_connect(&ws_url(&gw, "/v3/events/pub/shop/firehose"), Some(TOKEN_A)).await;
    let mut last = Value::Null;
    for _ in 0..3000 {
        publisher
            .send(WsMessage::Text(payload.clone()))
            .await
            .expect("send");
        last =
            serde_json::from_slice(&ws_next(&mut publisher).await.expect("reply")).expect("json");
    }
    for r in readers {
        assert_eq!(r.await.expect("reader"), 3000);
    }
    // 12 MB went to each subscriber; the slow one was cut off, the ten others remain.
    assert_eq!(last["subscribers"], 10, "{last}");
    let after = rss_kib(gw.pid());
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // The slow one was cut at once, not left hanging until its write timed out (30 s):
    // what it has buffered, then the end of the stream.
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "the slow subscriber's connection was not closed"
    );
    // The disconnect is counted where Prometheus sees it.
    let metrics = reqwest::Client::new()
        .get(gw.admin_url("/metrics"))
        .bearer_auth(common::ADMIN_KEY)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("nextgate_hub_slow_subscriber_disconnects_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nextgate_hub_messages_published_total 3000\n"),
        "{metrics}"
    );
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nextgate_hub_messages_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 1, "{metrics}");
    drop(slow);
}

#[tokio::test]
async fn bad_input_gets_4xx_json_and_other_subscribers_lose_nothing() {
    let gw =
        gateway("[hub]\nmax_message_bytes = 1024\nmax_multiplex = 3\nmax_channels_per_app = 5\n")
            .await;
    let mut sse = Sse::open(
        &gw.events_url("/v3/events/sub/shop/ok"),
        Some(TOKEN_A),
        None,
    )
    .await;
    publish(&gw, "shop/ok", "m0").await;
    let big = "x".repeat(2000);
    let c = client();
    let e = |p: &str| gw.events_url(p);
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            c.post(e("/v3/events/pub/shop/ok"))
                .bearer_auth(TOKEN_A)
                .body(big),
            StatusCode::PAYLOAD_TOO_LARGE,
            "message",
        ),
        (
            c.post(e("/v3/events/pub/shop/bad%20name"))
                .bearer_auth(TOKEN_A)
                .body("x"),
            StatusCode::BAD_REQUEST,
            "channel",
        ),
        (
            c.post(e("/v3/events/pub/shop/"))
                .bearer_auth(TOKEN_A)
                .body("x"),
            StatusCode::BAD_REQUEST,
            "channel",
        ),
        (
            c.post(e(&format!("/v3/events/pub/shop/{}", "c".repeat(129))))
                .bearer_auth(TOKEN_A)
                .body("x"),
            StatusCode::BAD_REQUEST,
            "channel",
        ),
        (
            c.post(e("/v3/events/pub/Shop/x"))
                .bearer_auth(TOKEN_A)
                .body("x"),
            StatusCode::BAD_REQUEST,
            "channel",
        ),
        (
            c.post(e("/v3/events/pub/shop/ok"))
                .bearer_auth(TOKEN_A)
                .header("x-event-type", "a b")
                .body("x"),
            StatusCode::BAD_REQUEST,
            "x-event-type",
        ),
        (
            c.get(e("/v3/events/sub/shop/ok?last_event_id=12"))
                .bearer_auth(TOKEN_A)
                .header("accept", "text/event-stream"),
            StatusCode::BAD_REQUEST,
            "last_event_id",
        ),
        (
            c.get(e("/v3/events/sub/shop/ok"))
                .bearer_auth(TOKEN_A)
                .header("accept", "text/event-stream")
                .header("last-event-id", "1:2:3"),
            StatusCode::BAD_REQUEST,
            "last_event_id",
        ),
        (
            c.get(e("/v3/events/sub?channels=shop/a,shop/b,shop/c,shop/d"))
                .bearer_auth(TOKEN_A)
                .header("accept", "text/event-stream"),
            StatusCode::BAD_REQUEST,
            "channels",
        ),
        (
            c.get(e("/v3/events/sub?channels=shop/a,shop/a"))
                .bearer_auth(TOKEN_A)
                .header("accept", "text/event-stream"),
            StatusCode::BAD_REQUEST,
            "channels",
        ),
        (
            c.get(e("/v3/events/sub"))
                .bearer_auth(TOKEN_A)
                .header("accept", "text/event-stream"),
            StatusCode::BAD_REQUEST,
            "channels",
        ),
        (
            c.get(e("/v3/events/sub/shop/ok")).bearer_auth(TOKEN_A),
            StatusCode::NOT_ACCEPTABLE,
            "",
        ),
        (
            c.post(e("/v3/events/sub/shop/ok")).bearer_auth(TOKEN_A),
            StatusCode::METHOD_NOT_ALLOWED,
            "",
        ),
        (
            c.post(e("/v3/events/pub/shop/ok")).body("x"),
            StatusCode::UNAUTHORIZED,
            "",
        ),
        (
            c.post(e("/v3/events/pub/shop/ok"))
                .bearer_auth("nope-nope-nope-nope")
                .body("x"),
            StatusCode::FORBIDDEN,
            "",
        ),
        (
            c.post(e("/v3/events/pub/nobody/x"))
                .bearer_auth(ADMIN_KEY)
                .body("x"),
            StatusCode::NOT_FOUND,
            "",
        ),
        (
            c.post(e("/v3/events/tickets"))
                .bearer_auth(TOKEN_A)
                .body("{"),
            StatusCode::BAD_REQUEST,
            "body",
        ),
        (
            c.post(e("/v3/events/tickets"))
                .bearer_auth(TOKEN_A)
                .body(r#"{"channels":["shop/x"],"ttl":"soon"}"#),
            StatusCode::BAD_REQUEST,
            "ttl",
        ),
        (
            c.post(e("/v3/events/tickets"))
                .bearer_auth(TOKEN_A)
                .body(r#"{"channels":[],"x":1}"#),
            StatusCode::BAD_REQUEST,
            "body",
        ),
        (c.get(e("/v3/events/nothing")), StatusCode::NOT_FOUND, ""),
    ];
    for (i, (req, status, field)) in cases.into_iter().enumerate() {
        let r = req.send().await.expect("request");
        assert_eq!(r.status(), status, "case {i}");
        let body: Value = r
            .json()
            .await
            .unwrap_or_else(|_| panic!("case {i}: JSON body"));
        assert!(body["error"].as_str().is_some(), "case {i}: {body}");
        if !field.is_empty() {
            assert_eq!(body["field"], field, "case {i}: {body}");
        }
    }
    // The channel limit: `ok` plus four more, then 429.
    for i in 0..4 {
        assert_eq!(
            publish(&gw, &format!("shop/c{i}"), "x").await.0,
            StatusCode::ACCEPTED
        );
    }
    let (s, body) = publish(&gw, "shop/c9", "x").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
    // The subscriber that was there all along missed nothing.
    publish(&gw, "shop/ok", "m1").await;
    assert_eq!(
        sse.next_data().await.expect("m0").data.as_deref(),
        Some("m0")
    );
    assert_eq!(
        sse.next_data().await.expect("m1").data.as_deref(),
        Some("m1")
    );
}

#[tokio::test]
async fn websocket_publisher_replies_and_reports_errors() {
    let gw = gateway("[hub]\nmax_message_bytes = 100\n").await;
    let mut sub = ws_connect(&ws_url(&gw, "/v3/events/sub/shop/wspub"), Some(TOKEN_A)).await;
    let mut publisher = ws_connect(&ws_url(&gw, "/v3/events/pub/shop/wspub"), Some(TOKEN_A)).await;
    publisher
        .send(WsMessage::Binary(vec![0, 159, 146, 150]))
        .await
        .expect("send");
    let info: Value =
        serde_json::from_slice(&ws_next(&mut publisher).await.expect("reply")).expect("json");
    assert_eq!(info["subscribers"], 1);
    assert_eq!(
        ws_next(&mut sub).await.expect("binary"),
        vec![0, 159, 146, 150]
    );
    publisher
        .send(WsMessage::Text("y".repeat(200)))
        .await
        .expect("send");
    let err: Value =
        serde_json::from_slice(&ws_next(&mut publisher).await.expect("reply")).expect("json");
    assert_eq!(err["field"], "message", "{err}");
    // Without the owner's token the upgrade is refused.
    let refused = tokio_tungstenite::connect_async(ws_url(&gw, "/v3/events/pub/shop/wspub")).await;
    assert!(refused.is_err());
    publisher.send(WsMessage::Close(None)).await.expect("close");
    let _ = CloseCode::Normal;
}

/// A receiving app for webhooks: fails the first `fail` POSTs with 500, records the rest.
struct Receiver {
    addr: std::net::SocketAddr,
    got: std::sync::Arc<parking_lot_free::Log>,
}

mod parking_lot_free {
    /// Deliveries recorded by the receiver: (event id, channel, signature, body).
    #[derive(Default)]
    pub struct Log {
        pub attempts: std::sync::atomic::AtomicUsize,
        pub delivered: std::sync::Mutex<Vec<(String, String, String, String)>>,
    }
}

async fn receiver(fail: usize) -> Receiver {
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = std::sync::Arc::new(parking_lot_free::Log::default());
    let log = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string()
                            };
                            let (id, chan, sig, path) = (
                                h("x-nextgate-event-id"),
                                h("x-nextgate-channel"),
                                h("x-nextgate-signature"),
                                req.uri().path().to_string(),
                            );
                            let body = String::from_utf8(
                                req.into_body()
                                    .collect()
                                    .await
                                    .expect("body")
                                    .to_bytes()
                                    .to_vec(),
                            )
                            .expect("utf-8");
                            let n = log.attempts.fetch_add(1, Ordering::SeqCst);
                            let status = if path != "/hooks/orders" {
                                404
                            } else if n < fail {
                                500
                            } else {
                                log.delivered
                                    .lock()
                                    .expect("lock")
                                    .push((id, chan, sig, body));
                                200
                            };
                            let mut r = hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"ok"),
                            ));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Receiver { addr, got }
}

async fn wait_for(rx: &Receiver, gw: &Gateway, n: usize) {
    for _ in 0..200 {
        if rx.got.delivered.lock().expect("lock").len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{n} webhook deliveries did not arrive; log:\n{}",
        gw.log_text()
    );
}

fn hmac_hex(key: &str, msg: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("key");
    m.update(msg);
    hex::encode(m.finalize().into_bytes())
}

#[tokio::test]
async fn webhook_delivery_in_order_with_retries_signed_and_kept_across_restarts() {
    let mut gw = Gateway::start("[hub]\nwebhook_max_backoff = \"200ms\"\n").await;
    let rx = receiver(3).await;
    gw.register("shop", &["http://127.0.0.1:9".into()], TOKEN_A)
        .await;
    gw.register("bill", &[format!("http://{}", rx.addr)], TOKEN_B)
        .await;
    // `bill` subscribes to `shop`'s channel with its own token.
    let r = client()
        .post(gw.events_url("/v3/events/subscriptions"))
        .bearer_auth(TOKEN_B)
        .header("x-nextgate-app", "bill")
        .json(&serde_json::json!({"channel": "shop/orders", "path": "/hooks/orders"}))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(r.status(), 201);
    let sub: Value = r.json().await.expect("json");
    let secret = sub["signing_secret"].as_str().expect("secret").to_string();
    let id = sub["id"].as_str().expect("id").to_string();
    assert_eq!(sub["app"], "bill");
    // Bad requests.
    for (body, field) in [
        (
            serde_json::json!({"channel": "shop/orders", "path": "no-slash"}),
            "path",
        ),
        (
            serde_json::json!({"channel": "bad", "path": "/x"}),
            "channel",
        ),
        (serde_json::json!({"channel": "shop/orders"}), "body"),
    ] {
        let r = client()
            .post(gw.events_url("/v3/events/subscriptions"))
            .bearer_auth(TOKEN_B)
            .header("x-nextgate-app", "bill")
            .json(&body)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["field"], field, "{v}");
    }

    for i in 0..5 {
        let (s, _) = publish(&gw, "shop/orders", &format!("order {i}")).await;
        assert_eq!(s, StatusCode::CREATED, "the webhook counts as a subscriber");
    }
    wait_for(&rx, &gw, 5).await;
    {
        let d = rx.got.delivered.lock().expect("lock");
        let bodies: Vec<&str> = d.iter().map(|x| x.3.as_str()).collect();
        assert_eq!(
            bodies,
            (0..5)
                .map(|i| format!("order {i}"))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        );
        for (eid, chan, sig, body) in d.iter() {
            assert_eq!(chan, "shop/orders");
            let (t, v1) = sig.split_once(",v1=").expect("signature format");
            let t = t.strip_prefix("t=").expect("t=");
            let want = hmac_hex(&secret, format!("{t}.{eid}.{chan}.{body}").as_bytes());
            assert_eq!(v1, want, "signature verifies with the signing secret");
        }
    }
    assert_eq!(
        rx.got.attempts.load(std::sync::atomic::Ordering::SeqCst),
        8,
        "3 failures, then 5 deliveries"
    );

    // The subscription survives a restart and keeps delivering.
    gw.restart().await;
    publish(&gw, "shop/orders", "after restart").await;
    wait_for(&rx, &gw, 6).await;
    assert_eq!(rx.got.delivered.lock().expect("lock")[5].3, "after restart");
    let r = client()
        .get(gw.events_url("/v3/events/subscriptions"))
        .bearer_auth(TOKEN_B)
        .header("x-nextgate-app", "bill")
        .send()
        .await
        .expect("list");
    let list: Value = r.json().await.expect("json");
    assert_eq!(list["subscriptions"][0]["id"], id.as_str());
    // Only the receiving app (or the admin) may remove it.
    let url = gw.events_url(&format!("/v3/events/subscriptions/{id}"));
    assert_eq!(
        client()
            .delete(&url)
            .bearer_auth(TOKEN_A)
            .send()
            .await
            .expect("delete")
            .status(),
        403
    );
    assert_eq!(
        client()
            .delete(&url)
            .bearer_auth(TOKEN_B)
            .send()
            .await
            .expect("delete")
            .status(),
        204
    );
    assert_eq!(
        client()
            .get(&url)
            .bearer_auth(TOKEN_B)
            .send()
            .await
            .expect("get")
            .status(),
        404
    );
    publish(&gw, "shop/orders", "after removal").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.got.delivered.lock().expect("lock").len(), 6);
}

#[tokio::test]
async fn sse_and_websocket_subscribers_through_the_proxy_listener() {
    let gw = gateway("").await;
    let info_url = gw.events_url("/v3/events/pub/shop/via");
    // Each subscription reaches the hub over its own proxy upstream connection.
    let wait_for = |n: u64| {
        let info_url = info_url.clone();
        async move {
            let mut subscribers = Value::Null;
            for _ in 0..100 {
                let r = client()
                    .get(&info_url)
                    .bearer_auth(TOKEN_A)
                    .send()
                    .await
                    .expect("info");
                subscribers = r.json::<Value>().await.expect("json")["subscribers"].clone();
                if subscribers == n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            subscribers
        }
    };
    let mut sse = Sse::open(
        &gw.proxy_url("/v3/events/sub/shop/via"),
        Some(TOKEN_A),
        None,
    )
    .await;
    assert_eq!(
        wait_for(1).await,
        1,
        "SSE subscriber; log:\n{}",
        gw.log_text()
    );
    let mut ws = ws_connect(
        &format!("ws://{}/v3/events/sub/shop/via", gw.proxy),
        Some(TOKEN_A),
    )
    .await;
    assert_eq!(
        wait_for(2).await,
        2,
        "WebSocket subscriber; log:\n{}",
        gw.log_text()
    );
    let (s, _) = publish(&gw, "shop/via", "through the proxy").await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        sse.next_data().await.expect("sse").data.as_deref(),
        Some("through the proxy")
    );
    assert_eq!(ws_next(&mut ws).await.expect("ws"), b"through the proxy");
}
