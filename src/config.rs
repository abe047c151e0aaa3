//! Configuration: the TOML file's structs, their defaults, validation, and the runtime
//! [`Settings`] the rest of the gateway reads.
//!
//! The file structs mirror `conf/nextgate.toml` key for key and reject unknown keys. They are
//! never used past startup: [`Settings::from_file`] validates them (every problem is a
//! [`ConfigError`] naming the key) and converts them into typed settings.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable that supplies the admin key (overrides `admin.key`).
pub const ENV_ADMIN_KEY: &str = "NEXTGATE_ADMIN_KEY";

/// Environment variable that supplies the hub's signing secret (overrides `hub.secret`).
pub const ENV_HUB_SECRET: &str = "NEXTGATE_HUB_SECRET";

/// A configuration problem, naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (unknown key, wrong type).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A key has a value that is out of range or malformed.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid {
        /// Dotted key, e.g. `listen.proxy`.
        key: String,
        /// Why.
        reason: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// The configuration file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// `[server]`
    pub server: ServerFile,
    /// `[listen]`
    pub listen: ListenFile,
    /// `[admin]`
    pub admin: AdminFile,
    /// `[registry]`
    pub registry: RegistryFile,
    /// `[proxy]`
    pub proxy: ProxyFile,
    /// `[health]`
    pub health: HealthFile,
    /// `[hub]`
    pub hub: HubFile,
    /// `[model]`
    pub model: ModelFile,
    /// `[scaler]`
    pub scaler: ScalerFile,
    /// `[scaling.{app}]`: scaling specs declared by the operator, per app name.
    pub scaling: std::collections::BTreeMap<String, crate::scaler::spec::ScalingSpec>,
    /// `[log]`
    pub log: LogFile,
}

/// `[server]`: process-wide knobs, most of them passed to Pingora.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerFile {
    /// Worker threads per service; 0 means one per CPU.
    pub threads: usize,
    /// Let idle worker threads steal tasks from busy ones (Tokio work stealing).
    pub work_stealing: bool,
    /// Directory for registrations, the generated admin key, pid file and upgrade socket.
    pub state_dir: String,
    /// Time between SIGTERM and the start of the final shutdown step.
    pub grace_period: String,
    /// Longest time the final shutdown step waits for in-flight requests.
    pub shutdown_timeout: String,
    /// Pid file; empty means `{state_dir}/nextgate.pid`.
    pub pid_file: String,
    /// Upgrade socket for zero-downtime restarts; empty means `{state_dir}/nextgate-upgrade.sock`.
    pub upgrade_sock: String,
}

impl Default for ServerFile {
    fn default() -> Self {
        Self {
            threads: 0,
            work_stealing: true,
            state_dir: "nextgate-state".into(),
            grace_period: "1s".into(),
            shutdown_timeout: "5s".into(),
            pid_file: String::new(),
            upgrade_sock: String::new(),
        }
    }
}

/// `[listen]`: listener addresses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenFile {
    /// Public proxy listener (plain HTTP).
    pub proxy: String,
    /// Admin listener (registry API).
    pub admin: String,
    /// Event hub listener (publish, subscribe, tickets); also reached through `proxy`.
    pub events: String,
    /// Optional public HTTPS listener; empty disables it.
    pub https: String,
    /// PEM certificate chain for `https`.
    pub tls_cert: String,
    /// PEM private key for `https`.
    pub tls_key: String,
}

impl Default for ListenFile {
    fn default() -> Self {
        Self {
            proxy: "0.0.0.0:8080".into(),
            admin: "127.0.0.1:8081".into(),
            events: "0.0.0.0:8082".into(),
            https: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

/// `[admin]`: the admin API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminFile {
    /// Admin key; empty means `NEXTGATE_ADMIN_KEY`, else a key generated into the state dir.
    pub key: String,
    /// Largest request body the admin API accepts, in bytes.
    pub max_body_bytes: usize,
    /// Most admin connections served at once.
    pub max_connections: usize,
    /// Serve `GET /metrics` without the admin key (for scrapers on a trusted network).
    pub metrics_public: bool,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            key: String::new(),
            max_body_bytes: 64 * 1024,
            max_connections: 256,
            metrics_public: false,
        }
    }
}

/// `[registry]`: who may register.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryFile {
    /// `open`: any name may register; `provisioned`: only names the admin created.
    pub mode: String,
    /// Shortest accepted app token.
    pub min_token_length: usize,
    /// Most backends one app may register.
    pub max_endpoints: usize,
}

