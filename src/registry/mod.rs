//! The app registry (the process manager): who is registered, with which backends and token.
//!
//! Readers (the proxy, the admin API) load an immutable snapshot from an `ArcSwap` without
//! locking. Writers are serialised by one async mutex, held across the durable store write on
//! purpose: a change is persisted first, then applied, so a reply of 2xx means it is on disk,
//! and no two writers can interleave their snapshots. The request path never touches it.

pub mod store;
pub mod token;
pub mod validate;

use crate::config::{RegistryMode, Settings};
use crate::cost::counters::AppStats;
use crate::upstream::{Target, Upstream};
use arc_swap::ArcSwap;
use pingora_load_balancing::HealthRegistry;
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::{AppRecord, RegistryStore, StoreError};
use token::TokenHash;
use validate::Endpoint;

/// How long one endpoint host name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Registry errors; the admin API maps each to a status and a JSON body.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Bad input in one field (400).
    #[error("{message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The token does not match the one bound to the name (403).
    #[error("token does not match the token registered for `{0}`")]
    TokenMismatch(String),
    /// Registration mode is `provisioned` and the name was not provisioned (403).
    #[error("`{0}` is not provisioned; registration is limited to names the admin created")]
    NotProvisioned(String),
    /// No such app (404).
    #[error("no app named `{0}`")]
    NotFound(String),
    /// The store failed; nothing changed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A registration request after parsing, before validation.
#[derive(Debug, Clone)]
pub struct Registration {
    /// App name.
    pub name: String,
    /// Endpoint URLs.
    pub endpoints: Vec<String>,
    /// App token.
    pub token: String,
    /// Backend selection; `None` keeps the app's current choice (or the configured default).
    pub balance: Option<crate::balance::Balance>,
    /// Scaling spec; `None` keeps the app's current one.
    pub scaling: Option<crate::scaler::spec::ScalingSpec>,
}

/// A registered (or provisioned) app: an immutable record plus its live upstream.
pub struct App {
    record: AppRecord,
    token: Option<TokenHash>,
    /// Load-balanced backends (shared across versions of the same app).
    pub upstream: Arc<Upstream>,
}

impl App {
    /// App name.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// The app's scaling spec, if it has one.
    pub fn scaling(&self) -> Option<&crate::scaler::spec::ScalingSpec> {
        self.record.scaling.as_ref()
    }

    /// Whether `token` is this app's token (constant time; false when none is bound).
    pub fn verify_token(&self, token: &str) -> bool {
        self.token.as_ref().is_some_and(|h| h.verify(token))
    }

    /// The public description: never the token.
    pub fn view(&self) -> AppView {
        let backends = self.upstream.backends();
        let mut list: Vec<BackendView> = backends
            .iter()
            .map(|b| BackendView {
                endpoint: crate::upstream::info(b).map_or_else(String::new, |i| i.endpoint.clone()),
                address: b.addr.to_string(),
                healthy: self.upstream.healthy(b),
            })
            .collect();
        // Registration order, and endpoints that did not resolve at startup still listed.
        let order = |e: &str| self.record.endpoints.iter().position(|x| x == e);
        list.sort_by_key(|b| order(&b.endpoint));
        for e in &self.record.endpoints {
            if !list.iter().any(|b| &b.endpoint == e) {
                list.push(BackendView {
                    endpoint: e.clone(),
                    address: String::new(),
                    healthy: false,
                });
            }
        }
        AppView {
            name: self.record.name.clone(),
            backends: list,
            token_bound: self.token.is_some(),
            provisioned: self.record.provisioned,
            registered_at: rfc3339(self.record.registered_at_ms),
            updated_at: rfc3339(self.record.updated_at_ms),
            balance: self.upstream.balance().as_str(),
            scaling: self.record.scaling.clone(),
        }
    }
}

/// JSON description of an app.
#[derive(Debug, Serialize)]
pub struct AppView {
    /// Name.
    pub name: String,
    /// Backends with health.
    pub backends: Vec<BackendView>,
    /// A token is bound.
    pub token_bound: bool,
    /// Created by the admin.
    pub provisioned: bool,
    /// First registration (RFC 3339).
    pub registered_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
    /// Backend selection in use.
    pub balance: &'static str,
    /// Scaling spec, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<crate::scaler::spec::ScalingSpec>,
}

