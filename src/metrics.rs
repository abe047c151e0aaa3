//! Every Prometheus metric in one place, served as `GET /metrics` on the admin listener.
//!
//! Nothing on the request path touches the `prometheus` crate: the proxy and the hub count in
//! their own atomics ([`crate::cost::counters`], [`crate::hub::HubStats`]) and the model keeps
//! its figures in a snapshot. On each scrape one [`Collector`] reads them and builds the metric
//! families, named in base units (seconds, bytes) with the usual `_total` suffix on counters.
//! Labels are bounded: apps are registered names, backends are registered endpoints, routes
//! are the bounded route keys. The `prometheus` process collector adds CPU, memory and file
//! descriptors.

use crate::cost::counters::{Histogram as Buckets, BUCKETS, CLASSES, METHODS};
use crate::cost::CostModel;
use crate::hub::Hub;
use crate::registry::Registry;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The metrics: name, help, type, label names.
const DEFS: &[(&str, &str, MetricType, &[&str])] = &[
    (
        "nextgate_requests_total",
        "Proxied requests by app, method and response status class (none: no response was sent).",
        MetricType::COUNTER,
        &["app", "method", "status_class"],
    ),
    (
        "nextgate_request_duration_seconds",
        "Time from the start of the request to the end of the response, by app.",
        MetricType::HISTOGRAM,
        &["app"],
    ),
    (
        "nextgate_upstream_duration_seconds",
        "Time spent on the backend (connect start to the end of its response), by app.",
        MetricType::HISTOGRAM,
        &["app"],
    ),
    (
        "nextgate_requests_in_flight",
        "Requests being proxied now, by app.",
        MetricType::GAUGE,
        &["app"],
    ),
    (
        "nextgate_request_retries_total",
        "Attempts beyond the first (another backend after a failure), by app.",
        MetricType::COUNTER,
        &["app"],
    ),
    (
        "nextgate_request_body_bytes_total",
        "Request body bytes read from clients, by app.",
        MetricType::COUNTER,
        &["app"],
    ),
    (
        "nextgate_response_body_bytes_total",
        "Response body bytes sent to clients, by app.",
        MetricType::COUNTER,
        &["app"],
    ),
    (
        "nextgate_unrouted_requests_total",
        "Requests that matched no route or no registered app (answered 404).",
        MetricType::COUNTER,
        &[],
    ),
    (
        "nextgate_app_latency_ewma_seconds",
        "Cost model: time-decayed mean request time, by app.",
        MetricType::GAUGE,
        &["app"],
    ),
    (
        "nextgate_app_peak_latency_ewma_seconds",
        "Cost model: peak-sensitive request time, by app.",
        MetricType::GAUGE,
        &["app"],
    ),
    (
        "nextgate_app_cost_ewma_seconds",
        "Cost model: time-decayed mean backend time per request, by app.",
        MetricType::GAUGE,
        &["app"],
    ),
    (
        "nextgate_app_request_rate",
        "Cost model: time-decayed requests per second, by app.",
        MetricType::GAUGE,
        &["app"],
    ),
    (
        "nextgate_app_error_rate",
        "Cost model: time-decayed failed requests per second, by app.",
        MetricType::GAUGE,
        &["app"],
    ),
    (
        "nextgate_app_concurrency",
        "Cost model: mean requests in flight (time integral), by app.",
        MetricType::GAUGE,
        &["app"],
    ),
    (
        "nextgate_app_max_sustained_request_rate",
        "Cost model: highest requests per second seen at acceptable latency, by app.",
        MetricType::GAUGE,
        &["app"],
    ),
    (
        "nextgate_route_requests_total",
        "Proxied requests by app and route key (method and path template).",
        MetricType::COUNTER,
        &["app", "route"],
    ),
    (
        "nextgate_route_cost_ewma_seconds",
        "Cost model: time-decayed mean backend time per request, by app and route key.",
        MetricType::GAUGE,
        &["app", "route"],
    ),
    (
        "nextgate_registry_changes_total",
        "Acknowledged (persisted) registry changes by kind: register, provision, token, deregister.",
        MetricType::COUNTER,
        &["change"],
    ),
    (
        "nextgate_apps",
        "Registered (or provisioned) apps.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "nextgate_backends",
        "Backends by app and health (1 healthy, 0 not), one series per backend.",
        MetricType::GAUGE,
        &["app", "backend"],
    ),
    (
        "nextgate_backend_requests_total",
        "Attempts sent to each backend, by app and backend.",
        MetricType::COUNTER,
        &["app", "backend"],
    ),
    (
        "nextgate_backend_requests_in_flight",
        "Attempts in flight on each backend (what the balancer weighs).",
        MetricType::GAUGE,
        &["app", "backend"],
    ),
    (
        "nextgate_backend_latency_peak_ewma_seconds",
        "Balancer: peak-EWMA latency estimate of each backend.",
        MetricType::GAUGE,
        &["app", "backend"],
    ),
    (
        "nextgate_scaler_replicas",
        "Scaler: replicas by app and state (desired, ready, starting, draining).",
        MetricType::GAUGE,
        &["app", "state"],
    ),
    (
        "nextgate_scaler_decisions_total",
        "Scaler: decisions that changed the replica count, by direction.",
        MetricType::COUNTER,
        &["direction"],
    ),
    (
        "nextgate_scaler_replica_events_total",
        "Scaler: replicas started, removed, and lost (died or removed outside the gateway).",
        MetricType::COUNTER,
        &["event"],
    ),
    (
        "nextgate_scaler_errors_total",
        "Scaler: failed runtime calls (engine unreachable or refusing, replicas never ready).",
        MetricType::COUNTER,
        &[],
    ),
    (
        "nextgate_hub_channels",
        "Event hub: channels that exist now.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "nextgate_hub_subscribers",
        "Event hub: connected subscribers now.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "nextgate_hub_messages_published_total",
        "Event hub: messages published.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "nextgate_hub_messages_delivered_total",
        "Event hub: messages written to subscriber connections.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "nextgate_hub_subscriptions_total",
        "Event hub: subscriptions opened.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "nextgate_hub_messages_dropped_total",
        "Event hub: messages slow subscribers did not get (refused by their full queue or still queued when they were disconnected).",
        MetricType::COUNTER,
        &[],
    ),
    (
        "nextgate_hub_slow_subscriber_disconnects_total",
        "Event hub: subscribers dropped because their queue overflowed.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "nextgate_hub_webhook_deliveries_total",
        "Event hub: webhook deliveries that succeeded.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "nextgate_hub_webhook_failures_total",
        "Event hub: webhook attempts that failed.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "nextgate_hub_webhook_dropped_total",
        "Event hub: messages a webhook subscription never got (they left the buffer first).",
        MetricType::COUNTER,
        &[],
    ),
];

