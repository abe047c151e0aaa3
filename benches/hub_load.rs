//! Load client for the event hub benchmark (`benches/hub_vs_nchan.py` drives it): opens
//! subscribers (WebSocket or SSE) on a number of channels, publishes timestamped messages over
//! HTTP at a fixed rate, and reports deliveries per second, publish-to-receive latency, lost
//! messages, and the server's CPU and memory (from /proc, given its pid).
//!
//! Run: `cargo build --release --example hub_load`, then
//! `target/release/examples/hub_load --sub 'ws://127.0.0.1:8082/v3/events/sub/bench/c{ch}'
//!  --pub 'http://127.0.0.1:8082/v3/events/pub/bench/c{ch}' --channels 1 --subs 1000
//!  --rate 100 --duration 10 --token TOKEN --server-pid PID`
//!
//! Everything it talks to is on loopback; every phase is bounded in time.

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    sub: String,
    publ: String,
    transport: String,
    channels: usize,
    subs: usize,
    rate: f64,
    duration: f64,
    token: Option<String>,
    msg_bytes: usize,
    server_pid: Option<u32>,
    publishers: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        sub: String::new(),
        publ: String::new(),
        transport: "ws".into(),
        channels: 1,
        subs: 100,
        rate: 100.0,
        duration: 10.0,
        token: None,
        msg_bytes: 64,
        server_pid: None,
        publishers: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--sub" => a.sub = v(),
            "--pub" => a.publ = v(),
            "--transport" => a.transport = v(),
            "--channels" => a.channels = v().parse().expect("--channels"),
            "--subs" => a.subs = v().parse().expect("--subs (per channel)"),
            "--rate" => a.rate = v().parse().expect("--rate (messages/s, all channels)"),
            "--duration" => a.duration = v().parse().expect("--duration (s)"),
            "--token" => a.token = Some(v()),
            "--msg-bytes" => a.msg_bytes = v().parse().expect("--msg-bytes"),
            "--server-pid" => a.server_pid = Some(v().parse().expect("--server-pid")),
            "--publishers" => a.publishers = v().parse().expect("--publishers"),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !a.sub.is_empty() && !a.publ.is_empty(),
        "--sub and --pub are required"
    );
    a
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// `pid` and all its descendants (nginx's workers).
fn tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() {
        let p = pids[i];
        if let Ok(kids) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            pids.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    pids
}

/// utime + stime of the process tree, in seconds.
fn proc_cpu(pid: u32) -> f64 {
    let tck = 100.0;
    tree(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((ut + st) / tck)
        })
        .sum()
}

/// Resident memory of the process tree, KiB.
fn proc_rss_kib(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// Per subscriber: messages received and latency samples (µs).
#[derive(Default)]
struct Tally {
    received: u64,
    out_of_order: u64,
    last_seq: u64,
    lat_us: Vec<u32>,
}

fn record(t: &mut Tally, payload: &[u8], measuring: &AtomicU64) {
    // Payload: "{seq:010} {ts_us:016} xxxx..."
    if payload.len() < 27 {
        return;
    }
    let num = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
    };
    let (Some(seq), Some(ts)) = (num(&payload[..10]), num(&payload[11..27])) else {
        return;
    };
    t.received += 1;
    if seq <= t.last_seq && t.last_seq != 0 {
        t.out_of_order += 1;
    }
    t.last_seq = seq;
    if measuring.load(Ordering::Relaxed) == 1 {
        t.lat_us
            .push(now_us().saturating_sub(ts).min(u32::MAX as u64) as u32);
    }
}

fn split_url(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    (host.to_string(), format!("/{path}"))
}

async fn ws_sub(
    url: String,
    token: Option<String>,
    measuring: Arc<AtomicU64>,
    stop: Arc<AtomicU64>,
) -> Tally {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let mut req = url.as_str().into_client_request().expect("ws url");
    if let Some(t) = &token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    let mut t = Tally::default();
    let (mut ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("ws connect failed: {e}");
            return t;
        }
    };
    loop {
        let next = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
        match next {
            Ok(Some(Ok(Message::Text(s)))) => record(&mut t, s.as_bytes(), &measuring),
            Ok(Some(Ok(Message::Binary(b)))) => record(&mut t, &b, &measuring),
            Ok(Some(Ok(_))) => {}
            Ok(_) => break,
            Err(_) => {
                if stop.load(Ordering::Relaxed) == 1 {
                    break;
                }
            }
        }
    }
    t
}

/// Where the chunked decoder is.
#[derive(Clone, Copy)]
enum Chunk {
    Size,
    Data(usize),
    Crlf,
}

