//! The cost model: what every proxied request costs, per app, per backend and per route key.
//!
//! - [`counters`]: what the request path writes (atomics only, no locks once a route is known).
//! - [`ewma`]: time-decayed averages, pure.
//! - [`model`]: folds counter readings into figures on a tick, pure.
//! - [`route_key`]: method + path template, pure.
//! - [`CostModel`]: holds the model state and publishes snapshots for the stats API, metrics and
//!   the scaler.

pub mod counters;
pub mod ewma;
pub mod model;
pub mod route_key;

use arc_swap::ArcSwap;
use counters::{AppStats, Counters};
use model::{ModelParams, Series, SeriesView};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::Instant;

/// One app's counters, as the model's tick reads them.
pub struct AppInput<'a> {
    /// App name.
    pub name: &'a str,
    /// Its counters.
    pub stats: &'a AppStats,
    /// Its backends: endpoint, whether health checks pass, counters.
    pub backends: Vec<(&'a str, bool, &'a Counters)>,
}

/// One backend in a snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    /// Endpoint URL.
    pub endpoint: String,
    /// Passing health checks.
    pub healthy: bool,
    /// Its figures.
    #[serde(flatten)]
    pub model: SeriesView,
}

/// One route key in a snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    /// `METHOD /template`, or `other`.
    pub route: String,
    /// Its figures.
    #[serde(flatten)]
    pub model: SeriesView,
}

/// An app's model at one tick: what `GET /v3/events/processes/{name}/stats` returns.
#[derive(Debug, Clone, Serialize)]
pub struct AppView {
    /// App name.
    pub app: String,
    /// Whole-app figures.
    #[serde(flatten)]
    pub model: SeriesView,
    /// Mean time to get a backend connection (new or reused), ms, since start.
    pub mean_connect_ms: Option<f64>,
    /// Mean time from connection to first response byte, ms, since start.
    pub mean_first_byte_ms: Option<f64>,
    /// Request body bytes read.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Attempts beyond the first.
    pub retries: u64,
    /// Per backend.
    pub backends: Vec<BackendView>,
    /// Per route key.
    pub routes: Vec<RouteView>,
}

struct AppState {
    series: Series,
    backends: HashMap<String, Series>,
    routes: HashMap<String, Series>,
}

/// The model: state folded on every tick, and the latest snapshot for readers.
pub struct CostModel {
    params: ModelParams,
    state: Mutex<(HashMap<String, AppState>, Option<Instant>)>,
    snapshot: ArcSwap<HashMap<String, Arc<AppView>>>,
}

fn mean_ms(sum_us: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| (sum_us as f64 / n as f64).round() / 1000.0)
}

/// A series seen for the first time: its counters started at zero (with the app, the backend
/// or the route key), so what they hold happened since the previous tick, `since`.
fn first_sight(r: counters::Reading, since: Instant, now: Instant, p: &ModelParams) -> Series {
    let mut s = Series::new(counters::Reading::default(), since, p);
    s.update(r, now, p);
    s
}

fn fold(
    map: &mut HashMap<String, Series>,
    key: &str,
    r: counters::Reading,
    since: Instant,
    now: Instant,
    p: &ModelParams,
) -> SeriesView {
    let s = map
        .entry(key.to_string())
        .and_modify(|s| s.update(r, now, p))
        .or_insert_with(|| first_sight(r, since, now, p));
    s.view()
}

