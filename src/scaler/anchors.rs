//! Models of two well-known autoscalers, run on the same traces as our policy
//! ([`super::sim`]) so the comparison is like for like. They follow the documented algorithms
//! with their default parameters, on the same concurrency signal:
//!
//! - **Knative KPA**: every 2 s, desired = ceil(mean concurrency over the 60 s stable window /
//!   target); panic mode when the 6 s panic window asks for at least twice the ready pods, in
//!   which desired follows the panic window and never goes down, until 60 s without panic;
//!   scale-down at most halves (max scale-down rate 2); only ready pods count.
//! - **Kubernetes HPA**: every 15 s, desired = ceil(ready x metric / target) where the metric
//!   is the mean concurrency per ready pod over the last 30 s (the metrics pipeline's window),
//!   skipped inside a 10% tolerance; scale-up at most max(4 pods, +100%) per period;
//!   scale-down to the highest recommendation of the last 300 s.

use super::policy::{Replicas, Signals};
use super::sim::Scaler;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Mean of the samples within `window` of `now`.
fn window_mean(samples: &mut VecDeque<(Instant, f64)>, now: Instant, window: Duration) -> f64 {
    while samples
        .front()
        .is_some_and(|(at, _)| now.saturating_duration_since(*at) > window)
    {
        samples.pop_front();
    }
    if samples.is_empty() {
        return 0.0;
    }
    samples.iter().map(|(_, v)| v).sum::<f64>() / samples.len() as f64
}

/// Knative's KPA, as documented.
pub struct Kpa {
    target: f64,
    min: u32,
    max: u32,
    samples: VecDeque<(Instant, f64)>,
    panic_until: Option<Instant>,
    panic_peak: u32,
}

impl Kpa {
    /// A KPA with `target` concurrency per pod and bounds.
    pub fn new(target: f64, min: u32, max: u32) -> Self {
        Self {
            target,
            min,
            max,
            samples: VecDeque::new(),
            panic_until: None,
            panic_peak: 0,
        }
    }
}

impl Scaler for Kpa {
    fn name(&self) -> &'static str {
        "Knative KPA"
    }
    fn period(&self) -> Duration {
        Duration::from_secs(2)
    }
    fn decide(&mut self, s: &Signals, r: Replicas, now: Instant) -> u32 {
        // KPA samples concurrency every second; our tick feeds the latest fast reading.
        self.samples.push_back((now, s.concurrency_fast));
        let stable = window_mean(&mut self.samples, now, Duration::from_secs(60));
        let mut panic_samples: VecDeque<_> = self
            .samples
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= Duration::from_secs(6))
            .copied()
            .collect();
        let panic = window_mean(&mut panic_samples, now, Duration::from_secs(6));
        let want_stable = (stable / self.target).ceil() as u32;
        let want_panic = (panic / self.target).ceil() as u32;
        let ready = r.ready.max(1);
        if f64::from(want_panic) / f64::from(ready) >= 2.0 {
            self.panic_until = Some(now + Duration::from_secs(60));
        }
        let current = r.capacity();
        let want = match self.panic_until {
            Some(until) if now < until => {
                self.panic_peak = self.panic_peak.max(want_panic).max(current);
                self.panic_peak
            }
            _ => {
                self.panic_until = None;
                self.panic_peak = 0;
                // Max scale-down rate 2.
                want_stable.max(current / 2)
            }
        };
        want.clamp(self.min, self.max)
    }
}

/// The Kubernetes HPA, as documented.
pub struct Hpa {
    target: f64,
    min: u32,
    max: u32,
    samples: VecDeque<(Instant, f64)>,
    recommendations: VecDeque<(Instant, u32)>,
}

impl Hpa {
    /// An HPA with `target` concurrency per pod and bounds.
    pub fn new(target: f64, min: u32, max: u32) -> Self {
        Self {
            target,
            min: min.max(1),
            max,
            samples: VecDeque::new(),
            recommendations: VecDeque::new(),
        }
    }
}

impl Scaler for Hpa {
    fn name(&self) -> &'static str {
        "Kubernetes HPA"
    }
    fn period(&self) -> Duration {
        Duration::from_secs(15)
    }
    fn decide(&mut self, s: &Signals, r: Replicas, now: Instant) -> u32 {
        let ready = r.ready.max(1);
        self.samples
            .push_back((now, s.concurrency_fast / f64::from(ready)));
        let metric = window_mean(&mut self.samples, now, Duration::from_secs(30));
        let current = r.capacity().max(1);
        let ratio = metric / self.target;
        let mut want = if (ratio - 1.0).abs() <= 0.1 {
            current
        } else {
            (f64::from(ready) * ratio).ceil() as u32
        };
        want = want.min(current.saturating_mul(2).max(current + 4));
        self.recommendations.push_back((now, want));
        while self
            .recommendations
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > Duration::from_secs(300))
        {
            self.recommendations.pop_front();
        }
        if want < current {
            want = self
                .recommendations
                .iter()
                .map(|(_, n)| *n)
                .max()
                .unwrap_or(current)
                .min(current);
        }
        want.clamp(self.min, self.max)
    }
}
