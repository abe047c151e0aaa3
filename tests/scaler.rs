//! The scaler against the real Docker engine. A static test app (tests/support/scale_backend.rs,
//! latency growing with its concurrency) is built into a `FROM scratch` image; an app
//! registered with a docker scaling spec is driven up by a bounded load loop, has a replica
//! killed and replaced, comes back down when the load stops, and is adopted (not restarted)
//! by a restarted gateway; no request fails while the load runs. Every container and image
//! the test makes is removed at the end, however it ends.

mod common;

use common::{Gateway, ADMIN_KEY};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "scaler-test-token-0123456789";

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("the docker CLI is needed for this test and could not run: {e}")
        });
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Removes the app's containers and the test image when dropped.
struct Cleanup {
    app: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in containers(&self.app, true) {
            docker(&["rm", "-f", &id]);
        }
        docker(&["rmi", "-f", &self.image]);
    }
}

fn containers(app: &str, all: bool) -> Vec<String> {
    let filter = format!("label=nextgate.app={app}");
    let mut args = vec!["ps", "-q", "--no-trunc", "--filter", &filter];
    if all {
        args.push("-a");
    }
    let (ok, out) = docker(&args);
    assert!(ok, "docker ps: {out}");
    let mut ids: Vec<String> = out.lines().map(str::to_string).collect();
    ids.sort();
    ids
}

/// A name for this run's app and its test image, built; both are removed when the guard drops
/// (also when the test fails).
fn test_app(prefix: &str) -> (String, String, Cleanup) {
    let app = format!("{prefix}{}", std::process::id());
    let image = format!("nextgate-scale-test:{app}");
    let cleanup = Cleanup {
        app: app.clone(),
        image: image.clone(),
    };
    build_image(&image);
    (app, image, cleanup)
}

/// Build the test app as a static binary and wrap it in a `FROM scratch` image.
fn build_image(tag: &str) {
    let (ok, out) = docker(&["version", "--format", "{{.Server.Version}}"]);
    assert!(
        ok,
        "the Docker engine must be running for the scaler tests: {out}"
    );
    let dir = tempfile::tempdir().expect("tmp");
    let bin = dir.path().join("scale-backend");
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/scale_backend.rs"
    );
    let status = Command::new("rustc")
        .args([
            "-O",
            "-C",
            "target-feature=+crt-static",
            "--target",
            "x86_64-unknown-linux-gnu",
            src,
            "-o",
        ])
        .arg(&bin)
        .status()
        .expect("run rustc");
    assert!(status.success(), "building the static test app failed");
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY scale-backend /scale-backend\nEXPOSE 8080\nENTRYPOINT [\"/scale-backend\"]\n",
    )
    .expect("Dockerfile");
    let (ok, out) = docker(&["build", "-q", "-t", tag, &dir.path().to_string_lossy()]);
    assert!(ok, "docker build: {out}");
}

/// Register `app` with a scaling spec (with the admin key, as a spec needs); the response.
async fn register_scaled(gw: &Gateway, app: &str, scaling: serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.admin_url("/v3/events/processes/register"))
        .bearer_auth(ADMIN_KEY)
        .json(&serde_json::json!({"name": app, "token": TOKEN, "scaling": scaling}))
        .send()
        .await
        .expect("register")
}