impl Default for RegistryFile {
    fn default() -> Self {
        Self {
            mode: "open".into(),
            min_token_length: 16,
            max_endpoints: 64,
        }
    }
}

/// `[proxy]`: request routing and upstream behaviour.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyFile {
    /// Path prefix under which `/{prefix}/{app}/{rest}` routes to `app`.
    pub mount_prefix: String,
    /// `Host: {app}.{base_domain}` routes to `app`; empty disables host routing.
    pub base_domain: String,
    /// Upstream TCP (and TLS) connect timeout.
    pub connect_timeout: String,
    /// Upstream read timeout between bytes; lifted for WebSocket upgrades and event streams.
    pub read_timeout: String,
    /// Upstream write timeout.
    pub write_timeout: String,
    /// How long an idle upstream keepalive connection is kept.
    pub idle_timeout: String,
    /// Further backends tried after a connection failure (each backend at most once).
    pub max_retries: usize,
    /// How long a backend that failed a connection is avoided before traffic tries it again.
    pub fail_cooldown: String,
    /// Largest request header block (all header lines) accepted from clients, in bytes.
    pub max_header_bytes: usize,
    /// Default backend selection: `peak_ewma` or `round_robin` (an app may choose its own).
    pub balance: String,
    /// Time constant of the balancer's per-backend latency estimate.
    pub balance_decay: String,
    /// Latency charged to a backend for a connect error or a 5xx (at least 1s).
    pub fail_penalty: String,
}

impl Default for ProxyFile {
    fn default() -> Self {
        Self {
            mount_prefix: "/v3".into(),
            base_domain: String::new(),
            connect_timeout: "2s".into(),
            read_timeout: "60s".into(),
            write_timeout: "60s".into(),
            idle_timeout: "60s".into(),
            max_retries: 2,
            fail_cooldown: "5s".into(),
            max_header_bytes: 64 * 1024,
            balance: "peak_ewma".into(),
            balance_decay: "10s".into(),
            fail_penalty: "1s".into(),
        }
    }
}

/// `[scaler]`: the loop that scales apps with a scaling spec.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScalerFile {
    /// Decision interval.
    pub tick: String,
    /// Between ticks, how often the signals are checked for a scale-up.
    pub check: String,
    /// Drain time for a replica leaving, and its stop grace period.
    pub grace: String,
    /// How long a new replica may take to pass its readiness probe.
    pub ready_timeout: String,
    /// Band around capacity inside which load changes nothing (0.1 = 10%).
    pub tolerance: f64,
    /// Scale-down follows the highest recommendation over this window.
    pub stabilisation: String,
    /// No scale-down this soon after a scale-up.
    pub down_delay: String,
    /// Most requests held per scaled app while it has no replica; more get 503.
    pub hold_max: usize,
    /// Longest a request is held waiting for a replica; then 503 with Retry-After.
    pub hold_timeout: String,
}

impl Default for ScalerFile {
    fn default() -> Self {
        Self {
            tick: "1s".into(),
            check: "250ms".into(),
            grace: "10s".into(),
            ready_timeout: "30s".into(),
            tolerance: 0.1,
            stabilisation: "60s".into(),
            down_delay: "30s".into(),
            hold_max: 100,
            hold_timeout: "30s".into(),
        }
    }
}

impl ScalerFile {
    fn validate(&self) -> Result<crate::scaler::controller::ScalerSettings, ConfigError> {
        let tick = duration("scaler.tick", &self.tick)?;
        if tick < Duration::from_millis(100) || tick > Duration::from_secs(60) {
            return Err(invalid("scaler.tick", "must be between 100ms and 60s"));
        }
        let check = duration("scaler.check", &self.check)?;
        if check < Duration::from_millis(50) || check > Duration::from_secs(60) {
            return Err(invalid("scaler.check", "must be between 50ms and 60s"));
        }
        if !(0.0..=0.5).contains(&self.tolerance) {
            return Err(invalid("scaler.tolerance", "must be between 0 and 0.5"));
        }
        let bounded = |key: &'static str, v: &str, min: Duration, max: Duration| {
            let d = duration(key, v)?;
            if d < min || d > max {
                return Err(invalid(
                    key,
                    format!(
                        "must be between {} and {}",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                ));
            }
            Ok(d)
        };
        let ten_min = Duration::from_secs(600);
        let hour = Duration::from_secs(3600);
        Ok(crate::scaler::controller::ScalerSettings {
            tick,
            check,
            grace: bounded("scaler.grace", &self.grace, Duration::ZERO, ten_min)?,
            ready_timeout: bounded(
                "scaler.ready_timeout",
                &self.ready_timeout,
                Duration::from_millis(100),
                ten_min,
            )?,
            hold_max: self.hold_max,
            hold_timeout: bounded(
                "scaler.hold_timeout",
                &self.hold_timeout,
                Duration::ZERO,
                ten_min,
            )?,
            params: crate::scaler::policy::Params {
                tolerance: self.tolerance,
                stabilisation: bounded(
                    "scaler.stabilisation",
                    &self.stabilisation,
                    Duration::ZERO,
                    hour,
                )?,
                down_delay: bounded("scaler.down_delay", &self.down_delay, Duration::ZERO, hour)?,
                ..crate::scaler::policy::Params::default()
            },
        })
    }
}

