//! Test helpers: start the real `nextgate` binary on ephemeral loopback ports, and small real
//! backends (hyper) that the proxy forwards to.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Admin key every test gateway is started with.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// A free loopback port (bound then released; the gateway binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A running gateway process.
pub struct Gateway {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub events: SocketAddr,
    pub state: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// Extra environment for the process (applied on the next spawn or restart).
    pub env: Vec<(String, String)>,
}

impl Gateway {
    /// Start with the given extra TOML (sections may be given; listeners are set here).
    pub async fn start(extra: &str) -> Gateway {
        Self::start_with(extra, |_| {}).await
    }

    /// Start, letting the caller add settings to the `[listen]` table (e.g. https).
    pub async fn start_with(extra: &str, listen_extra: impl FnOnce(&mut String)) -> Gateway {
        Self::start_full(extra, Some(ADMIN_KEY), listen_extra).await
    }

    /// Start with full control: `admin_key: None` leaves the key to the gateway.
    pub async fn start_full(
        extra: &str,
        admin_key: Option<&str>,
        listen_extra: impl FnOnce(&mut String),
    ) -> Gateway {
        let state = tempfile::tempdir().expect("state dir");
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let events: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut listen =
            format!("[listen]\nproxy = \"{proxy}\"\nadmin = \"{admin}\"\nevents = \"{events}\"\n");
        listen_extra(&mut listen);
        let key = admin_key.map_or(String::new(), |k| format!("[admin]\nkey = \"{k}\"\n"));
        let text = format!(
            "{listen}\n{key}\n[server]\nthreads = 2\nstate_dir = \"{}\"\n\n{extra}\n",
            state.path().display()
        );
        let config = state.path().join("nextgate.toml");
        std::fs::write(&config, text).expect("write config");
        let log = state.path().join("gateway.log");
        let mut gw = Gateway {
            proxy,
            admin,
            events,
            state,
            config,
            child: None,
            log,
            env: Vec::new(),
        };
        gw.spawn().await;
        gw
    }

    /// Path of the state directory.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_nextgate"))
            .arg("-c")
            .arg(&self.config)
            .env_remove("NEXTGATE_ADMIN_KEY")
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nextgate");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("http://{}/healthz", self.admin);
        let client = reqwest::Client::new();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "gateway exited early with {status}; log:\n{}",
                        self.log_text()
                    );
                }
            }
            let admin_ok = matches!(client.get(&url).send().await, Ok(r) if r.status() == 200);
            let proxy_ok = tokio::net::TcpStream::connect(self.proxy).await.is_ok();
            let events_ok = tokio::net::TcpStream::connect(self.events).await.is_ok();
            if admin_ok && proxy_ok && events_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready in 30s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The gateway's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit; returns how long it took and the exit status.
    pub fn terminate(&mut self) -> (Duration, std::process::ExitStatus) {
        let mut c = self.child.take().expect("running");
        let t = Instant::now();
        let rc = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .expect("kill -TERM");
        assert!(rc.success());
        let status = c.wait().expect("wait");
        (t.elapsed(), status)
    }

    /// Start again on the same config, ports and state.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// Start a second process on the same config and return its exit status and stderr,
    /// waiting at most 30 s (for startup failures).
    pub fn run_expect_exit(&self) -> (std::process::ExitStatus, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_nextgate"))
            .arg("-c")
            .arg(&self.config)
            .env_remove("NEXTGATE_ADMIN_KEY")
            .output()
            .expect("run nextgate");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn events_url(&self, path: &str) -> String {
        format!("http://{}{}", self.events, path)
    }

    /// Register `name` with JSON; panics unless 200/201.
    pub async fn register(
        &self,
        name: &str,
        endpoints: &[String],
        token: &str,
    ) -> reqwest::StatusCode {
        self.register_balanced(name, endpoints, token, None).await
    }

    /// Register `name` with a `balance` choice (`None`: the gateway's default).
    pub async fn register_balanced(
        &self,
        name: &str,
        endpoints: &[String],
        token: &str,
        balance: Option<&str>,
    ) -> reqwest::StatusCode {
        let mut body = serde_json::json!({"name": name, "endpoint": endpoints, "token": token});
        if let Some(b) = balance {
            body["balance"] = b.into();
        }
        let resp = reqwest::Client::new()
            .post(self.admin_url("/v3/events/processes/register"))
            .json(&body)
            .send()
            .await
            .expect("register request");
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "register {name}: {status} {body}");
        status
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A test backend: a real hyper HTTP/1 server with a few routes.
///
/// - `GET /id` -> the backend's id
/// - `GET /echo...` -> JSON with the path-and-query and request headers it received
/// - `GET /bytes?n=N` -> N bytes of a known pattern, streamed in 64 KiB chunks
/// - `POST /upload` -> reads the body streaming; replies with its length and checksum
/// - `GET /stream-gated` -> first chunk, then waits for `release()` before the last chunk
/// - `GET /ws` -> WebSocket echo
/// - `GET /work...` -> waits `delay_ms`, then answers `status` (200 unless set) with the id
pub struct Backend {
    pub id: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    /// Delay of `/work` answers, ms.
    pub delay_ms: Arc<AtomicU64>,
    /// Status of `/work` answers (0 = 200).
    pub status: Arc<AtomicU64>,
    /// Bytes of request bodies received so far (all requests).
    pub body_bytes: Arc<AtomicU64>,
    pub gate: Arc<Notify>,
    task: JoinHandle<()>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

/// The byte at offset `i` of the known pattern.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Checksum over a byte run starting at offset 0.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(s: impl Into<Bytes>) -> BoxBody {
    Full::new(s.into()).boxed()
}

struct Ctx {
    id: String,
    hits: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    status: Arc<AtomicU64>,
    body_bytes: Arc<AtomicU64>,
    gate: Arc<Notify>,
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    ctx.hits.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let resp = match path.as_str() {
        "/id" => Response::new(full(ctx.id.clone())),
        p if p.starts_with("/work") => {
            let delay = ctx.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let mut r = Response::new(full(ctx.id.clone()));
            let status = ctx.status.load(Ordering::Relaxed) as u16;
            if status != 0 {
                *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
            }
            r
        }
        p if p.starts_with("/echo") => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
                .collect();
            let body = serde_json::json!({
                "id": ctx.id,
                "method": req.method().as_str(),
                "path_and_query": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
                "headers": headers,
            });
            Response::new(full(body.to_string()))
        }
        "/bytes" => {
            let n: u64 = query
                .strip_prefix("n=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let stream = futures_util::stream::unfold(0u64, move |off| async move {
                if off >= n {
                    return None;
                }
                let len = (n - off).min(64 * 1024);
                let chunk: Vec<u8> = (off..off + len).map(pattern).collect();
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))),
                    off + len,
                ))
            });
            let mut r = Response::new(StreamBody::new(stream).boxed());
            r.headers_mut()
                .insert("content-length", n.to_string().parse().expect("hv"));
            r
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut len = 0u64;
            let mut h = 0xcbf29ce484222325u64;
            let mut ok = true;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            for b in d.iter() {
                                h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
                            }
                            len += d.len() as u64;
                            ctx.body_bytes.fetch_add(d.len() as u64, Ordering::SeqCst);
                        }
                    }
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            let body = serde_json::json!({"len": len, "checksum": h, "complete": ok});
            Response::new(full(body.to_string()))
        }
        "/stream-gated" => {
            let gate = ctx.gate.clone();
            let stream = futures_util::stream::unfold(0u8, move |step| {
                let gate = gate.clone();
                async move {
                    match step {
                        0 => Some((
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"first;"))),
                            1,
                        )),
                        1 => {
                            gate.notified().await;
                            Some((Ok(Frame::data(Bytes::from_static(b"last"))), 2))
                        }
                        _ => None,
                    }
                }
            });
            Response::new(StreamBody::new(stream).boxed())
        }
        "/ws" => return Ok(ws_upgrade(req)),
        _ => {
            let mut r = Response::new(full("not found"));
            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
            r
        }
    };
    Ok(resp)
}

