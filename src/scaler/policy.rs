//! The scaling policy: a pure function of the app's load signals, its replicas and `now`,
//! returning how many replicas it should have and why. No IO, no clock: the scaler loop feeds
//! it once per tick (about a second) and at once when a request reaches an app at zero.
//!
//! The rules, in order:
//! 1. **Demand** is in-flight concurrency (the cost model's time integral), averaged with a
//!    fast time constant (2 s) and a slow one (30 s, about a minute's window). Replicas
//!    wanted = concurrency / effective target per replica, rounded up. Replicas still
//!    starting count as capacity.
//! 2. **Use the cost.** The policy keeps a baseline: rate per replica and latency at the last
//!    healthy tick (capacity covered the concurrency, latency within the objective). Latency
//!    half as much again as the baseline at a rate per replica that did not rise means the
//!    time is spent downstream: adding replicas would not help, so it does not scale up for
//!    it. Latency over the objective while capacity covers the concurrency and the rate per
//!    replica did rise means the app saturates below its declared target: the effective
//!    target is lowered (at most 10% per tick, never below a quarter of the declared one) and
//!    recovers once latency is back.
//! 3. **React fast.** The fast signal above the current capacity by more than the tolerance
//!    scales up at once, to what the fast signal asks for.
//! 4. **Stay steady.** Scale-down follows the highest recommendation seen over the
//!    stabilisation window, where a recommendation keeps the slow signal inside the tolerance
//!    band (a level the fast signal would not leave at once); it waits `down_delay` after any
//!    scale-up and removes at most half the replicas per step.
//! 5. **Scale to zero** after `idle_to_zero` without requests when the spec allows it (min 0);
//!    a request that finds no replica asks for one at once.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// What an app declared about scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Fewest replicas (0 allows scale to zero).
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// Requests in flight one replica should carry.
    pub concurrency: f64,
    /// Latency objective, if any.
    pub latency: Option<Duration>,
    /// Idle time after which an app with `min == 0` goes to zero.
    pub idle_to_zero: Option<Duration>,
}

/// Policy parameters (the same for every app).
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Band around the current capacity inside which the fast signal changes nothing.
    pub tolerance: f64,
    /// Scale-down looks at the highest recommendation over this window.
    pub stabilisation: Duration,
    /// No scale-down this soon after a scale-up.
    pub down_delay: Duration,
    /// Lowest effective target, as a fraction of the declared one.
    pub min_target_fraction: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            tolerance: 0.1,
            stabilisation: Duration::from_secs(60),
            down_delay: Duration::from_secs(30),
            min_target_fraction: 0.25,
        }
    }
}

/// The app's load at one tick, from the cost model.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signals {
    /// Mean requests in flight over the fast window.
    pub concurrency_fast: f64,
    /// Mean requests in flight over the slow window.
    pub concurrency_slow: f64,
    /// Requests per second over the fast window.
    pub rate_fast: f64,
    /// Mean latency over the fast window, ms (`None`: no request finished).
    pub latency_ms: Option<f64>,
    /// Requests held because the app has no ready replica.
    pub waiting: u32,
}

/// Replicas as the driver sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replicas {
    /// Serving.
    pub ready: u32,
    /// Created, not yet ready (counted as capacity).
    pub starting: u32,
}

impl Replicas {
    /// Ready plus starting.
    pub fn capacity(&self) -> u32 {
        self.ready + self.starting
    }
}

/// Why the policy chose what it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Demand is within the tolerance of capacity.
    Steady,
    /// The fast signal is over capacity.
    ScaleUp,
    /// A request found no replica.
    ColdStart,
    /// The stabilised recommendation is under capacity.
    ScaleDown,
    /// Scale-down is due but a scale-up was too recent.
    DownDelayed,
    /// Latency rose at a flat rate per replica: a downstream bottleneck.
    Bottleneck,
    /// Idle long enough to go to zero.
    Idle,
    /// Held at the spec's bounds.
    Bounds,
}

impl Reason {
    /// Label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::ScaleUp => "scale_up",
            Self::ColdStart => "cold_start",
            Self::ScaleDown => "scale_down",
            Self::DownDelayed => "down_delayed",
            Self::Bottleneck => "downstream_bottleneck",
            Self::Idle => "idle",
            Self::Bounds => "bounds",
        }
    }
}

/// A decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Replicas wanted (ready + starting).
    pub replicas: u32,
    /// Why.
    pub reason: Reason,
}

/// What the policy remembers about one app between ticks.
#[derive(Debug, Clone)]
pub struct State {
    recommendations: VecDeque<(Instant, u32)>,
    last_up: Option<Instant>,
    last_request: Instant,
    /// Effective target as a fraction of the declared one.
    target_fraction: f64,
    /// Rate per replica and latency (ms) at the last tick that was healthy: capacity covered
    /// the concurrency and latency was within the objective.
    baseline: Option<(f64, f64)>,
}

impl State {
    /// A fresh state at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            recommendations: VecDeque::new(),
            last_up: None,
            last_request: now,
            target_fraction: 1.0,
            baseline: None,
        }
    }

    /// The effective target per replica.
    pub fn effective_target(&self, t: &Target) -> f64 {
        t.concurrency * self.target_fraction
    }
}

/// Signals under this count as no load.
const IDLE: f64 = 0.01;

