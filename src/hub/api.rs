//! The hub's HTTP surface, under `{prefix}/events/` on the events listener (and through the
//! public proxy listener, which forwards `{prefix}/events/` here).
//!
//! | method | path | credential |
//! |---|---|---|
//! | POST | `pub/{app}/{channel}` | owner's token or admin key: publish the body |
//! | GET | `pub/{app}/{channel}` | same: channel info, or a WebSocket upgrade to publish frames |
//! | DELETE | `pub/{app}/{channel}` | same: delete the channel, ending its subscribers |
//! | GET | `sub/{app}/{channel}`, `sub?channels=a/x,b/y` | ticket, any app's token, or none for public channels: WebSocket or SSE |
//! | POST | `tickets` | an app's token: `{"channels": [...], "ttl": "10m"}` |
//! | PUT, DELETE | `public/{app}/{channel}` | owner's token or admin key: declare public or not |
//! | GET | `public/{app}` | same: the app's public channels |
//! | POST | `subscriptions` | receiving app's token: `{"channel": "billing/invoices", "path": "/hooks/invoices"}` |
//! | GET | `subscriptions`, `subscriptions/{id}` | receiving app's token (with `X-Nextgate-App` for the list) or admin key |
//! | DELETE | `subscriptions/{id}` | receiving app's token or admin key |
//!
//! Credentials travel as `Authorization: Bearer ...`; a ticket also as `?ticket=`. Which app a
//! token belongs to is the `X-Nextgate-App` header when sent, else the owner of each channel.

use super::channel::ChannelInfo;
use super::sse::SseBody;
use super::store::HubStore;
use super::ticket::{self, Claims, Signer, TicketError};
use super::webhook::{Command, Hold, WebhookRecord};
use super::{ws, ChannelName, Hub, HubError, Resume};
use crate::error::ApiError;
use crate::http_server::{bearer, Body, Handler};
use crate::registry::token::AdminKey;
use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use pingora_core::server::ShutdownWatch;
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Header naming the app whose token is presented.
pub const APP_HEADER: &str = "x-nextgate-app";