/// What the collector reads.
pub struct Sources {
    /// Registered apps and their counters.
    pub registry: Arc<Registry>,
    /// The cost model's snapshot.
    pub model: Arc<CostModel>,
    /// The scaler's state.
    pub scaler: Arc<crate::scaler::controller::ScalerStatus>,
    /// The event hub.
    pub hub: Arc<Hub>,
    /// The proxy's unrouted-request counter.
    pub unrouted: Arc<AtomicU64>,
    /// The balancer's latency time constant (to read its estimates).
    pub balance_decay: std::time::Duration,
}

struct GatewayCollector {
    descs: Vec<Desc>,
    src: Sources,
}

fn labels(names: &[&str], values: &[&str]) -> Vec<LabelPair> {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| {
            let mut l = LabelPair::default();
            l.set_name((*n).to_string());
            l.set_value((*v).to_string());
            l
        })
        .collect()
}

/// Collects families in the order of [`DEFS`].
struct Families {
    by_name: HashMap<&'static str, MetricFamily>,
}

impl Families {
    fn new() -> Self {
        let by_name = DEFS
            .iter()
            .map(|(name, help, kind, _)| {
                let mut f = MetricFamily::default();
                f.set_name((*name).to_string());
                f.set_help((*help).to_string());
                f.set_field_type(*kind);
                (*name, f)
            })
            .collect();
        Self { by_name }
    }

    fn push(&mut self, name: &'static str, values: &[&str], set: impl FnOnce(&mut Metric)) {
        let Some((_, _, _, names)) = DEFS.iter().find(|d| d.0 == name) else {
            debug_assert!(false, "metric {name} is not in DEFS");
            return;
        };
        debug_assert_eq!(names.len(), values.len(), "labels of {name}");
        let mut m = Metric::from_label(labels(names, values));
        set(&mut m);
        if let Some(f) = self.by_name.get_mut(name) {
            f.mut_metric().push(m);
        }
    }

