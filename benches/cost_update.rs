//! Per-request cost of the timing path: what the proxy does for every request to count it into
//! its app, route key and backend and to feed the balancer (goal: under 200 ns in all).
//!
//! Run: `cargo bench --bench cost_update`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use nextgate::balance::{clock_ms, peak::PeakLatency};
use nextgate::cost::counters::{AppStats, Counters, Sample};
use nextgate::cost::route_key;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let stats = AppStats::new(64);
    let backend = Counters::default();
    let peak = PeakLatency::default();
    let decay = Duration::from_secs(10);
    let sample = Sample {
        status: 200,
        total: Duration::from_micros(850),
        upstream: Some(Duration::from_micros(700)),
        connect: Some(Duration::from_micros(20)),
        first_byte: Some(Duration::from_micros(600)),
        bytes_out: 1024,
        ..Sample::default()
    };
    // Warm the route table, as a running gateway has it.
    stats.routes.get("GET", "/users/1/orders");

    c.bench_function("route_key::hash GET /users/{id}/orders", |b| {
        b.iter(|| route_key::hash(black_box("GET"), black_box("/users/12345/orders")))
    });
    c.bench_function(
        "request: begin + end on app, route, backend + peak ewma",
        |b| {
            b.iter(|| {
                let route = stats
                    .routes
                    .get(black_box("GET"), black_box("/users/12345/orders"));
                stats.counters.begin();
                route.counters.begin();
                backend.begin();
                stats.end(0, &route, black_box(&sample));
                backend.end(&sample);
                peak.observe(0.7, clock_ms(), decay);
            })
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
