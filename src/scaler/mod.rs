//! The scaler: decides from the cost model how many replicas an app needs.
//!
//! - [`policy`]: the decision, pure (signals, replicas, `now` in; replicas and a reason out).
//! - [`sim`]: a deterministic app-and-load simulator that runs policies on recorded traces.
//! - [`anchors`]: models of Knative's KPA and the Kubernetes HPA for comparison.
//! - [`spec`]: what an app declares (driver, image, bounds, target), validated.
//! - [`runtime`]: the [`runtime::ContainerRuntime`] trait and its Docker Engine implementation.
//! - [`controller`]: the loop: signals from the cost model, decisions, replicas started,
//!   probed, added to the app's backends, drained and removed.

pub mod anchors;
pub mod controller;
pub mod policy;
pub mod runtime;
pub mod sim;
pub mod spec;

#[cfg(test)]
mod tests {
    use super::anchors::{Hpa, Kpa};
    use super::policy::{self, Params, Reason, Replicas, Signals, State, Target};
    use super::sim::{self, App, Ours, Outcome, Trace};
    use std::time::Duration;
    use tokio::time::Instant;

    const TARGET: f64 = 4.0;

    fn target() -> Target {
        Target {
            min: 1,
            max: 20,
            concurrency: TARGET,
            latency: Some(Duration::from_millis(150)),
            idle_to_zero: None,
        }
    }

    fn app(initial: u32) -> App {
        App {
            capacity: 100.0,
            startup: Duration::from_secs(2),
            initial,
        }
    }

    fn traces() -> Vec<(Trace, u32)> {
        vec![
            (
                Trace {
                    name: "step 100 -> 500 req/s",
                    length: Duration::from_secs(300),
                    rate: |t| if t < 61.5 { 100.0 } else { 500.0 },
                    base_ms: |_| 50.0,
                    noise: 0.0,
                    step_at: Some(61.5),
                },
                2,
            ),
            (
                Trace {
                    name: "ramp 50 -> 800 req/s in 10 min",
                    length: Duration::from_secs(660),
                    rate: |t| 50.0 + 750.0 * (t / 600.0).min(1.0),
                    base_ms: |_| 50.0,
                    noise: 0.0,
                    step_at: Some(0.0),
                },
                1,
            ),
            (
                Trace {
                    name: "spike 100 -> 800 req/s for 20 s",
                    length: Duration::from_secs(360),
                    rate: |t| {
                        if (121.5..141.5).contains(&t) {
                            800.0
                        } else {
                            100.0
                        }
                    },
                    base_ms: |_| 50.0,
                    noise: 0.0,
                    step_at: Some(121.5),
                },
                2,
            ),
            (
                Trace {
                    name: "noisy steady at a boundary, 30 min",
                    length: Duration::from_secs(1800),
                    rate: |_| 230.0,
                    base_ms: |_| 50.0,
                    noise: 0.15,
                    step_at: None,
                },
                4,
            ),
            (
                Trace {
                    name: "slow downstream: 50 -> 250 ms at flat rate",
                    length: Duration::from_secs(360),
                    rate: |_| 150.0,
                    base_ms: |t| if t < 121.5 { 50.0 } else { 250.0 },
                    noise: 0.0,
                    step_at: Some(121.5),
                },
                3,
            ),
        ]
    }

    fn run_all() -> Vec<[Outcome; 3]> {
        traces()
            .into_iter()
            .map(|(trace, initial)| {
                let a = app(initial);
                let mut ours = Ours::new(target(), Params::default(), Instant::now());
                let mut kpa = Kpa::new(TARGET, 1, 20);
                let mut hpa = Hpa::new(TARGET, 1, 20);
                [
                    sim::run(&trace, &a, TARGET, &mut ours),
                    sim::run(&trace, &a, TARGET, &mut kpa),
                    sim::run(&trace, &a, TARGET, &mut hpa),
                ]
            })
            .collect()
    }

    fn table(rows: &[[Outcome; 3]]) -> String {
        let mut s = String::from(
            "| trace | policy | reaction s | over-capacity concurrency-s | replica-s | reversals | peak | final |\n|---|---|---|---|---|---|---|---|\n",
        );
        for row in rows {
            for o in row {
                s.push_str(&format!(
                    "| {} | {} | {} | {:.0} | {:.0} | {} | {} | {} |\n",
                    o.trace,
                    o.policy,
                    o.reaction_s.map_or("-".to_string(), |r| format!("{r:.1}")),
                    o.over_capacity,
                    o.replica_seconds,
                    o.reversals,
                    o.peak_replicas,
                    o.final_replicas
                ));
            }
        }
        s
    }

