//! An app's backends: a Pingora [`LoadBalancer`] over a backend set that changes at runtime,
//! health from the gateway's one shared [`HealthRegistry`], and passive failure marking.
//!
//! The set lives in an `ArcSwap` read by a [`ServiceDiscovery`]; replacing it and calling
//! `update` swaps the selector atomically, so requests in flight keep the backend they chose and
//! new requests see the new set at once. Selection is peak-EWMA power of two choices or round
//! robin ([`crate::balance`]), chosen per app, behind [`Upstream::select`].

use crate::balance::peak::PeakLatency;
use crate::balance::{Balance, P2c, P2cParams};
use crate::config::{HealthKind, Settings};
use crate::cost::counters::{AppStats, Counters};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_http::RequestHeader;
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora_load_balancing::selection::RoundRobin;
use pingora_load_balancing::{Backend, Backends, HealthRegistry, LoadBalancer};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Most candidates looked at when selecting a backend.
const MAX_SELECT_ITERATIONS: usize = 256;

/// What the gateway knows about one backend beyond its address; rides in [`Backend::ext`].
#[derive(Debug)]
pub struct BackendInfo {
    /// Normalised endpoint URL as registered.
    pub endpoint: String,
    /// Connect with TLS.
    pub tls: bool,
    /// TLS server name (the endpoint's host).
    pub sni: String,
    /// Milliseconds since [`clock_origin`] of the last connection failure, 0 for none.
    failed_at_ms: AtomicU64,
    /// Requests to this backend: the cost model reads them, the balancer its in-flight count.
    pub counters: Counters,
    /// Peak-EWMA response time, for the balancer.
    pub peak: PeakLatency,
}

fn clock_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // +1 keeps 0 free to mean "never failed".
    clock_origin().elapsed().as_millis() as u64 + 1
}