/// `[scaling.{app}]` tables: each name a valid app name, each spec valid, errors keyed
/// `scaling.{app}.{field}`.
fn validate_scaling(
    specs: std::collections::BTreeMap<String, crate::scaler::spec::ScalingSpec>,
) -> Result<std::collections::BTreeMap<String, crate::scaler::spec::ScalingSpec>, ConfigError> {
    for (name, spec) in &specs {
        if let Err(e) = crate::registry::validate::name(name) {
            return Err(invalid(&format!("scaling.{name}"), e.to_string()));
        }
        if let Err(e) = spec.validate() {
            let field = e.field.strip_prefix("scaling.").unwrap_or(e.field);
            return Err(invalid(&format!("scaling.{name}.{field}"), e.message));
        }
    }
    Ok(specs)
}

/// `[model]`: the cost model fed by every proxied request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelFile {
    /// How often counters are folded into the model.
    pub tick: String,
    /// Time constant of the model's averages.
    pub decay: String,
    /// Latency at or under which a request rate counts as sustained capacity.
    pub acceptable_latency: String,
    /// Route keys kept per app; further kinds of request are counted as `other`.
    pub max_routes_per_app: usize,
    /// Time constant of the scaler's fast signals (concurrency, arrivals, latency).
    pub fast_decay: String,
    /// Time constant of the scaler's slow concurrency signal.
    pub slow_decay: String,
}

impl Default for ModelFile {
    fn default() -> Self {
        Self {
            tick: "250ms".into(),
            decay: "10s".into(),
            acceptable_latency: "500ms".into(),
            max_routes_per_app: 64,
            fast_decay: "2s".into(),
            slow_decay: "30s".into(),
        }
    }
}

/// Validated `[model]`.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// Fold interval.
    pub tick: Duration,
    /// Maths parameters.
    pub params: crate::cost::model::ModelParams,
    /// Route keys per app.
    pub max_routes: usize,
}

/// A time constant: 100 ms to 1 h.
fn decay_bounds(key: &'static str, v: &str) -> Result<Duration, ConfigError> {
    let d = duration(key, v)?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err(invalid(key, "must be between 100ms and 1h"));
    }
    Ok(d)
}

impl ModelFile {
    fn validate(&self) -> Result<ModelSettings, ConfigError> {
        let tick = duration("model.tick", &self.tick)?;
        if tick < Duration::from_millis(10) || tick > Duration::from_secs(10) {
            return Err(invalid("model.tick", "must be between 10ms and 10s"));
        }
        let decay = duration("model.decay", &self.decay)?;
        if decay < tick {
            return Err(invalid("model.decay", "must be at least model.tick"));
        }
        let acceptable_latency = duration("model.acceptable_latency", &self.acceptable_latency)?;
        if acceptable_latency.is_zero() {
            return Err(invalid("model.acceptable_latency", "must be positive"));
        }
        Ok(ModelSettings {
            tick,
            params: crate::cost::model::ModelParams {
                decay,
                acceptable_latency,
                fast: decay_bounds("model.fast_decay", &self.fast_decay)?,
                slow: decay_bounds("model.slow_decay", &self.slow_decay)?,
            },
            max_routes: positive("model.max_routes_per_app", self.max_routes_per_app)?,
        })
    }
}

/// `[health]`: active health checks, one shared checker for all apps.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthFile {
    /// `tcp` (connect only), `http` (GET `path`, any 2xx passes) or `none`.
    pub kind: String,
    /// Path requested by `http` checks.
    pub path: String,
    /// Time between check passes.
    pub interval: String,
    /// Timeout of one check.
    pub timeout: String,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub healthy_threshold: usize,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub unhealthy_threshold: usize,
}

impl Default for HealthFile {
    fn default() -> Self {
        Self {
            kind: "tcp".into(),
            path: "/".into(),
            interval: "2s".into(),
            timeout: "1s".into(),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        }
    }
}

