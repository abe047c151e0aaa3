//! The admin API on the admin listener: app registration (the process manager endpoint) and
//! registry management.
//!
//! | method | path | credential |
//! |---|---|---|
//! | POST | `/v3/events/processes/register` | the app token in the body |
//! | GET | `/v3/events/processes` | admin key |
//! | GET | `/v3/events/processes/{name}` | admin key or the app's token |
//! | PUT | `/v3/events/processes/{name}` | admin key (pre-provision) |
//! | DELETE | `/v3/events/processes/{name}` | admin key or the app's token |
//! | POST | `/v3/events/processes/{name}/token` | admin key (re-bind the token) |
//! | GET | `/healthz` | none |
//!
//! Credentials travel as `Authorization: Bearer ...`. Bodies are form-encoded or JSON, bounded
//! in size; unknown fields are refused.

use crate::balance::Balance;
use crate::cost::CostModel;
use crate::error::ApiError;
use crate::http_server::{bearer, Body, Handler};
use crate::metrics::Metrics;
use crate::registry::token::AdminKey;
use crate::registry::{validate, App, Registration, Registry};
use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::sync::Arc;

/// Path prefix of the registry API.
pub const PROCESSES: &str = "/v3/events/processes";

/// The admin API.
pub struct AdminApi {
    registry: Arc<Registry>,
    admin_key: AdminKey,
    max_body: usize,
    model: Option<Arc<CostModel>>,
    metrics: Option<(Arc<Metrics>, bool)>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EndpointField {
    One(String),
    Many(Vec<String>),
}

impl EndpointField {
    fn into_list(self) -> Vec<String> {
        match self {
            EndpointField::One(s) => validate::split_endpoints(&s),
            EndpointField::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterJson {
    name: Option<String>,
    endpoint: Option<EndpointField>,
    token: Option<String>,
    balance: Option<String>,
    scaling: Option<crate::scaler::spec::ScalingSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterForm {
    name: Option<String>,
    endpoint: Option<String>,
    token: Option<String>,
    balance: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionBody {
    token: Option<String>,
    endpoint: Option<EndpointField>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Form,
    Empty,
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn ok_json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(v) => json_response(status, Bytes::from(v)),
        Err(e) => error_json(&ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

/// An [`ApiError`] as a JSON response.
pub fn error_json(e: &ApiError) -> Response<Body> {
    json_response(e.status, e.body())
}

/// Turn a serde error into a field error: unknown and missing fields are named.
fn decode_error(e: impl std::fmt::Display) -> ApiError {
    let msg = e.to_string();
    let quoted = msg.split('`').nth(1).map(str::to_string);
    if msg.starts_with("unknown field") {
        let field = quoted.unwrap_or_else(|| "body".into());
        return ApiError::field(
            StatusCode::BAD_REQUEST,
            field.clone(),
            format!("unknown field `{field}`"),
        );
    }
    if msg.starts_with("duplicate field") {
        let field = quoted.unwrap_or_else(|| "body".into());
        return ApiError::field(
            StatusCode::BAD_REQUEST,
            field.clone(),
            format!("field `{field}` given twice"),
        );
    }
    if msg.contains("did not match any variant of untagged enum EndpointField") {
        return ApiError::field(
            StatusCode::BAD_REQUEST,
            "endpoint",
            "endpoint must be a string of comma-separated URLs or an array of URLs",
        );
    }
    ApiError::field(
        StatusCode::BAD_REQUEST,
        "body",
        format!("malformed body: {msg}"),
    )
}

fn required(v: Option<String>, field: &'static str) -> Result<String, ApiError> {
    match v {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            field,
            format!("`{field}` is required"),
        )),
    }
}

impl AdminApi {
    /// The admin API over `registry`, guarded by `admin_key`.
    pub fn new(registry: Arc<Registry>, admin_key: AdminKey, max_body: usize) -> Self {
        Self {
            registry,
            admin_key,
            max_body,
            model: None,
            metrics: None,
        }
    }

    /// Serve the cost model at `{name}/stats` and the metrics at `/metrics` (`public`: no key).
    pub fn with_observability(
        mut self,
        model: Arc<CostModel>,
        metrics: Arc<Metrics>,
        public: bool,
    ) -> Self {
        self.model = Some(model);
        self.metrics = Some((metrics, public));
        self
    }

    fn metrics(&self, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
        let Some((metrics, public)) = &self.metrics else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "metrics are not enabled",
            ));
        };
        if !public {
            self.require_admin(headers)?;
        }
        let mut resp = Response::new(Full::new(Bytes::from(metrics.render())).boxed_unsync());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        Ok(resp)
    }

    fn stats(&self, headers: &HeaderMap, name: &str) -> Result<Response<Body>, ApiError> {
        let app = self.require_admin_or_app(headers, name)?;
        let view = self.model.as_ref().and_then(|m| m.app(app.name()));
        match view {
            Some(v) => Ok(ok_json(StatusCode::OK, &*v)),
            // Registered since the last tick: nothing measured yet.
            None => Ok(ok_json(
                StatusCode::OK,
                &serde_json::json!({"app": app.name(), "requests": 0, "backends": [], "routes": []}),
            )),
        }
    }

    fn is_admin(&self, headers: &HeaderMap) -> bool {
        bearer(headers).is_some_and(|k| self.admin_key.verify(k))
    }

    fn require_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match bearer(headers) {
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "admin key required: send `Authorization: Bearer KEY`",
            )),
            Some(k) if self.admin_key.verify(k) => Ok(()),
            Some(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin key is not valid",
            )),
        }
    }

    /// Admin key, or the token of app `name`. The app must exist (404 otherwise, but only after
    /// a credential was shown, so names do not leak to anonymous callers).
    fn require_admin_or_app(&self, headers: &HeaderMap, name: &str) -> Result<Arc<App>, ApiError> {
        let Some(cred) = bearer(headers) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "credential required: send `Authorization: Bearer KEY-OR-APP-TOKEN`",
            ));
        };
        let app = self.registry.get(name);
        let allowed =
            self.admin_key.verify(cred) || app.as_ref().is_some_and(|a| a.verify_token(cred));
        match (allowed, app) {
            (true, Some(app)) => Ok(app),
            (true, None) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no app named `{name}`"),
            )),
            (false, _) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "credential is neither the admin key nor this app's token",
            )),
        }
    }

    fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
        let Some(ct) = headers.get(header::CONTENT_TYPE) else {
            return Ok(BodyKind::Empty);
        };
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        match essence {
            "application/json" => Ok(BodyKind::Json),
            "application/x-www-form-urlencoded" => Ok(BodyKind::Form),
            _ => Err(ApiError::field(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content-type",
                format!(
                    "unsupported content type `{essence}`: use application/json or application/x-www-form-urlencoded"
                ),
            )),
        }
    }

    async fn read_body(&self, req: Request<Incoming>) -> Result<(BodyKind, Bytes), ApiError> {
        let kind = Self::body_kind(req.headers())?;
        let too_large = || {
            ApiError::field(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body",
                format!("body is larger than {} bytes", self.max_body),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return Err(too_large());
        }
        let bytes = Limited::new(req.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    ApiError::field(
                        StatusCode::BAD_REQUEST,
                        "body",
                        format!("cannot read body: {e}"),
                    )
                }
            })?
            .to_bytes();
        if kind == BodyKind::Empty && !bytes.is_empty() {
            return Err(ApiError::field(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content-type",
                "a body needs a content type: application/json or application/x-www-form-urlencoded",
            ));
        }
        Ok((kind, bytes))
    }

    fn decode<J: DeserializeOwned, F: DeserializeOwned>(
        kind: BodyKind,
        bytes: &[u8],
    ) -> Result<Result<J, F>, ApiError> {
        match kind {
            BodyKind::Json => serde_json::from_slice(bytes).map(Ok).map_err(decode_error),
            BodyKind::Form => serde_urlencoded::from_bytes(bytes)
                .map(Err)
                .map_err(decode_error),
            BodyKind::Empty => serde_json::from_slice(b"{}").map(Ok).map_err(decode_error),
        }
    }

    async fn register(&self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let admin = self.is_admin(req.headers());
        let (kind, bytes) = self.read_body(req).await?;
        if kind == BodyKind::Empty {
            return Err(ApiError::field(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content-type",
                "registration needs a form-encoded or JSON body",
            ));
        }
        let (name, endpoint, token, balance, scaling) =
            match Self::decode::<RegisterJson, RegisterForm>(kind, &bytes)? {
                Ok(j) => (
                    j.name,
                    j.endpoint.map(EndpointField::into_list),
                    j.token,
                    j.balance,
                    j.scaling,
                ),
                Err(f) => (
                    f.name,
                    f.endpoint.map(|e| validate::split_endpoints(&e)),
                    f.token,
                    f.balance,
                    None,
                ),
            };
        // A scaling spec starts containers (or resizes a Swarm service): the admin's call.
        if scaling.is_some() && !admin {
            return Err(ApiError::field(
                StatusCode::FORBIDDEN,
                "scaling",
                "a scaling spec starts containers: send the admin key (`Authorization: Bearer KEY`)",
            ));
        }
        let balance = match balance.as_deref() {
            None | Some("") => None,
            Some(b) => Some(Balance::parse(b).ok_or_else(|| {
                ApiError::field(
                    StatusCode::BAD_REQUEST,
                    "balance",
                    "`balance` must be \"peak_ewma\" or \"round_robin\"",
                )
            })?),
        };
        let reg = Registration {
            name: required(name, "name")?,
            // Required unless the app is scaled (its replicas are its backends): the registry
            // knows, also for a spec declared in the config file.
            endpoints: endpoint.unwrap_or_default(),
            token: required(token, "token")?,
            balance,
            scaling,
        };
        let (app, created) = self.registry.register(reg).await?;
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let mut resp = ok_json(status, &app.view());
        if created {
            if let Ok(v) = header::HeaderValue::from_str(&format!("{PROCESSES}/{}", app.name())) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
        }
        Ok(resp)
    }

    async fn provision(
        &self,
        name: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        self.require_admin(req.headers())?;
        let (kind, bytes) = self.read_body(req).await?;
        let body = match Self::decode::<ProvisionBody, ProvisionBody>(kind, &bytes)? {
            Ok(b) | Err(b) => b,
        };
        let endpoints = body.endpoint.map(EndpointField::into_list);
        let (app, created) = self
            .registry
            .provision(name, body.token.as_deref(), endpoints.as_deref())
            .await?;
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(ok_json(status, &app.view()))
    }

    async fn rebind(&self, name: &str, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        self.require_admin(req.headers())?;
        let (kind, bytes) = self.read_body(req).await?;
        let body = match Self::decode::<TokenBody, TokenBody>(kind, &bytes)? {
            Ok(b) | Err(b) => b,
        };
        let token = required(body.token, "token")?;
        let app = self.registry.rebind_token(name, &token).await?;
        Ok(ok_json(StatusCode::OK, &app.view()))
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        if path == "/metrics" {
            return match method {
                Method::GET | Method::HEAD => self.metrics(req.headers()),
                _ => Err(method_not_allowed("GET")),
            };
        }
        if path == "/healthz" {
            return match method {
                Method::GET | Method::HEAD => Ok(ok_json(
                    StatusCode::OK,
                    &serde_json::json!({"status": "ok", "apps": self.registry.len()}),
                )),
                _ => Err(method_not_allowed("GET")),
            };
        }
        let Some(rest) = path.strip_prefix(PROCESSES) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no such endpoint `{path}`"),
            ));
        };
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        match (segments.as_slice(), &method) {
            ([], &Method::GET) => {
                self.require_admin(req.headers())?;
                let apps: Vec<_> = self.registry.list().iter().map(|a| a.view()).collect();
                Ok(ok_json(
                    StatusCode::OK,
                    &serde_json::json!({ "apps": apps }),
                ))
            }
            ([], _) => Err(method_not_allowed("GET")),
            (["register"], &Method::POST) => self.register(req).await,
            (["register"], _) => Err(method_not_allowed("POST")),
            ([name], &Method::GET) => {
                let app = self.require_admin_or_app(req.headers(), name)?;
                Ok(ok_json(StatusCode::OK, &app.view()))
            }
            ([name], &Method::PUT) => self.provision(name, req).await,
            ([name], &Method::DELETE) => {
                self.require_admin_or_app(req.headers(), name)?;
                self.registry.deregister(name).await?;
                Ok(json_response(StatusCode::NO_CONTENT, Bytes::new()))
            }
            ([_], _) => Err(method_not_allowed("GET, PUT, DELETE")),
            ([name, "stats"], &Method::GET) => self.stats(req.headers(), name),
            ([_, "stats"], _) => Err(method_not_allowed("GET")),
            ([name, "token"], &Method::POST) => self.rebind(name, req).await,
            ([_, "token"], _) => Err(method_not_allowed("POST")),
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no such endpoint `{path}`"),
            )),
        }
    }
}

