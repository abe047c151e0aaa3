//! Time-decayed moving averages: pure maths of samples and `now`, no IO and no clock reads.
//!
//! The decay is a time constant in seconds, not a per-sample factor: a sample `dt` after the
//! previous one gets the weight `1 - exp(-dt / decay)`, so the average means the same thing at
//! ten requests a second and at ten thousand. Time comes from `tokio::time::Instant`, so tests
//! pause and advance it.

use std::time::Duration;
use tokio::time::Instant;

/// Weight kept by the old value after `dt` under time constant `decay`.
fn keep(dt: Duration, decay: Duration) -> f64 {
    debug_assert!(!decay.is_zero(), "decay must be positive");
    let d = decay.as_secs_f64().max(f64::MIN_POSITIVE);
    (-dt.as_secs_f64() / d).exp()
}

/// An exponentially weighted moving average of samples.
#[derive(Debug, Clone, Copy)]
pub struct Ewma {
    decay: Duration,
    value: f64,
    at: Option<Instant>,
}

impl Ewma {
    /// An average with time constant `decay` and no sample yet.
    pub fn new(decay: Duration) -> Self {
        debug_assert!(!decay.is_zero(), "decay must be positive");
        Self {
            decay,
            value: 0.0,
            at: None,
        }
    }

    /// Add `sample` taken at `now`. The first sample is the value.
    pub fn observe(&mut self, sample: f64, now: Instant) {
        debug_assert!(sample.is_finite(), "sample must be finite");
        self.value = match self.at {
            None => sample,
            Some(at) => {
                let w = keep(now.saturating_duration_since(at), self.decay);
                self.value * w + sample * (1.0 - w)
            }
        };
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
    }

    /// The average, or `None` before the first sample.
    pub fn get(&self) -> Option<f64> {
        self.at.map(|_| self.value)
    }
}

/// A peak-sensitive average: a sample above the value replaces it at once, lower samples
/// decay it like [`Ewma`]. A backend that turns slow is seen as slow by the next request.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    inner: Ewma,
}

impl PeakEwma {
    /// A peak average with time constant `decay` and no sample yet.
    pub fn new(decay: Duration) -> Self {
        Self {
            inner: Ewma::new(decay),
        }
    }

    /// Add `sample` taken at `now`.
    pub fn observe(&mut self, sample: f64, now: Instant) {
        match self.inner.get() {
            Some(v) if sample > v => {
                self.inner.value = sample;
                self.inner.at = Some(now);
            }
            _ => self.inner.observe(sample, now),
        }
    }

    /// The value, or `None` before the first sample.
    pub fn get(&self) -> Option<f64> {
        self.inner.get()
    }
}

/// A rate of events per second, smoothed over time: fed the events counted since the last
/// update, it averages the interval rates with weights that depend on the interval length.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    decay: Duration,
    value: f64,
    at: Instant,
    started: bool,
    pending: f64,
}

impl Rate {
    /// A rate that starts counting at `now`.
    pub fn new(decay: Duration, now: Instant) -> Self {
        debug_assert!(!decay.is_zero(), "decay must be positive");
        Self {
            decay,
            value: 0.0,
            at: now,
            started: false,
            pending: 0.0,
        }
    }

    /// `events` happened since the last update; the interval ends at `now`. An empty interval
    /// (no time passed) changes nothing but carries its events to the next one.
    pub fn update(&mut self, events: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at);
        if dt.is_zero() {
            self.pending += events;
            return false;
        }
        let inst = (events + std::mem::take(&mut self.pending)) / dt.as_secs_f64();
        if self.started {
            let w = keep(dt, self.decay);
            self.value = self.value * w + inst * (1.0 - w);
        } else {
            // The first interval stands for the past: an app that starts busy is busy.
            self.value = inst;
            self.started = true;
        }
        self.at = now;
        true
    }

    /// Events per second (0 before the first interval).
    pub fn get(&self) -> f64 {
        self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    #[tokio::test(start_paused = true)]
    async fn ewma_weights_by_elapsed_time() {
        let t0 = Instant::now();
        let mut e = Ewma::new(Duration::from_secs(10));
        assert_eq!(e.get(), None);
        e.observe(100.0, t0);
        assert_eq!(e.get(), Some(100.0));
        tokio::time::advance(Duration::from_secs(10)).await;
        e.observe(200.0, Instant::now());
        // keep = e^-1 = 0.36787944117; 100 * 0.3679 + 200 * 0.6321
        let want = 100.0 * (-1f64).exp() + 200.0 * (1.0 - (-1f64).exp());
        assert!(
            close(e.get().unwrap_or(0.0), want),
            "{:?} != {want}",
            e.get()
        );
        assert!(close(want, 163.212_055_882_855_77));
    }

    #[tokio::test(start_paused = true)]
    async fn ewma_samples_at_the_same_instant_do_not_move_it() {
        let t0 = Instant::now();
        let mut e = Ewma::new(Duration::from_secs(1));
        e.observe(5.0, t0);
        e.observe(1000.0, t0);
        assert_eq!(e.get(), Some(5.0));
    }

    #[tokio::test(start_paused = true)]
    async fn peak_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut p = PeakEwma::new(Duration::from_secs(5));
        p.observe(10.0, t0);
        tokio::time::advance(Duration::from_millis(1)).await;
        p.observe(500.0, Instant::now());
        assert_eq!(p.get(), Some(500.0));
        tokio::time::advance(Duration::from_secs(5)).await;
        p.observe(10.0, Instant::now());
        let want = 500.0 * (-1f64).exp() + 10.0 * (1.0 - (-1f64).exp());
        assert!(close(p.get().unwrap_or(0.0), want));
        assert!(close(want, 190.260_926_174_006_76));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_counts_events_per_second_and_decays_when_idle() {
        let mut r = Rate::new(Duration::from_secs(2), Instant::now());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(r.update(50.0, Instant::now()));
        assert!(close(r.get(), 100.0));
        // Two seconds of silence: keep = e^-1.
        tokio::time::advance(Duration::from_secs(2)).await;
        r.update(0.0, Instant::now());
        assert!(close(r.get(), 100.0 * (-1f64).exp()));
        assert!(close(r.get(), 36.787_944_117_144_23));
        // No time passed: nothing changes, and the events count in the next interval.
        assert!(!r.update(10.0, Instant::now()));
        assert!(close(r.get(), 36.787_944_117_144_23));
        tokio::time::advance(Duration::from_secs(2)).await;
        r.update(0.0, Instant::now());
        let want = 36.787_944_117_144_23 * (-1f64).exp() + 5.0 * (1.0 - (-1f64).exp());
        assert!(close(r.get(), want));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_is_independent_of_update_spacing() {
        // 1000 events/s steady, updated every 100 ms or every second: same value.
        let t0 = Instant::now();
        let mut fine = Rate::new(Duration::from_secs(1), t0);
        let mut coarse = Rate::new(Duration::from_secs(1), t0);
        for i in 1..=30u64 {
            fine.update(100.0, t0 + Duration::from_millis(100 * i));
            if i % 10 == 0 {
                coarse.update(1000.0, t0 + Duration::from_millis(100 * i));
            }
        }
        assert!(close(fine.get(), 1000.0));
        assert!(close(coarse.get(), 1000.0));
    }
}