    fn counter(&mut self, name: &'static str, values: &[&str], v: f64) {
        self.push(name, values, |m| {
            let mut c = Counter::default();
            c.set_value(v);
            m.set_counter(c);
        });
    }

    fn gauge(&mut self, name: &'static str, values: &[&str], v: f64) {
        self.push(name, values, |m| {
            let mut g = Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        });
    }

    fn histogram(&mut self, name: &'static str, values: &[&str], h: &Buckets) {
        let (counts, sum) = h.cumulative();
        self.push(name, values, |m| {
            let mut p = Histogram::default();
            p.set_sample_count(counts[BUCKETS.len()]);
            p.set_sample_sum(sum);
            p.set_bucket(
                BUCKETS
                    .iter()
                    .zip(counts)
                    .map(|(ub, c)| {
                        let mut b = Bucket::default();
                        b.set_upper_bound(*ub);
                        b.set_cumulative_count(c);
                        b
                    })
                    .collect(),
            );
            m.set_histogram(p);
        });
    }

    fn into_vec(mut self) -> Vec<MetricFamily> {
        DEFS.iter()
            .filter_map(|d| self.by_name.remove(d.0))
            .collect()
    }
}

/// A counter's value for a sample.
fn value(a: &AtomicU64) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

fn secs(ms: Option<f64>) -> f64 {
    ms.unwrap_or(0.0) / 1000.0
}