    #[tokio::test(start_paused = true)]
    async fn traces_against_kpa_and_hpa() {
        let rows = run_all();
        eprintln!("{}", table(&rows));
        let [step, ramp, spike, noisy, downstream] = &rows[..] else {
            panic!("five traces");
        };
        // React fast: within one tick of a step or a spike.
        for r in [step, spike] {
            let ours = &r[0];
            assert!(
                ours.reaction_s.is_some_and(|s| s <= 1.0),
                "{}: reaction {:?}",
                ours.trace,
                ours.reaction_s
            );
        }
        // Less demand left over capacity than either anchor on step, ramp and spike.
        for r in [step, ramp, spike] {
            let [ours, kpa, hpa] = r;
            assert!(
                ours.over_capacity <= kpa.over_capacity && ours.over_capacity <= hpa.over_capacity,
                "{}: ours {:.0}, KPA {:.0}, HPA {:.0}",
                ours.trace,
                ours.over_capacity,
                kpa.over_capacity,
                hpa.over_capacity
            );
        }
        // Stay steady: at most 2 direction changes in 30 minutes of noisy load at a boundary.
        assert!(noisy[0].reversals <= 2, "{:?}", noisy[0]);
        // A downstream bottleneck adds no replicas (the anchors add some).
        assert_eq!(downstream[0].peak_replicas, 3, "{:?}", downstream[0]);
        assert!(downstream[1].peak_replicas > 3 || downstream[2].peak_replicas > 3);
        // After the step and the spike, back down to what the load needs, not stuck high.
        assert!(spike[0].final_replicas <= 3, "{:?}", spike[0]);
    }

    /// `n` ready replicas, none starting.
    fn ready(n: u32) -> Replicas {
        Replicas {
            ready: n,
            starting: 0,
        }
    }

