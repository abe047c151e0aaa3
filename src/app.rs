//! Wiring: builds every Pingora service from [`Settings`] and runs the server. Nothing else in
//! the crate imports this module.

use crate::admin::AdminApi;
use crate::config::{HealthKind, Settings};
use crate::cost::{AppInput, CostModel};
use crate::http_server::HyperApp;
use crate::hub::api::HubApi;
use crate::hub::store::HubStore;
use crate::hub::ticket::Signer;
use crate::hub::webhook::{WebhookSettings, Webhooks};
use crate::hub::Hub;
use crate::metrics::{Metrics, Sources};
use crate::proxy::route::RouteConfig;
use crate::proxy::{Gateway, ProxyConfig};
use crate::registry::store::{FileStore, RegistryStore};
use crate::registry::token::{generate_key, AdminKey};
use crate::registry::Registry;
use crate::scaler::controller::{Controller, ScalerStatus};
use crate::upstream::GatewayHealthCheck;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::ShutdownWatch;
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use pingora_load_balancing::{HealthCheckService, HealthRegistry};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How often idle hub channels are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// State directory problem.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// Directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Admin key or hub secret file problem.
    #[error("secret file {path}: {reason}")]
    AdminKey {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The registry could not be loaded.
    #[error("{0}")]
    Registry(#[from] crate::registry::store::StoreError),
    /// A `[scaling.{app}]` spec from the config file could not be applied.
    #[error("scaling.{app}: {source}")]
    Scaling {
        /// App name.
        app: String,
        /// Why.
        source: crate::registry::RegistryError,
    },
    /// A listener address cannot be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Listen {
        /// Config key.
        key: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TLS material problem.
    #[error("https listener: {0}")]
    Tls(String),
    /// The metrics registry could not be built.
    #[error("metrics: {0}")]
    Metrics(String),
    /// Runtime could not be built.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

/// Use the configured secret, or the one stored in `{state_dir}/{file}`, or make one there
/// (mode 0600) and log its path.
fn secret(
    configured: Option<&String>,
    settings: &Settings,
    file: &str,
    min_len: usize,
) -> Result<String, StartupError> {
    if let Some(k) = configured {
        return Ok(k.clone());
    }
    let path = settings.state_dir.join(file);
    let err = |reason: String| StartupError::AdminKey {
        path: path.clone(),
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(k) if k.trim().len() >= min_len => {
            tracing::info!(path = %path.display(), "secret loaded from state directory");
            return Ok(k.trim().to_string());
        }
        Ok(_) => return Err(err(format!("secret is shorter than {min_len} characters"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let key = generate_key();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&path).map_err(|e| err(e.to_string()))?;
    f.write_all(format!("{key}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| err(e.to_string()))?;
    tracing::warn!(path = %path.display(), "none configured: generated a secret (mode 0600)");
    Ok(key)
}

/// Where the proxy reaches a listener bound to `addr` (a wildcard address means loopback).
fn local_peer(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// A TCP listener for hyper-served apps. hyper reads into its own buffer, so the 64 KiB L4
/// read buffer Pingora puts on every accepted connection by default would only add a copy,
/// and it stays allocated for the life of a connection: with it, every idle hub subscriber
/// cost about 80 KiB (measured with 2000 WebSocket subscribers); without it, see README.
fn hyper_listener(addr: SocketAddr) -> ListenerConfig {
    ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::unbuffered())
}

/// Sweeps idle channels and channels of deregistered apps.
struct HubSweeper {
    hub: Arc<Hub>,
}

#[async_trait::async_trait]
impl BackgroundService for HubSweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let removed = self.hub.sweep(tokio::time::Instant::now());
                    if removed > 0 {
                        tracing::debug!(removed, channels = self.hub.channel_count(), "hub channels swept");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Folds every app's counters into the cost model on each tick.
struct ModelTicker {
    model: Arc<CostModel>,
    registry: Arc<Registry>,
    tick: Duration,
}

impl ModelTicker {
    fn fold(&self) {
        let apps = self.registry.list();
        let backends: Vec<Arc<std::collections::BTreeSet<pingora_load_balancing::Backend>>> =
            apps.iter().map(|a| a.upstream.backends()).collect();
        let inputs: Vec<AppInput<'_>> = apps
            .iter()
            .zip(&backends)
            .map(|(app, set)| AppInput {
                name: app.name(),
                stats: &app.upstream.stats,
                backends: set
                    .iter()
                    .filter_map(|b| {
                        let i = crate::upstream::info(b)?;
                        Some((i.endpoint.as_str(), app.upstream.healthy(b), &i.counters))
                    })
                    .collect(),
            })
            .collect();
        self.model.tick(&inputs, tokio::time::Instant::now());
    }
}

#[async_trait::async_trait]
impl BackgroundService for ModelTicker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.fold(),
                _ = shutdown.changed() => return,
            }
        }
    }
}

fn check_bind(key: &'static str, addr: SocketAddr) -> Result<(), StartupError> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|source| StartupError::Listen { key, addr, source })
}

fn check_readable(path: &Path, what: &str) -> Result<(), StartupError> {
    std::fs::metadata(path)
        .map(drop)
        .map_err(|e| StartupError::Tls(format!("{what} {}: {e}", path.display())))
}

/// Build every service and run until SIGTERM/SIGINT; returns after a graceful shutdown.
pub fn run(settings: Settings) -> Result<(), StartupError> {
    std::fs::create_dir_all(&settings.state_dir).map_err(|source| StartupError::StateDir {
        path: settings.state_dir.clone(),
        source,
    })?;
    let key = secret(settings.admin_key.as_ref(), &settings, "admin.key", 16)?;
    let hub_secret = secret(settings.hub.secret.as_ref(), &settings, "hub.secret", 32)?;
    check_bind("listen.proxy", settings.proxy_addr)?;
    check_bind("listen.admin", settings.admin_addr)?;
    check_bind("listen.events", settings.hub.addr)?;
    if let Some(tls) = &settings.https {
        check_bind("listen.https", tls.addr)?;
        check_readable(&tls.cert, "certificate")?;
        check_readable(&tls.key, "private key")?;
    }

    let health = Arc::new(HealthRegistry::new());
    let active_checks = settings.health_kind != HealthKind::None;
    if active_checks {
        health.set_health_check(Box::new(GatewayHealthCheck::new(&settings)));
    }
    let store: Arc<dyn RegistryStore> = Arc::new(FileStore::new(&settings.state_dir));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartupError::Runtime)?;
    let registry = Arc::new(rt.block_on(Registry::open(store, health.clone(), &settings))?);
    let unscaled = rt
        .block_on(registry.apply_declared(&settings.scaling))
        .map_err(|(app, source)| StartupError::Scaling { app, source })?;
    drop(rt);
    tracing::info!(apps = registry.len(), state_dir = %settings.state_dir.display(), "registry loaded");

    let conf = ServerConf {
        threads: settings.threads,
        work_stealing: settings.work_stealing,
        pid_file: settings.pid_file.to_string_lossy().into_owned(),
        upgrade_sock: settings.upgrade_sock.to_string_lossy().into_owned(),
        grace_period_seconds: Some(settings.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(settings.shutdown_timeout.as_secs().max(1)),
        daemon: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let conf = server.configuration.clone();

    let scaler_status = Arc::new(ScalerStatus::default());
    let proxy_cfg = ProxyConfig {
        route: RouteConfig {
            mount_prefix: settings.mount_prefix.clone(),
            base_domain: settings.base_domain.clone(),
        },
        connect_timeout: settings.connect_timeout,
        read_timeout: settings.read_timeout,
        write_timeout: settings.write_timeout,
        idle_timeout: settings.idle_timeout,
        max_retries: settings.max_retries,
        fail_cooldown: settings.fail_cooldown,
        max_header_bytes: settings.max_header_bytes,
        access_log: settings.access_log,
        hub_addr: local_peer(settings.hub.addr),
        fail_penalty: settings.fail_penalty,
        balance_decay: settings.balance_decay,
        hold_max: settings.scaler.hold_max,
        hold_timeout: settings.scaler.hold_timeout,
        scaler: scaler_status.clone(),
    };
    let gateway = Gateway::new(registry.clone(), proxy_cfg);
    let unrouted = gateway.unrouted();
    let mut proxy = pingora_proxy::http_proxy_service_with_name(&conf, gateway, "proxy");
    proxy.add_tcp(&settings.proxy_addr.to_string());
    if let Some(tls) = &settings.https {
        let tls_settings =
            TlsSettings::intermediate(&tls.cert.to_string_lossy(), &tls.key.to_string_lossy())
                .map_err(|e| StartupError::Tls(e.to_string()))?;
        proxy.add_tls_with_settings(&tls.addr.to_string(), None, tls_settings);
    }

    let hub = Hub::new(settings.hub.clone(), registry.clone());
    let model = Arc::new(CostModel::new(settings.model.params));
    let metrics = Metrics::new(Sources {
        registry: registry.clone(),
        model: model.clone(),
        scaler: scaler_status.clone(),
        hub: hub.clone(),
        unrouted,
        balance_decay: settings.balance_decay,
    })
    .map_err(|e| StartupError::Metrics(e.to_string()))?;
    let admin_api = Arc::new(
        AdminApi::new(
            registry.clone(),
            AdminKey::new(&key),
            settings.admin_max_body,
        )
        .with_observability(model.clone(), Arc::new(metrics), settings.metrics_public),
    );
    let mut admin = Service::new(
        "admin".to_string(),
        HyperApp::new(
            admin_api,
            settings.max_header_bytes,
            settings.admin_max_connections,
        ),
    );
    admin.add_listener(hyper_listener(settings.admin_addr));
    admin.threads = Some(1);

    let hub_store = Arc::new(HubStore::open(&settings.state_dir)?);
    let signer = Signer::new(hub_secret.as_bytes());
    let (webhook_tx, webhook_rx) = tokio::sync::mpsc::unbounded_channel();
    let webhooks = Webhooks::new(
        hub.clone(),
        signer.clone(),
        WebhookSettings {
            timeout: settings.hub.webhook_timeout,
            max_backoff: settings.hub.webhook_max_backoff,
        },
        hub_store.subscriptions(),
        webhook_rx,
    );
    let hub_api = Arc::new(HubApi::new(
        hub.clone(),
        hub_store,
        signer,
        AdminKey::new(&key),
        &settings.mount_prefix,
        webhook_tx,
    ));
    let mut events = Service::new(
        "events".to_string(),
        HyperApp::new(
            hub_api,
            settings.max_header_bytes,
            settings.hub.max_connections,
        ),
    );
    events.add_listener(hyper_listener(settings.hub.addr));

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(events);
    server.add_service(background_service("hub sweeper", HubSweeper { hub }));
    server.add_service(background_service("webhooks", webhooks));
    server.add_service(background_service(
        "cost model",
        ModelTicker {
            model: model.clone(),
            registry: registry.clone(),
            tick: settings.model.tick,
        },
    ));
    server.add_service(background_service(
        "scaler",
        Controller::new(
            registry.clone(),
            model,
            settings.scaler,
            scaler_status,
            unscaled,
        ),
    ));
    if active_checks {
        let mut checker = HealthCheckService::new(health);
        checker.health_check_frequency = Some(settings.health_interval);
        checker.parallel_health_check = true;
        server.add_service(background_service("health checks", checker));
    }
    tracing::info!(
        proxy = %settings.proxy_addr,
        admin = %settings.admin_addr,
        events = %settings.hub.addr,
        https = ?settings.https.as_ref().map(|t| t.addr),
        threads = settings.threads,
        "nextgate starting"
    );
    server.run(RunArgs::default());
    tracing::info!("nextgate stopped");
    Ok(())
}
