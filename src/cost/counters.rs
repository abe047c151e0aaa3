//! What the request path writes: plain atomic counters per app, per backend and per route key,
//! plus fixed-bucket histograms. Nothing here locks on a request that has been seen before;
//! the model ([`super::model`]) reads the counters on its tick and does the maths.

use super::route_key;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One finished request, as the proxy measured it.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Response status sent to the client (0: none was sent).
    pub status: u16,
    /// The request failed in the gateway or upstream (no response, 5xx, connect error).
    pub failed: bool,
    /// Filter phase start to the end of the response.
    pub total: Duration,
    /// Time spent on the backend: connect start to the end of its response (the request's cost).
    pub upstream: Option<Duration>,
    /// Time to connect (or reuse a connection) to the backend.
    pub connect: Option<Duration>,
    /// Time from connecting to the first response byte.
    pub first_byte: Option<Duration>,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// Attempts beyond the first.
    pub retries: u32,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Counters for one series (an app, a backend or a route key).
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests finished.
    pub requests: AtomicU64,
    /// Of those, failed (5xx or no response).
    pub errors: AtomicU64,
    /// Sum of total times, microseconds (the time integral of in-flight requests).
    pub latency_us: AtomicU64,
    /// Sum of backend times, microseconds.
    pub cost_us: AtomicU64,
    /// Requests in flight now.
    pub in_flight: AtomicI64,
}

/// A plain reading of [`Counters`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    /// Requests finished.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Sum of total times, microseconds.
    pub latency_us: u64,
    /// Sum of backend times, microseconds.
    pub cost_us: u64,
    /// In flight now.
    pub in_flight: i64,
}

impl Counters {
    /// A request started.
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request that [`begin`](Self::begin) counted is over without a sample.
    pub fn abandon(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// A request that [`begin`](Self::begin) counted finished.
    pub fn end(&self, s: &Sample) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.finish(s);
    }

    /// Count a finished request (without touching in-flight).
    pub fn finish(&self, s: &Sample) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if s.failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency_us
            .fetch_add(micros(s.total), Ordering::Relaxed);
        if let Some(u) = s.upstream {
            self.cost_us.fetch_add(micros(u), Ordering::Relaxed);
        }
    }

    /// Read every counter.
    pub fn read(&self) -> Reading {
        Reading {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency_us: self.latency_us.load(Ordering::Relaxed),
            cost_us: self.cost_us.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed).max(0),
        }
    }
}

/// Upper bounds of the duration histograms, seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A duration histogram with [`BUCKETS`] (plus +Inf) in atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Count one duration.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros(d), Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (the last is +Inf, the total) and the sum in seconds.
    pub fn cumulative(&self) -> ([u64; BUCKETS.len() + 1], f64) {
        let mut out = [0u64; BUCKETS.len() + 1];
        let mut acc = 0;
        for (o, c) in out.iter_mut().zip(&self.counts) {
            acc += c.load(Ordering::Relaxed);
            *o = acc;
        }
        (out, self.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// Methods counted apart in metrics; the rest are `OTHER`.
pub const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER",
];
/// Status classes counted apart: 1xx..5xx, and none (no response was sent).
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Index of `method` in [`METHODS`].
pub fn method_index(method: &str) -> usize {
    METHODS[..7].iter().position(|m| *m == method).unwrap_or(7)
}

/// Index of `status`'s class in [`CLASSES`].
pub fn class_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100) - 1,
        _ => 5,
    }
}

/// The hash is already a hash: use it as is.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type RouteMap = HashMap<u64, Arc<RouteStats>, BuildHasherDefault<Identity>>;

/// Counters of one route key.
#[derive(Debug)]
pub struct RouteStats {
    /// The template (`GET /users/{id}`), or [`route_key::OTHER`].
    pub key: String,
    /// Its counters.
    pub counters: Counters,
}

/// An app's route keys, bounded: read lock-free, written (rarely, once per new kind of
/// request) under a mutex that copies the map.
pub struct Routes {
    map: ArcSwap<RouteMap>,
    write: Mutex<()>,
    max: usize,
    other: Arc<RouteStats>,
}

impl Routes {
    /// At most `max` keys; requests beyond go to `other`.
    pub fn new(max: usize) -> Self {
        Self {
            map: ArcSwap::from_pointee(RouteMap::default()),
            write: Mutex::new(()),
            max,
            other: Arc::new(RouteStats {
                key: route_key::OTHER.to_string(),
                counters: Counters::default(),
            }),
        }
    }