    fn signals(conc: f64, rate: f64, lat: f64) -> Signals {
        Signals {
            concurrency_fast: conc,
            concurrency_slow: conc,
            rate_fast: rate,
            latency_ms: Some(lat),
            waiting: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn decision_table() {
        let t = target();
        let p = Params::default();
        let r = |ready, starting| Replicas { ready, starting };
        let now = Instant::now();
        // (signals, replicas, expected replicas, reason)
        let cases = [
            (signals(8.0, 100.0, 60.0), r(2, 0), 2, Reason::Steady),
            (signals(8.6, 100.0, 60.0), r(2, 0), 2, Reason::Steady), // inside 10%
            (signals(12.0, 150.0, 60.0), r(2, 0), 3, Reason::ScaleUp),
            (signals(12.0, 150.0, 60.0), r(2, 1), 3, Reason::Steady), // starting counts
            (signals(200.0, 2000.0, 60.0), r(2, 0), 20, Reason::ScaleUp), // clamped to max
            (signals(0.0, 0.0, 60.0), r(0, 0), 1, Reason::Bounds),    // up to min
        ];
        for (i, (s, rep, want, reason)) in cases.into_iter().enumerate() {
            let mut st = State::new(now);
            let d = policy::decide(&t, &p, &mut st, &s, rep, now);
            assert_eq!((d.replicas, d.reason), (want, reason), "case {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn scale_down_waits_halves_and_follows_the_window() {
        let t = target();
        let p = Params::default();
        let mut st = State::new(Instant::now());
        // A burst the slow signal barely saw: up at once.
        let burst = Signals {
            concurrency_slow: 4.0,
            ..signals(40.0, 500.0, 60.0)
        };
        let d = policy::decide(&t, &p, &mut st, &burst, ready(2), Instant::now());
        assert_eq!((d.replicas, d.reason), (10, Reason::ScaleUp));
        // Gone 5 s later: a scale-up was too recent to scale down.
        tokio::time::advance(Duration::from_secs(5)).await;
        let quiet = signals(4.0, 50.0, 50.0);
        let d = policy::decide(&t, &p, &mut st, &quiet, ready(10), Instant::now());
        assert_eq!(d.reason, Reason::DownDelayed);
        // Past the delay: at most half removed per step.
        tokio::time::advance(Duration::from_secs(26)).await;
        let d = policy::decide(&t, &p, &mut st, &quiet, ready(10), Instant::now());
        assert_eq!((d.replicas, d.reason), (5, Reason::ScaleDown));
        tokio::time::advance(Duration::from_secs(1)).await;
        let d = policy::decide(&t, &p, &mut st, &quiet, ready(5), Instant::now());
        assert_eq!((d.replicas, d.reason), (3, Reason::ScaleDown));
        // 4 in flight at a target of 4: the band keeps 2 (4 / (4 x 0.9) -> 2), not 1.
        tokio::time::advance(Duration::from_secs(1)).await;
        let d = policy::decide(&t, &p, &mut st, &quiet, ready(3), Instant::now());
        assert_eq!((d.replicas, d.reason), (2, Reason::ScaleDown));
        tokio::time::advance(Duration::from_secs(1)).await;
        let d = policy::decide(&t, &p, &mut st, &quiet, ready(2), Instant::now());
        assert_eq!((d.replicas, d.reason), (2, Reason::Steady));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sustained_load_holds_its_replicas_for_the_window() {
        let t = target();
        let p = Params::default();
        let mut st = State::new(Instant::now());
        let busy = signals(36.0, 400.0, 60.0);
        let d = policy::decide(&t, &p, &mut st, &busy, ready(10), Instant::now());
        assert_eq!(d.reason, Reason::Steady);
        // The load drops; for the next 60 s the window remembers it.
        for _ in 0..60 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let d = policy::decide(
                &t,
                &p,
                &mut st,
                &signals(4.0, 50.0, 50.0),
                ready(10),
                Instant::now(),
            );
            assert_eq!(d.replicas, 10);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let d = policy::decide(
            &t,
            &p,
            &mut st,
            &signals(4.0, 50.0, 50.0),
            ready(10),
            Instant::now(),
        );
        assert_eq!((d.replicas, d.reason), (5, Reason::ScaleDown));
    }

    #[tokio::test(start_paused = true)]
    async fn cold_start_and_scale_to_zero() {
        let t = Target {
            min: 0,
            idle_to_zero: Some(Duration::from_secs(300)),
            ..target()
        };
        let p = Params::default();
        let mut st = State::new(Instant::now());
        let waiting = Signals {
            waiting: 3,
            ..Signals::default()
        };
        let d = policy::decide(
            &t,
            &p,
            &mut st,
            &waiting,
            Replicas::default(),
            Instant::now(),
        );
        assert_eq!((d.replicas, d.reason), (1, Reason::ColdStart));
        // Idle for less than the period: kept.
        tokio::time::advance(Duration::from_secs(299)).await;
        let d = policy::decide(
            &t,
            &p,
            &mut st,
            &Signals::default(),
            ready(1),
            Instant::now(),
        );
        assert_eq!(d.replicas, 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        let d = policy::decide(
            &t,
            &p,
            &mut st,
            &Signals::default(),
            ready(1),
            Instant::now(),
        );
        assert_eq!((d.replicas, d.reason), (0, Reason::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn latency_lowers_the_target_only_when_the_app_itself_saturates() {
        let t = target();
        let p = Params::default();
        let now = Instant::now();
        let rep = ready(2);
        // Healthy at 100 req/s per replica.
        let mut st = State::new(now);
        policy::decide(&t, &p, &mut st, &signals(8.0, 200.0, 60.0), rep, now);
        // Concurrency still within capacity (8 of 2 x 4), but latency over the objective while
        // the rate per replica rose 50%: the app saturates below its target. The target drops
        // (10% this tick) and one more replica is asked for.
        let d = policy::decide(&t, &p, &mut st, &signals(8.0, 300.0, 300.0), rep, now);
        assert_eq!((d.replicas, d.reason), (3, Reason::ScaleUp));
        assert!(
            (st.effective_target(&t) - 3.6).abs() < 1e-9,
            "{}",
            st.effective_target(&t)
        );
        // Same concurrency rise at a flat rate: downstream, no replicas added.
        let mut st = State::new(now);
        policy::decide(&t, &p, &mut st, &signals(8.0, 200.0, 60.0), rep, now);
        let d = policy::decide(&t, &p, &mut st, &signals(12.0, 200.0, 300.0), rep, now);
        assert_eq!((d.replicas, d.reason), (2, Reason::Bottleneck));
    }
}