fn wanted(concurrency: f64, per_replica: f64) -> u32 {
    if concurrency <= IDLE {
        return 0;
    }
    (concurrency / per_replica.max(1e-9) - 1e-9).ceil().max(1.0) as u32
}

/// Decide for one app. `state` is updated (history, cool-downs, effective target).
pub fn decide(
    t: &Target,
    p: &Params,
    state: &mut State,
    s: &Signals,
    r: Replicas,
    now: Instant,
) -> Decision {
    let current = r.capacity();
    let clamp = |n: u32| n.clamp(t.min, t.max.max(t.min));
    // Averages decay towards zero without reaching it: under a hundredth is idle.
    if s.concurrency_fast > IDLE || s.rate_fast > IDLE || s.waiting > 0 {
        state.last_request = now;
    }

    // Cold start: a request is waiting and nothing will serve it.
    if s.waiting > 0 && current == 0 {
        let n = clamp(wanted(s.concurrency_fast.max(s.waiting as f64), t.concurrency).max(1));
        return up(state, now, n, Reason::ColdStart);
    }

    // Use the cost: adjust the effective target from latency against the objective. Only
    // while capacity covers the concurrency: latency from being short of replicas is what
    // scaling up on concurrency already answers.
    let rate_per_replica = s.rate_fast / f64::from(r.ready.max(1));
    let covered =
        s.concurrency_fast <= f64::from(current) * state.effective_target(t) * (1.0 + p.tolerance);
    let within_objective = match (t.latency, s.latency_ms) {
        (Some(objective), Some(lat)) => lat <= objective.as_secs_f64() * 1000.0,
        _ => true,
    };
    let baseline = state.baseline;
    // Latency rose (half as much again as when healthy) at a rate per replica that did not:
    // the time is spent downstream, and replicas would not buy it back.
    let bottleneck = match (baseline, s.latency_ms) {
        (Some((rate0, lat0)), Some(lat)) => lat > lat0 * 1.5 && rate_per_replica <= rate0 * 1.1,
        _ => false,
    };
    if let (Some(objective), Some(lat)) = (t.latency, s.latency_ms) {
        let obj_ms = objective.as_secs_f64() * 1000.0;
        if within_objective {
            // Recover towards the declared target, a tenth of the way per tick.
            state.target_fraction =
                (state.target_fraction + (1.0 - state.target_fraction) * 0.1).min(1.0);
        } else if covered && !bottleneck {
            // Over the objective with capacity covering the concurrency and the rate per
            // replica up: the app saturates below its target. At most 10% lower per tick.
            let rate0 = baseline.map_or(0.0, |(r, _)| r);
            if rate_per_replica > rate0 * 1.1 {
                state.target_fraction =
                    (state.target_fraction * (obj_ms / lat).max(0.9)).max(p.min_target_fraction);
            }
        }
    }
    if covered && within_objective {
        if let Some(lat) = s.latency_ms {
            state.baseline = Some((rate_per_replica, lat));
        }
    }
    let per = state.effective_target(t);
    let fast = wanted(s.concurrency_fast, per);

    // Scale-down history. A recommendation is what keeps demand inside the tolerance band
    // (so the fast signal would not scale straight back up): the slow signal's, or the fast
    // one's as far as the current capacity covers it.
    let comfortable = per * (1.0 - p.tolerance);
    let slow_down = wanted(s.concurrency_slow, comfortable);
    let fast_down = wanted(s.concurrency_fast, comfortable);
    state
        .recommendations
        .push_back((now, slow_down.max(fast_down.min(current))));
    while let Some((at, _)) = state.recommendations.front() {
        if now.saturating_duration_since(*at) > p.stabilisation {
            state.recommendations.pop_front();
        } else {
            break;
        }
    }

    // React fast.
    let capacity = f64::from(current) * per;
    if s.concurrency_fast > capacity * (1.0 + p.tolerance) && fast > current {
        if bottleneck {
            return Decision {
                replicas: clamp(current),
                reason: Reason::Bottleneck,
            };
        }
        let n = clamp(fast);
        if n == current {
            return Decision {
                replicas: n,
                reason: Reason::Bounds,
            };
        }
        return up(state, now, n, Reason::ScaleUp);
    }

    // Idle: to zero when allowed.
    if let Some(idle) = t.idle_to_zero {
        if t.min == 0 && current > 0 && now.saturating_duration_since(state.last_request) >= idle {
            return Decision {
                replicas: 0,
                reason: Reason::Idle,
            };
        }
    }

    // Stay steady: scale down from the highest recommendation of the window.
    let highest = state
        .recommendations
        .iter()
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(current)
        .max(1);
    if highest < current {
        if state
            .last_up
            .is_some_and(|at| now.saturating_duration_since(at) < p.down_delay)
        {
            return Decision {
                replicas: current,
                reason: Reason::DownDelayed,
            };
        }
        let floor = current - current / 2;
        let n = clamp(highest.max(floor));
        if n < current {
            return Decision {
                replicas: n,
                reason: Reason::ScaleDown,
            };
        }
    }
    let n = clamp(current);
    Decision {
        replicas: n,
        reason: if n == current {
            Reason::Steady
        } else {
            Reason::Bounds
        },
    }
}

fn up(state: &mut State, now: Instant, n: u32, reason: Reason) -> Decision {
    state.last_up = Some(now);
    Decision {
        replicas: n,
        reason,
    }
}