async fn metrics(gw: &Gateway) -> String {
    reqwest::Client::new()
        .get(gw.admin_url("/metrics"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

async fn app_view(gw: &Gateway, app: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(gw.admin_url(&format!("/v3/events/processes/{app}")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("app view")
        .json()
        .await
        .expect("json")
}

async fn backends(gw: &Gateway, app: &str) -> usize {
    app_view(gw, app).await["backends"]
        .as_array()
        .map_or(0, |b| b.len())
}

/// Restart the gateway: it adopts the app's one running replica instead of starting another.
async fn restart_adopts(gw: &mut Gateway, app: &str) {
    let before = containers(app, true);
    assert_eq!(before.len(), 1, "one replica before the restart");
    let _ = gw.terminate();
    gw.restart().await;
    let n = wait_backends(gw, app, 30, |n| n == 1).await;
    assert_eq!(n, 1, "adopted after restart; log:\n{}", gw.log_text());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        containers(app, true),
        before,
        "the same container, no new one"
    );
}

/// Wait until `cond(backends)` holds, up to `secs`; returns the last count.
async fn wait_backends(gw: &Gateway, app: &str, secs: u64, cond: impl Fn(usize) -> bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let n = backends(gw, app).await;
        if cond(n) || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

/// `workers` clients sending GETs until stopped (or 60 s, whichever is first).
fn load(gw: &Gateway, app: &str, workers: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let url = gw.proxy_url(&format!("/v3/{app}/work"));
    let tasks = (0..workers)
        .map(|_| {
            let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let status = r.status();
                            errors.push(format!("{status} {}", r.text().await.unwrap_or_default()));
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(e.to_string());
                        }
                    }
                }
                errors
            })
        })
        .collect();
    Load {
        stop,
        ok,
        failed,
        tasks,
    }
}

impl Load {
    async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for t in self.tasks {
            errors.extend(t.await.expect("load task"));
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

#[tokio::test]
async fn docker_replicas_follow_the_load_and_survive_kills_and_restarts() {
    let (app, image, _cleanup) = test_app("scaly");
    let mut gw = Gateway::start(
        "[health]\nkind = \"none\"\n\
         [model]\ntick = \"100ms\"\nslow_decay = \"3s\"\n\
         [scaler]\ntick = \"1s\"\ncheck = \"250ms\"\ngrace = \"2s\"\nstabilisation = \"4s\"\ndown_delay = \"3s\"\n",
    )
    .await;
    let resp = register_scaled(
        &gw,
        &app,
        serde_json::json!({"driver": "docker", "image": image, "port": 8080,
                        "min": 1, "max": 4, "target_concurrency": 2}),
    )
    .await;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["scaling"]["driver"], "docker", "{body}");

    // The minimum comes up on its own, probed before it gets traffic.
    let n = wait_backends(&gw, &app, 30, |n| n == 1).await;
    assert_eq!(n, 1, "one replica at the minimum; log:\n{}", gw.log_text());
    assert_eq!(containers(&app, false).len(), 1);

    // Load: 8 clients on replicas that get slower with concurrency (target 2 each).
    let l = load(&gw, &app, 8);
    let step = Instant::now();
    let deadline = step + Duration::from_secs(10);
    let mut reacted = None;
    while reacted.is_none() && Instant::now() < deadline {
        let m = metrics(&gw).await;
        if m.contains(&format!(
            "nextgate_scaler_replicas{{app=\"{app}\",state=\"desired\"}} 1\n"
        )) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else if m.contains(&format!(
            "nextgate_scaler_replicas{{app=\"{app}\",state=\"desired\"}}"
        )) {
            reacted = Some(step.elapsed());
        }
    }
    eprintln!("scale-up decided {reacted:?} after the load step");
    assert!(
        reacted.is_some_and(|r| r < Duration::from_secs(5)),
        "reaction {reacted:?}"
    );
    let n = wait_backends(&gw, &app, 20, |n| n >= 3).await;
    assert!(
        n >= 3,
        "scaled up under load: {n} backends; log:\n{}",
        gw.log_text()
    );

    // A replica killed outside the gateway is noticed and replaced, under load.
    let victim = containers(&app, false).pop().expect("a replica");
    let (ok, out) = docker(&["kill", &victim]);
    assert!(ok, "docker kill: {out}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let replaced = loop {
        let now = containers(&app, false);
        if !now.contains(&victim) && now.len() >= 3 && backends(&gw, &app).await >= 3 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(replaced, "killed replica replaced; log:\n{}", gw.log_text());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok_count, failed, errors) = l.finish().await;
    assert!(ok_count > 100, "the load ran: {ok_count} requests");
    if failed > 0 {
        let log = gw.log_text();
        let scaler: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("scaler") || l.contains("WARN") || l.contains("ERROR"))
            .take(80)
            .collect();
        panic!(
            "{failed} requests failed while scaling, first: {:?}\nlog:\n{}",
            &errors[..errors.len().min(5)],
            scaler.join("\n")
        );
    }