fn ws_upgrade(mut req: Request<Incoming>) -> Response<BoxBody> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        use futures_util::{SinkExt, StreamExt};
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", "websocket".parse().expect("hv"));
    h.insert("connection", "upgrade".parse().expect("hv"));
    h.insert("sec-websocket-accept", key.parse().expect("hv"));
    r
}

impl Backend {
    /// Start a backend on an ephemeral loopback port.
    pub async fn start(id: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Self::serve(id, listener)
    }

    /// Start a backend on a given address (e.g. to bring one back on its old port).
    pub async fn start_on(id: &str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        Self::serve(id, listener)
    }

    fn serve(id: &str, listener: TcpListener) -> Backend {
        let addr = listener.local_addr().expect("addr");
        let ctx = Arc::new(Ctx {
            id: id.to_string(),
            hits: Arc::new(AtomicU64::new(0)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            status: Arc::new(AtomicU64::new(0)),
            body_bytes: Arc::new(AtomicU64::new(0)),
            gate: Arc::new(Notify::new()),
        });
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let task = {
            let ctx = ctx.clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let ctx = ctx.clone();
                    let h = tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(ctx.clone(), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .with_upgrades()
                            .await;
                    });
                    if let Ok(mut c) = conns.lock() {
                        c.retain(|h| !h.is_finished());
                        c.push(h.abort_handle());
                    }
                }
            })
        };
        Backend {
            id: id.to_string(),
            addr,
            hits: ctx.hits.clone(),
            delay_ms: ctx.delay_ms.clone(),
            status: ctx.status.clone(),
            body_bytes: ctx.body_bytes.clone(),
            gate: ctx.gate.clone(),
            task,
            conns,
        }
    }

    /// Endpoint URL for registration.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Let a `/stream-gated` response finish.
    pub fn release(&self) {
        self.gate.notify_waiters();
    }

    /// Stop accepting and cut every open connection, like a crashed process.
    pub fn kill(&self) {
        self.task.abort();
        if let Ok(c) = self.conns.lock() {
            for h in c.iter() {
                h.abort();
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}
