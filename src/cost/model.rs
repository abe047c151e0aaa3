//! The cost model: turns counter readings taken on a tick into time-decayed figures per series.
//! Pure: every function takes the readings and `now`; nothing here reads a clock or a socket.
//!
//! For each series (an app, one of its backends, one of its route keys) it keeps:
//! - latency: mean request time per interval, averaged with a time constant, and a peak-sensitive
//!   twin that jumps to a slower interval at once;
//! - cost: mean backend time per request (what a request consumed of the app's capacity);
//! - rate and error rate, per second;
//! - concurrency as a time integral: the request-seconds completed in an interval divided by its
//!   length (Little's law measured directly), beside `rate x latency` (the law computed) and the
//!   in-flight gauge at the tick, so the three can be cross-checked;
//! - the highest rate sustained while latency stayed acceptable.

use super::counters::Reading;
use super::ewma::{Ewma, PeakEwma, Rate};
use serde::Serialize;
use std::time::Duration;
use tokio::time::Instant;

/// Model parameters.
#[derive(Debug, Clone, Copy)]
pub struct ModelParams {
    /// Time constant of every average.
    pub decay: Duration,
    /// Latency at or under which a rate counts as sustained capacity.
    pub acceptable_latency: Duration,
    /// Time constant of the scaler's fast signals.
    pub fast: Duration,
    /// Time constant of the scaler's slow signal.
    pub slow: Duration,
}

/// One series' model state.
#[derive(Debug, Clone)]
pub struct Series {
    last: Reading,
    at: Instant,
    latency: Ewma,
    peak_latency: PeakEwma,
    cost: Ewma,
    rate: Rate,
    error_rate: Rate,
    concurrency: Ewma,
    max_ok_rate: f64,
    in_flight: i64,
    conc_fast: Ewma,
    conc_slow: Ewma,
    arrivals: Rate,
    latency_fast: Ewma,
}

/// Default time constant of the scaler's fast signals.
pub const FAST: Duration = Duration::from_secs(2);
/// Default time constant of the scaler's slow signal.
pub const SLOW: Duration = Duration::from_secs(30);

/// What a series looks like at one tick (milliseconds and per-second figures).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SeriesView {
    /// Requests finished since the gateway started.
    pub requests: u64,
    /// Of those, failed.
    pub errors: u64,
    /// Requests per second.
    pub rate: f64,
    /// Failed requests per second.
    pub error_rate: f64,
    /// Mean request time, ms (`None` before the first request).
    pub latency_ms: Option<f64>,
    /// Peak-sensitive request time, ms.
    pub peak_latency_ms: Option<f64>,
    /// Mean backend time per request, ms: the cost of a request.
    pub cost_ms: Option<f64>,
    /// Mean requests in flight, measured as a time integral.
    pub concurrency: f64,
    /// `rate x latency`: Little's law, computed, to compare with `concurrency`.
    pub littles_law: f64,
    /// Requests in flight at the tick.
    pub in_flight: i64,
    /// Highest rate seen while latency was acceptable.
    pub max_sustained_rate: f64,
    /// For the scaler: concurrency (time integral, or the in-flight count when higher)
    /// averaged over the fast time constant.
    pub concurrency_fast: f64,
    /// The same over the slow one.
    pub concurrency_slow: f64,
    /// Requests arriving (started) per second over the fast time constant.
    pub arrival_rate: f64,
    /// Mean request time over the fast time constant, ms.
    pub latency_fast_ms: Option<f64>,
}

impl Series {
    /// A series whose counters read `first` at `now`.
    pub fn new(first: Reading, now: Instant, p: &ModelParams) -> Self {
        Self {
            last: first,
            at: now,
            latency: Ewma::new(p.decay),
            peak_latency: PeakEwma::new(p.decay),
            cost: Ewma::new(p.decay),
            rate: Rate::new(p.decay, now),
            error_rate: Rate::new(p.decay, now),
            concurrency: Ewma::new(p.decay),
            max_ok_rate: 0.0,
            in_flight: first.in_flight,
            conc_fast: Ewma::new(p.fast),
            conc_slow: Ewma::new(p.slow),
            arrivals: Rate::new(p.fast, now),
            latency_fast: Ewma::new(p.fast),
        }
    }