/// The hub API.
pub struct HubApi {
    hub: Arc<Hub>,
    store: Arc<HubStore>,
    signer: Signer,
    admin_key: AdminKey,
    prefix: String,
    webhooks: tokio::sync::mpsc::UnboundedSender<Command>,
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        let msg = e.to_string();
        match e {
            HubError::Invalid { field, .. } => ApiError::field(StatusCode::BAD_REQUEST, field, msg),
            HubError::UnknownApp(_) | HubError::NoChannel(_) => {
                ApiError::new(StatusCode::NOT_FOUND, msg)
            }
            HubError::TooLarge { .. } => {
                ApiError::field(StatusCode::PAYLOAD_TOO_LARGE, "message", msg)
            }
            HubError::TooManyChannels { .. } => {
                ApiError::field(StatusCode::TOO_MANY_REQUESTS, "channel", msg)
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct SubQuery {
    channels: Option<String>,
    last_event_id: Option<String>,
    meta: Option<String>,
    ticket: Option<String>,
}

/// A checked subscribe request.
struct SubRequest {
    names: Vec<ChannelName>,
    resume: Resume,
    meta: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionRequest {
    channel: String,
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TicketRequest {
    channels: Vec<String>,
    ttl: Option<String>,
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn json_value<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    json(status, serde_json::to_vec(v).unwrap_or_default())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn wants_text(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/plain") && !a.contains("json"))
}

fn info_response(status: StatusCode, text: bool, info: &ChannelInfo) -> Response<Body> {
    if text {
        let mut r = json(status, info.to_text());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    } else {
        json_value(status, info)
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn is_truthy(v: Option<&str>) -> bool {
    matches!(v, Some("1" | "true" | "yes" | "on" | ""))
}

fn wants_sse(headers: &HeaderMap) -> bool {
    header_str(headers, "accept").is_some_and(|a| a.contains("text/event-stream"))
}

impl HubApi {
    /// The API over `hub`; `mount_prefix` is the proxy's (e.g. `/v3`).
    pub fn new(
        hub: Arc<Hub>,
        store: Arc<HubStore>,
        signer: Signer,
        admin_key: AdminKey,
        mount_prefix: &str,
        webhooks: tokio::sync::mpsc::UnboundedSender<Command>,
    ) -> Self {
        Self {
            hub,
            store,
            signer,
            admin_key,
            prefix: format!("{mount_prefix}/events/"),
            webhooks,
        }
    }

    fn subscription_view(&self, r: &WebhookRecord) -> serde_json::Value {
        serde_json::json!({
            "id": r.id,
            "app": r.app,
            "channel": r.channel,
            "path": r.path,
            "created_at": humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(r.created_ms)).to_string(),
            "signing_secret": self.signer.derive(&format!("webhook:{}", r.id)),
        })
    }

    async fn read_json<T: serde::de::DeserializeOwned>(
        req: Request<Incoming>,
        example: &str,
    ) -> Result<T, ApiError> {
        let body = Limited::new(req.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|_| {
                ApiError::field(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body",
                    "request bodies here are at most 64 KiB",
                )
            })?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                "body",
                format!("expected {example}: {e}"),
            )
        })
    }

    async fn subscriptions(
        &self,
        req: Request<Incoming>,
        id: &str,
    ) -> Result<Response<Body>, ApiError> {
        let headers = req.headers().clone();
        let Some(cred) = bearer(&headers).map(str::to_string) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "send the app's token as `Authorization: Bearer TOKEN`",
            ));
        };
        let store_failed = |e: crate::registry::store::StoreError| {
            tracing::error!(error = %e, "hub state could not be saved");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "hub state could not be saved; nothing was changed",
            )
        };
        if !id.is_empty() {
            let Some(r) = self.store.subscriptions().into_iter().find(|r| r.id == id) else {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no subscription `{}`",
                        id.chars().take(64).collect::<String>()
                    ),
                ));
            };
            let allowed = self.admin_key.verify(&cred)
                || self
                    .hub
                    .registry
                    .get(&r.app)
                    .is_some_and(|a| a.verify_token(&cred));
            if !allowed {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("only `{}` (its token) or the admin may do this", r.app),
                ));
            }
            return match *req.method() {
                Method::GET => Ok(json_value(StatusCode::OK, &self.subscription_view(&r))),
                Method::DELETE => {
                    self.store
                        .remove_subscription(id)
                        .await
                        .map_err(store_failed)?;
                    let _ = self.webhooks.send(Command::Stop(r.id.clone()));
                    tracing::info!(subscription = %r.id, app = %r.app, channel = %r.channel, "webhook subscription removed");
                    Ok(json(StatusCode::NO_CONTENT, Bytes::new()))
                }
                _ => Err(method_not_allowed("GET, DELETE")),
            };
        }
        match *req.method() {
            Method::GET => {
                let app = if self.admin_key.verify(&cred) {
                    header_str(&headers, APP_HEADER).map(str::to_string)
                } else {
                    let Some(app) = header_str(&headers, APP_HEADER) else {
                        return Err(ApiError::field(
                            StatusCode::BAD_REQUEST,
                            APP_HEADER,
                            format!("name your app in `{APP_HEADER}`"),
                        ));
                    };
                    self.token_app(&headers, &cred, &[])?;
                    Some(app.to_string())
                };
                let list: Vec<_> = self
                    .store
                    .subscriptions()
                    .iter()
                    .filter(|r| app.as_ref().is_none_or(|a| *a == r.app))
                    .map(|r| self.subscription_view(r))
                    .collect();
                Ok(json_value(
                    StatusCode::OK,
                    &serde_json::json!({"subscriptions": list}),
                ))
            }
            Method::POST => {
                let r: SubscriptionRequest =
                    Self::read_json(req, r#"{"channel": "app/channel", "path": "/hooks/x"}"#)
                        .await?;
                let name = self.hub.channel_name(&r.channel)?;
                if !r.path.starts_with('/')
                    || r.path.len() > 1024
                    || r.path.bytes().any(|b| !b.is_ascii_graphic())
                {
                    return Err(ApiError::field(
                        StatusCode::BAD_REQUEST,
                        "path",
                        "path must start with / and be at most 1024 visible ASCII characters",
                    ));
                }
                let app = match self.token_app(&headers, &cred, std::slice::from_ref(&name))? {
                    Some(app) => app,
                    None => match header_str(&headers, APP_HEADER) {
                        Some(app) if self.hub.registry.get(app).is_some() => app.to_string(),
                        Some(app) => return Err(HubError::UnknownApp(app.to_string()).into()),
                        None => {
                            return Err(ApiError::field(
                                StatusCode::BAD_REQUEST,
                                APP_HEADER,
                                format!(
                                    "with the admin key, name the receiving app in `{APP_HEADER}`"
                                ),
                            ))
                        }
                    },
                };
                if self.hub.registry.get(name.app()).is_none() {
                    return Err(HubError::UnknownApp(name.app().to_string()).into());
                }
                let record = WebhookRecord {
                    id: hex::encode(crate::registry::token::random_bytes::<12>()),
                    app,
                    channel: name.as_str().to_string(),
                    path: r.path,
                    created_ms: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                };
                self.store
                    .add_subscription(record.clone())
                    .await
                    .map_err(store_failed)?;
                tracing::info!(subscription = %record.id, app = %record.app, channel = %record.channel, path = %record.path, "webhook subscription created");
                let view = self.subscription_view(&record);
                let hold = Hold::new(self.hub.get_or_create(&name)?);
                let _ = self.webhooks.send(Command::Start(record, hold));
                Ok(json_value(StatusCode::CREATED, &view))
            }
            _ => Err(method_not_allowed("GET, POST")),
        }
    }

    /// Admin key or the token of `app`.
    fn require_owner(&self, headers: &HeaderMap, app: &str) -> Result<(), ApiError> {
        let Some(cred) = bearer(headers) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                format!("credential required: send `Authorization: Bearer TOKEN` with the token of `{app}`"),
            ));
        };
        if self.admin_key.verify(cred) {
            return Ok(());
        }
        match self.hub.registry.get(app) {
            None => Err(HubError::UnknownApp(app.to_string()).into()),
            Some(a) if a.verify_token(cred) => Ok(()),
            Some(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("only `{app}` (its token) or the admin may do this"),
            )),
        }
    }

    /// Who a token belongs to: `X-Nextgate-App` when sent, else the owner of every channel.
    fn token_app(
        &self,
        headers: &HeaderMap,
        cred: &str,
        names: &[ChannelName],
    ) -> Result<Option<String>, ApiError> {
        if self.admin_key.verify(cred) {
            return Ok(None);
        }
        let denied =
            |who: &str| ApiError::new(StatusCode::FORBIDDEN, format!("the token is not `{who}`'s"));
        if let Some(app) = header_str(headers, APP_HEADER) {
            return match self.hub.registry.get(app) {
                Some(a) if a.verify_token(cred) => Ok(Some(app.to_string())),
                Some(_) => Err(denied(app)),
                None => Err(HubError::UnknownApp(app.to_string()).into()),
            };
        }
        for n in names {
            match self.hub.registry.get(n.app()) {
                Some(a) if a.verify_token(cred) => {}
                Some(_) => {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        format!(
                            "the token is not `{}`'s; to use another app's token, name it in `{APP_HEADER}`",
                            n.app()
                        ),
                    ))
                }
                None => return Err(HubError::UnknownApp(n.app().to_string()).into()),
            }
        }
        Ok(names.first().map(|n| n.app().to_string()))
    }

    fn authorize_subscribe(
        &self,
        headers: &HeaderMap,
        query_ticket: Option<&str>,
        names: &[ChannelName],
    ) -> Result<(), ApiError> {
        let cred = query_ticket.or_else(|| bearer(headers));
        match cred {
            Some(t) if t.starts_with(ticket::PREFIX) => {
                let claims = self.signer.verify(t, unix_now()).map_err(|e| {
                    let msg = match e {
                        TicketError::Expired => "ticket has expired: ask the app for a new one",
                        TicketError::BadSignature => "ticket signature is not valid",
                        TicketError::Malformed => "ticket is malformed",
                    };
                    ApiError::field(StatusCode::UNAUTHORIZED, "ticket", msg)
                })?;
                if !claims.app.is_empty() && self.hub.registry.get(&claims.app).is_none() {
                    return Err(ApiError::field(
                        StatusCode::UNAUTHORIZED,
                        "ticket",
                        "the app that issued this ticket is no longer registered",
                    ));
                }
                if let Some(n) = names
                    .iter()
                    .find(|n| !claims.channels.iter().any(|c| c == n.as_str()))
                {
                    return Err(ApiError::field(
                        StatusCode::FORBIDDEN,
                        "ticket",
                        format!("the ticket does not cover `{}`", n.as_str()),
                    ));
                }
                Ok(())
            }
            Some(cred) => self.token_app(headers, cred, names).map(drop),
            None => match names.iter().find(|n| !self.store.is_public(n.as_str())) {
                None => Ok(()),
                Some(n) => Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "`{}` is not public: subscribe with a ticket or an app token",
                        n.as_str()
                    ),
                )),
            },
        }
    }

    async fn read_message(&self, req: Request<Incoming>) -> Result<Bytes, ApiError> {
        let limit = self.hub.settings.max_message_bytes;
        let too_large = |size: usize| ApiError::from(HubError::TooLarge { size, limit });
        let declared =
            header_str(req.headers(), "content-length").and_then(|v| v.parse::<usize>().ok());
        if let Some(n) = declared.filter(|&n| n > limit) {
            return Err(too_large(n));
        }
        match Limited::new(req.into_body(), limit).collect().await {
            // A copy of exactly the message: the collected `Bytes` can be a slice of hyper's
            // read buffer, and a buffered message would keep that whole buffer alive (about
            // 10 KiB per message, measured with 1000 channels).
            Ok(b) => Ok(Bytes::copy_from_slice(&b.to_bytes())),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit + 1)),
            Err(e) => Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "message",
                format!("cannot read the message: {e}"),
            )),
        }
    }

    async fn publish(
        &self,
        req: Request<Incoming>,
        name: ChannelName,
    ) -> Result<Response<Body>, ApiError> {
        self.require_owner(req.headers(), name.app())?;
        // Taken before the body consumes the request; the hub validates the event name.
        let h = req.headers();
        let text = wants_text(h);
        let content_type =
            header_str(h, "content-type").map(|c| c.chars().take(255).collect::<String>());
        let event = header_str(h, "x-event-type")
            .or_else(|| header_str(h, "x-eventsource-event"))
            .map(str::to_string);
        let data = self.read_message(req).await?;
        let p = self
            .hub
            .publish(&name, data, content_type.as_deref(), event.as_deref())?;
        let status = if p.offered > 0 {
            StatusCode::CREATED
        } else {
            StatusCode::ACCEPTED
        };
        Ok(info_response(status, text, &p.info))
    }

    async fn pub_path(
        &self,
        mut req: Request<Incoming>,
        name: &str,
        shutdown: &ShutdownWatch,
    ) -> Result<Response<Body>, ApiError> {
        let name = self.hub.channel_name(name)?;
        match *req.method() {
            Method::POST | Method::PUT => self.publish(req, name).await,
            Method::GET | Method::HEAD => {
                self.require_owner(req.headers(), name.app())?;
                if fastwebsockets::upgrade::is_upgrade_request(&req) {
                    self.hub.get_or_create(&name)?;
                    let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req).map_err(|e| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            format!("bad websocket upgrade: {e}"),
                        )
                    })?;
                    tokio::spawn(ws::serve_publisher(
                        fut,
                        self.hub.clone(),
                        name,
                        shutdown.clone(),
                    ));
                    return Ok(resp.map(|b| b.map_err(|never| match never {}).boxed_unsync()));
                }
                match self.hub.info(&name) {
                    Some(info) => Ok(info_response(
                        StatusCode::OK,
                        wants_text(req.headers()),
                        &info,
                    )),
                    None => Err(HubError::NoChannel(name.as_str().to_string()).into()),
                }
            }
            Method::DELETE => {
                self.require_owner(req.headers(), name.app())?;
                let info = self.hub.info(&name);
                match info {
                    Some(info) if self.hub.delete(&name) => Ok(info_response(
                        StatusCode::OK,
                        wants_text(req.headers()),
                        &info,
                    )),
                    _ => Err(HubError::NoChannel(name.as_str().to_string()).into()),
                }
            }
            _ => Err(method_not_allowed("GET, POST, DELETE")),
        }
    }

    /// Check a subscribe request: channels, credential, resume point, limit.
    fn prepare_sub(
        &self,
        uri: &http::Uri,
        headers: &HeaderMap,
        path_channel: Option<&str>,
    ) -> Result<SubRequest, ApiError> {
        let q: SubQuery = match uri.query() {
            Some(q) => serde_urlencoded::from_str(q).map_err(|e| {
                ApiError::field(StatusCode::BAD_REQUEST, "query", format!("bad query: {e}"))
            })?,
            None => SubQuery::default(),
        };
        let mut names = Vec::new();
        if let Some(c) = path_channel {
            names.push(self.hub.channel_name(c)?);
        }
        if let Some(list) = q.channels.as_deref() {
            for c in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                names.push(self.hub.channel_name(c)?);
            }
        }
        if names.is_empty() {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "channels",
                "name a channel: sub/{app}/{channel} or ?channels=app/a,app/b",
            ));
        }
        self.authorize_subscribe(headers, q.ticket.as_deref(), &names)?;
        let resume_text = header_str(headers, "last-event-id")
            .map(str::to_string)
            .or(q.last_event_id);
        let resume = match resume_text.as_deref() {
            Some(t) => Resume::parse(t, names.len())?,
            None => Resume::Live,
        };
        if self.hub.subscriber_count() >= self.hub.settings.max_connections as u64 {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the hub is at its subscriber limit; try again later",
            ));
        }
        // Frames of a multiplexed subscription must say their channel: always meta.
        let meta = is_truthy(q.meta.as_deref()) || names.len() > 1;
        Ok(SubRequest {
            names,
            resume,
            meta,
        })
    }

    /// For `{prefix}/events/sub...` paths, the channel named in the path (if any).
    fn sub_target<'a>(&self, path: &'a str) -> Option<Option<&'a str>> {
        let rest = path.strip_prefix(&self.prefix)?;
        match rest.split_once('/') {
            None if rest == "sub" => Some(None),
            Some(("sub", "")) => Some(None),
            Some(("sub", c)) => Some(Some(c)),
            _ => None,
        }
    }

    async fn sub_path(
        &self,
        mut req: Request<Incoming>,
        path_channel: Option<&str>,
        shutdown: &ShutdownWatch,
    ) -> Result<Response<Body>, ApiError> {
        if !matches!(*req.method(), Method::GET) {
            return Err(method_not_allowed("GET"));
        }
        let SubRequest {
            names,
            resume,
            meta,
        } = self.prepare_sub(req.uri(), req.headers(), path_channel)?;
        let heartbeat = self.hub.settings.heartbeat;
        if fastwebsockets::upgrade::is_upgrade_request(&req) {
            let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("bad websocket upgrade: {e}"),
                )
            })?;
            let sub = self.hub.subscribe(names, &resume)?;
            tokio::spawn(ws::serve_subscriber(
                fut,
                sub,
                meta,
                heartbeat,
                shutdown.clone(),
            ));
            return Ok(resp.map(|b| b.map_err(|never| match never {}).boxed_unsync()));
        }
        if !wants_sse(req.headers()) {
            return Err(ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                "subscribe with a WebSocket upgrade or with `Accept: text/event-stream`",
            ));
        }
        let sub = self.hub.subscribe(names, &resume)?;
        let body = SseBody::new(sub, meta, heartbeat, shutdown.clone());
        let mut resp = Response::new(body.boxed_unsync());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        Ok(resp)
    }

    async fn tickets(&self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        if req.method() != Method::POST {
            return Err(method_not_allowed("POST"));
        }
        let headers = req.headers().clone();
        let Some(cred) = bearer(&headers).map(str::to_string) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "send the app's token as `Authorization: Bearer TOKEN`",
            ));
        };
        let r: TicketRequest = Self::read_json(req, r#"{"channels": [...], "ttl": "10m"}"#).await?;
        if r.channels.is_empty() || r.channels.len() > 64 {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "channels",
                "name 1 to 64 channels",
            ));
        }
        let names = r
            .channels
            .iter()
            .map(|c| self.hub.channel_name(c))
            .collect::<Result<Vec<_>, _>>()?;
        let app = self.token_app(&headers, &cred, &names)?;
        let ttl = match r.ttl.as_deref() {
            None => self.hub.settings.ticket_ttl,
            Some(t) => humantime::parse_duration(t).map_err(|e| {
                ApiError::field(
                    StatusCode::BAD_REQUEST,
                    "ttl",
                    format!("`{t}` is not a duration like \"10m\": {e}"),
                )
            })?,
        };
        if ttl.is_zero() || ttl > self.hub.settings.ticket_max_ttl {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "ttl",
                format!(
                    "ttl must be above zero and at most {}",
                    humantime::format_duration(self.hub.settings.ticket_max_ttl)
                ),
            ));
        }
        let expires = unix_now() + ttl.as_secs().max(1);
        let claims = Claims {
            app: app.unwrap_or_default(),
            channels: names.iter().map(|n| n.as_str().to_string()).collect(),
            expires,
        };
        let t = self.signer.issue(&claims);
        let expires_at =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(expires))
                .to_string();
        Ok(json_value(
            StatusCode::CREATED,
            &serde_json::json!({"ticket": t, "channels": claims.channels, "expires_at": expires_at}),
        ))
    }

    async fn public(&self, req: Request<Incoming>, rest: &str) -> Result<Response<Body>, ApiError> {
        if !rest.contains('/') {
            if req.method() != Method::GET {
                return Err(method_not_allowed("GET"));
            }
            crate::registry::validate::name(rest)
                .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "app", e.to_string()))?;
            self.require_owner(req.headers(), rest)?;
            return Ok(json_value(
                StatusCode::OK,
                &serde_json::json!({"public": self.store.public_of(rest)}),
            ));
        }
        let name = self.hub.channel_name(rest)?;
        self.require_owner(req.headers(), name.app())?;
        let public = match *req.method() {
            Method::PUT => true,
            Method::DELETE => false,
            _ => return Err(method_not_allowed("PUT, DELETE")),
        };
        self.store
            .set_public(name.as_str(), public)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "hub state could not be saved");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "hub state could not be saved; nothing was changed",
                )
            })?;
        Ok(json_value(
            StatusCode::OK,
            &serde_json::json!({"channel": name.as_str(), "public": public}),
        ))
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        shutdown: &ShutdownWatch,
    ) -> Result<Response<Body>, ApiError> {
        let path = req.uri().path().to_string();
        if path == "/healthz" {
            return Ok(json_value(
                StatusCode::OK,
                &serde_json::json!({"status": "ok", "channels": self.hub.channel_count(), "subscribers": self.hub.subscriber_count()}),
            ));
        }
        let not_found = || {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no such endpoint `{}`",
                    path.chars().take(200).collect::<String>()
                ),
            )
        };
        let rest = path
            .strip_prefix(&self.prefix)
            .or_else(|| {
                path.strip_prefix(self.prefix.trim_end_matches('/'))
                    .filter(|r| r.is_empty())
            })
            .ok_or_else(not_found)?;
        let (head, tail) = rest.split_once('/').unwrap_or((rest, ""));
        match head {
            "pub" => self.pub_path(req, tail, shutdown).await,
            "sub" if tail.is_empty() => self.sub_path(req, None, shutdown).await,
            "sub" => self.sub_path(req, Some(tail), shutdown).await,
            "tickets" if tail.is_empty() => self.tickets(req).await,
            "public" if !tail.is_empty() => self.public(req, tail).await,
            "subscriptions" => self.subscriptions(req, tail).await,
            _ => Err(not_found()),
        }
    }
}

