//! Backend selection: peak-EWMA power of two choices (the default), or round robin.
//!
//! [`P2c`] is a Pingora [`BackendSelection`]: for each request it draws two distinct backends at
//! random and offers the one with the lower load first, then the other, then the rest (so the
//! caller's health and retry filters still find a backend). Load is a backend's peak-EWMA
//! latency times its requests in flight plus one ([`load`]). A backend never sampled yet counts
//! at the median of the sampled ones, so a new backend is neither flooded nor starved; failures
//! are fed in as a penalty latency by the proxy, so a backend that fails fast is not attractive.

pub mod peak;

use crate::upstream::info;
use pingora_load_balancing::selection::{BackendIter, BackendSelection};
use pingora_load_balancing::Backend;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Which algorithm an app's balancer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Peak-EWMA latency x (in flight + 1), best of two random choices.
    #[default]
    PeakEwma,
    /// Each backend in turn.
    RoundRobin,
}

impl Balance {
    /// Parse the config / registration spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "peak_ewma" => Some(Self::PeakEwma),
            "round_robin" => Some(Self::RoundRobin),
            _ => None,
        }
    }

    /// The spelling used in config and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeakEwma => "peak_ewma",
            Self::RoundRobin => "round_robin",
        }
    }
}

/// Milliseconds since the balancer's clock origin, never 0.
pub fn clock_ms() -> u32 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let ms = ORIGIN.get_or_init(Instant::now).elapsed().as_millis();
    (ms as u32).wrapping_add(1).max(1)
}

/// Selection parameters.
#[derive(Debug, Clone, Copy)]
pub struct P2cParams {
    /// Time constant of the latency estimate.
    pub decay: Duration,
}

impl Default for P2cParams {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
        }
    }
}

/// Pure load formula: latency estimate (ms) times (in flight + 1). A small floor keeps the
/// in-flight count meaningful when the estimate has decayed to nothing.
pub fn load(latency_ms: f64, in_flight: i64) -> f64 {
    (latency_ms.max(0.0) + 0.01) * (in_flight.max(0) as f64 + 1.0)
}

/// Pure choice: the index (0 or 1) of the lower of two loads; ties go to the first.
pub fn better(a: f64, b: f64) -> usize {
    usize::from(b < a)
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let seed = u64::from_le_bytes(crate::registry::token::random_bytes::<8>());
        seed | 1
    });
}

/// A random index below `n` (xorshift64*, per thread).
fn random_below(n: usize) -> usize {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as usize % n.max(1)
    })
}

/// Peak-EWMA power-of-two-choices selection over one backend set.
pub struct P2c {
    backends: Box<[Backend]>,
    params: P2cParams,
}

impl P2c {
    fn estimate(&self, b: &Backend, now: u32) -> Option<f64> {
        info(b).and_then(|i| i.peak.get(now, self.params.decay))
    }

    fn in_flight(b: &Backend) -> i64 {
        info(b).map_or(0, |i| i.counters.in_flight.load(Ordering::Relaxed))
    }

    /// Median estimate of the sampled backends (0 when none is sampled).
    fn median(&self, now: u32) -> f64 {
        let mut v: Vec<f64> = self
            .backends
            .iter()
            .filter_map(|b| self.estimate(b, now))
            .collect();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    fn load_of(&self, b: &Backend, now: u32, median: &mut Option<f64>) -> f64 {
        let lat = match self.estimate(b, now) {
            Some(l) => l,
            None => *median.get_or_insert_with(|| self.median(now)),
        };
        load(lat, Self::in_flight(b))
    }
}

impl BackendSelection for P2c {
    type Iter = P2cIter;
    type Config = P2cParams;

    fn build_with_config(backends: &BTreeSet<Backend>, config: &P2cParams) -> Self {
        Self {
            backends: backends.iter().cloned().collect(),
            params: *config,
        }
    }

    fn build(backends: &BTreeSet<Backend>) -> Self {
        Self::build_with_config(backends, &P2cParams::default())
    }

    fn iter(self: &Arc<Self>, _key: &[u8]) -> P2cIter {
        let n = self.backends.len();
        let first = match n {
            0 | 1 => [0, 0],
            _ => {
                let a = random_below(n);
                let b = (a + 1 + random_below(n - 1)) % n;
                let now = clock_ms();
                let mut median = None;
                let la = self.load_of(&self.backends[a], now, &mut median);
                let lb = self.load_of(&self.backends[b], now, &mut median);
                if better(la, lb) == 0 {
                    [a, b]
                } else {
                    [b, a]
                }
            }
        };
        P2cIter {
            sel: self.clone(),
            first,
            step: 0,
        }
    }
}

/// The two choices, best first, then every other backend.
pub struct P2cIter {
    sel: Arc<P2c>,
    first: [usize; 2],
    step: usize,
}

impl BackendIter for P2cIter {
    fn next(&mut self) -> Option<&Backend> {
        let n = self.sel.backends.len();
        let step = self.step;
        if step >= n {
            return None;
        }
        self.step += 1;
        let idx = match step {
            0 => self.first[0],
            1 => self.first[1],
            // The rest in order: the (k-2)th index that is not one of the first two.
            k => {
                let (x, y) = (
                    self.first[0].min(self.first[1]),
                    self.first[0].max(self.first[1]),
                );
                let mut i = k - 2;
                if i >= x {
                    i += 1;
                }
                if i >= y {
                    i += 1;
                }
                i
            }
        };
        self.sel.backends.get(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_weighs_latency_by_in_flight() {
        assert!(load(10.0, 0) < load(10.0, 1));
        assert!(load(100.0, 0) > load(10.0, 5));
        assert!(load(0.0, 0) < load(0.0, 1));
        assert_eq!(better(1.0, 2.0), 0);
        assert_eq!(better(2.0, 1.0), 1);
        assert_eq!(better(1.0, 1.0), 0);
    }

    fn set(n: u16) -> BTreeSet<Backend> {
        (0..n)
            .map(|i| {
                let mut b = Backend::new(&format!("127.0.0.1:{}", 1000 + i)).expect("addr");
                b.weight = 1;
                b
            })
            .collect()
    }

    #[test]
    fn iter_offers_every_backend_once() {
        for n in [0u16, 1, 2, 3, 7] {
            let sel = Arc::new(P2c::build(&set(n)));
            for _ in 0..50 {
                let mut it = sel.iter(b"");
                let mut seen = Vec::new();
                while let Some(b) = it.next() {
                    seen.push(b.addr.to_string());
                }
                let mut uniq = seen.clone();
                uniq.sort();
                uniq.dedup();
                assert_eq!(seen.len(), n as usize, "n={n}: {seen:?}");
                assert_eq!(uniq.len(), n as usize, "n={n}: {seen:?}");
            }
        }
    }

    #[test]
    fn random_below_stays_in_range_and_spreads() {
        let mut hits = [0u32; 3];
        for _ in 0..3000 {
            hits[random_below(3)] += 1;
        }
        assert!(hits.iter().all(|h| *h > 800), "{hits:?}");
    }
}