/// `[hub]`: the event hub.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubFile {
    /// HMAC secret for tickets and webhook signatures; empty means `NEXTGATE_HUB_SECRET`, else
    /// a secret generated into the state directory.
    pub secret: String,
    /// Largest message in bytes.
    pub max_message_bytes: usize,
    /// Most channels one app may have at once.
    pub max_channels_per_app: usize,
    /// Messages kept per channel for replay.
    pub buffer_messages: usize,
    /// Longest time a message is kept for replay.
    pub buffer_age: String,
    /// Bytes kept per channel for replay.
    pub buffer_bytes: usize,
    /// Messages queued for one subscriber before it is disconnected as too slow.
    pub subscriber_queue_messages: usize,
    /// Bytes queued for one subscriber before it is disconnected as too slow.
    pub subscriber_queue_bytes: usize,
    /// SSE comment heartbeat and WebSocket ping interval.
    pub heartbeat: String,
    /// Most hub connections at once.
    pub max_connections: usize,
    /// Most channels on one multiplexed subscription.
    pub max_multiplex: usize,
    /// Longest channel name (the part after `{app}/`).
    pub max_channel_name: usize,
    /// Ticket lifetime when the request names none.
    pub ticket_ttl: String,
    /// Longest ticket lifetime a request may ask for.
    pub ticket_max_ttl: String,
    /// Timeout of one webhook delivery attempt.
    pub webhook_timeout: String,
    /// Longest pause between webhook retries (the backoff doubles from 100ms up to this).
    pub webhook_max_backoff: String,
}

impl Default for HubFile {
    fn default() -> Self {
        Self {
            secret: String::new(),
            max_message_bytes: 1024 * 1024,
            max_channels_per_app: 10_000,
            buffer_messages: 100,
            buffer_age: "1h".into(),
            buffer_bytes: 16 * 1024 * 1024,
            subscriber_queue_messages: 1024,
            subscriber_queue_bytes: 4 * 1024 * 1024,
            heartbeat: "15s".into(),
            max_connections: 16_384,
            max_multiplex: 16,
            max_channel_name: 128,
            ticket_ttl: "10m".into(),
            ticket_max_ttl: "24h".into(),
            webhook_timeout: "5s".into(),
            webhook_max_backoff: "10s".into(),
        }
    }
}

/// Validated `[hub]` settings.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// Listener.
    pub addr: SocketAddr,
    /// Secret from config or environment, if any.
    pub secret: Option<String>,
    /// Largest message.
    pub max_message_bytes: usize,
    /// Channels per app.
    pub max_channels_per_app: usize,
    /// Replay buffer: messages.
    pub buffer_messages: usize,
    /// Replay buffer: age.
    pub buffer_age: Duration,
    /// Replay buffer: bytes.
    pub buffer_bytes: usize,
    /// Subscriber queue: messages.
    pub queue_messages: usize,
    /// Subscriber queue: bytes.
    pub queue_bytes: usize,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Connection limit.
    pub max_connections: usize,
    /// Channels per multiplexed subscription.
    pub max_multiplex: usize,
    /// Channel name length.
    pub max_channel_name: usize,
    /// Default ticket lifetime.
    pub ticket_ttl: Duration,
    /// Longest ticket lifetime.
    pub ticket_max_ttl: Duration,
    /// Webhook attempt timeout.
    pub webhook_timeout: Duration,
    /// Longest webhook backoff.
    pub webhook_max_backoff: Duration,
}

