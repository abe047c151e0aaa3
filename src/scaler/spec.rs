//! What an app declares about its scaling, as given at registration and stored with the app.

use super::policy::Target;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Which driver runs the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    /// Containers on the local Docker engine.
    Docker,
    /// A Docker Swarm service's replica count.
    Swarm,
}

/// A scaling spec. Durations are humantime strings (`"200ms"`, `"5m"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingSpec {
    /// `docker` or `swarm`.
    pub driver: Driver,
    /// Image to run (`docker`), already present on the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Swarm service name (`swarm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Port the app listens on inside the container.
    pub port: u16,
    /// Environment for new containers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Fewest replicas; 0 allows scale to zero (with `idle_to_zero`).
    #[serde(default = "one")]
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// Requests in flight one replica should carry.
    #[serde(default = "ten")]
    pub target_concurrency: f64,
    /// Latency objective (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_objective: Option<String>,
    /// Idle time before scaling to zero (with `min: 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_to_zero: Option<String>,
    /// HTTP path probed for readiness (2xx); without it, a TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_path: Option<String>,
}

fn one() -> u32 {
    1
}

fn ten() -> f64 {
    10.0
}

/// Most replicas a spec may ask for.
pub const MAX_REPLICAS: u32 = 64;

/// A spec problem: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// Field, e.g. `scaling.max`.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

fn duration(field: &'static str, v: &Option<String>) -> Result<Option<Duration>, SpecError> {
    v.as_deref()
        .map(|s| {
            humantime::parse_duration(s.trim())
                .map_err(|e| err(field, format!("`{s}` is not a duration: {e}")))
        })
        .transpose()
}

impl ScalingSpec {
    /// Check every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), SpecError> {
        match self.driver {
            Driver::Docker => match self.image.as_deref() {
                None | Some("") => {
                    return Err(err("scaling.image", "the docker driver needs an image"))
                }
                Some(i) if i.len() > 256 || i.chars().any(|c| c.is_whitespace()) => {
                    return Err(err("scaling.image", "not an image reference"))
                }
                _ => {}
            },
            Driver::Swarm => match self.service.as_deref() {
                None | Some("") => {
                    return Err(err(
                        "scaling.service",
                        "the swarm driver needs a service name",
                    ))
                }
                Some(s)
                    if s.len() > 63
                        || s.chars().any(|c| {
                            !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                        }) =>
                {
                    return Err(err("scaling.service", "not a service name"))
                }
                _ => {}
            },
        }
        if self.port == 0 {
            return Err(err("scaling.port", "port must be 1-65535"));
        }
        if self.max == 0 || self.max > MAX_REPLICAS {
            return Err(err("scaling.max", format!("max must be 1-{MAX_REPLICAS}")));
        }
        if self.min > self.max {
            return Err(err("scaling.min", "min is larger than max"));
        }
        if !(self.target_concurrency.is_finite()
            && self.target_concurrency > 0.0
            && self.target_concurrency <= 10_000.0)
        {
            return Err(err(
                "scaling.target_concurrency",
                "target_concurrency must be a number above 0 and at most 10000",
            ));
        }
        duration("scaling.latency_objective", &self.latency_objective)?;
        let idle = duration("scaling.idle_to_zero", &self.idle_to_zero)?;
        if idle.is_some() && self.min > 0 {
            return Err(err("scaling.idle_to_zero", "idle_to_zero needs min: 0"));
        }
        for (k, v) in &self.env {
            if k.is_empty()
                || k.contains('=')
                || k.len() > 256
                || v.len() > 4096
                || v.contains('\0')
            {
                return Err(err("scaling.env", format!("bad environment entry `{k}`")));
            }
        }
        if self.env.len() > 64 {
            return Err(err("scaling.env", "at most 64 environment entries"));
        }
        if let Some(p) = &self.ready_path {
            if !p.starts_with('/')
                || p.len() > 256
                || p.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(err(
                    "scaling.ready_path",
                    "ready_path must be a path starting with /",
                ));
            }
        }
        Ok(())
    }

    /// The policy's view of the spec. Call after [`validate`](Self::validate).
    pub fn target(&self) -> Target {
        Target {
            min: self.min,
            max: self.max,
            concurrency: self.target_concurrency,
            latency: duration("", &self.latency_objective).ok().flatten(),
            idle_to_zero: duration("", &self.idle_to_zero).ok().flatten(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Result<ScalingSpec, String> {
        let s: ScalingSpec = serde_json::from_value(json).map_err(|e| e.to_string())?;
        s.validate().map_err(|e| e.field.to_string())?;
        Ok(s)
    }

    #[test]
    fn validation_table() {
        use serde_json::json;
        let ok = json!({"driver": "docker", "image": "app:1", "port": 8080, "max": 4});
        let s = spec(ok.clone()).expect("valid");
        assert_eq!((s.min, s.target_concurrency), (1, 10.0));
        let cases = [
            (
                json!({"driver": "docker", "port": 8080, "max": 4}),
                "scaling.image",
            ),
            (
                json!({"driver": "swarm", "port": 8080, "max": 4}),
                "scaling.service",
            ),
            (
                json!({"driver": "docker", "image": "a b", "port": 8080, "max": 4}),
                "scaling.image",
            ),
            (
                json!({"driver": "docker", "image": "a", "port": 0, "max": 4}),
                "scaling.port",
            ),
            (
                json!({"driver": "docker", "image": "a", "port": 80, "max": 0}),
                "scaling.max",
            ),
            (
                json!({"driver": "docker", "image": "a", "port": 80, "max": 65}),
                "scaling.max",
            ),
            (
                json!({"driver": "docker", "image": "a", "port": 80, "max": 2, "min": 3}),
                "scaling.min",
            ),
            (
                json!({"driver": "docker", "image": "a", "port": 80, "max": 2, "target_concurrency": 0}),
                "scaling.target_concurrency",
            ),
            (
                json!({"driver": "docker", "image": "a", "port": 80, "max": 2, "latency_objective": "soon"}),
                "scaling.latency_objective",
            ),
            (
                json!({"driver": "docker", "image": "a", "port": 80, "max": 2, "idle_to_zero": "5m"}),
                "scaling.idle_to_zero",
            ),
            (
                json!({"driver": "docker", "image": "a", "port": 80, "max": 2, "env": {"A=B": "x"}}),
                "scaling.env",
            ),
            (
                json!({"driver": "docker", "image": "a", "port": 80, "max": 2, "ready_path": "health"}),
                "scaling.ready_path",
            ),
        ];
        for (j, field) in cases {
            assert_eq!(spec(j.clone()).err().as_deref(), Some(field), "{j}");
        }
        let zero = json!({"driver": "docker", "image": "a", "port": 80, "max": 2, "min": 0, "idle_to_zero": "5m", "latency_objective": "200ms"});
        let t = spec(zero).expect("valid").target();
        assert_eq!(t.idle_to_zero, Some(Duration::from_secs(300)));
        assert_eq!(t.latency, Some(Duration::from_millis(200)));
        assert!(spec(json!({"driver": "k8s", "port": 1, "max": 1})).is_err());
        assert!(
            spec(json!({"driver": "docker", "image": "a", "port": 1, "max": 1, "colour": 1}))
                .is_err()
        );
    }
}
