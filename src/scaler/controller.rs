//! The scaler loop: once per tick, for every app with a scaling spec, read its signals from the
//! cost model, ask the policy, and make the replicas match. Between ticks, every `check`, the
//! policy is asked on a copy of its state whether it would scale up; if so the pass runs then.
//!
//! - A new replica is created and started, probed every 50 ms (HTTP `ready_path` or TCP) and
//!   only then added to the app's backends.
//! - Scale-down picks the replica with the fewest requests in flight, takes it out of the
//!   backends, waits for its requests to finish (up to the grace period), then stops it
//!   (SIGTERM, SIGKILL after the grace period) and removes it.
//! - Each tick lists the app's labelled containers: ones started by an earlier run are adopted
//!   (probed, then served); ones that died or were removed are dropped from the backends, and
//!   the policy replaces them because the ready count fell.
//! - An unreachable engine is logged and counted; the rest of the gateway keeps serving and the
//!   loop keeps trying.

use super::policy::{self, Decision, Params, Reason, Replicas, Signals, State};
use super::runtime::{probe, ContainerRuntime, DockerRuntime, Replica, ServiceRuntime};
use super::spec::{Driver, ScalingSpec};
use crate::cost::CostModel;
use crate::registry::{App, Registry};
use crate::upstream::Target;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Scaler settings from `[scaler]`.
#[derive(Debug, Clone, Copy)]
pub struct ScalerSettings {
    /// Decision interval.
    pub tick: Duration,
    /// Between ticks, how often the signals are checked for a scale-up.
    pub check: Duration,
    /// Drain and stop grace period.
    pub grace: Duration,
    /// How long a new replica may take to answer its probe.
    pub ready_timeout: Duration,
    /// Most requests held per app at zero replicas.
    pub hold_max: usize,
    /// Longest a request is held.
    pub hold_timeout: Duration,
    /// Policy parameters.
    pub params: Params,
}

/// One app's scaler state, as metrics and the stats API show it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AppStatus {
    /// Replicas wanted.
    pub desired: u32,
    /// Serving.
    pub ready: u32,
    /// Started, not yet ready.
    pub starting: u32,
    /// Being drained and removed.
    pub draining: u32,
    /// The last decision's reason.
    pub reason: &'static str,
}

/// Counters and per-app state for metrics, and the loop's wake-up call.
#[derive(Default, Debug)]
pub struct ScalerStatus {
    /// Wakes the loop before its tick: a request held for an app with no replica.
    pub wake: tokio::sync::Notify,
    /// Per app.
    pub apps: ArcSwap<HashMap<String, AppStatus>>,
    /// Decisions that raised the replica count.
    pub ups: AtomicU64,
    /// Decisions that lowered it.
    pub downs: AtomicU64,
    /// Runtime calls that failed (engine unreachable, refused, probe timeouts).
    pub errors: AtomicU64,
    /// Replicas started.
    pub started: AtomicU64,
    /// Replicas stopped and removed by the scaler.
    pub removed: AtomicU64,
    /// Replicas that died or vanished outside the gateway.
    pub lost: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    Draining,
}

#[derive(Debug)]
struct Known {
    addr: Option<SocketAddr>,
    phase: Phase,
    /// The drain-and-remove task was started.
    removing: bool,
    /// Its backend's counters, taken when it leaves the backends, to drain on.
    info: Option<Arc<crate::upstream::BackendInfo>>,
}

impl Known {
    fn starting(addr: Option<SocketAddr>) -> Self {
        Self {
            addr,
            phase: Phase::Starting,
            removing: false,
            info: None,
        }
    }
}

/// The backend counters of the app's backend at `addr`, if it is in the set.
fn backend_info(app: &App, addr: SocketAddr) -> Option<Arc<crate::upstream::BackendInfo>> {
    app.upstream.backends().iter().find_map(|b| {
        (b.addr.as_inet() == Some(&addr))
            .then(|| crate::upstream::info(b).cloned())
            .flatten()
    })
}

/// A start that did not give a serving replica: back off before the next one (0.5 s,
/// doubling, up to 30 s).
fn start_failed(st: &mut AppScaler) {
    st.start_failures = st.start_failures.saturating_add(1);
    let wait = Duration::from_millis(250)
        .saturating_mul(1 << st.start_failures.min(7))
        .min(Duration::from_secs(30));
    st.start_after = Some(Instant::now() + wait);
}

