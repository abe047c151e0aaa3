//! The cost model's stats API and the Prometheus endpoint, checked with real tools:
//! `promtool check metrics` lints the exposition, and a real Prometheus server scrapes the
//! gateway over loopback. Both come from Debian's `prometheus` package (`.ci/run` installs it);
//! a machine without them fails here with the command that installs them.

mod common;

use common::{free_port, Backend, Gateway, ADMIN_KEY};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "observability-token-0123456789";

fn tool(name: &str) -> String {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = std::path::Path::new(dir).join(name);
        if p.is_file() {
            return p.to_string_lossy().into_owned();
        }
    }
    panic!("`{name}` is not installed: run `apt-get install -y prometheus` (as .ci/run does)");
}

async fn get(url: &str, bearer: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

async fn setup() -> (Gateway, Backend) {
    let backend = Backend::start("b1").await;
    let gw = Gateway::start("[health]\nkind = \"none\"\n[model]\ntick = \"50ms\"\n").await;
    gw.register("shop", &[backend.url()], TOKEN).await;
    (gw, backend)
}

async fn send(gw: &Gateway, n: usize) {
    let client = reqwest::Client::new();
    for i in 0..n {
        let url = gw.proxy_url(&format!("/v3/shop/work/{i}"));
        let resp = client.get(&url).send().await.expect("request");
        assert_eq!(resp.status(), 200);
        resp.bytes().await.expect("body");
    }
}

#[tokio::test]
async fn stats_show_the_model_per_app_backend_and_route() {
    let (gw, backend) = setup().await;
    send(&gw, 40).await;
    let url = gw.admin_url("/v3/events/processes/shop/stats");

    // Credentials: none 401, another app's token 403, the app's token or the admin key 200.
    gw.register("other", &[backend.url()], "other-token-0123456789abc")
        .await;
    let (status, body) = get(&url, None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (status, _) = get(&url, Some("other-token-0123456789abc")).await;
    assert_eq!(status, 403);
    let (status, _) = get(&url, Some(ADMIN_KEY)).await;
    assert_eq!(status, 200);

    // The tick folds the counters within 50 ms; wait for all 40 to show.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = loop {
        let (status, body) = get(&url, Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        if v["requests"] == 40 || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stats["app"], "shop");
    assert_eq!(stats["requests"], 40, "{stats}");
    assert_eq!(stats["errors"], 0, "{stats}");
    assert!(
        stats["latency_ms"].as_f64().is_some_and(|l| l > 0.0),
        "{stats}"
    );
    assert!(
        stats["cost_ms"].as_f64().is_some_and(|l| l > 0.0),
        "{stats}"
    );
    assert!(stats["rate"].as_f64().is_some_and(|r| r > 0.0), "{stats}");
    assert_eq!(stats["backends"][0]["endpoint"], backend.url(), "{stats}");
    assert_eq!(stats["backends"][0]["requests"], 40, "{stats}");
    assert_eq!(stats["routes"][0]["route"], "GET /work/{id}", "{stats}");
    assert_eq!(stats["routes"][0]["requests"], 40, "{stats}");

    let (status, body) = get(
        &gw.admin_url("/v3/events/processes/nope/stats"),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn metrics_need_the_admin_key_and_pass_promtool() {
    let promtool = tool("promtool");
    let (gw, _backend) = setup().await;
    send(&gw, 25).await;
    // One unrouted request and one hub message, so those families have samples.
    let r = reqwest::get(gw.proxy_url("/v3/nobody/x"))
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
    let r = reqwest::Client::new()
        .post(gw.events_url("/v3/events/pub/shop/news"))
        .bearer_auth(TOKEN)
        .body("hello")
        .send()
        .await
        .expect("publish");
    assert_eq!(r.status(), 202);

    let (status, body) = get(&gw.admin_url("/metrics"), None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("admin key required"), "{body}");
    let (status, text) = get(&gw.admin_url("/metrics"), Some(ADMIN_KEY)).await;
    assert_eq!(status, 200);
    for want in [
        "nextgate_requests_total{app=\"shop\",method=\"GET\",status_class=\"2xx\"} 25",
        "nextgate_request_duration_seconds_count{app=\"shop\"} 25",
        "nextgate_upstream_duration_seconds_bucket{app=\"shop\",le=\"+Inf\"} 25",
        "nextgate_route_requests_total{app=\"shop\",route=\"GET /work/{id}\"} 25",
        "nextgate_unrouted_requests_total 1",
        "nextgate_hub_messages_published_total 1",
        "nextgate_apps 1",
        "nextgate_registry_changes_total{change=\"register\"} 1",
        "process_cpu_seconds_total",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    assert!(
        text.contains("nextgate_backends{app=\"shop\",backend=\"http://127.0.0.1:"),
        "{text}"
    );

    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool: {said}");
    assert!(said.trim().is_empty(), "promtool found problems:\n{said}");
}

/// Kills the Prometheus server when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn query(prom: &str, q: &str) -> Option<f64> {
    let resp = reqwest::Client::new()
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = resp.json().await.ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_gateway() {
    let prometheus = tool("prometheus");
    let (gw, _backend) = setup().await;
    send(&gw, 37).await;

    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: nextgate\n    authorization:\n      credentials: {ADMIN_KEY}\n    static_configs:\n      - targets: ['{}']\n",
            gw.admin
        ),
    )
    .expect("write prometheus.yml");
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
    let _prom = Child(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    let prom = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut up, mut requests) = (None, None);
    while Instant::now() < deadline {
        up = query(&prom, "up{job=\"nextgate\"}").await;
        requests = query(&prom, "sum(nextgate_requests_total{app=\"shop\"})").await;
        if up == Some(1.0) && requests == Some(37.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
    assert_eq!(
        up,
        Some(1.0),
        "prometheus never saw the target up; its log:\n{tail}"
    );
    assert_eq!(requests, Some(37.0), "prometheus log:\n{tail}");
}
