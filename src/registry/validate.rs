//! Pure validation of registration input: app names, endpoint lists and tokens.

use super::RegistryError;

/// Names the gateway keeps for itself: `/v3/events/...` is the gateway's own API, and
/// `/v3/events/processes/register` is the registration endpoint.
pub const RESERVED_NAMES: &[&str] = &["events", "register"];

/// Longest app name: one DNS label, so host routing (`{name}.{base_domain}`) works for every name.
pub const MAX_NAME_LEN: usize = 63;

/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 256;

/// A parsed backend endpoint URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Normalised URL, `scheme://host:port`.
    pub url: String,
    /// `https` backend.
    pub tls: bool,
    /// Host as written (IP literal or DNS name), without brackets.
    pub host: String,
    /// Port (explicit or the scheme's default).
    pub port: u16,
}

fn bad(field: &'static str, message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field,
        message: message.into(),
    }
}

/// Check an app name: a lower-case DNS label, not reserved.
pub fn name(name: &str) -> Result<(), RegistryError> {
    if name.is_empty() {
        return Err(bad("name", "name must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(
            "name",
            format!("name is longer than {MAX_NAME_LEN} characters"),
        ));
    }
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(bad(
            "name",
            "name must match ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ (a lower-case DNS label)",
        ));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(bad(
            "name",
            format!("name `{name}` is reserved for the gateway"),
        ));
    }
    Ok(())
}

/// Check a token's length and characters (printable ASCII, no spaces).
pub fn token(token: &str, min_len: usize) -> Result<(), RegistryError> {
    if token.len() < min_len {
        return Err(bad(
            "token",
            format!("token must be at least {min_len} characters"),
        ));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(bad(
            "token",
            format!("token must be at most {MAX_TOKEN_LEN} characters"),
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("token", "token must be printable ASCII without spaces"));
    }
    Ok(())
}

/// Split a comma-separated endpoint string into its items (empty items are kept, so they fail).
pub fn split_endpoints(s: &str) -> Vec<String> {
    s.split(',').map(|e| e.trim().to_string()).collect()
}

/// Parse one endpoint URL: `http://host[:port]` or `https://host[:port]`, optional trailing `/`.
pub fn endpoint(raw: &str) -> Result<Endpoint, RegistryError> {
    if raw.is_empty() {
        return Err(bad("endpoint", "endpoint list has an empty item"));
    }
    let uri: http::Uri = raw.parse().map_err(|_| {
        bad(
            "endpoint",
            format!("`{raw}` is not a URL like http://10.0.0.1:8000"),
        )
    })?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => {
            return Err(bad(
                "endpoint",
                format!("`{raw}`: unsupported scheme `{other}` (use http or https)"),
            ))
        }
        None => {
            return Err(bad(
                "endpoint",
                format!("`{raw}` has no scheme (use http://host:port)"),
            ))
        }
    };
    let authority = uri
        .authority()
        .ok_or_else(|| bad("endpoint", format!("`{raw}` has no host")))?;
    if authority.as_str().contains('@') {
        return Err(bad(
            "endpoint",
            format!("`{raw}`: credentials in URLs are not accepted"),
        ));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("endpoint", format!("`{raw}` has no host")));
    }
    let auth = authority.as_str();
    let after_host = &auth[auth.rfind(']').map_or(0, |i| i + 1)..];
    let port = match after_host.rsplit_once(':') {
        Some((_, p)) => match p.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(bad(
                    "endpoint",
                    format!("`{raw}`: port must be a number from 1 to 65535"),
                ))
            }
            Ok(p) => p,
        },
        None if tls => 443,
        None => 80,
    };
    if uri.query().is_some() || !matches!(uri.path(), "" | "/") {
        return Err(bad(
            "endpoint",
            format!("`{raw}`: endpoints are scheme://host:port without a path or query"),
        ));
    }
    let host = host.to_ascii_lowercase();
    let scheme = if tls { "https" } else { "http" };
    let url = if host.contains(':') {
        format!("{scheme}://[{host}]:{port}")
    } else {
        format!("{scheme}://{host}:{port}")
    };
    Ok(Endpoint {
        url,
        tls,
        host,
        port,
    })
}

/// Parse a whole endpoint list: not empty, at most `max`, no duplicates.
pub fn endpoints(items: &[String], max: usize) -> Result<Vec<Endpoint>, RegistryError> {
    if items.is_empty() || items.iter().all(|s| s.trim().is_empty()) {
        return Err(bad("endpoint", "endpoint list is empty"));
    }
    if items.len() > max {
        return Err(bad("endpoint", format!("more than {max} endpoints")));
    }
    let mut out: Vec<Endpoint> = Vec::with_capacity(items.len());
    for raw in items {
        let ep = endpoint(raw.trim())?;
        if out.iter().any(|e| e.url == ep.url) {
            return Err(bad("endpoint", format!("duplicate endpoint `{}`", ep.url)));
        }
        out.push(ep);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<impl std::fmt::Debug, RegistryError>) -> &'static str {
        match r {
            Err(RegistryError::Invalid { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn names() {
        for ok in ["iaas", "a", "billing-v2", "0abc", &"a".repeat(63)] {
            assert!(name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Iaas",
            "-a",
            "a-",
            "a_b",
            "a.b",
            "events",
            "é",
            &"a".repeat(64),
        ] {
            assert_eq!(field(name(bad)), "name", "{bad}");
        }
    }

    #[test]
    fn tokens() {
        assert!(token("Wld2pWduZW1hqgzbxSWDW5mhGzxZzD0I", 16).is_ok());
        assert_eq!(field(token("short", 16)), "token");
        assert_eq!(field(token("has space in the token", 16)), "token");
        assert_eq!(field(token(&"x".repeat(257), 16)), "token");
    }

    #[test]
    fn seed_sample_endpoints() {
        let items = split_endpoints(
            "http://10.128.0.100:8000,http://10.128.0.150:8000,http://10.128.0.200:8000",
        );
        let eps = endpoints(&items, 64).expect("seed sample is valid");
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[0].url, "http://10.128.0.100:8000");
        assert_eq!(eps[2].port, 8000);
        assert!(!eps[1].tls);
    }

    #[test]
    fn endpoint_forms() {
        let e = endpoint("https://Backend.Internal").expect("https default port");
        assert_eq!(
            (e.url.as_str(), e.port, e.tls),
            ("https://backend.internal:443", 443, true)
        );
        let e = endpoint("http://[::1]:9000/").expect("ipv6");
        assert_eq!(e.url, "http://[::1]:9000");
        assert_eq!(e.host, "::1");
    }

    #[test]
    fn endpoint_errors() {
        for bad in [
            "",
            "10.0.0.1:8000",
            "ftp://10.0.0.1:21",
            "http://",
            "http://10.0.0.1:0",
            "http://10.0.0.1:99999",
            "http://10.0.0.1:8000/api",
            "http://10.0.0.1:8000?x=1",
            "http://user:pw@10.0.0.1:8000",
            "not a url",
        ] {
            assert_eq!(field(endpoint(bad)), "endpoint", "{bad}");
        }
        assert_eq!(field(endpoints(&[], 4)), "endpoint");
        let dup = split_endpoints("http://a:1,http://A:1/");
        assert_eq!(field(endpoints(&dup, 4)), "endpoint");
        let many = split_endpoints("http://a:1,http://a:2,http://a:3");
        assert_eq!(field(endpoints(&many, 2)), "endpoint");
    }
}
