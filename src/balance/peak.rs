//! A backend's peak-EWMA latency in one `AtomicU64`, updated with a compare-and-swap on every
//! response: no lock on the request path.
//!
//! The word holds the estimate in milliseconds as an `f32` (high half) and the time of the last
//! update in milliseconds since the gateway's clock origin (low half, 0 = never sampled; it
//! wraps after 49 days, which only makes one decay step wrong). A sample above the estimate
//! replaces it; a lower one pulls it down with the weight of the time since the last sample
//! under the time constant, and at least [`MIN_WEIGHT`]: on a busy backend, samples a
//! millisecond apart would otherwise leave one hiccup in the estimate for the whole time
//! constant (measured in `tests/balance.rs`: a 5 ms backend with a single 50 ms answer looked
//! slower than a 100 ms one for seconds). Between samples the estimate decays towards zero, so
//! a backend that was slow once gets tried again after a while.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Milliseconds from `then` to `now` on the wrapping clock; 0 when `then` is (just) after
/// `now`, as when another thread stored a newer stamp between our clock read and our load.
fn elapsed(then: u32, now: u32) -> f64 {
    f64::from((now.wrapping_sub(then) as i32).max(0))
}

/// Pure decay step: the estimate `value` (ms) updated at `then` (ms), seen at `now`.
pub fn decayed(value: f64, then: u32, now: u32, decay: Duration) -> f64 {
    let dt = elapsed(then, now) / 1000.0;
    value * (-dt / decay.as_secs_f64().max(1e-9)).exp()
}

/// Least weight of one lower sample: 32 fast answers take a spike down by e^-1.
pub const MIN_WEIGHT: f64 = 1.0 / 32.0;

/// Pure update step: a sample of `rtt_ms` at `now` against `value` updated at `then`.
pub fn observe(value: f64, then: u32, now: u32, rtt_ms: f64, decay: Duration) -> f64 {
    if then == 0 || rtt_ms >= value {
        return rtt_ms;
    }
    let dt = elapsed(then, now) / 1000.0;
    let keep = (-dt / decay.as_secs_f64().max(1e-9))
        .exp()
        .min(1.0 - MIN_WEIGHT);
    value * keep + rtt_ms * (1.0 - keep)
}

fn pack(value: f64, at: u32) -> u64 {
    (u64::from((value as f32).to_bits()) << 32) | u64::from(at)
}

fn unpack(word: u64) -> (f64, u32) {
    (f64::from(f32::from_bits((word >> 32) as u32)), word as u32)
}

/// The estimate of one backend.
#[derive(Debug, Default)]
pub struct PeakLatency {
    word: AtomicU64,
}

impl PeakLatency {
    /// Add a response time of `rtt_ms` seen at `now` (ms since the clock origin, never 0).
    pub fn observe(&self, rtt_ms: f64, now: u32, decay: Duration) {
        let now = now.max(1);
        let mut cur = self.word.load(Ordering::Relaxed);
        loop {
            let (value, then) = unpack(cur);
            let next = pack(observe(value, then, now, rtt_ms, decay), now);
            match self
                .word
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }

    /// The estimate at `now`, or `None` when the backend was never sampled.
    pub fn get(&self, now: u32, decay: Duration) -> Option<f64> {
        let (value, then) = unpack(self.word.load(Ordering::Relaxed));
        (then != 0).then(|| decayed(value, then, now, decay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(10);

    #[test]
    fn first_sample_and_peaks_replace_the_estimate() {
        let p = PeakLatency::default();
        assert_eq!(p.get(5, D), None);
        p.observe(20.0, 1000, D);
        assert_eq!(p.get(1000, D), Some(20.0));
        p.observe(300.0, 1001, D);
        assert_eq!(p.get(1001, D), Some(300.0));
    }

    #[test]
    fn lower_samples_decay_it_by_elapsed_time() {
        let p = PeakLatency::default();
        p.observe(100.0, 1000, D);
        // 10 s later a 10 ms sample: 100 e^-1 + 10 (1 - e^-1) = 43.10915
        p.observe(10.0, 11_000, D);
        let v = p.get(11_000, D).unwrap_or(0.0);
        assert!((v - 43.109_15).abs() < 1e-3, "{v}");
        // Without samples it keeps decaying: 20 s more is e^-2.
        let later = p.get(31_000, D).unwrap_or(0.0);
        assert!((later - v * (-2f64).exp()).abs() < 1e-3, "{later}");
    }

    #[test]
    fn a_stamp_from_just_after_now_does_not_decay_to_nothing() {
        let p = PeakLatency::default();
        p.observe(300.0, 5001, D);
        // Read with a `now` taken a millisecond before that store.
        assert_eq!(p.get(5000, D), Some(300.0));
    }

    #[test]
    fn one_fast_sample_moves_a_peak_by_the_least_weight_and_many_bring_it_down() {
        let p = PeakLatency::default();
        p.observe(1000.0, 1000, D); // a penalty
        p.observe(1.0, 1001, D); // 1 ms later, a fast answer
        let v = p.get(1001, D).unwrap_or(0.0);
        // 1000 x 31/32 + 1 x 1/32 = 968.78
        assert!((v - 968.781).abs() < 0.01, "{v}");
        for i in 2..=96u32 {
            p.observe(1.0, 1000 + i, D);
        }
        // 95 more: (31/32)^96 x 999 + 1 = 48.41
        let v = p.get(1096, D).unwrap_or(0.0);
        assert!((v - 48.41).abs() < 0.1, "{v}");
    }
}