impl HubFile {
    fn validate(&self, events: &str) -> Result<HubSettings, ConfigError> {
        let env_secret = std::env::var(ENV_HUB_SECRET).ok().filter(|k| !k.is_empty());
        let secret = env_secret.or_else(|| Some(self.secret.clone()).filter(|k| !k.is_empty()));
        if secret.as_ref().is_some_and(|k| k.len() < 32) {
            return Err(invalid("hub.secret", "must be at least 32 characters"));
        }
        let heartbeat = duration("hub.heartbeat", &self.heartbeat)?;
        if heartbeat < Duration::from_millis(100) {
            return Err(invalid("hub.heartbeat", "must be at least 100ms"));
        }
        let ticket_ttl = duration("hub.ticket_ttl", &self.ticket_ttl)?;
        let ticket_max_ttl = duration("hub.ticket_max_ttl", &self.ticket_max_ttl)?;
        if ticket_ttl > ticket_max_ttl || ticket_ttl.is_zero() {
            return Err(invalid(
                "hub.ticket_ttl",
                "must be above zero and at most hub.ticket_max_ttl",
            ));
        }
        if !(1..=1024).contains(&self.max_channel_name) {
            return Err(invalid(
                "hub.max_channel_name",
                "must be between 1 and 1024",
            ));
        }
        Ok(HubSettings {
            addr: socket_addr("listen.events", events)?,
            secret,
            max_message_bytes: positive("hub.max_message_bytes", self.max_message_bytes)?,
            max_channels_per_app: positive("hub.max_channels_per_app", self.max_channels_per_app)?,
            buffer_messages: positive("hub.buffer_messages", self.buffer_messages)?,
            buffer_age: duration("hub.buffer_age", &self.buffer_age)?,
            buffer_bytes: positive("hub.buffer_bytes", self.buffer_bytes)?,
            queue_messages: positive(
                "hub.subscriber_queue_messages",
                self.subscriber_queue_messages,
            )?,
            queue_bytes: positive("hub.subscriber_queue_bytes", self.subscriber_queue_bytes)?,
            heartbeat,
            max_connections: positive("hub.max_connections", self.max_connections)?,
            max_multiplex: positive("hub.max_multiplex", self.max_multiplex)?,
            max_channel_name: self.max_channel_name,
            ticket_ttl,
            ticket_max_ttl,
            webhook_timeout: duration("hub.webhook_timeout", &self.webhook_timeout)?,
            webhook_max_backoff: duration("hub.webhook_max_backoff", &self.webhook_max_backoff)?,
        })
    }
}

/// `[log]`: logging.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogFile {
    /// `tracing` filter, e.g. `info` or `nextgate=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
    /// One structured log line per proxied request at info level.
    pub access: bool,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
            access: false,
        }
    }
}

/// Who may register a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryMode {
    /// Any valid name may register.
    Open,
    /// Only names pre-provisioned by the admin may register.
    Provisioned,
}

/// Which active health check runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthKind {
    /// No active checks: backends are healthy unless passively marked after failures.
    None,
    /// TCP connect.
    Tcp,
    /// HTTP GET on a path.
    Http {
        /// Requested path.
        path: String,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Optional HTTPS listener.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// Listen address.
    pub addr: SocketAddr,
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// Validated runtime settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Worker threads per service.
    pub threads: usize,
    /// Tokio work stealing between worker threads.
    pub work_stealing: bool,
    /// State directory.
    pub state_dir: PathBuf,
    /// SIGTERM grace period.
    pub grace_period: Duration,
    /// Final shutdown timeout.
    pub shutdown_timeout: Duration,
    /// Pid file path.
    pub pid_file: PathBuf,
    /// Upgrade socket path.
    pub upgrade_sock: PathBuf,
    /// Public proxy listener.
    pub proxy_addr: SocketAddr,
    /// Admin listener.
    pub admin_addr: SocketAddr,
    /// Optional HTTPS listener.
    pub https: Option<TlsListener>,
    /// Admin key from config or environment, if any.
    pub admin_key: Option<String>,
    /// Admin API body limit.
    pub admin_max_body: usize,
    /// Admin API connection limit.
    pub admin_max_connections: usize,
    /// `/metrics` without a credential.
    pub metrics_public: bool,
    /// Registration mode.
    pub registry_mode: RegistryMode,
    /// Shortest token.
    pub min_token_length: usize,
    /// Most endpoints per app.
    pub max_endpoints: usize,
    /// Mount prefix without trailing slash, e.g. `/v3`.
    pub mount_prefix: String,
    /// Base domain for host routing, lower case, without leading dot.
    pub base_domain: Option<String>,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Upstream read timeout.
    pub read_timeout: Duration,
    /// Upstream write timeout.
    pub write_timeout: Duration,
    /// Upstream keepalive idle timeout.
    pub idle_timeout: Duration,
    /// Retries after a connection failure.
    pub max_retries: usize,
    /// Passive failure cooldown.
    pub fail_cooldown: Duration,
    /// Client request header limit.
    pub max_header_bytes: usize,
    /// Health check kind.
    pub health_kind: HealthKind,
    /// Health check interval.
    pub health_interval: Duration,
    /// Health check timeout.
    pub health_timeout: Duration,
    /// Consecutive successes to become healthy.
    pub healthy_threshold: usize,
    /// Consecutive failures to become unhealthy.
    pub unhealthy_threshold: usize,
    /// Event hub.
    pub hub: HubSettings,
    /// Default backend selection.
    pub balance: crate::balance::Balance,
    /// Balancer latency time constant.
    pub balance_decay: Duration,
    /// Latency charged for a failed attempt.
    pub fail_penalty: Duration,
    /// Cost model.
    pub model: ModelSettings,
    /// Scaler.
    pub scaler: crate::scaler::controller::ScalerSettings,
    /// Scaling specs from the file, applied to their apps at startup.
    pub scaling: std::collections::BTreeMap<String, crate::scaler::spec::ScalingSpec>,
    /// Log filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Access log on.
    pub access_log: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self::from_file(FileConfig::default()).expect("built-in defaults are valid")
    }
}