    /// Take the reading `r` at `now`.
    pub fn update(&mut self, r: Reading, now: Instant, p: &ModelParams) {
        let dt = now.saturating_duration_since(self.at);
        if dt.is_zero() {
            return;
        }
        // Counters only grow; a smaller reading means they were replaced: start over from it.
        let n = r.requests.saturating_sub(self.last.requests);
        let errors = r.errors.saturating_sub(self.last.errors);
        let lat_us = r.latency_us.saturating_sub(self.last.latency_us);
        let cost_us = r.cost_us.saturating_sub(self.last.cost_us);
        self.rate.update(n as f64, now);
        self.error_rate.update(errors as f64, now);
        // Started = finished + in flight; arrivals are its growth.
        let started =
            (r.requests as i64 + r.in_flight) - (self.last.requests as i64 + self.last.in_flight);
        self.arrivals.update(started.max(0) as f64, now);
        // Requests still running count too: a slow backend holds them before they finish.
        let integral = lat_us as f64 / 1e6 / dt.as_secs_f64();
        let demand = integral.max(r.in_flight as f64);
        self.conc_fast.observe(demand, now);
        self.conc_slow.observe(demand, now);
        if n > 0 {
            let mean_ms = lat_us as f64 / n as f64 / 1000.0;
            self.latency.observe(mean_ms, now);
            self.peak_latency.observe(mean_ms, now);
            self.latency_fast.observe(mean_ms, now);
            if cost_us > 0 {
                self.cost.observe(cost_us as f64 / n as f64 / 1000.0, now);
            }
        }
        self.concurrency
            .observe(lat_us as f64 / 1e6 / dt.as_secs_f64(), now);
        let ok_ms = p.acceptable_latency.as_secs_f64() * 1000.0;
        if self.latency.get().is_some_and(|l| l <= ok_ms) {
            self.max_ok_rate = self.max_ok_rate.max(self.rate.get());
        }
        self.in_flight = r.in_flight;
        self.last = r;
        self.at = now;
    }