impl CostModel {
    /// An empty model.
    pub fn new(params: ModelParams) -> Self {
        Self {
            params,
            state: Mutex::new((HashMap::new(), None)),
            snapshot: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    /// Fold the current counters of `apps` at `now` and publish a new snapshot. Apps not listed
    /// are forgotten.
    pub fn tick(&self, apps: &[AppInput<'_>], now: Instant) {
        let p = &self.params;
        let mut guard = self.state.lock();
        let (state, last_tick) = &mut *guard;
        // The previous tick (or now, for the first: then the next tick folds it all).
        let since = last_tick.filter(|t| *t < now).unwrap_or(now);
        *last_tick = Some(now);
        state.retain(|name, _| apps.iter().any(|a| a.name == name));
        let mut snap = HashMap::with_capacity(apps.len());
        for a in apps {
            let reading = a.stats.counters.read();
            let st = state
                .entry(a.name.to_string())
                .and_modify(|st| st.series.update(reading, now, p))
                .or_insert_with(|| AppState {
                    series: first_sight(reading, since, now, p),
                    backends: HashMap::new(),
                    routes: HashMap::new(),
                });
            let backends: Vec<BackendView> = a
                .backends
                .iter()
                .map(|(endpoint, healthy, c)| BackendView {
                    endpoint: endpoint.to_string(),
                    healthy: *healthy,
                    model: fold(&mut st.backends, endpoint, c.read(), since, now, p),
                })
                .collect();
            st.backends
                .retain(|k, _| a.backends.iter().any(|(e, _, _)| e == k));
            let routes: Vec<RouteView> = a
                .stats
                .routes
                .all()
                .iter()
                .map(|r| RouteView {
                    route: r.key.clone(),
                    model: fold(&mut st.routes, &r.key, r.counters.read(), since, now, p),
                })
                .filter(|r| r.model.requests > 0 || r.model.in_flight > 0)
                .collect();
            let n = a.stats.counters.requests.load(Ordering::Relaxed);
            let view = AppView {
                app: a.name.to_string(),
                model: st.series.view(),
                mean_connect_ms: mean_ms(a.stats.connect_us.load(Ordering::Relaxed), n),
                mean_first_byte_ms: mean_ms(a.stats.first_byte_us.load(Ordering::Relaxed), n),
                bytes_in: a.stats.bytes_in.load(Ordering::Relaxed),
                bytes_out: a.stats.bytes_out.load(Ordering::Relaxed),
                retries: a.stats.retries.load(Ordering::Relaxed),
                backends,
                routes,
            };
            snap.insert(a.name.to_string(), Arc::new(view));
        }
        self.snapshot.store(Arc::new(snap));
    }

    /// The latest snapshot of `app`.
    pub fn app(&self, app: &str) -> Option<Arc<AppView>> {
        self.snapshot.load().get(app).cloned()
    }

    /// The latest snapshot of every app.
    pub fn all(&self) -> Arc<HashMap<String, Arc<AppView>>> {
        self.snapshot.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::counters::Sample;
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn tick_builds_app_backend_and_route_views() {
        let model = CostModel::new(ModelParams {
            decay: Duration::from_secs(10),
            acceptable_latency: Duration::from_millis(100),
            fast: model::FAST,
            slow: model::SLOW,
        });
        let stats = AppStats::new(8);
        let backend = Counters::default();
        let input = || AppInput {
            name: "shop",
            stats: &stats,
            backends: vec![("http://127.0.0.1:1", true, &backend)],
        };
        model.tick(&[input()], Instant::now());
        for _ in 0..4 {
            tokio::time::advance(Duration::from_millis(250)).await;
            for i in 0..25u64 {
                let route = stats.routes.get("GET", &format!("/items/{i}"));
                stats.counters.begin();
                route.counters.begin();
                backend.begin();
                let s = Sample {
                    status: 200,
                    total: Duration::from_millis(4),
                    upstream: Some(Duration::from_millis(3)),
                    connect: Some(Duration::from_micros(100)),
                    ..Sample::default()
                };
                stats.end(0, &route, &s);
                backend.end(&s);
            }
            model.tick(&[input()], Instant::now());
        }
        let v = model.app("shop").expect("snapshot");
        assert_eq!(v.model.requests, 100);
        assert_eq!(v.model.rate, 100.0);
        assert_eq!(v.model.latency_ms, Some(4.0));
        assert_eq!(v.model.cost_ms, Some(3.0));
        assert_eq!(v.model.concurrency, 0.4);
        assert_eq!(v.mean_connect_ms, Some(0.1));
        assert_eq!(v.backends.len(), 1);
        assert_eq!(v.backends[0].model.requests, 100);
        assert_eq!(v.backends[0].model.rate, 100.0);
        assert_eq!(v.routes.len(), 1);
        assert_eq!(v.routes[0].route, "GET /items/{id}");
        assert_eq!(v.routes[0].model.cost_ms, Some(3.0));
        let json = serde_json::to_value(&*v).expect("json");
        assert_eq!(json["routes"][0]["rate"], 100.0);
        assert_eq!(json["backends"][0]["healthy"], true);

        // The app goes away: so does its model.
        model.tick(&[], Instant::now());
        assert!(model.app("shop").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_app_first_seen_after_its_requests_still_gets_their_figures() {
        let model = CostModel::new(ModelParams {
            decay: Duration::from_secs(10),
            acceptable_latency: Duration::from_millis(100),
            fast: model::FAST,
            slow: model::SLOW,
        });
        model.tick(&[], Instant::now());
        tokio::time::advance(Duration::from_millis(250)).await;
        // Registered and served 10 requests between two ticks.
        let stats = AppStats::new(8);
        for _ in 0..10 {
            let route = stats.routes.get("GET", "/a");
            stats.counters.begin();
            route.counters.begin();
            let s = Sample {
                status: 200,
                total: Duration::from_millis(4),
                upstream: Some(Duration::from_millis(3)),
                ..Sample::default()
            };
            stats.end(0, &route, &s);
        }
        let input = AppInput {
            name: "late",
            stats: &stats,
            backends: Vec::new(),
        };
        model.tick(&[input], Instant::now());
        let v = model.app("late").expect("snapshot");
        assert_eq!(v.model.requests, 10);
        assert_eq!(v.model.latency_ms, Some(4.0));
        assert_eq!(v.model.cost_ms, Some(3.0));
        assert_eq!(v.model.rate, 40.0);
        assert_eq!(v.routes[0].model.latency_ms, Some(4.0));
    }
}