fn method_not_allowed(allow: &str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed here; allowed: {allow}"),
    )
}

#[async_trait]
impl Handler for AdminApi {
    async fn handle(
        &self,
        req: Request<Incoming>,
        _shutdown: &pingora_core::server::ShutdownWatch,
    ) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let admin = self.is_admin(req.headers());
        match self.route(req).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(%method, %path, status = e.status.as_u16(), error = %e.error, admin, "admin request refused");
                error_json(&e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_errors_name_the_field() {
        let e = serde_json::from_str::<RegisterJson>(r#"{"name":"a","color":"red"}"#)
            .expect_err("unknown");
        assert_eq!(decode_error(e).field.as_deref(), Some("color"));
        let e = serde_urlencoded::from_str::<RegisterForm>("name=a&name=b").expect_err("dup");
        assert_eq!(decode_error(e).field.as_deref(), Some("name"));
        let e = serde_json::from_str::<RegisterJson>(r#"{"endpoint": 5}"#).expect_err("type");
        assert_eq!(decode_error(e).field.as_deref(), Some("endpoint"));
        let e = serde_json::from_str::<RegisterJson>("{").expect_err("syntax");
        assert_eq!(decode_error(e).field.as_deref(), Some("body"));
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().expect("hv"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("hv"));
        assert_eq!(bearer(&h), None);
    }
}
