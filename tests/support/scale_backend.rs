//! A test app for the scaler tests, std only so it builds in seconds as a static binary and
//! runs in a `FROM scratch` image. HTTP/1.1 with keep-alive on `0.0.0.0:$PORT` (8080); every
//! request waits `BASE_MS + PER_MS x (requests in progress - 1)` milliseconds (20 + 20 by
//! default), so its latency grows with its concurrency, then answers `200 ok`.
//!
//! Build: `rustc -O -C target-feature=+crt-static --target x86_64-unknown-linux-gnu
//! tests/support/scale_backend.rs -o scale-backend`

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn serve(stream: TcpStream, busy: Arc<AtomicU64>, base: u64, per: u64) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut close = false;
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if h == "connection: close" {
                close = true;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        if length > 0 {
            let mut body = vec![0u8; length];
            std::io::Read::read_exact(&mut reader, &mut body)?;
        }
        let now = busy.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(base + per * now));
        busy.fetch_sub(1, Ordering::SeqCst);
        let body = "ok\n";
        write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}",
            body.len()
        )?;
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

fn main() {
    let port = env("PORT", 8080);
    let (base, per) = (env("BASE_MS", 20), env("PER_MS", 20));
    let listener = TcpListener::bind(("0.0.0.0", port as u16)).expect("bind");
    let busy = Arc::new(AtomicU64::new(0));
    for stream in listener.incoming().flatten() {
        let busy = busy.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, busy, base, per);
        });
    }
}