/// SSE over raw HTTP/1.1, with a minimal chunked decoder.
async fn sse_sub(
    url: String,
    token: Option<String>,
    measuring: Arc<AtomicU64>,
    stop: Arc<AtomicU64>,
) -> Tally {
    let mut t = Tally::default();
    let (host, path) = split_url(&url);
    let Ok(mut s) = TcpStream::connect(&host).await else {
        eprintln!("sse connect failed");
        return t;
    };
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{auth}\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return t;
    }
    let mut raw = BytesMut::with_capacity(16 * 1024);
    let mut body = BytesMut::new();
    let mut chunked = None::<bool>;
    let mut chunk = Chunk::Size;
    loop {
        let n = match tokio::time::timeout(Duration::from_millis(500), s.read_buf(&mut raw)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => {
                if stop.load(Ordering::Relaxed) == 1 {
                    break;
                }
                continue;
            }
        };
        let _ = n;
        if chunked.is_none() {
            let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                eprintln!("sse refused: {}", head.lines().next().unwrap_or(""));
                return t;
            }
            chunked = Some(head.contains("transfer-encoding: chunked"));
            raw.advance(end + 4);
        }
        if chunked == Some(true) {
            loop {
                match chunk {
                    Chunk::Size => {
                        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
                            break;
                        };
                        let line = std::str::from_utf8(&raw[..eol]).unwrap_or("0");
                        let size =
                            usize::from_str_radix(line.split(';').next().unwrap_or("0").trim(), 16)
                                .unwrap_or(0);
                        raw.advance(eol + 2);
                        if size == 0 {
                            return t;
                        }
                        chunk = Chunk::Data(size);
                    }
                    Chunk::Data(left) => {
                        let take = left.min(raw.len());
                        body.extend_from_slice(&raw[..take]);
                        raw.advance(take);
                        if take < left {
                            chunk = Chunk::Data(left - take);
                            break;
                        }
                        chunk = Chunk::Crlf;
                    }
                    Chunk::Crlf => {
                        if raw.len() < 2 {
                            break;
                        }
                        raw.advance(2);
                        chunk = Chunk::Size;
                    }
                }
            }
        } else {
            body.extend_from_slice(&raw);
            raw.clear();
        }
        // SSE lines
        while let Some(eol) = body.iter().position(|&b| b == b'\n') {
            let line = body.split_to(eol + 1);
            if let Some(d) = line.strip_prefix(b"data: ") {
                record(&mut t, d, &measuring);
            }
        }
    }
    t
}

/// One publishing connection: channels `first, first + stride, ...` in turn, at `rate`.
struct Publisher {
    urls: Vec<String>,
    token: Option<String>,
    rate: f64,
    until: Instant,
    msg_bytes: usize,
    seq: Arc<AtomicU64>,
    published: Arc<Vec<AtomicU64>>,
    first_channel: usize,
    stride: usize,
    errors: Arc<AtomicU64>,
}

async fn publisher(p: Publisher) {
    let Publisher {
        urls,
        token,
        rate,
        until,
        msg_bytes,
        seq,
        published,
        first_channel,
        stride,
        errors,
    } = p;
    let (host, _) = split_url(&urls[0]);
    let mut conn = connect(&host).await;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let paths: Vec<String> = urls.iter().map(|u| split_url(u).1).collect();
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut ch = first_channel;
    let mut buf = BytesMut::with_capacity(4096);
    while Instant::now() < until {
        tick.tick().await;
        let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
        let mut body = format!("{n:010} {:016} ", now_us());
        while body.len() < msg_bytes {
            body.push('x');
        }
        let req = format!(
            "POST {} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            paths[ch],
            body.len()
        );
        // One request and its response; a connection the server closed (nginx ends one
        // after `keepalive_requests`) is opened again and the request sent again, once.
        let mut sent = false;
        for _attempt in 0..2 {
            if conn.write_all(req.as_bytes()).await.is_err() {
                conn = connect(&host).await;
                buf.clear();
                continue;
            }
            match read_response(&mut conn, &mut buf).await {
                Some((ok, close)) => {
                    if ok {
                        published[ch].fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if close {
                        conn = connect(&host).await;
                        buf.clear();
                    }
                    sent = true;
                    break;
                }
                None => {
                    conn = connect(&host).await;
                    buf.clear();
                }
            }
        }
        if !sent {
            errors.fetch_add(1, Ordering::Relaxed);
        }
        ch += stride;
        if ch >= paths.len() {
            ch = first_channel;
        }
    }
}

async fn connect(host: &str) -> TcpStream {
    let conn = TcpStream::connect(host).await.expect("publisher connect");
    conn.set_nodelay(true).expect("nodelay");
    conn
}

/// Read one response (head and content-length body): whether it was 201/202 and whether the
/// server closes the connection after it. `None` when the connection ended first.
async fn read_response(conn: &mut TcpStream, buf: &mut BytesMut) -> Option<(bool, bool)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let ok = head.starts_with("http/1.1 201") || head.starts_with("http/1.1 202");
                let close = head.contains("connection: close");
                buf.advance(end + 4 + len);
                return Some((ok, close));
            }
        }
        match conn.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let a = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(a));
}

