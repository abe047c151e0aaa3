//! nextgate, the NextDeveloper API Gateway: an edge proxy on Pingora with an app registry
//! and an event hub.
//!
//! # Layout
//! - [`config`]: the TOML file's structs, defaults and validation into [`config::Settings`].
//! - [`app`]: wiring; builds the proxy, admin and health-check services and runs the server.
//! - [`registry`]: registered apps, tokens ([`registry::token`]), input checks
//!   ([`registry::validate`]) and durable state ([`registry::store`]).
//! - [`upstream`]: an app's load-balanced backends, passive failure marks, the health check.
//! - [`balance`]: backend selection: peak-EWMA power of two choices, or round robin.
//! - [`cost`]: request counters (atomics) and the cost model's pure maths (EWMAs, route keys).
//! - [`proxy`]: the Pingora `ProxyHttp` that routes by app name ([`proxy::route`] is pure).
//! - [`admin`]: the registry's HTTP API on the admin listener.
//! - [`http_server`]: hyper handlers served on Pingora listeners.
//! - [`hub`]: the event hub: channels, publish, WebSocket and SSE subscribers, replay, tickets.
//! - [`scaler`]: the scaling policy (pure), a trace simulator and the KPA/HPA anchors.
//! - [`metrics`]: every Prometheus metric, read from the counters at scrape time.
//! - [`error`]: errors at the HTTP edge as status + JSON.

pub mod admin;
pub mod app;
pub mod balance;
pub mod config;
pub mod cost;
pub mod error;
pub mod http_server;
pub mod hub;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod scaler;
pub mod upstream;