/// JSON description of a backend.
#[derive(Debug, Serialize)]
pub struct BackendView {
    /// Endpoint URL.
    pub endpoint: String,
    /// Resolved address (empty if it did not resolve).
    pub address: String,
    /// Passing active health checks.
    pub healthy: bool,
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type AppMap = HashMap<String, Arc<App>>;

/// The registry.
pub struct Registry {
    apps: ArcSwap<AppMap>,
    write: tokio::sync::Mutex<()>,
    store: Arc<dyn RegistryStore>,
    health: Arc<HealthRegistry>,
    mode: RegistryMode,
    min_token_length: usize,
    max_endpoints: usize,
    balance: crate::balance::Balance,
    p2c: crate::balance::P2cParams,
    max_routes: usize,
    changes: [std::sync::atomic::AtomicU64; 4],
}

/// Kinds of registry change, as counted by [`Registry::changes`].
pub const CHANGES: [&str; 4] = ["register", "provision", "token", "deregister"];

async fn resolve(ep: &Endpoint) -> Result<SocketAddr, String> {
    if let Ok(ip) = ep.host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, ep.port));
    }
    let lookup = tokio::net::lookup_host((ep.host.as_str(), ep.port));
    match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Ok(Ok(mut addrs)) => addrs
            .next()
            .ok_or_else(|| format!("`{}` resolves to no address", ep.host)),
        Ok(Err(e)) => Err(format!("cannot resolve `{}`: {e}", ep.host)),
        Err(_) => Err(format!("resolving `{}` timed out", ep.host)),
    }
}

/// Resolve endpoints into targets; an error names the endpoint, duplicates by address fail.
async fn targets(endpoints: &[Endpoint]) -> Result<Vec<Target>, RegistryError> {
    let mut out: Vec<Target> = Vec::with_capacity(endpoints.len());
    for ep in endpoints {
        let addr = resolve(ep)
            .await
            .map_err(|message| RegistryError::Invalid {
                field: "endpoint",
                message,
            })?;
        if let Some(prev) = out.iter().find(|t| t.addr == addr) {
            return Err(RegistryError::Invalid {
                field: "endpoint",
                message: format!(
                    "`{}` and `{}` are the same backend {addr}",
                    prev.endpoint, ep.url
                ),
            });
        }
        out.push(Target {
            endpoint: ep.url.clone(),
            addr,
            tls: ep.tls,
            sni: ep.host.clone(),
        });
    }
    Ok(out)
}

fn p2c_params(settings: &Settings) -> crate::balance::P2cParams {
    crate::balance::P2cParams {
        decay: settings.balance_decay,
    }
}

