//! A deterministic load simulator for comparing scaling policies on the same traces, with no
//! IO and no clock: each policy sees the signals a real gateway would measure, once per tick,
//! and its decisions change the replicas of a modelled app.
//!
//! The app: each ready replica serves up to `capacity` requests per second at `base` latency;
//! latency grows as utilisation approaches 1 (`base * (1 + 0.5 rho^2 / (1 - rho))`), and load
//! beyond capacity queues. Concurrency follows Little's law. A new replica is ready `startup`
//! after it was asked for. Noise, when a trace has it, comes from a fixed-seed generator, so
//! every run of a trace is the same.

use super::policy::{self, Params, Replicas, Signals, State, Target};
use crate::cost::ewma::Ewma;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// A load trace.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Name in the report.
    pub name: &'static str,
    /// Length.
    pub length: Duration,
    /// Offered requests per second at `t` seconds.
    pub rate: fn(f64) -> f64,
    /// Backend latency at low load, ms, at `t` seconds (a rise at flat rate is a downstream
    /// bottleneck).
    pub base_ms: fn(f64) -> f64,
    /// Relative noise on the rate (0.15 = +-15%).
    pub noise: f64,
    /// When the load changes, for the reaction time (seconds).
    pub step_at: Option<f64>,
}

/// The modelled app.
#[derive(Debug, Clone, Copy)]
pub struct App {
    /// Requests per second one replica serves at most.
    pub capacity: f64,
    /// Time from asking for a replica to its being ready.
    pub startup: Duration,
    /// Replicas at the start.
    pub initial: u32,
}

/// A scaling policy under test.
pub trait Scaler {
    /// Name in the report.
    fn name(&self) -> &'static str;
    /// How often it decides.
    fn period(&self) -> Duration;
    /// The replicas it wants, given the signals and the replicas now.
    fn decide(&mut self, s: &Signals, r: Replicas, now: Instant) -> u32;
}

/// How a policy did on a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Policy.
    pub policy: &'static str,
    /// Trace.
    pub trace: &'static str,
    /// Seconds from the load change to the first scale-up decision (`None`: none).
    pub reaction_s: Option<f64>,
    /// Concurrency above what the ready replicas carry at target, integrated over time.
    pub over_capacity: f64,
    /// Replica-seconds used (the bill).
    pub replica_seconds: f64,
    /// Changes of direction in the desired replica count.
    pub reversals: u32,
    /// Most replicas asked for.
    pub peak_replicas: u32,
    /// Replicas asked for at the end.
    pub final_replicas: u32,
}

/// Our policy, as a [`Scaler`].
pub struct Ours {
    /// The app's target.
    pub target: Target,
    /// Parameters.
    pub params: Params,
    state: State,
}

impl Ours {
    /// Our policy for `target`, starting at `now`.
    pub fn new(target: Target, params: Params, now: Instant) -> Self {
        Self {
            target,
            params,
            state: State::new(now),
        }
    }
}

impl Scaler for Ours {
    fn name(&self) -> &'static str {
        "nextgate"
    }
    fn period(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn decide(&mut self, s: &Signals, r: Replicas, now: Instant) -> u32 {
        policy::decide(&self.target, &self.params, &mut self.state, s, r, now).replicas
    }
}

/// Fixed-seed noise in [-1, 1].
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
}