/// What the spawned tasks report back.
enum Event {
    Started { app: String, replica: Replica },
    StartFailed { app: String },
    Ready { app: String, id: String },
    NotReady { app: String, id: String },
    Removed { app: String, id: String },
    RemoveFailed { app: String, id: String },
}

struct AppScaler {
    policy: State,
    replicas: HashMap<String, Known>,
    /// Start calls not answered yet.
    pending: u32,
    managed: Vec<Target>,
    upstream: usize,
    last: Option<Decision>,
    /// Consecutive start failures, and no new start before this.
    start_failures: u32,
    start_after: Option<Instant>,
    /// Capacity as the last pass left it (its starts included): what the between-tick check
    /// compares the policy's answer with.
    capacity: Option<Replicas>,
}

impl AppScaler {
    fn new(now: Instant) -> Self {
        Self {
            policy: State::new(now),
            replicas: HashMap::new(),
            pending: 0,
            managed: Vec::new(),
            upstream: 0,
            last: None,
            start_failures: 0,
            start_after: None,
            capacity: None,
        }
    }
}

/// The loop.
pub struct Controller {
    registry: Arc<Registry>,
    model: Arc<CostModel>,
    settings: ScalerSettings,
    status: Arc<ScalerStatus>,
    runtime: tokio::sync::Mutex<Option<Arc<DockerRuntime>>>,
    /// When the engine-unavailable warning was last logged (at most one per 30 s).
    warned: parking_lot::Mutex<Option<Instant>>,
    /// Apps that lost their spec while the gateway was down (a `[scaling.{app}]` table taken
    /// out of the file): the first passes remove their leftover replicas.
    unscaled: Vec<String>,
}

impl Controller {
    /// A controller over `registry`'s scaled apps.
    pub fn new(
        registry: Arc<Registry>,
        model: Arc<CostModel>,
        settings: ScalerSettings,
        status: Arc<ScalerStatus>,
        unscaled: Vec<String>,
    ) -> Self {
        Self {
            registry,
            model,
            settings,
            status,
            unscaled,
            runtime: tokio::sync::Mutex::new(None),
            warned: parking_lot::Mutex::new(None),
        }
    }

