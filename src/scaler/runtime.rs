//! Where replicas run: the [`ContainerRuntime`] trait and its Docker Engine implementation
//! (bollard). Containers the gateway starts carry the label `nextgate.app={app}`, so a restarted
//! gateway adopts its own containers and never touches anybody else's.

use super::spec::ScalingSpec;
use async_trait::async_trait;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::Docker;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Label naming the app a container belongs to.
pub const APP_LABEL: &str = "nextgate.app";

/// One replica as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Container id.
    pub id: String,
    /// Where the gateway reaches it (the published loopback port), if published.
    pub addr: Option<SocketAddr>,
    /// Running (not created, exited or dead).
    pub running: bool,
}

/// A runtime failure.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine cannot be reached.
    #[error("docker engine unreachable: {0}")]
    Unreachable(String),
    /// The engine refused or failed the call.
    #[error("docker engine: {0}")]
    Engine(String),
}

fn engine(e: bollard::errors::Error) -> RuntimeError {
    use bollard::errors::Error as E;
    match e {
        E::SocketNotFoundError(_) | E::HyperResponseError { .. } | E::IOError { .. } => {
            RuntimeError::Unreachable(e.to_string())
        }
        other => RuntimeError::Engine(other.to_string()),
    }
}

/// Runs an app's replicas.
#[async_trait]
pub trait ContainerRuntime: Send + Sync {
    /// Every container of `app` (running or not).
    async fn list(&self, app: &str) -> Result<Vec<Replica>, RuntimeError>;
    /// Create and start one replica of `app`; its port is published on loopback.
    async fn start(&self, app: &str, spec: &ScalingSpec) -> Result<Replica, RuntimeError>;
    /// Stop (SIGTERM, then SIGKILL after `grace`) and remove a replica.
    async fn remove(&self, id: &str, grace: Duration) -> Result<(), RuntimeError>;
}

/// The local Docker engine.
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// Connect with the local defaults (`DOCKER_HOST` or the Unix socket) and negotiate the API
    /// version with the engine.
    pub async fn connect() -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_local_defaults().map_err(engine)?;
        let docker = docker.negotiate_version().await.map_err(engine)?;
        Ok(Self { docker })
    }
}