impl Registry {
    /// Open the registry: load every stored app and build its upstream. A corrupt store is an
    /// error. Endpoints whose host no longer resolves are logged and left out of the set.
    pub async fn open(
        store: Arc<dyn RegistryStore>,
        health: Arc<HealthRegistry>,
        settings: &Settings,
    ) -> Result<Self, StoreError> {
        let records = store.load().await?;
        let mut map = AppMap::with_capacity(records.len());
        for record in records {
            let token = match &record.token_hash {
                Some(s) => Some(TokenHash::decode(s).ok_or_else(|| StoreError::Corrupt {
                    path: "registry".into(),
                    reason: format!("app `{}` has an unreadable token hash", record.name),
                })?),
                None => None,
            };
            let balance = record.balance.unwrap_or(settings.balance);
            let upstream = Arc::new(Upstream::new(
                &health,
                balance,
                p2c_params(settings),
                Arc::new(AppStats::new(settings.model.max_routes)),
            ));
            let mut set = Vec::new();
            for raw in &record.endpoints {
                let resolved = match validate::endpoint(raw) {
                    Ok(ep) => targets(std::slice::from_ref(&ep))
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match resolved {
                    Ok(mut t) => set.append(&mut t),
                    Err(error) => {
                        tracing::warn!(app = %record.name, endpoint = %raw, %error, "endpoint left out")
                    }
                }
            }
            upstream.set_targets(&set).await;
            let name = record.name.clone();
            map.insert(
                name,
                Arc::new(App {
                    record,
                    token,
                    upstream,
                }),
            );
        }
        Ok(Self {
            apps: ArcSwap::from_pointee(map),
            write: tokio::sync::Mutex::new(()),
            store,
            health,
            mode: settings.registry_mode,
            min_token_length: settings.min_token_length,
            max_endpoints: settings.max_endpoints,
            balance: settings.balance,
            p2c: p2c_params(settings),
            max_routes: settings.model.max_routes,
            changes: Default::default(),
        })
    }

    /// The app called `name`, lock-free.
    pub fn get(&self, name: &str) -> Option<Arc<App>> {
        self.apps.load().get(name).cloned()
    }

    /// Every app, sorted by name.
    pub fn list(&self) -> Vec<Arc<App>> {
        let mut v: Vec<_> = self.apps.load().values().cloned().collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    /// Acknowledged changes so far, by kind (in the order of [`CHANGES`]).
    pub fn changes(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.changes[i].load(std::sync::atomic::Ordering::Relaxed))
    }

    fn changed(&self, kind: usize) {
        self.changes[kind].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Number of apps.
    pub fn len(&self) -> usize {
        self.apps.load().len()
    }

    /// No apps.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write `next` to the store durably. Caller holds the write lock.
    async fn persist(&self, next: &AppMap) -> Result<(), RegistryError> {
        let mut records: Vec<AppRecord> = next.values().map(|a| a.record.clone()).collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        self.store.save(records).await?;
        Ok(())
    }

    /// Self-registration: create the app (binding its token) or update its endpoints (token must
    /// match). Returns the app and whether it was created.
    pub async fn register(&self, reg: Registration) -> Result<(Arc<App>, bool), RegistryError> {
        validate::name(&reg.name)?;
        validate::token(&reg.token, self.min_token_length)?;
        if let Some(spec) = &reg.scaling {
            spec.validate().map_err(|e| RegistryError::Invalid {
                field: e.field,
                message: e.message,
            })?;
        }
        let given = !reg.endpoints.iter().all(|e| e.trim().is_empty());
        let targets = if given {
            Some(targets(&validate::endpoints(&reg.endpoints, self.max_endpoints)?).await?)
        } else {
            None
        };

        let _guard = self.write.lock().await;
        let current = self.apps.load_full();
        let existing = current.get(&reg.name);
        // A scaled app may come without endpoints: its replicas are its backends, and the
        // endpoints it has (if any) are kept. Its spec may be the operator's, already on the
        // record.
        let scaled = reg.scaling.is_some() || existing.is_some_and(|a| a.scaling().is_some());
        if targets.is_none() && !scaled {
            return Err(RegistryError::Invalid {
                field: "endpoint",
                message: "`endpoint` is required".into(),
            });
        }
        let now = now_ms();
        let (token, registered_at_ms, provisioned, created) = match existing {
            Some(app) => {
                let token = match &app.token {
                    Some(h) if h.verify(&reg.token) => h.clone(),
                    Some(_) => return Err(RegistryError::TokenMismatch(reg.name)),
                    None => TokenHash::new(&reg.token),
                };
                // A provisioned name without endpoints becomes "registered" on first registration.
                let first = app.record.endpoints.is_empty() && app.record.provisioned;
                (
                    token,
                    app.record.registered_at_ms,
                    app.record.provisioned,
                    first,
                )
            }
            None if self.mode == RegistryMode::Provisioned => {
                return Err(RegistryError::NotProvisioned(reg.name))
            }
            None => (TokenHash::new(&reg.token), now, false, true),
        };
        let record = AppRecord {
            name: reg.name.clone(),
            endpoints: match (&targets, existing) {
                (Some(t), _) => t.iter().map(|t| t.endpoint.clone()).collect(),
                (None, Some(app)) => app.record.endpoints.clone(),
                (None, None) => Vec::new(),
            },
            token_hash: Some(token.encode()),
            provisioned,
            registered_at_ms,
            updated_at_ms: now,
            balance: reg.balance.or(existing.and_then(|a| a.record.balance)),
            scaling: reg
                .scaling
                .clone()
                .or_else(|| existing.and_then(|a| a.record.scaling.clone())),
            // A spec brought by an (admin) registration replaces the file's until the next
            // restart, and is no longer the file's to remove.
            declared: reg.scaling.is_none() && existing.is_some_and(|a| a.record.declared),
        };
        let backends = record.endpoints.len();
        let app = self
            .replace(&current, record, Some(token), targets.as_deref())
            .await?;
        self.changed(0);
        tracing::info!(app = %app.name(), backends, created, "app registered");
        Ok((app, created))
    }

    /// Admin: create or update a provisioned name, optionally binding a token and endpoints.
    pub async fn provision(
        &self,
        name: &str,
        token: Option<&str>,
        endpoints: Option<&[String]>,
    ) -> Result<(Arc<App>, bool), RegistryError> {
        validate::name(name)?;
        if let Some(t) = token {
            validate::token(t, self.min_token_length)?;
        }
        let targets = match endpoints {
            Some(list) => Some(targets(&validate::endpoints(list, self.max_endpoints)?).await?),
            None => None,
        };
        let _guard = self.write.lock().await;
        let current = self.apps.load_full();
        let existing = current.get(name);
        let now = now_ms();
        let token_hash = match (token, existing) {
            (Some(t), _) => Some(TokenHash::new(t)),
            (None, Some(app)) => app.token.clone(),
            (None, None) => None,
        };
        let record = AppRecord {
            name: name.to_string(),
            endpoints: match (&targets, existing) {
                (Some(t), _) => t.iter().map(|t| t.endpoint.clone()).collect(),
                (None, Some(app)) => app.record.endpoints.clone(),
                (None, None) => Vec::new(),
            },
            token_hash: token_hash.as_ref().map(TokenHash::encode),
            provisioned: true,
            registered_at_ms: existing.map_or(now, |a| a.record.registered_at_ms),
            updated_at_ms: now,
            balance: existing.and_then(|a| a.record.balance),
            scaling: existing.and_then(|a| a.record.scaling.clone()),
            declared: existing.is_some_and(|a| a.record.declared),
        };
        let created = existing.is_none();
        let app = self
            .replace(&current, record, token_hash, targets.as_deref())
            .await?;
        self.changed(1);
        tracing::info!(app = %name, created, token_set = token.is_some(), "app provisioned");
        Ok((app, created))
    }

    /// The config file's `[scaling.{app}]` specs at startup: each applied with
    /// [`Registry::declare_scaling`], and a spec that came from a table no longer in the file
    /// removed from its app. Returns the apps that lost their spec (their leftover replicas are
    /// the scaler's to remove).
    pub async fn apply_declared(
        &self,
        specs: &std::collections::BTreeMap<String, crate::scaler::spec::ScalingSpec>,
    ) -> Result<Vec<String>, (String, RegistryError)> {
        for (name, spec) in specs {
            self.declare_scaling(name, spec)
                .await
                .map_err(|e| (name.clone(), e))?;
        }
        let stale: Vec<String> = self
            .list()
            .iter()
            .filter(|a| a.record.declared && !specs.contains_key(a.name()))
            .map(|a| a.name().to_string())
            .collect();
        for name in &stale {
            self.undeclare_scaling(name)
                .await
                .map_err(|e| (name.clone(), e))?;
        }
        Ok(stale)
    }

    /// Remove a spec that came from the config file (its table is gone); the app stays.
    async fn undeclare_scaling(&self, name: &str) -> Result<(), RegistryError> {
        let _guard = self.write.lock().await;
        let current = self.apps.load_full();
        let Some(app) = current.get(name) else {
            return Ok(());
        };
        let mut record = app.record.clone();
        record.scaling = None;
        record.declared = false;
        record.updated_at_ms = now_ms();
        self.replace(&current, record, app.token.clone(), None)
            .await?;
        self.changed(1);
        tracing::info!(app = %name, "scaling spec no longer in the config file: removed");
        Ok(())
    }

    /// The operator's scaling spec for `name` (from the config file): the app is created as a
    /// provisioned name if it does not exist, and its spec replaced if it differs. Endpoints,
    /// token and balance are kept. Returns whether anything changed.
    pub async fn declare_scaling(
        &self,
        name: &str,
        spec: &crate::scaler::spec::ScalingSpec,
    ) -> Result<bool, RegistryError> {
        validate::name(name)?;
        spec.validate().map_err(|e| RegistryError::Invalid {
            field: e.field,
            message: e.message,
        })?;
        let _guard = self.write.lock().await;
        let current = self.apps.load_full();
        let existing = current.get(name);
        if existing.is_some_and(|a| a.record.declared && a.record.scaling.as_ref() == Some(spec)) {
            return Ok(false);
        }
        let now = now_ms();
        let record = AppRecord {
            name: name.to_string(),
            endpoints: existing.map_or_else(Vec::new, |a| a.record.endpoints.clone()),
            token_hash: existing.and_then(|a| a.record.token_hash.clone()),
            provisioned: existing.is_none_or(|a| a.record.provisioned),
            registered_at_ms: existing.map_or(now, |a| a.record.registered_at_ms),
            updated_at_ms: now,
            balance: existing.and_then(|a| a.record.balance),
            scaling: Some(spec.clone()),
            declared: true,
        };
        let token = existing.and_then(|a| a.token.clone());
        self.replace(&current, record, token, None).await?;
        self.changed(1);
        tracing::info!(app = %name, created = existing.is_none(), "scaling spec from the config file applied");
        Ok(true)
    }

    /// Admin: bind a new token to an existing app.
    pub async fn rebind_token(&self, name: &str, token: &str) -> Result<Arc<App>, RegistryError> {
        validate::token(token, self.min_token_length)?;
        let _guard = self.write.lock().await;
        let current = self.apps.load_full();
        let app = current
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        let hash = TokenHash::new(token);
        let mut record = app.record.clone();
        record.token_hash = Some(hash.encode());
        record.updated_at_ms = now_ms();
        let app = self.replace(&current, record, Some(hash), None).await?;
        self.changed(2);
        tracing::info!(app = %name, "token re-bound");
        Ok(app)
    }

    /// Remove an app. Requests in flight to it finish; new ones get 404.
    pub async fn deregister(&self, name: &str) -> Result<(), RegistryError> {
        let _guard = self.write.lock().await;
        let current = self.apps.load_full();
        if !current.contains_key(name) {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        let mut next = (*current).clone();
        next.remove(name);
        self.persist(&next).await?;
        self.apps.store(Arc::new(next));
        self.changed(3);
        tracing::info!(app = %name, "app deregistered");
        Ok(())
    }

    /// Build the new version of an app, persist the map with it, then switch its backends and
    /// publish. `targets: None` keeps the current backends. Caller holds the write lock.
    async fn replace(
        &self,
        current: &AppMap,
        record: AppRecord,
        token: Option<TokenHash>,
        targets: Option<&[Target]>,
    ) -> Result<Arc<App>, RegistryError> {
        let balance = record.balance.unwrap_or(self.balance);
        let existing = current.get(&record.name).map(|a| a.upstream.clone());
        // The balancer is kept across versions unless the app chose another algorithm; a new
        // one keeps the app's counters and gets the current backends.
        let (upstream, carry) = match existing {
            Some(u) if u.balance() == balance => (u, None),
            Some(u) => (
                Arc::new(Upstream::new(
                    &self.health,
                    balance,
                    self.p2c,
                    u.stats.clone(),
                )),
                Some(u.parts().await),
            ),
            None => (
                Arc::new(Upstream::new(
                    &self.health,
                    balance,
                    self.p2c,
                    Arc::new(AppStats::new(self.max_routes)),
                )),
                None,
            ),
        };
        let app = Arc::new(App {
            record,
            token,
            upstream,
        });
        let mut next = current.clone();
        next.insert(app.record.name.clone(), app.clone());
        self.persist(&next).await?;
        if let Some((registered, managed)) = &carry {
            app.upstream.set_managed(managed).await;
            if targets.is_none() {
                app.upstream.set_targets(registered).await;
            }
        }
        if let Some(t) = targets {
            app.upstream.set_targets(t).await;
        }
        self.apps.store(Arc::new(next));
        Ok(app)
    }
}