impl Collector for GatewayCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut f = Families::new();
        let apps = self.src.registry.list();
        let models = self.src.model.all();
        let now = crate::balance::clock_ms();
        f.gauge("nextgate_apps", &[], apps.len() as f64);
        let changes = self.src.registry.changes();
        for (kind, n) in crate::registry::CHANGES.iter().zip(changes) {
            f.counter("nextgate_registry_changes_total", &[kind], n as f64);
        }
        f.counter(
            "nextgate_unrouted_requests_total",
            &[],
            self.src.unrouted.load(Ordering::Relaxed) as f64,
        );
        for app in &apps {
            let name = app.name();
            let s = &app.upstream.stats;
            for (mi, method) in METHODS.iter().enumerate() {
                for (ci, class) in CLASSES.iter().enumerate() {
                    let n = s.by_method_class[mi][ci].load(Ordering::Relaxed);
                    if n > 0 {
                        f.counter("nextgate_requests_total", &[name, method, class], n as f64);
                    }
                }
            }
            f.histogram("nextgate_request_duration_seconds", &[name], &s.duration);
            f.histogram("nextgate_upstream_duration_seconds", &[name], &s.upstream);
            let r = s.counters.read();
            f.gauge("nextgate_requests_in_flight", &[name], r.in_flight as f64);
            f.counter("nextgate_request_retries_total", &[name], value(&s.retries));
            f.counter(
                "nextgate_request_body_bytes_total",
                &[name],
                value(&s.bytes_in),
            );
            f.counter(
                "nextgate_response_body_bytes_total",
                &[name],
                value(&s.bytes_out),
            );
            for route in s.routes.all() {
                let n = route.counters.requests.load(Ordering::Relaxed);
                if n > 0 {
                    f.counter(
                        "nextgate_route_requests_total",
                        &[name, &route.key],
                        n as f64,
                    );
                }
            }
            if let Some(m) = models.get(name) {
                let v = &m.model;
                f.gauge(
                    "nextgate_app_latency_ewma_seconds",
                    &[name],
                    secs(v.latency_ms),
                );
                f.gauge(
                    "nextgate_app_peak_latency_ewma_seconds",
                    &[name],
                    secs(v.peak_latency_ms),
                );
                f.gauge("nextgate_app_cost_ewma_seconds", &[name], secs(v.cost_ms));
                f.gauge("nextgate_app_request_rate", &[name], v.rate);
                f.gauge("nextgate_app_error_rate", &[name], v.error_rate);
                f.gauge("nextgate_app_concurrency", &[name], v.concurrency);
                f.gauge(
                    "nextgate_app_max_sustained_request_rate",
                    &[name],
                    v.max_sustained_rate,
                );
                for r in &m.routes {
                    if r.model.cost_ms.is_some() {
                        f.gauge(
                            "nextgate_route_cost_ewma_seconds",
                            &[name, &r.route],
                            secs(r.model.cost_ms),
                        );
                    }
                }
            }
            for b in app.upstream.backends().iter() {
                let Some(i) = crate::upstream::info(b) else {
                    continue;
                };
                let labels = [name, i.endpoint.as_str()];
                let healthy = app.upstream.healthy(b);
                f.gauge(
                    "nextgate_backends",
                    &labels,
                    if healthy { 1.0 } else { 0.0 },
                );
                let r = i.counters.read();
                f.counter(
                    "nextgate_backend_requests_total",
                    &labels,
                    r.requests as f64,
                );
                f.gauge(
                    "nextgate_backend_requests_in_flight",
                    &labels,
                    r.in_flight as f64,
                );
                if let Some(ms) = i.peak.get(now, self.src.balance_decay) {
                    f.gauge(
                        "nextgate_backend_latency_peak_ewma_seconds",
                        &labels,
                        ms / 1000.0,
                    );
                }
            }
        }
        let sc = &self.src.scaler;
        for (app, st) in sc.apps.load().iter() {
            for (state, n) in [
                ("desired", st.desired),
                ("ready", st.ready),
                ("starting", st.starting),
                ("draining", st.draining),
            ] {
                f.gauge("nextgate_scaler_replicas", &[app, state], f64::from(n));
            }
        }
        f.counter("nextgate_scaler_decisions_total", &["up"], value(&sc.ups));
        f.counter(
            "nextgate_scaler_decisions_total",
            &["down"],
            value(&sc.downs),
        );
        f.counter(
            "nextgate_scaler_replica_events_total",
            &["started"],
            value(&sc.started),
        );
        f.counter(
            "nextgate_scaler_replica_events_total",
            &["removed"],
            value(&sc.removed),
        );
        f.counter(
            "nextgate_scaler_replica_events_total",
            &["lost"],
            value(&sc.lost),
        );
        f.counter("nextgate_scaler_errors_total", &[], value(&sc.errors));
        let hub = &self.src.hub;
        let st = &hub.stats;
        f.gauge("nextgate_hub_channels", &[], hub.channel_count() as f64);
        f.gauge(
            "nextgate_hub_subscribers",
            &[],
            hub.subscriber_count() as f64,
        );
        f.counter(
            "nextgate_hub_messages_published_total",
            &[],
            value(&st.published),
        );
        f.counter(
            "nextgate_hub_messages_delivered_total",
            &[],
            value(&st.delivered),
        );
        f.counter(
            "nextgate_hub_subscriptions_total",
            &[],
            value(&st.subscribed),
        );
        f.counter(
            "nextgate_hub_messages_dropped_total",
            &[],
            value(&st.dropped),
        );
        f.counter(
            "nextgate_hub_slow_subscriber_disconnects_total",
            &[],
            value(&st.slow_disconnects),
        );
        f.counter(
            "nextgate_hub_webhook_deliveries_total",
            &[],
            value(&st.webhook_delivered),
        );
        f.counter(
            "nextgate_hub_webhook_failures_total",
            &[],
            value(&st.webhook_failures),
        );
        f.counter(
            "nextgate_hub_webhook_dropped_total",
            &[],
            value(&st.webhook_lost),
        );
        f.into_vec()
    }
}

/// The gateway's metrics registry.
pub struct Metrics {
    registry: prometheus::Registry,
}

impl Metrics {
    /// Build the registry over `src`. Fails only if a metric definition is invalid, which the
    /// tests rule out.
    pub fn new(src: Sources) -> prometheus::Result<Self> {
        let descs = DEFS
            .iter()
            .map(|(name, help, _, labels)| {
                Desc::new(
                    (*name).to_string(),
                    (*help).to_string(),
                    labels.iter().map(|l| (*l).to_string()).collect(),
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<Vec<_>>>()?;
        let registry = prometheus::Registry::new();
        registry.register(Box::new(GatewayCollector { descs, src }))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self { registry })
    }

    /// The text exposition format (`text/plain; version=0.0.4`).
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}
