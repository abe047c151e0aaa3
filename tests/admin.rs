//! The registry's admin API against a real gateway process: registration (form, JSON, the
//! seed's sample), token binding, the admin key, pre-provisioned mode, bad input, persistence
//! across restarts and `kill -9`, and the command line.

mod common;

use common::{Gateway, ADMIN_KEY};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

/// No active health checks: these tests register addresses that must never be probed.
const NO_PROBES: &str = "[health]\nkind = \"none\"\n";
const REGISTER: &str = "/v3/events/processes/register";
const TOKEN_A: &str = "token-aaaaaaaaaaaaaaaa";
const TOKEN_B: &str = "token-bbbbbbbbbbbbbbbb";

async fn post_form(gw: &Gateway, body: &str) -> (StatusCode, Value) {
    let r = Client::new()
        .post(gw.admin_url(REGISTER))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post_json(gw: &Gateway, body: Value) -> (StatusCode, Value) {
    let r = Client::new()
        .post(gw.admin_url(REGISTER))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn call(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut rb = Client::new().request(method, gw.admin_url(path));
    if let Some(b) = bearer {
        rb = rb.bearer_auth(b);
    }
    if let Some(body) = body {
        rb = rb.json(&body);
    }
    let r = rb.send().await.expect("request");
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn seed_sample_registers_verbatim() {
    let gw = Gateway::start(NO_PROBES).await;
    let sample = "name=iaas&endpoint=http://10.128.0.100:8000,http://10.128.0.150:8000,http://10.128.0.200:8000&token=Wld2pWduZW1hqgzbxSWDW5mhGzxZzD0I";
    let (status, body) = post_form(&gw, sample).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], "iaas");
    let endpoints: Vec<&str> = body["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["endpoint"].as_str().expect("endpoint"))
        .collect();
    assert_eq!(
        endpoints,
        [
            "http://10.128.0.100:8000",
            "http://10.128.0.150:8000",
            "http://10.128.0.200:8000"
        ]
    );
    assert!(body["backends"][0]["healthy"].is_boolean());
    assert!(body["registered_at"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
    assert!(
        !body
            .to_string()
            .contains("Wld2pWduZW1hqgzbxSWDW5mhGzxZzD0I"),
        "token leaked"
    );
    // The same request again is an update.
    let (status, body) = post_form(&gw, sample).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The token is stored hashed.
    let state = std::fs::read_to_string(gw.state_dir().join("registry.json")).expect("state");
    assert!(!state.contains("Wld2pWduZW1hqgzbxSWDW5mhGzxZzD0I"));
    assert!(state.contains("sha256:"));
}

#[tokio::test]
async fn json_registration_and_token_binding() {
    let gw = Gateway::start(NO_PROBES).await;
    let (s, b) = post_json(
        &gw,
        json!({"name": "web", "endpoint": ["http://127.0.0.1:9", "http://127.0.0.2:9"], "token": TOKEN_A}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["backends"].as_array().map(Vec::len), Some(2));
    // JSON with endpoint as a comma-separated string; same token: update.
    let (s, b) = post_json(
        &gw,
        json!({"name": "web", "endpoint": "http://127.0.0.3:9", "token": TOKEN_A}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["backends"][0]["endpoint"], "http://127.0.0.3:9");
    assert_eq!(b["backends"].as_array().map(Vec::len), Some(1));
    // Another token may not take the name over.
    let (s, b) = post_json(
        &gw,
        json!({"name": "web", "endpoint": "http://127.0.0.4:9", "token": TOKEN_B}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(b["field"], "token");
    // Inspect with the app token, not with another.
    let (s, _) = call(
        &gw,
        reqwest::Method::GET,
        "/v3/events/processes/web",
        Some(TOKEN_A),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = call(
        &gw,
        reqwest::Method::GET,
        "/v3/events/processes/web",
        Some(TOKEN_B),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    // Deregister needs the same token.
    let (s, _) = call(
        &gw,
        reqwest::Method::DELETE,
        "/v3/events/processes/web",
        Some(TOKEN_B),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = call(
        &gw,
        reqwest::Method::DELETE,
        "/v3/events/processes/web",
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call(
        &gw,
        reqwest::Method::DELETE,
        "/v3/events/processes/web",
        Some(TOKEN_A),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = call(
        &gw,
        reqwest::Method::GET,
        "/v3/events/processes/web",
        Some(ADMIN_KEY),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // After deregistration the name is free for a new token.
    let (s, b) = post_json(
        &gw,
        json!({"name": "web", "endpoint": "http://127.0.0.4:9", "token": TOKEN_B}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
}

#[tokio::test]
async fn admin_key_lists_inspects_deletes_and_rebinds() {
    let gw = Gateway::start(NO_PROBES).await;
    for name in ["alpha", "beta"] {
        gw.register(name, &["http://127.0.0.1:9".into()], TOKEN_A)
            .await;
    }
    let list = "/v3/events/processes";
    let (s, b) = call(&gw, reqwest::Method::GET, list, None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert!(b["error"].as_str().is_some());
    let (s, _) = call(
        &gw,
        reqwest::Method::GET,
        list,
        Some("not-the-admin-key-at-all"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = call(&gw, reqwest::Method::GET, list, Some(TOKEN_A), None).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "an app token is not the admin key"
    );
    let (s, b) = call(&gw, reqwest::Method::GET, list, Some(ADMIN_KEY), None).await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = b["apps"]
        .as_array()
        .expect("apps")
        .iter()
        .map(|a| a["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert!(!b.to_string().contains(TOKEN_A));

    // Re-bind beta's token: the old one stops working, the new one works.
    let path = "/v3/events/processes/beta/token";
    let (s, _) = call(
        &gw,
        reqwest::Method::POST,
        path,
        Some(TOKEN_A),
        Some(json!({"token": TOKEN_B})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "apps cannot re-bind");
    let (s, b) = call(
        &gw,
        reqwest::Method::POST,
        path,
        Some(ADMIN_KEY),
        Some(json!({"token": TOKEN_B})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _) = post_json(
        &gw,
        json!({"name": "beta", "endpoint": "http://127.0.0.1:9", "token": TOKEN_A}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = post_json(
        &gw,
        json!({"name": "beta", "endpoint": "http://127.0.0.1:9", "token": TOKEN_B}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    // Admin deletes any app.
    let (s, _) = call(
        &gw,
        reqwest::Method::DELETE,
        "/v3/events/processes/alpha",
        Some(ADMIN_KEY),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, b) = call(
        &gw,
        reqwest::Method::DELETE,
        "/v3/events/processes/alpha",
        Some(ADMIN_KEY),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    // Unknown paths and methods get JSON errors.
    let (s, b) = call(&gw, reqwest::Method::GET, "/nope", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(b["error"].is_string());
    let (s, b) = call(&gw, reqwest::Method::GET, REGISTER, None, None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert!(b["error"].is_string());
}

#[tokio::test]
async fn provisioned_mode_only_admits_provisioned_names() {
    let gw = Gateway::start(&format!("{NO_PROBES}[registry]\nmode = \"provisioned\"\n")).await;
    let (s, b) = post_json(
        &gw,
        json!({"name": "web", "endpoint": "http://127.0.0.1:9", "token": TOKEN_A}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(b["field"], "name");
    // Provisioning needs the admin key.
    let (s, _) = call(
        &gw,
        reqwest::Method::PUT,
        "/v3/events/processes/web",
        Some(TOKEN_A),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = call(
        &gw,
        reqwest::Method::PUT,
        "/v3/events/processes/web",
        Some(ADMIN_KEY),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["token_bound"], false);
    assert_eq!(b["provisioned"], true);
    // First registration of a provisioned name binds the token.
    let (s, b) = post_json(
        &gw,
        json!({"name": "web", "endpoint": "http://127.0.0.1:9", "token": TOKEN_A}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["token_bound"], true);
    let (s, _) = post_json(
        &gw,
        json!({"name": "web", "endpoint": "http://127.0.0.1:9", "token": TOKEN_B}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Provisioning with a token binds it up front.
    let (s, b) = call(
        &gw,
        reqwest::Method::PUT,
        "/v3/events/processes/api",
        Some(ADMIN_KEY),
        Some(json!({"token": TOKEN_B, "endpoint": ["http://127.0.0.1:10"]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["backends"][0]["endpoint"], "http://127.0.0.1:10");
    let (s, _) = post_json(
        &gw,
        json!({"name": "api", "endpoint": "http://127.0.0.1:9", "token": TOKEN_A}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = post_json(
        &gw,
        json!({"name": "api", "endpoint": "http://127.0.0.1:9", "token": TOKEN_B}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn bad_input_table() {
    let gw = Gateway::start(NO_PROBES).await;
    let ok_ep = "http://127.0.0.1:9";
    enum B {
        Form(String),
        Json(Value),
        Raw(&'static str, Vec<u8>),
    }
    let form = |s: &str| B::Form(s.to_string());
    let cases: Vec<(&str, B, u16, &str)> = vec![
        (
            "missing name",
            form(&format!("endpoint={ok_ep}&token={TOKEN_A}")),
            400,
            "name",
        ),
        (
            "empty name",
            form(&format!("name=&endpoint={ok_ep}&token={TOKEN_A}")),
            400,
            "name",
        ),
        (
            "name with capitals",
            form(&format!("name=Web&endpoint={ok_ep}&token={TOKEN_A}")),
            400,
            "name",
        ),
        (
            "name with underscore",
            form(&format!("name=my_app&endpoint={ok_ep}&token={TOKEN_A}")),
            400,
            "name",
        ),
        (
            "reserved name",
            form(&format!("name=events&endpoint={ok_ep}&token={TOKEN_A}")),
            400,
            "name",
        ),
        (
            "name too long",
            B::Json(json!({"name": "a".repeat(64), "endpoint": ok_ep, "token": TOKEN_A})),
            400,
            "name",
        ),
        (
            "missing endpoint",
            form(&format!("name=web&token={TOKEN_A}")),
            400,
            "endpoint",
        ),
        (
            "empty endpoint",
            form(&format!("name=web&endpoint=&token={TOKEN_A}")),
            400,
            "endpoint",
        ),
        (
            "empty endpoint array",
            B::Json(json!({"name": "web", "endpoint": [], "token": TOKEN_A})),
            400,
            "endpoint",
        ),
        (
            "malformed endpoint",
            form(&format!("name=web&endpoint=not%20a%20url&token={TOKEN_A}")),
            400,
            "endpoint",
        ),
        (
            "no scheme",
            form(&format!("name=web&endpoint=127.0.0.1:9&token={TOKEN_A}")),
            400,
            "endpoint",
        ),
        (
            "unsupported scheme",
            form(&format!(
                "name=web&endpoint=ftp://127.0.0.1:21&token={TOKEN_A}"
            )),
            400,
            "endpoint",
        ),
        (
            "duplicate endpoints",
            form(&format!(
                "name=web&endpoint={ok_ep},{ok_ep}/&token={TOKEN_A}"
            )),
            400,
            "endpoint",
        ),
        (
            "empty item in list",
            form(&format!("name=web&endpoint={ok_ep},,&token={TOKEN_A}")),
            400,
            "endpoint",
        ),
        (
            "endpoint with path",
            form(&format!("name=web&endpoint={ok_ep}/api&token={TOKEN_A}")),
            400,
            "endpoint",
        ),
        (
            "port out of range",
            form(&format!(
                "name=web&endpoint=http://127.0.0.1:70000&token={TOKEN_A}"
            )),
            400,
            "endpoint",
        ),
        (
            "endpoint of wrong type",
            B::Json(json!({"name": "web", "endpoint": 5, "token": TOKEN_A})),
            400,
            "endpoint",
        ),
        (
            "missing token",
            form(&format!("name=web&endpoint={ok_ep}")),
            400,
            "token",
        ),
        (
            "token too short",
            form(&format!("name=web&endpoint={ok_ep}&token=short")),
            400,
            "token",
        ),
        (
            "token with space",
            form(&format!(
                "name=web&endpoint={ok_ep}&token=has%20a%20space%20inside%20it"
            )),
            400,
            "token",
        ),
        (
            "unknown json field",
            B::Json(json!({"name": "web", "endpoint": ok_ep, "token": TOKEN_A, "color": "red"})),
            400,
            "color",
        ),
        (
            "unknown form field",
            form(&format!(
                "name=web&endpoint={ok_ep}&token={TOKEN_A}&extra=1"
            )),
            400,
            "extra",
        ),
        (
            "malformed json",
            B::Raw("application/json", b"{\"name\": ".to_vec()),
            400,
            "body",
        ),
        (
            "wrong content type",
            B::Raw("text/plain", b"name=web".to_vec()),
            415,
            "content-type",
        ),
        (
            "body too large",
            B::Raw("application/json", vec![b' '; 100 * 1024]),
            413,
            "body",
        ),
    ];
    assert!(cases.len() >= 15);
    let client = Client::new();
    for (what, body, status, field) in cases {
        let rb = client.post(gw.admin_url(REGISTER));
        let rb = match body {
            B::Form(s) => rb
                .header("content-type", "application/x-www-form-urlencoded")
                .body(s),
            B::Json(v) => rb.json(&v),
            B::Raw(ct, bytes) => rb.header("content-type", ct).body(bytes),
        };
        let resp = rb.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(ct, "application/json", "{what}");
        assert_eq!(body["field"], field, "{what}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {body}"
        );
    }
    // Nothing was registered by any of them, and the gateway is still serving.
    let (s, b) = call(
        &gw,
        reqwest::Method::GET,
        "/v3/events/processes",
        Some(ADMIN_KEY),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["apps"].as_array().map(Vec::len), Some(0), "{b}");
}

#[tokio::test]
async fn restart_keeps_every_registration() {
    let mut gw = Gateway::start(NO_PROBES).await;
    for (i, name) in ["one", "two", "three"].iter().enumerate() {
        gw.register(name, &[format!("http://127.0.0.1:{}", 1000 + i)], TOKEN_A)
            .await;
    }
    let (_, before) = call(
        &gw,
        reqwest::Method::GET,
        "/v3/events/processes",
        Some(ADMIN_KEY),
        None,
    )
    .await;
    gw.restart().await;
    let (s, after) = call(
        &gw,
        reqwest::Method::GET,
        "/v3/events/processes",
        Some(ADMIN_KEY),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(before, after);
    // Tokens survive too.
    let (s, _) = post_json(
        &gw,
        json!({"name": "two", "endpoint": "http://127.0.0.1:9", "token": TOKEN_B}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = post_json(
        &gw,
        json!({"name": "two", "endpoint": "http://127.0.0.1:9", "token": TOKEN_A}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn kill_9_loses_no_acknowledged_registration() {
    let mut gw = Gateway::start(NO_PROBES).await;
    for round in 0..3u64 {
        let url = gw.admin_url(REGISTER);
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let writer = {
            let acked = acked.clone();
            tokio::spawn(async move {
                let client = Client::new();
                for i in 0..5000u32 {
                    let name = format!("r{round}-app-{i}");
                    let body = json!({"name": name, "endpoint": format!("http://127.0.0.1:{}", 1 + i % 60000), "token": TOKEN_A});
                    match client.post(&url).json(&body).send().await {
                        Ok(r) if r.status().is_success() => acked.lock().expect("lock").push(name),
                        _ => break,
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(300 + 150 * round)).await;
        gw.kill9();
        writer.await.expect("writer");
        let acked = acked.lock().expect("lock").clone();
        assert!(
            !acked.is_empty(),
            "round {round}: nothing was acknowledged before the kill"
        );
        gw.restart().await;
        let (s, b) = call(
            &gw,
            reqwest::Method::GET,
            "/v3/events/processes",
            Some(ADMIN_KEY),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let have: std::collections::HashSet<&str> = b["apps"]
            .as_array()
            .expect("apps")
            .iter()
            .filter_map(|a| a["name"].as_str())
            .collect();
        let lost: Vec<&String> = acked
            .iter()
            .filter(|n| !have.contains(n.as_str()))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: lost {} of {} acknowledged: {lost:?}",
            lost.len(),
            acked.len()
        );
    }
}

#[tokio::test]
async fn corrupt_state_stops_startup() {
    let mut gw = Gateway::start(NO_PROBES).await;
    gw.register("web", &["http://127.0.0.1:9".into()], TOKEN_A)
        .await;
    gw.kill9();
    let path = gw.state_dir().join("registry.json");
    let good = std::fs::read(&path).expect("state");
    std::fs::write(&path, &good[..good.len() / 2]).expect("truncate");
    let (status, stderr) = gw.run_expect_exit();
    assert!(!status.success(), "started on a corrupt state file");
    assert!(stderr.contains("corrupt"), "{stderr}");
    assert!(stderr.contains("registry.json"), "{stderr}");
    // The file is left as it was, never replaced by an empty registry.
    assert_eq!(
        std::fs::read(&path).expect("state"),
        &good[..good.len() / 2]
    );
}

#[tokio::test]
async fn generated_admin_key_is_private_and_works() {
    let gw = Gateway::start_full(NO_PROBES, None, |_| {}).await;
    let path = gw.state_dir().join("admin.key");
    let key = std::fs::read_to_string(&path).expect("admin.key generated");
    let key = key.trim();
    assert!(key.len() >= 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert!(
        gw.log_text().contains("admin.key"),
        "the key's path is logged"
    );
    let (s, _) = call(
        &gw,
        reqwest::Method::GET,
        "/v3/events/processes",
        Some(key),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &gw,
        reqwest::Method::GET,
        "/v3/events/processes",
        Some(ADMIN_KEY),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[test]
fn cli_checks_config_and_names_the_key() {
    let bin = env!("CARGO_BIN_EXE_nextgate");
    let dir = tempfile::tempdir().expect("dir");
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .env_remove("NEXTGATE_ADMIN_KEY")
            .output()
            .expect("run")
    };
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/nextgate.toml");
    let out = run(&["-t", "-c", shipped]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["-t"]);
    assert!(out.status.success());
    for (text, key) in [
        (
            "[proxy]\nread_timeout = \"forever\"\n",
            "proxy.read_timeout",
        ),
        ("[listen]\nprox = \"1.2.3.4:5\"\n", "prox"),
        ("[registry]\nmode = \"closed\"\n", "registry.mode"),
    ] {
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, text).expect("write");
        let out = run(&["-t", "-c", f.to_str().expect("utf8")]);
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{text}: {err}");
    }
    let out = run(&["-t", "-c", "/nonexistent/nextgate.toml"]);
    assert!(!out.status.success());
    let out = run(&["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = run(&["--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--config"));
}

#[tokio::test]
async fn balance_choice_is_validated_and_survives_kill_9() {
    let mut gw = Gateway::start(NO_PROBES).await;
    let (status, body) = post_json(
        &gw,
        json!({"name": "lb", "endpoint": "http://127.0.0.1:9", "token": TOKEN_A, "balance": "fastest"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "balance", "{body}");
    let (status, body) = post_form(
        &gw,
        &format!("name=lb&endpoint=http://127.0.0.1:9&token={TOKEN_A}&balance=round_robin"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["balance"], "round_robin");
    // Re-registering without a choice keeps it; the default is peak_ewma.
    let (status, body) = post_json(
        &gw,
        json!({"name": "lb", "endpoint": "http://127.0.0.1:10", "token": TOKEN_A}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["balance"], "round_robin");
    let (_, body) = post_json(
        &gw,
        json!({"name": "dflt", "endpoint": "http://127.0.0.1:9", "token": TOKEN_B}),
    )
    .await;
    assert_eq!(body["balance"], "peak_ewma");
    gw.kill9();
    gw.restart().await;
    let r = Client::new()
        .get(gw.admin_url("/v3/events/processes/lb"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("get");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["balance"], "round_robin", "{body}");
    assert_eq!(
        body["backends"][0]["endpoint"], "http://127.0.0.1:10",
        "{body}"
    );
}