    /// The stats of `method path`'s key, added if there is room.
    pub fn get(&self, method: &str, path: &str) -> Arc<RouteStats> {
        let h = route_key::hash(method, path);
        {
            let map = self.map.load();
            if let Some(s) = map.get(&h) {
                return s.clone();
            }
            // Full: new kinds go to `other` without taking the lock.
            if map.len() >= self.max {
                return self.other.clone();
            }
        }
        let _g = self.write.lock();
        let current = self.map.load_full();
        if let Some(s) = current.get(&h) {
            return s.clone();
        }
        if current.len() >= self.max {
            return self.other.clone();
        }
        let stats = Arc::new(RouteStats {
            key: route_key::template(method, path),
            counters: Counters::default(),
        });
        let mut next = (*current).clone();
        next.insert(h, stats.clone());
        self.map.store(Arc::new(next));
        stats
    }

    /// Every key's stats, `other` last.
    pub fn all(&self) -> Vec<Arc<RouteStats>> {
        let mut v: Vec<_> = self.map.load().values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v.push(self.other.clone());
        v
    }
}

/// Everything the request path counts for one app.
pub struct AppStats {
    /// Totals.
    pub counters: Counters,
    /// Requests by method and status class.
    pub by_method_class: [[AtomicU64; CLASSES.len()]; METHODS.len()],
    /// Total request durations.
    pub duration: Histogram,
    /// Backend durations.
    pub upstream: Histogram,
    /// Sum of connect times, microseconds.
    pub connect_us: AtomicU64,
    /// Sum of connect-to-first-byte times, microseconds.
    pub first_byte_us: AtomicU64,
    /// Request body bytes.
    pub bytes_in: AtomicU64,
    /// Response body bytes.
    pub bytes_out: AtomicU64,
    /// Retries (attempts beyond the first).
    pub retries: AtomicU64,
    /// Route keys.
    pub routes: Routes,
}

impl AppStats {
    /// Empty stats keeping at most `max_routes` route keys.
    pub fn new(max_routes: usize) -> Self {
        Self {
            counters: Counters::default(),
            by_method_class: Default::default(),
            duration: Histogram::default(),
            upstream: Histogram::default(),
            connect_us: AtomicU64::new(0),
            first_byte_us: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            routes: Routes::new(max_routes),
        }
    }

    /// Count a response status by method (for requests kept out of the timing maths).
    pub fn count_status(&self, method: usize, status: u16) {
        self.by_method_class[method.min(METHODS.len() - 1)][class_index(status)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A request finished: count it everywhere the app keeps it (in-flight was counted by
    /// [`Counters::begin`] on `self.counters` and on the route's counters).
    pub fn end(&self, method: usize, route: &RouteStats, s: &Sample) {
        self.counters.end(s);
        route.counters.end(s);
        self.count_status(method, s.status);
        self.duration.observe(s.total);
        if let Some(u) = s.upstream {
            self.upstream.observe(u);
        }
        if let Some(c) = s.connect {
            self.connect_us.fetch_add(micros(c), Ordering::Relaxed);
        }
        if let Some(f) = s.first_byte {
            self.first_byte_us.fetch_add(micros(f), Ordering::Relaxed);
        }
        if s.bytes_in > 0 {
            self.bytes_in.fetch_add(s.bytes_in, Ordering::Relaxed);
        }
        if s.bytes_out > 0 {
            self.bytes_out.fetch_add(s.bytes_out, Ordering::Relaxed);
        }
        if s.retries > 0 {
            self.retries
                .fetch_add(u64::from(s.retries), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_inf_last() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (c, sum) = h.cumulative();
        assert_eq!(c[0], 1);
        assert_eq!(c[3], 2); // <= 5 ms
        assert_eq!(c[BUCKETS.len() - 1], 2); // <= 10 s
        assert_eq!(c[BUCKETS.len()], 3); // +Inf
        assert!((sum - 60.0033).abs() < 1e-9);
    }

    #[test]
    fn routes_are_bounded_and_the_rest_is_other() {
        let r = Routes::new(2);
        let a = r.get("GET", "/users/1");
        let a2 = r.get("GET", "/users/2");
        assert!(Arc::ptr_eq(&a, &a2));
        let b = r.get("POST", "/users");
        let c = r.get("GET", "/orders/1");
        assert_eq!(a.key, "GET /users/{id}");
        assert_eq!(b.key, "POST /users");
        assert_eq!(c.key, route_key::OTHER);
        let keys: Vec<_> = r.all().iter().map(|s| s.key.clone()).collect();
        assert_eq!(keys, ["GET /users/{id}", "POST /users", "other"]);
    }

    #[test]
    fn classes_and_methods() {
        assert_eq!(class_index(200), 1);
        assert_eq!(class_index(503), 4);
        assert_eq!(class_index(0), 5);
        assert_eq!(class_index(999), 5);
        assert_eq!(method_index("GET"), 0);
        assert_eq!(method_index("PROPFIND"), 7);
    }
}