fn duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        invalid(
            key,
            format!("`{value}` is not a duration like \"5s\" ({e})"),
        )
    })
}

fn socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        invalid(
            key,
            format!("`{value}` is not an address like 127.0.0.1:8080"),
        )
    })
}

fn positive(key: &str, value: usize) -> Result<usize, ConfigError> {
    if value == 0 {
        Err(invalid(key, "must be at least 1"))
    } else {
        Ok(value)
    }
}

impl Settings {
    /// Read, parse and validate a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate TOML text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        Self::from_file(file)
    }

    /// Validate file structs into settings. The environment's admin key wins over the file's.
    pub fn from_file(f: FileConfig) -> Result<Self, ConfigError> {
        let threads = if f.server.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            f.server.threads
        };
        if f.server.state_dir.trim().is_empty() {
            return Err(invalid("server.state_dir", "must not be empty"));
        }
        let state_dir = PathBuf::from(f.server.state_dir.trim());
        let pid_file = if f.server.pid_file.is_empty() {
            state_dir.join("nextgate.pid")
        } else {
            PathBuf::from(&f.server.pid_file)
        };
        let upgrade_sock = if f.server.upgrade_sock.is_empty() {
            state_dir.join("nextgate-upgrade.sock")
        } else {
            PathBuf::from(&f.server.upgrade_sock)
        };

        let https = if f.listen.https.trim().is_empty() {
            None
        } else {
            if f.listen.tls_cert.is_empty() {
                return Err(invalid(
                    "listen.tls_cert",
                    "required when listen.https is set",
                ));
            }
            if f.listen.tls_key.is_empty() {
                return Err(invalid(
                    "listen.tls_key",
                    "required when listen.https is set",
                ));
            }
            Some(TlsListener {
                addr: socket_addr("listen.https", &f.listen.https)?,
                cert: PathBuf::from(&f.listen.tls_cert),
                key: PathBuf::from(&f.listen.tls_key),
            })
        };

        let env_key = std::env::var(ENV_ADMIN_KEY).ok().filter(|k| !k.is_empty());
        let admin_key = env_key.or_else(|| Some(f.admin.key.clone()).filter(|k| !k.is_empty()));
        if let Some(k) = &admin_key {
            if k.len() < 16 {
                return Err(invalid("admin.key", "must be at least 16 characters"));
            }
        }

        let registry_mode = match f.registry.mode.as_str() {
            "open" => RegistryMode::Open,
            "provisioned" => RegistryMode::Provisioned,
            other => {
                return Err(invalid(
                    "registry.mode",
                    format!("`{other}` is not one of \"open\", \"provisioned\""),
                ))
            }
        };
        if !(8..=256).contains(&f.registry.min_token_length) {
            return Err(invalid(
                "registry.min_token_length",
                "must be between 8 and 256",
            ));
        }

        let prefix = f
            .proxy
            .mount_prefix
            .trim()
            .trim_end_matches('/')
            .to_string();
        if !prefix.starts_with('/') || prefix.contains("//") || prefix.contains(['?', '#', ' ']) {
            return Err(invalid(
                "proxy.mount_prefix",
                format!("`{}` must be a path like \"/v3\"", f.proxy.mount_prefix),
            ));
        }
        let base_domain = f
            .proxy
            .base_domain
            .trim()
            .trim_start_matches('.')
            .to_ascii_lowercase();
        let base_domain = (!base_domain.is_empty()).then_some(base_domain);

        let health_kind = match f.health.kind.as_str() {
            "none" => HealthKind::None,
            "tcp" => HealthKind::Tcp,
            "http" => {
                if !f.health.path.starts_with('/') {
                    return Err(invalid("health.path", "must start with /"));
                }
                HealthKind::Http {
                    path: f.health.path.clone(),
                }
            }
            other => {
                return Err(invalid(
                    "health.kind",
                    format!("`{other}` is not one of \"tcp\", \"http\", \"none\""),
                ))
            }
        };
        let health_interval = duration("health.interval", &f.health.interval)?;
        if health_interval < Duration::from_millis(100) {
            return Err(invalid("health.interval", "must be at least 100ms"));
        }

        let log_format = match f.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("`{other}` is not one of \"text\", \"json\""),
                ))
            }
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&f.log.level) {
            return Err(invalid("log.level", e.to_string()));
        }

        let balance = crate::balance::Balance::parse(&f.proxy.balance).ok_or_else(|| {
            invalid(
                "proxy.balance",
                format!(
                    "`{}` is not one of \"peak_ewma\", \"round_robin\"",
                    f.proxy.balance
                ),
            )
        })?;
        let balance_decay = duration("proxy.balance_decay", &f.proxy.balance_decay)?;
        if balance_decay < Duration::from_millis(100) {
            return Err(invalid("proxy.balance_decay", "must be at least 100ms"));
        }
        let fail_penalty = duration("proxy.fail_penalty", &f.proxy.fail_penalty)?;
        if fail_penalty < Duration::from_secs(1) {
            return Err(invalid("proxy.fail_penalty", "must be at least 1s"));
        }

        Ok(Settings {
            threads,
            work_stealing: f.server.work_stealing,
            state_dir,
            grace_period: duration("server.grace_period", &f.server.grace_period)?,
            shutdown_timeout: duration("server.shutdown_timeout", &f.server.shutdown_timeout)?,
            pid_file,
            upgrade_sock,
            proxy_addr: socket_addr("listen.proxy", &f.listen.proxy)?,
            admin_addr: socket_addr("listen.admin", &f.listen.admin)?,
            https,
            admin_key,
            admin_max_body: positive("admin.max_body_bytes", f.admin.max_body_bytes)?,
            admin_max_connections: positive("admin.max_connections", f.admin.max_connections)?,
            metrics_public: f.admin.metrics_public,
            registry_mode,
            min_token_length: f.registry.min_token_length,
            max_endpoints: positive("registry.max_endpoints", f.registry.max_endpoints)?,
            mount_prefix: prefix,
            base_domain,
            connect_timeout: duration("proxy.connect_timeout", &f.proxy.connect_timeout)?,
            read_timeout: duration("proxy.read_timeout", &f.proxy.read_timeout)?,
            write_timeout: duration("proxy.write_timeout", &f.proxy.write_timeout)?,
            idle_timeout: duration("proxy.idle_timeout", &f.proxy.idle_timeout)?,
            max_retries: f.proxy.max_retries,
            fail_cooldown: duration("proxy.fail_cooldown", &f.proxy.fail_cooldown)?,
            max_header_bytes: positive("proxy.max_header_bytes", f.proxy.max_header_bytes)?,
            health_kind,
            health_interval,
            health_timeout: duration("health.timeout", &f.health.timeout)?,
            healthy_threshold: positive("health.healthy_threshold", f.health.healthy_threshold)?,
            unhealthy_threshold: positive(
                "health.unhealthy_threshold",
                f.health.unhealthy_threshold,
            )?,
            hub: f.hub.validate(&f.listen.events)?,
            balance,
            balance_decay,
            fail_penalty,
            model: f.model.validate()?,
            scaler: f.scaler.validate()?,
            scaling: validate_scaling(f.scaling)?,
            log_level: f.log.level,
            log_format,
            access_log: f.log.access,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let s = parse("").expect("defaults");
        assert_eq!(s.proxy_addr, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(s.admin_addr, "127.0.0.1:8081".parse().expect("addr"));
        assert_eq!(s.mount_prefix, "/v3");
        assert_eq!(s.grace_period, Duration::from_secs(1));
        assert_eq!(s.registry_mode, RegistryMode::Open);
        assert_eq!(s.state_dir, PathBuf::from("nextgate-state"));
    }

    #[test]
    fn shipped_config_parses_to_defaults() {
        let text = include_str!("../conf/nextgate.toml");
        let s = parse(text).expect("conf/nextgate.toml is valid");
        let d = Settings::default();
        assert_eq!(s.proxy_addr, d.proxy_addr);
        assert_eq!(s.read_timeout, d.read_timeout);
        assert_eq!(s.health_kind, d.health_kind);
        assert_eq!(s.max_header_bytes, d.max_header_bytes);
        assert_eq!(s.hub.addr, d.hub.addr);
        assert_eq!(s.hub.buffer_messages, d.hub.buffer_messages);
        assert_eq!(s.hub.buffer_age, d.hub.buffer_age);
        assert_eq!(s.hub.queue_bytes, d.hub.queue_bytes);
        assert_eq!(s.hub.heartbeat, d.hub.heartbeat);
        assert_eq!(s.hub.ticket_max_ttl, d.hub.ticket_max_ttl);
        assert_eq!(s.hub.webhook_max_backoff, d.hub.webhook_max_backoff);
    }

    #[test]
    fn scaling_tables_validate_with_keyed_errors() {
        let s = parse(
            "[scaling.shop]\ndriver = \"docker\"\nimage = \"shop:1\"\nport = 8080\nmax = 8\n\
             [scaling.bill]\ndriver = \"swarm\"\nservice = \"bill\"\nport = 80\nmax = 3\n",
        )
        .expect("valid");
        assert_eq!(s.scaling.len(), 2);
        assert_eq!(s.scaling["shop"].max, 8);
        assert_eq!(s.scaling["shop"].min, 1, "min defaults to 1");
        assert_eq!(s.scaling["bill"].service.as_deref(), Some("bill"));
        assert!(parse("").expect("defaults").scaling.is_empty());
        let cases = [
            (
                "[scaling.Shop]\ndriver = \"docker\"\nimage = \"s\"\nport = 1\nmax = 1",
                "scaling.Shop",
            ),
            (
                "[scaling.shop]\ndriver = \"docker\"\nport = 1\nmax = 1",
                "scaling.shop.image",
            ),
            (
                "[scaling.shop]\ndriver = \"docker\"\nimage = \"s\"\nport = 1\nmax = 500",
                "scaling.shop.max",
            ),
            (
                "[scaling.shop]\ndriver = \"docker\"\nimage = \"s\"\nport = 1\nmax = 2\nreplicas = 3",
                "replicas",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).expect_err(text);
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn shipped_scaling_example_is_valid_once_uncommented() {
        let text = include_str!("../conf/nextgate.toml");
        let example: String = text
            .lines()
            .skip_while(|l| !l.starts_with("# [scaling."))
            .take_while(|l| l.starts_with("# "))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        assert!(example.contains("[scaling.shop]"), "{example}");
        let s = parse(&example).expect("the example in conf/nextgate.toml is valid");
        assert_eq!(s.scaling["shop"].max, 8);
    }

    #[test]
    fn container_config_parses() {
        let s =
            parse(include_str!("../conf/container.toml")).expect("conf/container.toml is valid");
        assert_eq!(s.admin_addr, "0.0.0.0:8081".parse().expect("addr"));
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/nextgate"));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[proxy]\nmount_prefx = \"/x\"\n").expect_err("unknown key");
        assert!(e.to_string().contains("mount_prefx"), "{e}");
        let e = parse("[proxi]\n").expect_err("unknown table");
        assert!(e.to_string().contains("proxi"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[listen]\nproxy = \"nope\"", "listen.proxy"),
            ("[server]\ngrace_period = \"soon\"", "server.grace_period"),
            ("[registry]\nmode = \"closed\"", "registry.mode"),
            ("[health]\nkind = \"icmp\"", "health.kind"),
            ("[proxy]\nmount_prefix = \"v3\"", "proxy.mount_prefix"),
            ("[listen]\nhttps = \"0.0.0.0:8443\"", "listen.tls_cert"),
            ("[admin]\nkey = \"short\"", "admin.key"),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("[listen]\nevents = \"x\"", "listen.events"),
            ("[hub]\nheartbeat = \"1ms\"", "hub.heartbeat"),
            ("[hub]\nticket_ttl = \"48h\"", "hub.ticket_ttl"),
            ("[hub]\nsecret = \"short\"", "hub.secret"),
            ("[hub]\nbuffer_messages = 0", "hub.buffer_messages"),
            ("[proxy]\nbalance = \"fastest\"", "proxy.balance"),
            ("[proxy]\nfail_penalty = \"10ms\"", "proxy.fail_penalty"),
            ("[model]\ntick = \"1ms\"", "model.tick"),
            ("[model]\nfast_decay = \"0s\"", "model.fast_decay"),
            (
                "[model]\nmax_routes_per_app = 0",
                "model.max_routes_per_app",
            ),
            (
                "[scaler]\nhold_timeout = \"1000years\"",
                "scaler.hold_timeout",
            ),
            ("[scaler]\ntolerance = 0.9", "scaler.tolerance"),
            ("[scaler]\ncheck = \"2m\"", "scaler.check"),
            ("[scaler]\ncheck = \"10ms\"", "scaler.check"),
            ("[scaler]\ngrace = \"soon\"", "scaler.grace"),
        ];
        for (text, key) in cases {
            let e = parse(text).expect_err(text);
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }
}
