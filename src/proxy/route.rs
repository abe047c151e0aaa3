//! Pure request routing: which app a request is for and what path it carries upstream.

/// Routing settings.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Mount prefix without trailing slash, e.g. `/v3`.
    pub mount_prefix: String,
    /// Base domain for host routing, lower case.
    pub base_domain: Option<String>,
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// To app `name`; `upstream_path` is the path and query to send, `None` to keep the original.
    App {
        /// App name.
        name: &'a str,
        /// Rewritten path and query.
        upstream_path: Option<String>,
    },
    /// The gateway's own `{prefix}/events/...` API.
    Events,
    /// Nothing matches.
    NotFound,
}

/// Strip an optional `:port` from a Host header value.
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// App name from `Host: {name}.{base}`, if the host is a single label under the base domain.
pub fn app_from_host<'a>(host: &'a str, base: &str) -> Option<&'a str> {
    let host = host_without_port(host).trim_end_matches('.');
    if host.len() <= base.len() + 1 {
        return None;
    }
    let (label, rest) = host.split_at(host.len() - base.len() - 1);
    if !rest[1..].eq_ignore_ascii_case(base) || !rest.starts_with('.') || label.contains('.') {
        return None;
    }
    Some(label)
}

/// Route a request by its Host header and path-and-query (`/v3/iaas/x?y=1`).
///
/// Host routing wins when a base domain is set and the host is `{name}.{base}`: the path is
/// kept. Otherwise `{prefix}/{name}/{rest}` goes to `name` as `/{rest}` with the query kept.
pub fn route<'a>(host: Option<&'a str>, path_and_query: &'a str, cfg: &RouteConfig) -> Route<'a> {
    if let (Some(base), Some(host)) = (&cfg.base_domain, host) {
        if let Some(name) = app_from_host(host, base) {
            return Route::App {
                name,
                upstream_path: None,
            };
        }
    }
    let Some(after) = path_and_query.strip_prefix(cfg.mount_prefix.as_str()) else {
        return Route::NotFound;
    };
    let Some(after) = after.strip_prefix('/') else {
        return Route::NotFound;
    };
    let end = after.find(['/', '?']).unwrap_or(after.len());
    let (name, rest) = after.split_at(end);
    if name.is_empty() {
        return Route::NotFound;
    }
    if name == "events" {
        return Route::Events;
    }
    let upstream_path = if rest.is_empty() {
        "/".to_string()
    } else if rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_string()
    };
    Route::App {
        name,
        upstream_path: Some(upstream_path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(base: Option<&str>) -> RouteConfig {
        RouteConfig {
            mount_prefix: "/v3".into(),
            base_domain: base.map(str::to_string),
        }
    }

    fn app<'a>(name: &'a str, path: &str) -> Route<'a> {
        Route::App {
            name,
            upstream_path: Some(path.to_string()),
        }
    }

    #[test]
    fn path_routing_table() {
        let c = cfg(None);
        let cases: &[(&str, Route)] = &[
            ("/v3/iaas/users/1", app("iaas", "/users/1")),
            (
                "/v3/iaas/users?id=1&x=%20",
                app("iaas", "/users?id=1&x=%20"),
            ),
            ("/v3/iaas", app("iaas", "/")),
            ("/v3/iaas/", app("iaas", "/")),
            ("/v3/iaas?q=1", app("iaas", "/?q=1")),
            ("/v3/events/pub/a/b", Route::Events),
            ("/v3/", Route::NotFound),
            ("/v3", Route::NotFound),
            ("/v3x/iaas", Route::NotFound),
            ("/v2/iaas/x", Route::NotFound),
            ("/", Route::NotFound),
        ];
        for (path, want) in cases {
            assert_eq!(&route(Some("gw.example"), path, &c), want, "{path}");
        }
    }

    #[test]
    fn host_routing() {
        let c = cfg(Some("apps.example.com"));
        let keep = |name| Route::App {
            name,
            upstream_path: None,
        };
        assert_eq!(
            route(Some("iaas.apps.example.com"), "/x?y", &c),
            keep("iaas")
        );
        assert_eq!(
            route(Some("iaas.apps.example.com:8080"), "/", &c),
            keep("iaas")
        );
        assert_eq!(route(Some("IAAS.Apps.Example.com."), "/", &c), keep("IAAS"));
        assert_eq!(
            route(Some("a.b.apps.example.com"), "/", &c),
            Route::NotFound
        );
        assert_eq!(route(Some("apps.example.com"), "/", &c), Route::NotFound);
        assert_eq!(
            route(Some("iaasapps.example.com"), "/", &c),
            Route::NotFound
        );
        // Host not under the base domain falls back to path routing.
        assert_eq!(
            route(Some("other.test"), "/v3/iaas/a", &c),
            app("iaas", "/a")
        );
        assert_eq!(route(None, "/v3/iaas/a", &c), app("iaas", "/a"));
    }

    #[test]
    fn custom_prefix() {
        let c = RouteConfig {
            mount_prefix: "/api/apps".into(),
            base_domain: None,
        };
        assert_eq!(route(None, "/api/apps/x/y", &c), app("x", "/y"));
        assert_eq!(route(None, "/v3/x/y", &c), Route::NotFound);
    }
}