fn method_not_allowed(allow: &str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed here; allowed: {allow}"),
    )
}

/// An error as a JSON response, with `Retry-After` on 503.
fn refusal(e: &ApiError) -> Response<Body> {
    let mut r = crate::admin::error_json(e);
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    r
}

#[async_trait]
impl Handler for HubApi {
    async fn handle(&self, req: Request<Incoming>, shutdown: &ShutdownWatch) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        match self.route(req, shutdown).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%method, %path, status = e.status.as_u16(), error = %e.error, "hub request refused");
                refusal(&e)
            }
        }
    }

    fn peeks(&self) -> bool {
        true
    }

    /// SSE subscriptions that open a connection are served without hyper: an idle one then
    /// holds no HTTP read and write buffers (README, Event hub).
    fn claims(&self, head: &Request<()>) -> bool {
        head.method() == Method::GET
            && wants_sse(head.headers())
            && !head.headers().contains_key(header::UPGRADE)
            && self.sub_target(head.uri().path()).is_some()
    }

    async fn serve(
        &self,
        head: Request<()>,
        stream: pingora_core::protocols::Stream,
        shutdown: &ShutdownWatch,
    ) {
        let path_channel = self.sub_target(head.uri().path()).flatten();
        let opened = self
            .prepare_sub(head.uri(), head.headers(), path_channel)
            .and_then(|p| {
                let sub = self.hub.subscribe(p.names, &p.resume)?;
                Ok(SseBody::new(
                    sub,
                    p.meta,
                    self.hub.settings.heartbeat,
                    shutdown.clone(),
                ))
            });
        match opened {
            // On a task of its own: the connection task Pingora runs this in is large (it
            // holds the state of every protocol step) and would stay for the stream's life.
            Ok(body) => drop(tokio::spawn(super::sse::serve_raw(stream, body))),
            Err(e) => {
                tracing::debug!(path = %head.uri().path(), status = e.status.as_u16(), error = %e.error, "hub request refused");
                super::sse::refuse_raw(stream, &e).await
            }
        }
    }
}