    /// The series as figures.
    pub fn view(&self) -> SeriesView {
        let latency = self.latency.get();
        SeriesView {
            requests: self.last.requests,
            errors: self.last.errors,
            rate: round(self.rate.get()),
            error_rate: round(self.error_rate.get()),
            latency_ms: latency.map(round),
            peak_latency_ms: self.peak_latency.get().map(round),
            cost_ms: self.cost.get().map(round),
            concurrency: round(self.concurrency.get().unwrap_or(0.0)),
            littles_law: round(self.rate.get() * latency.unwrap_or(0.0) / 1000.0),
            in_flight: self.in_flight,
            max_sustained_rate: round(self.max_ok_rate),
            concurrency_fast: round(self.conc_fast.get().unwrap_or(0.0)),
            concurrency_slow: round(self.conc_slow.get().unwrap_or(0.0)),
            arrival_rate: round(self.arrivals.get()),
            latency_fast_ms: self.latency_fast.get().map(round),
        }
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ModelParams {
        ModelParams {
            decay: Duration::from_secs(10),
            acceptable_latency: Duration::from_millis(100),
            fast: FAST,
            slow: SLOW,
        }
    }

    fn reading(
        requests: u64,
        errors: u64,
        latency_ms: u64,
        cost_ms: u64,
        in_flight: i64,
    ) -> Reading {
        Reading {
            requests,
            errors,
            latency_us: latency_ms * 1000,
            cost_us: cost_ms * 1000,
            in_flight,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn steady_load_gives_hand_computed_figures() {
        // 100 req/s at 20 ms each (18 ms of it on the backend): L = 100 x 0.02 = 2.
        let p = params();
        let t0 = Instant::now();
        let mut s = Series::new(Reading::default(), t0, &p);
        for i in 1..=20u64 {
            tokio::time::advance(Duration::from_secs(1)).await;
            s.update(
                reading(100 * i, 0, 2000 * i, 1800 * i, 2),
                Instant::now(),
                &p,
            );
        }
        let v = s.view();
        assert_eq!(v.requests, 2000);
        assert_eq!(v.rate, 100.0);
        assert_eq!(v.latency_ms, Some(20.0));
        assert_eq!(v.peak_latency_ms, Some(20.0));
        assert_eq!(v.cost_ms, Some(18.0));
        assert_eq!(v.concurrency, 2.0);
        assert_eq!(v.littles_law, 2.0);
        assert_eq!(v.in_flight, 2);
        assert_eq!(v.max_sustained_rate, 100.0);
        assert_eq!(v.error_rate, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_interval_moves_peak_at_once_and_the_mean_by_its_weight() {
        let p = params();
        let t0 = Instant::now();
        let mut s = Series::new(Reading::default(), t0, &p);
        tokio::time::advance(Duration::from_secs(1)).await;
        s.update(reading(10, 0, 100, 100, 0), Instant::now(), &p); // 10 ms each
        tokio::time::advance(Duration::from_secs(1)).await;
        s.update(reading(20, 5, 100 + 1000, 1100, 0), Instant::now(), &p); // 100 ms each
        let v = s.view();
        assert_eq!(v.peak_latency_ms, Some(100.0));
        // keep = e^-0.1 = 0.904837418; 10 x 0.9048 + 100 x 0.0952 = 18.565
        let keep = (-0.1f64).exp();
        assert_eq!(
            v.latency_ms,
            Some(round(10.0 * keep + 100.0 * (1.0 - keep)))
        );
        assert_eq!(v.latency_ms, Some(18.565));
        // Error rate: first interval 0/s, then 5/s weighted by 1 - keep.
        assert_eq!(v.error_rate, round(5.0 * (1.0 - keep)));
        assert_eq!(v.errors, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_counts_only_rates_at_acceptable_latency() {
        let p = ModelParams {
            decay: Duration::from_millis(1),
            acceptable_latency: Duration::from_millis(50),
            fast: FAST,
            slow: SLOW,
        };
        let t0 = Instant::now();
        let mut s = Series::new(Reading::default(), t0, &p);
        // 200 req/s at 10 ms: acceptable.
        tokio::time::advance(Duration::from_secs(1)).await;
        s.update(reading(200, 0, 2000, 2000, 2), Instant::now(), &p);
        // 400 req/s at 200 ms: overloaded, not capacity.
        tokio::time::advance(Duration::from_secs(1)).await;
        s.update(
            reading(600, 0, 2000 + 80_000, 82_000, 80),
            Instant::now(),
            &p,
        );
        let v = s.view();
        assert_eq!(v.rate, 400.0);
        assert_eq!(v.max_sustained_rate, 200.0);
        assert_eq!(v.concurrency, 80.0);
        assert_eq!(v.littles_law, 80.0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_series_decays_and_a_replaced_counter_does_not_go_negative() {
        let p = params();
        let t0 = Instant::now();
        let mut s = Series::new(Reading::default(), t0, &p);
        tokio::time::advance(Duration::from_secs(1)).await;
        s.update(reading(100, 0, 1000, 0, 0), Instant::now(), &p);
        tokio::time::advance(Duration::from_secs(10)).await;
        s.update(reading(100, 0, 1000, 0, 0), Instant::now(), &p);
        assert_eq!(s.view().rate, round(100.0 * (-1f64).exp()));
        assert_eq!(s.view().cost_ms, None);
        tokio::time::advance(Duration::from_secs(1)).await;
        s.update(reading(3, 0, 30, 0, 0), Instant::now(), &p);
        assert_eq!(s.view().requests, 3);
        assert!(s.view().rate >= 0.0);
    }
}
