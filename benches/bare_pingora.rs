//! The floor under the proxy benchmark: a Pingora `ProxyHttp` that does nothing but forward to
//! one backend (no routing, no timing, no balancing, no headers added), on the same
//! `ServerConf` nextgate uses. `proxy_vs_nginx.py --bare` runs it beside nextgate and nginx, so
//! the gap between nextgate and nginx can be split into what our filters cost and what
//! Pingora's HTTP/1 proxy path costs by itself.
//!
//! `bare_pingora LISTEN BACKEND [THREADS] [WORK_STEALING] [H2C_STREAMS]`, e.g.
//! `bare_pingora 127.0.0.1:9080 127.0.0.1:9001 1 true`. With `H2C_STREAMS` above 0 the
//! backend is spoken to in cleartext HTTP/2 (prior knowledge), that many streams per
//! connection.

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    backend: String,
    h2c_streams: usize,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora_core::Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.backend.as_str(), false, String::new());
        if self.h2c_streams > 0 {
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = self.h2c_streams;
        }
        Ok(Box::new(peer))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_pingora LISTEN BACKEND [THREADS] [WORK_STEALING] [H2C_STREAMS]";
    let listen = args.next().expect(usage);
    let backend = args.next().expect(usage);
    let threads = args
        .next()
        .map_or(1, |t| t.parse().expect("THREADS is a number"));
    let work_stealing = args
        .next()
        .is_none_or(|w| w.parse().expect("WORK_STEALING is true or false"));
    let h2c_streams = args
        .next()
        .map_or(0, |n| n.parse().expect("H2C_STREAMS is a number"));
    let dir = std::env::temp_dir().join(format!("bare-pingora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let conf = ServerConf {
        threads,
        work_stealing,
        pid_file: dir.join("pid").to_string_lossy().into_owned(),
        upgrade_sock: dir.join("upgrade.sock").to_string_lossy().into_owned(),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(
        &server.configuration,
        Bare {
            backend,
            h2c_streams,
        },
    );
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