/// Run `scaler` over `trace` against `app`, with `target` concurrency per replica used to count
/// over-capacity. Simulated in 100 ms steps.
pub fn run(trace: &Trace, app: &App, target: f64, scaler: &mut dyn Scaler) -> Outcome {
    let dt = Duration::from_millis(100);
    let t0 = Instant::now();
    let mut noise = Noise(0x5eed);
    let mut ready = app.initial;
    let mut starting: VecDeque<Instant> = VecDeque::new();
    let mut backlog = 0.0f64;
    let mut conc_fast = Ewma::new(Duration::from_secs(2));
    let mut conc_slow = Ewma::new(Duration::from_secs(30));
    let mut rate_fast = Ewma::new(Duration::from_secs(2));
    let mut lat_fast = Ewma::new(Duration::from_secs(2));
    let mut desired = app.initial;
    let mut last_dir = 0i32;
    let mut out = Outcome {
        policy: scaler.name(),
        trace: trace.name,
        reaction_s: None,
        over_capacity: 0.0,
        replica_seconds: 0.0,
        reversals: 0,
        peak_replicas: app.initial,
        final_replicas: app.initial,
    };
    let before_step = app.initial;
    let mut next_decision = Duration::ZERO;
    let mut noisy_rate = (trace.rate)(0.0);
    let steps = (trace.length.as_millis() / dt.as_millis()) as u64;
    for i in 0..steps {
        let elapsed = dt * i as u32;
        let now = t0 + elapsed;
        let t = elapsed.as_secs_f64();
        // New replicas become ready.
        while starting
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= app.startup)
        {
            starting.pop_front();
            ready += 1;
        }
        // Noise changes once a second.
        if i % 10 == 0 {
            noisy_rate = ((trace.rate)(t) * (1.0 + trace.noise * noise.next())).max(0.0);
        }
        let lambda = noisy_rate;
        let base = (trace.base_ms)(t) / 1000.0;
        let cap = f64::from(ready) * app.capacity;
        let rho = if cap > 0.0 {
            (lambda / cap).min(0.98)
        } else {
            1.0
        };
        let served = lambda.min(cap);
        backlog = (backlog + (lambda - served) * dt.as_secs_f64()).max(0.0);
        if cap > 0.0 && lambda < cap {
            backlog = (backlog - (cap - lambda) * dt.as_secs_f64()).max(0.0);
        }
        let w = base * (1.0 + 0.5 * rho * rho / (1.0 - rho))
            + if cap > 0.0 { backlog / cap } else { 0.0 };
        let concurrency = served * w + backlog;
        conc_fast.observe(concurrency, now);
        conc_slow.observe(concurrency, now);
        rate_fast.observe(lambda, now);
        lat_fast.observe(w * 1000.0, now);
        out.over_capacity += (concurrency - f64::from(ready) * target).max(0.0) * dt.as_secs_f64();
        out.replica_seconds += f64::from(ready + starting.len() as u32) * dt.as_secs_f64();

        if elapsed >= next_decision {
            next_decision += scaler.period();
            let signals = Signals {
                concurrency_fast: conc_fast.get().unwrap_or(0.0),
                concurrency_slow: conc_slow.get().unwrap_or(0.0),
                rate_fast: rate_fast.get().unwrap_or(0.0),
                latency_ms: lat_fast.get(),
                waiting: if ready == 0 && lambda > 0.0 { 1 } else { 0 },
            };
            let r = Replicas {
                ready,
                starting: starting.len() as u32,
            };
            let want = scaler.decide(&signals, r, now);
            if want != desired {
                let dir = if want > desired { 1 } else { -1 };
                if last_dir != 0 && dir != last_dir {
                    out.reversals += 1;
                }
                last_dir = dir;
                if dir > 0 && out.reaction_s.is_none() {
                    if let Some(step) = trace.step_at {
                        if t >= step && want > before_step {
                            out.reaction_s = Some(t - step);
                        }
                    }
                }
                desired = want;
                out.peak_replicas = out.peak_replicas.max(want);
            }
            // Apply: start or stop replicas (starting ones go first).
            let have = ready + starting.len() as u32;
            if want > have {
                for _ in 0..want - have {
                    starting.push_back(now);
                }
            } else {
                let mut extra = have - want;
                while extra > 0 && starting.pop_back().is_some() {
                    extra -= 1;
                }
                ready -= extra.min(ready);
            }
        }
    }
    out.final_replicas = desired;
    out
}