    /// The Docker runtime, connecting on first use (and again after a failure).
    async fn runtime(&self) -> Option<Arc<DockerRuntime>> {
        let mut slot = self.runtime.lock().await;
        if slot.is_none() {
            match DockerRuntime::connect().await {
                Ok(rt) => {
                    tracing::info!("scaler connected to the docker engine");
                    *slot = Some(Arc::new(rt));
                }
                Err(e) => {
                    self.status.errors.fetch_add(1, Ordering::Relaxed);
                    let mut warned = self.warned.lock();
                    let now = Instant::now();
                    if warned
                        .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(30))
                    {
                        *warned = Some(now);
                        tracing::warn!(error = %e, "scaler: docker engine unavailable (retrying every tick; counted in nextgate_scaler_errors_total)");
                    }
                }
            }
        }
        slot.clone()
    }

    /// Remove a container nothing tracks (started for an app that went away, or unusable).
    fn remove_orphan(&self, id: String) {
        let slot = self.runtime.try_lock().ok().and_then(|r| r.clone());
        if let Some(rt) = slot {
            tokio::spawn(async move {
                let _ = ContainerRuntime::remove(&*rt, &id, Duration::ZERO).await;
            });
        }
    }

    fn spawn_start(
        &self,
        rt: Arc<dyn ContainerRuntime>,
        app: &str,
        spec: &ScalingSpec,
        tx: &mpsc::UnboundedSender<Event>,
    ) {
        let (app, spec, tx) = (app.to_string(), spec.clone(), tx.clone());
        tokio::spawn(async move {
            match rt.start(&app, &spec).await {
                Ok(replica) => {
                    tracing::info!(app = %app, id = %short(&replica.id), addr = ?replica.addr, "replica started");
                    let _ = tx.send(Event::Started { app, replica });
                }
                Err(e) => {
                    tracing::warn!(app = %app, error = %e, "replica start failed");
                    let _ = tx.send(Event::StartFailed { app });
                }
            }
        });
    }

    fn spawn_probe(
        &self,
        app: &str,
        id: &str,
        addr: SocketAddr,
        path: Option<String>,
        tx: &mpsc::UnboundedSender<Event>,
    ) {
        let (app, id, tx) = (app.to_string(), id.to_string(), tx.clone());
        let deadline = Instant::now() + self.settings.ready_timeout;
        tokio::spawn(async move {
            loop {
                if probe(addr, path.as_deref(), Duration::from_millis(500)).await {
                    let _ = tx.send(Event::Ready { app, id });
                    return;
                }
                if Instant::now() >= deadline {
                    let _ = tx.send(Event::NotReady { app, id });
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }

    fn spawn_drain(
        &self,
        rt: Arc<dyn ContainerRuntime>,
        app: &str,
        id: &str,
        info: Option<Arc<crate::upstream::BackendInfo>>,
        tx: &mpsc::UnboundedSender<Event>,
    ) {
        let (name, id, tx) = (app.to_string(), id.to_string(), tx.clone());
        let grace = self.settings.grace;
        tokio::spawn(async move {
            // Out of the backends already; requests that chose it still count on its
            // counters until they finish.
            let deadline = Instant::now() + grace;
            while let Some(i) = &info {
                if i.counters.in_flight.load(Ordering::Relaxed) <= 0 || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match rt.remove(&id, grace).await {
                Ok(()) => {
                    tracing::info!(app = %name, id = %short(&id), "replica drained and removed");
                    let _ = tx.send(Event::Removed { app: name, id });
                }
                Err(e) => {
                    tracing::warn!(app = %name, id = %short(&id), error = %e, "replica removal failed; retrying");
                    let _ = tx.send(Event::RemoveFailed { app: name, id });
                }
            }
        });
    }

    async fn pass(
        &self,
        states: &mut HashMap<String, AppScaler>,
        tx: &mpsc::UnboundedSender<Event>,
        rx: &mut mpsc::UnboundedReceiver<Event>,
    ) {
        // Results of earlier tasks first, so this pass sees the replicas they started.
        while let Ok(ev) = rx.try_recv() {
            self.apply(states, ev, tx);
        }
        let apps: Vec<Arc<App>> = self
            .registry
            .list()
            .into_iter()
            .filter(|a| a.scaling().is_some())
            .collect();
        let gone: Vec<String> = states
            .keys()
            .filter(|name| !apps.iter().any(|a| a.name() == name.as_str()))
            .cloned()
            .collect();
        if apps.is_empty() && gone.is_empty() {
            return;
        }
        let Some(docker) = self.runtime().await else {
            // Until a pass gets through, only the tick retries (not every check).
            for state in states.values_mut() {
                state.capacity = None;
            }
            return;
        };
        let rt: Arc<dyn ContainerRuntime> = docker.clone();
        let services: Arc<dyn ServiceRuntime> = docker;
        // Apps deregistered (or no longer scaled): their replicas go too.
        for name in gone {
            // The state goes only once the listing worked: until then, retried every pass.
            match rt.list(&name).await {
                Ok(list) => {
                    states.remove(&name);
                    tracing::info!(app = %name, replicas = list.len(), "app no longer scaled: removing its replicas");
                    for r in list {
                        let (rt, grace) = (rt.clone(), self.settings.grace);
                        tokio::spawn(async move {
                            let _ = rt.remove(&r.id, grace).await;
                        });
                    }
                }
                Err(e) => {
                    self.status.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(app = %name, error = %e, "scaler: cannot list replicas to remove");
                }
            }
        }
        let now = Instant::now();
        for app in &apps {
            let name = app.name().to_string();
            let state = states
                .entry(name.clone())
                .or_insert_with(|| AppScaler::new(now));
            let Some(spec) = app.scaling() else { continue };
            if spec.driver == Driver::Swarm {
                self.swarm_app(&services, app, spec, state, now, tx).await;
                continue;
            }
            // What the engine has: adopt, and notice the dead.
            let listed = match rt.list(&name).await {
                Ok(l) => l,
                Err(e) => {
                    self.status.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(app = %name, error = %e, "scaler: cannot list replicas");
                    // The engine may have restarted: reconnect next pass.
                    *self.runtime.lock().await = None;
                    state.capacity = None;
                    continue;
                }
            };
            let mut gone = Vec::new();
            for (id, k) in &state.replicas {
                let alive = listed.iter().any(|r| &r.id == id && r.running);
                if !alive && k.phase != Phase::Draining {
                    gone.push(id.clone());
                }
            }
            for id in gone {
                if state
                    .replicas
                    .remove(&id)
                    .is_some_and(|k| k.phase == Phase::Starting)
                {
                    // It died before serving (a crashing image): back off like a failed start.
                    start_failed(state);
                }
                self.status.lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(app = %name, id = %short(&id), "replica died or was removed outside the gateway");
                let rt = rt.clone();
                tokio::spawn(async move {
                    let _ = rt.remove(&id, Duration::ZERO).await;
                });
            }
            for r in &listed {
                // Unknown running containers are adopted, unless a start of ours is still in
                // flight (that container is then probably the one being started).
                if r.running
                    && state.pending == 0
                    && !state.replicas.contains_key(&r.id)
                    && r.addr.is_some()
                {
                    tracing::info!(app = %name, id = %short(&r.id), addr = ?r.addr, "adopting running replica");
                    state.replicas.insert(r.id.clone(), Known::starting(r.addr));
                    if let Some(addr) = r.addr {
                        self.spawn_probe(&name, &r.id, addr, spec.ready_path.clone(), tx);
                    }
                } else if !r.running && state.pending == 0 && !state.replicas.contains_key(&r.id) {
                    // Leftover exited container of ours: clean it up.
                    let (rt, id) = (rt.clone(), r.id.clone());
                    tokio::spawn(async move {
                        let _ = rt.remove(&id, Duration::ZERO).await;
                    });
                }
            }
            // Ask the policy.
            let replicas = docker_capacity(state);
            let d = self.ask(app, spec, state, replicas, now);
            let have = replicas.capacity();
            let backing_off = state.start_after.is_some_and(|t| now < t);
            if d.replicas > have && backing_off {
                tracing::debug!(app = %name, failures = state.start_failures, "scaler: start backing off after failures");
            } else if d.replicas > have {
                self.status.ups.fetch_add(1, Ordering::Relaxed);
                for _ in 0..d.replicas - have {
                    state.pending += 1;
                    self.spawn_start(rt.clone(), &name, spec, tx);
                }
            } else if d.replicas < have {
                self.status.downs.fetch_add(1, Ordering::Relaxed);
                let extra = have - d.replicas;
                // Starting ones first (they serve nothing yet), then the least loaded.
                let mut starting: Vec<String> = state
                    .replicas
                    .iter()
                    .filter(|(_, k)| k.phase == Phase::Starting)
                    .map(|(id, _)| id.clone())
                    .collect();
                starting.sort();
                let mut ready: Vec<(i64, String)> = state
                    .replicas
                    .iter()
                    .filter(|(_, k)| k.phase == Phase::Ready)
                    .map(|(id, k)| {
                        (
                            k.addr
                                .and_then(|a| backend_info(app, a))
                                .map_or(0, |i| i.counters.in_flight.load(Ordering::Relaxed)),
                            id.clone(),
                        )
                    })
                    .collect();
                ready.sort();
                let victims: Vec<String> = starting
                    .into_iter()
                    .chain(ready.into_iter().map(|(_, id)| id))
                    .take(extra as usize)
                    .collect();
                for id in victims {
                    if let Some(k) = state.replicas.get_mut(&id) {
                        k.phase = Phase::Draining;
                        // Before it leaves the set: the drain watches its counters.
                        k.info = k.addr.and_then(|a| backend_info(app, a));
                    }
                }
            }
            state.capacity = Some(docker_capacity(state));
            apply_managed(app, state).await;
            // Drain what left the backends (once per replica: the task reports back).
            for (id, k) in state.replicas.iter_mut() {
                if k.phase == Phase::Draining && !k.removing {
                    k.removing = true;
                    self.spawn_drain(rt.clone(), &name, id, k.info.clone(), tx);
                }
            }
        }
        self.publish(states);
    }

    /// A swarm app: the service's replica count follows the decision; its running tasks,
    /// once probed, are the backends. Swarm picks which task stops on scale-down: requests
    /// cut by it are retried on another task by the proxy (idempotent ones, or any that had
    /// not reached the task).
    async fn swarm_app(
        &self,
        rt: &Arc<dyn ServiceRuntime>,
        app: &Arc<App>,
        spec: &ScalingSpec,
        state: &mut AppScaler,
        now: Instant,
        tx: &mpsc::UnboundedSender<Event>,
    ) {
        let name = app.name();
        let Some(service) = spec.service.as_deref() else {
            return;
        };
        let (desired, tasks) = match (
            rt.replicas(service).await,
            rt.tasks(service, spec.port).await,
        ) {
            (Ok(d), Ok(t)) => (d, t),
            (Err(e), _) | (_, Err(e)) => {
                self.status.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(app = %name, service, error = %e, "scaler: cannot read the swarm service");
                state.capacity = None;
                return;
            }
        };
        // Tasks that went away leave; new running ones are probed before they serve.
        let before = state.replicas.len();
        state.replicas.retain(|id, _| {
            tasks
                .iter()
                .any(|t| &t.id == id && t.running && t.addr.is_some())
        });
        let lost = before - state.replicas.len();
        if lost > 0 {
            tracing::info!(app = %name, service, tasks = lost, "swarm tasks gone");
        }
        for t in tasks.iter().filter(|t| t.running) {
            let Some(addr) = t.addr else { continue };
            if !state.replicas.contains_key(&t.id) {
                state
                    .replicas
                    .insert(t.id.clone(), Known::starting(Some(addr)));
                self.spawn_probe(name, &t.id, addr, spec.ready_path.clone(), tx);
            }
        }
        let ready = state
            .replicas
            .values()
            .filter(|k| k.phase == Phase::Ready)
            .count() as u32;
        let replicas = Replicas {
            ready,
            starting: desired.saturating_sub(ready),
        };
        let d = self.ask(app, spec, state, replicas, now);
        let mut applied = true;
        if d.replicas != desired {
            if d.replicas > desired {
                self.status.ups.fetch_add(1, Ordering::Relaxed);
            } else {
                self.status.downs.fetch_add(1, Ordering::Relaxed);
            }
            match rt.set_replicas(service, d.replicas).await {
                Ok(()) => {
                    tracing::info!(app = %name, service, from = desired, to = d.replicas, "swarm service scaled")
                }
                Err(e) => {
                    applied = false;
                    self.status.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(app = %name, service, error = %e, "scaler: cannot scale the swarm service");
                }
            }
        }
        state.pending = d.replicas.saturating_sub(ready);
        // What the service now asks of Swarm; after a failed update only the tick retries.
        state.capacity = applied.then_some(Replicas {
            ready,
            starting: state.pending,
        });
        apply_managed(app, state).await;
    }

    /// Signals from the cost model, the policy's decision, logged when it changes.
    fn ask(
        &self,
        app: &App,
        spec: &ScalingSpec,
        state: &mut AppScaler,
        replicas: Replicas,
        now: Instant,
    ) -> Decision {
        let name = app.name();
        let signals = self.signals(app);
        let d = policy::decide(
            &spec.target(),
            &self.settings.params,
            &mut state.policy,
            &signals,
            replicas,
            now,
        );
        let have = replicas.capacity();
        if d.replicas != have || state.last.map(|l| l.reason) != Some(d.reason) {
            let level = d.replicas != have;
            if level {
                tracing::info!(app = %name, from = have, to = d.replicas, reason = d.reason.as_str(),
                concurrency = signals.concurrency_fast, latency_ms = ?signals.latency_ms, "scaling");
            } else {
                tracing::debug!(app = %name, replicas = have, reason = d.reason.as_str(), "scaler decision");
            }
        }
        state.last = Some(d);
        d
    }

    /// The policy's inputs for `app`, from the cost model and the proxy's held requests.
    fn signals(&self, app: &App) -> Signals {
        // Requests held now for want of a replica (not a count since start).
        let waiting = u32::try_from(app.upstream.held.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        self.model.app(app.name()).map_or(
            Signals {
                waiting,
                ..Signals::default()
            },
            |v| Signals {
                concurrency_fast: v.model.concurrency_fast,
                concurrency_slow: v.model.concurrency_slow,
                rate_fast: v.model.arrival_rate,
                latency_ms: v.model.latency_fast_ms,
                waiting,
            },
        )
    }

    /// Between ticks: would the policy add replicas to some app now? Asked on a copy of each
    /// app's policy state, so the tick's cadence (windows, target steps) is unchanged; only a
    /// scale-up brings the next pass forward.
    fn wants_more(&self, states: &HashMap<String, AppScaler>) -> bool {
        let now = Instant::now();
        self.registry.list().iter().any(|app| {
            let (Some(spec), Some(state)) = (app.scaling(), states.get(app.name())) else {
                return false;
            };
            // `capacity` is set by a pass that got through. A container app's replicas are
            // counted live (task reports between passes change them); a Swarm service's come
            // from the engine, as the last pass read them.
            let Some(last) = state.capacity else {
                return false;
            };
            let capacity = match spec.driver {
                Driver::Docker => docker_capacity(state),
                Driver::Swarm => last,
            };
            if state.start_after.is_some_and(|t| now < t) {
                return false;
            }
            let mut policy = state.policy.clone();
            let d = policy::decide(
                &spec.target(),
                &self.settings.params,
                &mut policy,
                &self.signals(app),
                capacity,
                now,
            );
            d.replicas > capacity.capacity()
        })
    }

    fn apply(
        &self,
        states: &mut HashMap<String, AppScaler>,
        ev: Event,
        tx: &mpsc::UnboundedSender<Event>,
    ) {
        match ev {
            Event::Started { app, replica } => {
                self.status.started.fetch_add(1, Ordering::Relaxed);
                let scaled = self.registry.get(&app).filter(|a| a.scaling().is_some());
                let path = scaled
                    .as_ref()
                    .and_then(|a| a.scaling().and_then(|s| s.ready_path.clone()));
                let Some(st) = states.get_mut(&app).filter(|_| scaled.is_some()) else {
                    // The app went away (or stopped scaling) while this replica started.
                    self.remove_orphan(replica.id);
                    return;
                };
                st.pending = st.pending.saturating_sub(1);
                let Some(addr) = replica.addr else {
                    tracing::warn!(app = %app, id = %short(&replica.id), "replica has no published port; removing it");
                    start_failed(st);
                    self.remove_orphan(replica.id);
                    return;
                };
                if !st.replicas.contains_key(&replica.id) {
                    st.replicas
                        .insert(replica.id.clone(), Known::starting(Some(addr)));
                    self.spawn_probe(&app, &replica.id, addr, path, tx);
                }
            }
            Event::StartFailed { app } => {
                self.status.errors.fetch_add(1, Ordering::Relaxed);
                if let Some(st) = states.get_mut(&app) {
                    st.pending = st.pending.saturating_sub(1);
                    start_failed(st);
                }
            }
            Event::Ready { app, id } => {
                if let Some(st) = states.get_mut(&app) {
                    st.start_failures = 0;
                    st.start_after = None;
                }
                if let Some(k) = states.get_mut(&app).and_then(|s| s.replicas.get_mut(&id)) {
                    if k.phase == Phase::Starting {
                        k.phase = Phase::Ready;
                        tracing::info!(app = %app, id = %short(&id), addr = ?k.addr, "replica ready");
                    }
                }
            }
            Event::NotReady { app, id } => {
                self.status.errors.fetch_add(1, Ordering::Relaxed);
                let swarm = self
                    .registry
                    .get(&app)
                    .and_then(|a| a.scaling().map(|s| s.driver == Driver::Swarm))
                    .unwrap_or(false);
                if let Some(st) = states.get_mut(&app) {
                    start_failed(st);
                    if swarm {
                        // Swarm owns the task: forget it, so the next pass probes it again.
                        st.replicas.remove(&id);
                    } else if let Some(k) = st.replicas.get_mut(&id) {
                        tracing::warn!(app = %app, id = %short(&id), "replica never became ready; removing it");
                        k.phase = Phase::Draining;
                    }
                }
            }
            Event::Removed { app, id } => {
                self.status.removed.fetch_add(1, Ordering::Relaxed);
                if let Some(st) = states.get_mut(&app) {
                    st.replicas.remove(&id);
                }
            }
            Event::RemoveFailed { app, id } => {
                self.status.errors.fetch_add(1, Ordering::Relaxed);
                // Still draining: the next pass tries the removal again.
                if let Some(k) = states.get_mut(&app).and_then(|s| s.replicas.get_mut(&id)) {
                    k.removing = false;
                }
            }
        }
    }

    fn publish(&self, states: &HashMap<String, AppScaler>) {
        let snap = states
            .iter()
            .map(|(name, st)| {
                let count = |p: Phase| st.replicas.values().filter(|k| k.phase == p).count() as u32;
                (
                    name.clone(),
                    AppStatus {
                        desired: st.last.map_or(0, |d| d.replicas),
                        ready: count(Phase::Ready),
                        starting: count(Phase::Starting) + st.pending,
                        draining: count(Phase::Draining),
                        reason: st.last.map_or(Reason::Steady, |d| d.reason).as_str(),
                    },
                )
            })
            .collect();
        self.status.apps.store(Arc::new(snap));
    }
}

/// Make the app's scaler-managed backends the ready replicas (again when the app's upstream
/// was replaced by a re-registration).
async fn apply_managed(app: &App, state: &mut AppScaler) {
    let managed: Vec<Target> = state
        .replicas
        .values()
        .filter(|k| k.phase == Phase::Ready)
        .filter_map(|k| k.addr)
        .map(target)
        .collect();
    let upstream = Arc::as_ptr(&app.upstream) as usize;
    if managed_changed(&state.managed, &managed) || upstream != state.upstream {
        app.upstream.set_managed(&managed).await;
        state.managed = managed;
        state.upstream = upstream;
    }
}

/// A container app's replicas: ready ones, and starting ones with the starts not answered yet.
fn docker_capacity(state: &AppScaler) -> Replicas {
    let count = |p: Phase| state.replicas.values().filter(|k| k.phase == p).count() as u32;
    Replicas {
        ready: count(Phase::Ready),
        starting: count(Phase::Starting) + state.pending,
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn target(addr: SocketAddr) -> Target {
    Target {
        endpoint: format!("http://{addr}"),
        addr,
        tls: false,
        sni: String::new(),
    }
}

fn managed_changed(a: &[Target], b: &[Target]) -> bool {
    a.len() != b.len() || a.iter().any(|x| !b.iter().any(|y| y.addr == x.addr))
}

#[async_trait]
impl BackgroundService for Controller {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Known as scaled apps that are scaled no more, the pass removes their replicas.
        let start = Instant::now();
        let mut states: HashMap<String, AppScaler> = self
            .unscaled
            .iter()
            .map(|name| (name.clone(), AppScaler::new(start)))
            .collect();
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A check as long as the tick adds nothing: off.
        let checking = self.settings.check < self.settings.tick;
        let mut check = tokio::time::interval(self.settings.check);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Passes at least this far apart, however often something wakes the loop.
        const MIN_GAP: Duration = Duration::from_millis(50);
        let mut last = Instant::now();
        loop {
            let early = tokio::select! {
                _ = tick.tick() => false,
                // A load step between ticks: answered now, not at the next tick.
                _ = check.tick(), if checking => {
                    if !self.wants_more(&states) {
                        continue;
                    }
                    tracing::debug!("scaler: signals call for more replicas before the tick");
                    true
                }
                // A held request, or a task reporting (a replica ready, removed...): act now
                // rather than at the next tick.
                _ = self.status.wake.notified() => true,
                ev = rx.recv() => {
                    if let Some(ev) = ev {
                        self.apply(&mut states, ev, &tx);
                    }
                    true
                }
                _ = shutdown.changed() => return,
            };
            if early {
                let gap = Instant::now().saturating_duration_since(last);
                if gap < MIN_GAP {
                    tokio::time::sleep(MIN_GAP - gap).await;
                }
            }
            self.pass(&mut states, &tx, &mut rx).await;
            last = Instant::now();
        }
    }
}