    // Load gone: back to the minimum, drained and removed.
    let n = wait_backends(&gw, &app, 40, |n| n == 1).await;
    assert_eq!(n, 1, "back to the minimum; log:\n{}", gw.log_text());
    let deadline = Instant::now() + Duration::from_secs(20);
    while containers(&app, true).len() > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        containers(&app, true).len(),
        1,
        "stopped replicas are removed"
    );

    // A restarted gateway adopts the running replica instead of starting another.
    restart_adopts(&mut gw, &app).await;
    let r = reqwest::get(gw.proxy_url(&format!("/v3/{app}/work")))
        .await
        .expect("request");
    assert_eq!(r.status(), 200);

    // The scaler's work shows in the metrics.
    let metrics = metrics(&gw).await;
    assert!(
        metrics.contains(&format!(
            "nextgate_scaler_replicas{{app=\"{app}\",state=\"ready\"}} 1"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_spec_in_the_config_file_serves_its_app_before_it_registers() {
    let (app, image, _cleanup) = test_app("decl");
    let mut gw = Gateway::start(&format!(
        "[health]\nkind = \"none\"\n[scaler]\ntick = \"200ms\"\ngrace = \"1s\"\n\
         [scaling.{app}]\ndriver = \"docker\"\nimage = \"{image}\"\nport = 8080\nmin = 1\nmax = 2\n"
    ))
    .await;
    // Nobody registered: the declared app exists as a provisioned name, served by its replica.
    let n = wait_backends(&gw, &app, 30, |n| n == 1).await;
    assert_eq!(
        n,
        1,
        "the declared minimum came up; log:\n{}",
        gw.log_text()
    );
    let view = app_view(&gw, &app).await;
    assert_eq!(view["provisioned"], true, "{view}");
    assert_eq!(view["token_bound"], false, "{view}");
    assert_eq!(view["scaling"]["image"], image.as_str(), "{view}");
    let r = reqwest::get(gw.proxy_url(&format!("/v3/{app}/work")))
        .await
        .expect("request");
    assert_eq!(r.status(), 200);

    // The app binds its token later with a plain registration: no endpoint, no admin key.
    let r = reqwest::Client::new()
        .post(gw.admin_url("/v3/events/processes/register"))
        .json(&serde_json::json!({"name": app, "token": TOKEN}))
        .send()
        .await
        .expect("register");
    let status = r.status();
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(status.is_success(), "{status} {body}");
    assert_eq!(body["token_bound"], true, "{body}");

    // A restart with the same file changes nothing: same container, token still bound.
    let updated = app_view(&gw, &app).await["updated_at"].clone();
    restart_adopts(&mut gw, &app).await;
    let view = app_view(&gw, &app).await;
    assert_eq!(view["token_bound"], true, "{view}");
    assert_eq!(
        view["updated_at"], updated,
        "an unchanged spec is not rewritten: {view}"
    );

    // The table taken out of the file: at the next start the spec goes, and so do the replicas.
    let path = gw.state_dir().join("nextgate.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let cut = text.find("[scaling.").expect("the scaling table");
    std::fs::write(&path, &text[..cut]).expect("config");
    let _ = gw.terminate();
    gw.restart().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !containers(&app, true).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        containers(&app, true).is_empty(),
        "replicas of an app no longer scaled are removed; log:\n{}",
        gw.log_text()
    );
    let view = app_view(&gw, &app).await;
    assert!(view["scaling"].is_null(), "{view}");
    assert_eq!(view["token_bound"], true, "the app itself stays: {view}");
}

#[tokio::test]
async fn an_app_at_zero_holds_requests_until_a_replica_is_ready_then_idles_back_to_zero() {
    let (app, image, _cleanup) = test_app("zero");
    let gw = Gateway::start(
        "[health]\nkind = \"none\"\n\
         [model]\ntick = \"100ms\"\nfast_decay = \"500ms\"\nslow_decay = \"1s\"\n\
         [scaler]\ntick = \"250ms\"\ngrace = \"1s\"\nstabilisation = \"2s\"\ndown_delay = \"1s\"\n\
         hold_max = 2\nhold_timeout = \"20s\"\n",
    )
    .await;
    let resp = register_scaled(
        &gw,
        &app,
        serde_json::json!({"driver": "docker", "image": image, "port": 8080,
                        "min": 0, "max": 2, "idle_to_zero": "2s"}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        containers(&app, true).is_empty(),
        "min 0: nothing runs before a request"
    );

    // Four requests at once while at zero: two are held until the replica is ready and
    // succeed, the two beyond hold_max get 503 with Retry-After at once.
    let url = gw.proxy_url(&format!("/v3/{app}/work"));
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            // All at once: a cold start takes a few hundred ms, these arrive within a few.
            tokio::spawn(async move {
                let r = reqwest::get(&url).await.expect("request");
                let retry = r.headers().get("retry-after").is_some();
                (r.status().as_u16(), retry)
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("task"));
    }
    let waited = started.elapsed();
    eprintln!("cold start: held requests answered after {waited:?}");
    results.sort();
    assert_eq!(
        results,
        vec![(200, false), (200, false), (503, true), (503, true)],
        "log:\n{}",
        gw.log_text()
    );
    assert!(waited < Duration::from_secs(20), "held {waited:?}");
    assert_eq!(
        containers(&app, false).len(),
        1,
        "one replica for the cold start"
    );

    // Idle for idle_to_zero: back to zero, the container removed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !containers(&app, true).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        containers(&app, true).is_empty(),
        "scaled back to zero; log:\n{}",
        gw.log_text()
    );
    assert_eq!(backends(&gw, &app).await, 0);
}

/// Leaves the swarm on drop if the test initialised it; removes its service.
struct SwarmGuard {
    initialised: bool,
    service: String,
}

impl Drop for SwarmGuard {
    fn drop(&mut self) {
        docker(&["service", "rm", &self.service]);
        if self.initialised {
            docker(&["swarm", "leave", "--force"]);
        }
    }
}

fn service_replicas(service: &str) -> u32 {
    let (ok, out) = docker(&[
        "service",
        "inspect",
        "--format",
        "{{.Spec.Mode.Replicated.Replicas}}",
        service,
    ]);
    assert!(ok, "docker service inspect: {out}");
    out.trim().parse().unwrap_or(0)
}

#[tokio::test]
async fn a_swarm_service_follows_the_load() {
    let (app, image, _cleanup) = test_app("swarmy");
    // A single-node swarm: made here if the engine is not in one, and left again afterwards.
    let (ok, state) = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
    assert!(ok, "docker info: {state}");
    let initialised = state.trim() == "inactive";
    if initialised {
        let (ok, out) = docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        assert!(ok, "docker swarm init: {out}");
    }
    let service = format!("nextgate-test-{app}");
    let _swarm = SwarmGuard {
        initialised,
        service: service.clone(),
    };
    // Publishing the port attaches the tasks to this node's docker_gwbridge, where the
    // gateway reaches each task directly.
    let (ok, out) = docker(&[
        "service",
        "create",
        "--quiet",
        "--name",
        &service,
        "--replicas",
        "1",
        "--publish",
        "target=8080",
        &image,
    ]);
    assert!(ok, "docker service create: {out}");

    let gw = Gateway::start(
        "[health]\nkind = \"none\"\n\
         [model]\ntick = \"100ms\"\nslow_decay = \"3s\"\n\
         [scaler]\ntick = \"500ms\"\nstabilisation = \"4s\"\ndown_delay = \"3s\"\n",
    )
    .await;
    let resp = register_scaled(
        &gw,
        &app,
        serde_json::json!({"driver": "swarm", "service": service, "port": 8080,
                        "min": 1, "max": 3, "target_concurrency": 2}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let n = wait_backends(&gw, &app, 30, |n| n == 1).await;
    assert_eq!(
        n,
        1,
        "the service's task is the backend; log:\n{}",
        gw.log_text()
    );

    let l = load(&gw, &app, 8);
    let n = wait_backends(&gw, &app, 30, |n| n >= 2).await;
    assert!(
        n >= 2,
        "more tasks under load: {n}; log:\n{}",
        gw.log_text()
    );
    assert!(service_replicas(&service) >= 2);
    // Keep the load on while the new task takes traffic.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok_count, failed, errors) = l.finish().await;
    assert!(ok_count > 100, "the load ran: {ok_count}");
    assert_eq!(
        failed,
        0,
        "no request fails while scaling up: {:?}",
        &errors[..errors.len().min(5)]
    );

    // Load gone: the service goes back to its minimum.
    let deadline = Instant::now() + Duration::from_secs(40);
    while service_replicas(&service) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(service_replicas(&service), 1, "log:\n{}", gw.log_text());
    let n = wait_backends(&gw, &app, 20, |n| n == 1).await;
    assert_eq!(n, 1);
}

#[tokio::test]
async fn an_unreachable_engine_is_an_error_and_a_metric_not_a_crash() {
    let backend = common::Backend::start("plain").await;
    let mut gw = Gateway::start(
        "[health]\nkind = \"none\"\n[scaler]\ntick = \"200ms\"\nhold_timeout = \"1s\"\n",
    )
    .await;
    gw.env.push((
        "DOCKER_HOST".into(),
        "unix:///nonexistent/nextgate-test/docker.sock".into(),
    ));
    gw.restart().await;
    gw.register("plain", &[backend.url()], TOKEN).await;
    // Only the admin may ask for containers.
    let resp = reqwest::Client::new()
        .post(gw.admin_url("/v3/events/processes/register"))
        .json(&serde_json::json!({
            "name": "sneaky", "token": "sneaky-token-0123456789",
            "scaling": {"driver": "docker", "image": "anything:1", "port": 8080, "max": 64}
        }))
        .send()
        .await
        .expect("register");
    assert_eq!(resp.status(), 403);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["field"], "scaling", "{body}");
    let resp = register_scaled(
        &gw,
        "scaled",
        serde_json::json!({"driver": "docker", "image": "nothing:here", "port": 8080, "max": 2}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut errors = 0.0;
    while errors == 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        errors = metrics(&gw)
            .await
            .lines()
            .find_map(|l| l.strip_prefix("nextgate_scaler_errors_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
    }
    assert!(errors > 0.0, "errors counted; log:\n{}", gw.log_text());
    assert!(
        gw.log_text().contains("docker engine unavailable"),
        "{}",
        gw.log_text()
    );
    // The rest of the gateway keeps serving.
    let r = reqwest::get(gw.proxy_url("/v3/plain/id"))
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "plain");
    let r = reqwest::get(gw.proxy_url("/v3/scaled/x"))
        .await
        .expect("request");
    assert_eq!(
        r.status(),
        503,
        "no replica: held for hold_timeout, then a clear 503"
    );
    assert!(r.headers().get("retry-after").is_some());
}

#[tokio::test]
async fn a_missing_image_backs_off_instead_of_retrying_every_tick() {
    let (ok, out) = docker(&["version", "--format", "{{.Server.Version}}"]);
    assert!(
        ok,
        "the Docker engine must be running for the scaler tests: {out}"
    );
    let app = format!("noimage{}", std::process::id());
    let gw = Gateway::start("[health]\nkind = \"none\"\n[scaler]\ntick = \"100ms\"\n").await;
    let resp = register_scaled(&gw, &app, serde_json::json!({"driver": "docker", "image": "nextgate-no-such-image:0", "port": 8080, "max": 2})).await;
    assert_eq!(resp.status(), 201);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let errors: f64 = metrics(&gw)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("nextgate_scaler_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    // Attempts 0.5, 1, 2 s apart: a handful in 4 s, where a 100 ms tick would make 40.
    assert!(
        (1.0..=8.0).contains(&errors),
        "start attempts in 4 s: {errors}"
    );
    assert!(containers(&app, true).is_empty());
    assert!(
        gw.log_text().contains("replica start failed"),
        "{}",
        gw.log_text()
    );
}