impl DockerRuntime {
    /// Containers (running or not) matching one filter.
    async fn containers(
        &self,
        key: &str,
        value: String,
    ) -> Result<Vec<bollard::models::ContainerSummary>, RuntimeError> {
        let filters: HashMap<&str, Vec<String>> = HashMap::from([(key, vec![value])]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        self.docker
            .list_containers(Some(opts))
            .await
            .map_err(engine)
    }
}

fn published(c: &bollard::models::ContainerSummary, port: Option<u16>) -> Option<SocketAddr> {
    c.ports.as_ref()?.iter().find_map(|p| {
        let public = p.public_port?;
        if port.is_some_and(|want| want != p.private_port) {
            return None;
        }
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, public)))
    })
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn list(&self, app: &str) -> Result<Vec<Replica>, RuntimeError> {
        let list = self
            .containers("label", format!("{APP_LABEL}={app}"))
            .await?;
        Ok(list
            .iter()
            .filter_map(|c| {
                Some(Replica {
                    id: c.id.clone()?,
                    addr: published(c, None),
                    running: c
                        .state
                        .is_some_and(|s| s == bollard::models::ContainerSummaryStateEnum::RUNNING),
                })
            })
            .collect())
    }

    async fn start(&self, app: &str, spec: &ScalingSpec) -> Result<Replica, RuntimeError> {
        let port_key = format!("{}/tcp", spec.port);
        let body = ContainerCreateBody {
            image: spec.image.clone(),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(HashMap::from([(APP_LABEL.to_string(), app.to_string())])),
            exposed_ports: Some(vec![port_key.clone()]),
            host_config: Some(HostConfig {
                port_bindings: Some(HashMap::from([(
                    port_key,
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".into()),
                        host_port: Some(String::new()),
                    }]),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!(
            "nextgate-{app}-{}",
            hex::encode(crate::registry::token::random_bytes::<4>())
        );
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = self
            .docker
            .create_container(Some(opts), body)
            .await
            .map_err(engine)?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove(&created.id, Duration::ZERO).await;
            return Err(engine(e));
        }
        let list = self.containers("id", created.id.clone()).await?;
        let addr = list.first().and_then(|c| published(c, Some(spec.port)));
        Ok(Replica {
            id: created.id,
            addr,
            running: true,
        })
    }

    async fn remove(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let secs = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let stop = StopContainerOptionsBuilder::default().t(secs).build();
        // Already stopped is fine; removal is what matters.
        let _ = self.docker.stop_container(id, Some(stop)).await;
        let opts = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(engine(e)),
        }
    }
}

/// Whether `addr` answers: a TCP connect, or with `path` an HTTP GET answered 2xx.
pub async fn probe(addr: SocketAddr, path: Option<&str>, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let Some(path) = path else {
            return Some(true);
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut head = [0u8; 16];
        let n = s.read(&mut head).await.ok()?;
        let line = std::str::from_utf8(&head[..n]).ok()?;
        Some(line.starts_with("HTTP/1.") && line.get(9..10) == Some("2"))
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// A Docker Swarm service whose replica count the scaler sets. Its running tasks are reached
/// directly on this node's `docker_gwbridge` network, so the service must publish its port
/// (any published port: that is what attaches its tasks there) and run on this node.
#[async_trait]
pub trait ServiceRuntime: Send + Sync {
    /// The replica count the service asks for now.
    async fn replicas(&self, service: &str) -> Result<u32, RuntimeError>;
    /// Set the replica count (the whole spec goes back with the version read).
    async fn set_replicas(&self, service: &str, replicas: u32) -> Result<(), RuntimeError>;
    /// The service's running tasks, each with its address for `port`.
    async fn tasks(&self, service: &str, port: u16) -> Result<Vec<Replica>, RuntimeError>;
}

/// The bridge network through which a node reaches its Swarm tasks.
const GWBRIDGE: &str = "docker_gwbridge";

#[async_trait]
impl ServiceRuntime for DockerRuntime {
    async fn replicas(&self, service: &str) -> Result<u32, RuntimeError> {
        let s = self
            .docker
            .inspect_service(service, None)
            .await
            .map_err(engine)?;
        let n = s
            .spec
            .and_then(|spec| spec.mode)
            .and_then(|m| m.replicated)
            .and_then(|r| r.replicas)
            .ok_or_else(|| {
                RuntimeError::Engine(format!("service `{service}` is not replicated"))
            })?;
        Ok(u32::try_from(n.max(0)).unwrap_or(u32::MAX))
    }

    async fn set_replicas(&self, service: &str, replicas: u32) -> Result<(), RuntimeError> {
        let s = self
            .docker
            .inspect_service(service, None)
            .await
            .map_err(engine)?;
        let version = s
            .version
            .and_then(|v| v.index)
            .ok_or_else(|| RuntimeError::Engine(format!("service `{service}` has no version")))?;
        let mut spec = s
            .spec
            .ok_or_else(|| RuntimeError::Engine(format!("service `{service}` has no spec")))?;
        let mode = spec.mode.get_or_insert_with(Default::default);
        mode.replicated
            .get_or_insert_with(Default::default)
            .replicas = Some(i64::from(replicas));
        let opts = bollard::query_parameters::UpdateServiceOptionsBuilder::default()
            .version(i32::try_from(version).unwrap_or(i32::MAX))
            .build();
        self.docker
            .update_service(service, spec, opts, None)
            .await
            .map_err(engine)?;
        Ok(())
    }

    async fn tasks(&self, service: &str, port: u16) -> Result<Vec<Replica>, RuntimeError> {
        let filters: HashMap<&str, Vec<String>> = HashMap::from([
            ("service", vec![service.to_string()]),
            ("desired-state", vec!["running".to_string()]),
        ]);
        let opts = bollard::query_parameters::ListTasksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let tasks = self.docker.list_tasks(Some(opts)).await.map_err(engine)?;
        let bridge = self
            .docker
            .inspect_network(GWBRIDGE, None)
            .await
            .map_err(engine)?;
        // The bridge lists its endpoints by container id.
        let ips: HashMap<String, Ipv4Addr> = bridge
            .containers
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(id, e)| {
                let ip = e.ipv4_address?.split('/').next()?.parse().ok()?;
                Some((id, ip))
            })
            .collect();
        Ok(tasks
            .into_iter()
            .filter_map(|t| {
                let status = t.status?;
                let running = status.state == Some(bollard::models::TaskState::RUNNING);
                let container = status.container_status?.container_id?;
                let addr = ips.get(&container).map(|ip| SocketAddr::from((*ip, port)));
                Some(Replica {
                    id: t.id?,
                    addr,
                    running,
                })
            })
            .collect())
    }
}