impl BackendInfo {
    /// Record a connection failure now.
    pub fn mark_failed(&self) {
        self.failed_at_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Record a success: clears a passive failure mark.
    pub fn mark_ok(&self) {
        if self.failed_at_ms.load(Ordering::Relaxed) != 0 {
            self.failed_at_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Whether a recent connection failure keeps traffic away.
    pub fn cooling_down(&self, cooldown: Duration) -> bool {
        let at = self.failed_at_ms.load(Ordering::Relaxed);
        at != 0 && now_ms().saturating_sub(at) < cooldown.as_millis() as u64
    }
}

/// The [`BackendInfo`] of a backend built by this module.
pub fn info(backend: &Backend) -> Option<&Arc<BackendInfo>> {
    backend.ext.get::<Arc<BackendInfo>>()
}

/// One resolved endpoint to put in a set.
#[derive(Debug, Clone)]
pub struct Target {
    /// Normalised URL.
    pub endpoint: String,
    /// Resolved address.
    pub addr: SocketAddr,
    /// TLS.
    pub tls: bool,
    /// TLS server name.
    pub sni: String,
}

struct SharedSet(Arc<ArcSwap<BTreeSet<Backend>>>);

#[async_trait]
impl ServiceDiscovery for SharedSet {
    async fn discover(&self) -> pingora_core::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        Ok(((**self.0.load()).clone(), HashMap::new()))
    }
}

enum Lb {
    PeakEwma(LoadBalancer<P2c>),
    RoundRobin(LoadBalancer<RoundRobin>),
}

impl Lb {
    fn select_with(&self, key: &[u8], accept: impl Fn(&Backend, bool) -> bool) -> Option<Backend> {
        match self {
            Lb::PeakEwma(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
            Lb::RoundRobin(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
        }
    }

    fn backends(&self) -> &Backends {
        match self {
            Lb::PeakEwma(lb) => lb.backends(),
            Lb::RoundRobin(lb) => lb.backends(),
        }
    }

    async fn update(&self) -> pingora_core::Result<()> {
        match self {
            Lb::PeakEwma(lb) => lb.update().await,
            Lb::RoundRobin(lb) => lb.update().await,
        }
    }
}

/// An app's load-balanced backends and what its requests cost.
pub struct Upstream {
    lb: Lb,
    balance: Balance,
    set: Arc<ArcSwap<BTreeSet<Backend>>>,
    /// Registered targets and scaler-managed ones; the set is their union.
    parts: tokio::sync::Mutex<(Vec<Target>, Vec<Target>)>,
    /// Woken whenever the set changes (requests held for a scaled app at zero wait on it).
    changed: tokio::sync::Notify,
    /// Requests held now, waiting for a backend.
    pub held: std::sync::atomic::AtomicUsize,
    /// The app's request counters and route keys (kept across versions of the app).
    pub stats: Arc<AppStats>,
}

impl Upstream {
    /// An empty upstream balanced by `balance`, whose health comes from `health`, counting
    /// into `stats`.
    pub fn new(
        health: &Arc<HealthRegistry>,
        balance: Balance,
        params: P2cParams,
        stats: Arc<AppStats>,
    ) -> Self {
        let set = Arc::new(ArcSwap::from_pointee(BTreeSet::new()));
        let backends =
            Backends::new_with_health_registry(Box::new(SharedSet(set.clone())), health.clone());
        let lb = match balance {
            Balance::PeakEwma => Lb::PeakEwma(LoadBalancer::from_backends_with_config(
                backends,
                Some(params),
            )),
            Balance::RoundRobin => Lb::RoundRobin(LoadBalancer::from_backends(backends)),
        };
        Self {
            lb,
            balance,
            set,
            parts: tokio::sync::Mutex::new((Vec::new(), Vec::new())),
            changed: tokio::sync::Notify::new(),
            held: std::sync::atomic::AtomicUsize::new(0),
            stats,
        }
    }

    /// The selection algorithm.
    pub fn balance(&self) -> Balance {
        self.balance
    }

    /// Replace the registered backends (the scaler's replicas stay). Backends that stay keep
    /// their passive failure state and counters.
    pub async fn set_targets(&self, targets: &[Target]) {
        let mut parts = self.parts.lock().await;
        parts.0 = targets.to_vec();
        let all: Vec<Target> = parts.0.iter().chain(&parts.1).cloned().collect();
        self.rebuild(&all).await;
    }

    /// Replace the scaler-managed backends (the registered ones stay).
    pub async fn set_managed(&self, targets: &[Target]) {
        let mut parts = self.parts.lock().await;
        parts.1 = targets.to_vec();
        let all: Vec<Target> = parts.0.iter().chain(&parts.1).cloned().collect();
        self.rebuild(&all).await;
    }

    async fn rebuild(&self, targets: &[Target]) {
        let old = self.set.load_full();
        let mut next = BTreeSet::new();
        for t in targets {
            let existing = old
                .iter()
                .find(|b| b.addr == PingoraAddr::Inet(t.addr))
                .and_then(info)
                .filter(|i| i.endpoint == t.endpoint && i.tls == t.tls)
                .cloned();
            let info = existing.unwrap_or_else(|| {
                Arc::new(BackendInfo {
                    endpoint: t.endpoint.clone(),
                    tls: t.tls,
                    sni: t.sni.clone(),
                    failed_at_ms: AtomicU64::new(0),
                    counters: Counters::default(),
                    peak: PeakLatency::default(),
                })
            });
            let mut b = Backend {
                addr: PingoraAddr::Inet(t.addr),
                weight: 1,
                ext: Default::default(),
            };
            b.ext.insert(info);
            next.insert(b);
        }
        self.set.store(Arc::new(next));
        // SharedSet::discover cannot fail, so neither can update.
        if let Err(e) = self.lb.update().await {
            tracing::error!(error = %e, "backend set update failed");
        }
        self.changed.notify_waiters();
    }

    /// The registered and the scaler-managed targets (to rebuild them elsewhere).
    pub async fn parts(&self) -> (Vec<Target>, Vec<Target>) {
        self.parts.lock().await.clone()
    }

    /// The current backends.
    pub fn backends(&self) -> Arc<BTreeSet<Backend>> {
        self.set.load_full()
    }

    /// Whether the active health check currently passes for `backend`.
    pub fn healthy(&self, backend: &Backend) -> bool {
        self.lb.backends().ready(backend)
    }

    /// Wait until a backend qualifies for [`select`](Self::select), up to `timeout`.
    pub async fn select_when_ready(
        &self,
        key: &[u8],
        tried: &[SocketAddr],
        cooldown: Duration,
        timeout: Duration,
    ) -> Option<Backend> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a change in between is not missed.
            changed.as_mut().enable();
            if let Some(b) = self.select(key, tried, cooldown) {
                return Some(b);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// Pick a backend for a request: healthy, not in `tried`, and preferably not cooling down
    /// after a connection failure. `None` when no backend qualifies.
    pub fn select(&self, key: &[u8], tried: &[SocketAddr], cooldown: Duration) -> Option<Backend> {
        let untried = |b: &Backend| match &b.addr {
            PingoraAddr::Inet(a) => !tried.contains(a),
            _ => false,
        };
        self.lb
            .select_with(key, |b, healthy| {
                healthy && untried(b) && !info(b).is_some_and(|i| i.cooling_down(cooldown))
            })
            .or_else(|| {
                // Every healthy backend failed recently: trying one beats refusing the request.
                self.lb.select_with(key, |b, healthy| healthy && untried(b))
            })
    }
}

/// The gateway's active health check: TCP connect, or HTTP GET on a path for plain-HTTP backends
/// (TLS backends get a TCP connect).
pub struct GatewayHealthCheck {
    tcp: TcpHealthCheck,
    http: Option<HttpHealthCheck>,
    healthy_threshold: usize,
    unhealthy_threshold: usize,
}

impl GatewayHealthCheck {
    /// Build from settings.
    pub fn new(s: &Settings) -> Self {
        let mut tcp = *TcpHealthCheck::new();
        tcp.peer_template.options.connection_timeout = Some(s.health_timeout);
        tcp.consecutive_success = s.healthy_threshold;
        tcp.consecutive_failure = s.unhealthy_threshold;
        let http = match &s.health_kind {
            HealthKind::Tcp | HealthKind::None => None,
            HealthKind::Http { path } => {
                let mut hc = HttpHealthCheck::new("nextgate-health", false);
                let mut req = RequestHeader::build("GET", path.as_bytes(), None)
                    .expect("validated health path builds a request");
                req.append_header("Host", "nextgate-health")
                    .expect("static header is valid");
                req.append_header("User-Agent", "nextgate-health")
                    .expect("static header is valid");
                hc.req = req;
                hc.peer_template.options.connection_timeout = Some(s.health_timeout);
                hc.peer_template.options.read_timeout = Some(s.health_timeout);
                hc.consecutive_success = s.healthy_threshold;
                hc.consecutive_failure = s.unhealthy_threshold;
                Some(hc)
            }
        };
        Self {
            tcp,
            http,
            healthy_threshold: s.healthy_threshold,
            unhealthy_threshold: s.unhealthy_threshold,
        }
    }
}

#[async_trait]
impl HealthCheck for GatewayHealthCheck {
    async fn check(&self, target: &Backend) -> pingora_core::Result<()> {
        let tls = info(target).is_some_and(|i| i.tls);
        match &self.http {
            Some(http) if !tls => http.check(target).await,
            _ => self.tcp.check(target).await,
        }
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        let endpoint = info(target).map_or("?", |i| i.endpoint.as_str());
        tracing::warn!(backend = %target.addr, endpoint, healthy, "backend health changed");
    }

    fn health_threshold(&self, success: bool) -> usize {
        if success {
            self.healthy_threshold
        } else {
            self.unhealthy_threshold
        }
    }
}