async fn run(a: Args) {
    let measuring = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let sub_urls: Vec<String> = (0..a.channels)
        .map(|c| a.sub.replace("{ch}", &c.to_string()))
        .collect();
    let pub_urls: Vec<String> = (0..a.channels)
        .map(|c| a.publ.replace("{ch}", &c.to_string()))
        .collect();
    let rss_idle0 = a.server_pid.map_or(0, proc_rss_kib);
    // Connect subscribers, at most 256 handshakes at a time.
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let connected = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(a.channels * a.subs);
    let t_connect = Instant::now();
    for (c, sub_url) in sub_urls.iter().enumerate() {
        for _ in 0..a.subs {
            let url = sub_url.clone();
            let (token, m, s, g, k) = (
                a.token.clone(),
                measuring.clone(),
                stop.clone(),
                gate.clone(),
                connected.clone(),
            );
            let sse = a.transport == "sse";
            tasks.push((
                c,
                tokio::spawn(async move {
                    let permit = g.acquire_owned().await.expect("gate");
                    let fut = async move {
                        // The permit is released once the subscription is up (first poll after connect).
                        if sse {
                            sse_sub(url, token, m, s).await
                        } else {
                            ws_sub(url, token, m, s).await
                        }
                    };
                    tokio::pin!(fut);
                    // Give the connection up to 100 ms to be established before releasing the gate.
                    let early = tokio::time::timeout(Duration::from_millis(100), &mut fut).await;
                    k.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                    match early {
                        Ok(t) => t,
                        Err(_) => fut.await,
                    }
                }),
            ));
        }
    }
    let total_subs = (a.channels * a.subs) as u64;
    while connected.load(Ordering::Relaxed) < total_subs {
        assert!(
            t_connect.elapsed() < Duration::from_secs(120),
            "subscribers did not connect in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connect_s = t_connect.elapsed().as_secs_f64();
    let rss_idle = a.server_pid.map_or(0, proc_rss_kib);

    let published: Arc<Vec<AtomicU64>> =
        Arc::new((0..a.channels).map(|_| AtomicU64::new(0)).collect());
    let errors = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let cpu0 = a.server_pid.map_or(0.0, proc_cpu);
    measuring.store(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(a.duration);
    let pubs = a.publishers.min(a.channels).max(1);
    let mut ptasks = Vec::new();
    for p in 0..pubs {
        ptasks.push(tokio::spawn(publisher(Publisher {
            urls: pub_urls.clone(),
            token: a.token.clone(),
            rate: a.rate / pubs as f64,
            until,
            msg_bytes: a.msg_bytes,
            seq: seq.clone(),
            published: published.clone(),
            first_channel: p,
            stride: pubs,
            errors: errors.clone(),
        })));
    }
    for t in ptasks {
        let _ = t.await;
    }
    let pub_s = t0.elapsed().as_secs_f64();
    // Let deliveries drain, then stop the subscribers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu1 = a.server_pid.map_or(0.0, proc_cpu);
    let rss_peak = a.server_pid.map_or(0, proc_rss_kib);
    measuring.store(0, Ordering::Relaxed);
    stop.store(1, Ordering::Relaxed);
    let mut lat: Vec<u32> = Vec::new();
    let (mut received, mut expected, mut ooo, mut empty) = (0u64, 0u64, 0u64, 0u64);
    for (c, t) in tasks {
        let tally = t.await.unwrap_or_default();
        received += tally.received;
        ooo += tally.out_of_order;
        if tally.received == 0 {
            empty += 1;
        }
        expected += published[c].load(Ordering::Relaxed);
        lat.extend(tally.lat_us);
    }
    lat.sort_unstable();
    let cpu = cpu1 - cpu0;
    let published_total: u64 = published.iter().map(|p| p.load(Ordering::Relaxed)).sum();
    let out = serde_json::json!({
        "transport": a.transport,
        "channels": a.channels,
        "subs_per_channel": a.subs,
        "published": published_total,
        "publish_errors": errors.load(Ordering::Relaxed),
        "publish_seconds": pub_s,
        "expected": expected,
        "received": received,
        "lost": expected.saturating_sub(received),
        "out_of_order": ooo,
        "subscribers_without_messages": empty,
        "deliveries_per_s": received as f64 / pub_s,
        "p50_ms": pct(&lat, 0.5),
        "p99_ms": pct(&lat, 0.99),
        "max_ms": pct(&lat, 1.0),
        "server_cpu_s": cpu,
        "server_cpu_us_per_delivery": if received > 0 { cpu * 1e6 / received as f64 } else { f64::NAN },
        "server_rss_base_kib": rss_idle0,
        "server_rss_idle_kib": rss_idle,
        "server_rss_end_kib": rss_peak,
        "idle_kib_per_subscriber": (rss_idle as f64 - rss_idle0 as f64) / total_subs as f64,
        "connect_seconds": connect_s,
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{out}");
    }
}
