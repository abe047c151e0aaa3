//! Route keys: a request's method and its path reduced to a template, so that cost is known
//! per kind of request (`GET /users/{id}`) without one series per URL.
//!
//! Segments made of digits become `{id}`, UUIDs `{uuid}`, hex strings of 16 or more characters
//! `{hex}`, and any segment longer than [`MAX_SEGMENT`] `{long}`. At most [`MAX_SEGMENTS`]
//! segments are kept (the rest become `...`); the query is dropped. The key is hashed while it is
//! built, so a request whose kind is already known costs no allocation.

/// Segments kept in a template.
pub const MAX_SEGMENTS: usize = 8;
/// Longest segment kept as written.
pub const MAX_SEGMENT: usize = 48;
/// Name of the key that collects every request beyond an app's limit.
pub const OTHER: &str = "other";

/// What a path segment becomes in a template.
fn classify(seg: &[u8]) -> Option<&'static str> {
    if seg.iter().all(u8::is_ascii_digit) {
        return Some("{id}");
    }
    if is_uuid(seg) {
        return Some("{uuid}");
    }
    if seg.len() >= 16 && seg.iter().all(u8::is_ascii_hexdigit) {
        return Some("{hex}");
    }
    if seg.len() > MAX_SEGMENT {
        return Some("{long}");
    }
    None
}

fn is_uuid(s: &[u8]) -> bool {
    s.len() == 36
        && s.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Feed the template of `method path` to `out`, piece by piece.
fn emit(method: &str, path: &str, mut out: impl FnMut(&[u8])) {
    out(method.as_bytes());
    out(b" ");
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut any = false;
    for (i, seg) in path.split('/').filter(|s| !s.is_empty()).enumerate() {
        any = true;
        out(b"/");
        if i == MAX_SEGMENTS {
            out(b"...");
            break;
        }
        let seg = seg.as_bytes();
        match classify(seg) {
            Some(p) => out(p.as_bytes()),
            None => out(seg),
        }
    }
    if !any || (path.ends_with('/') && path.len() > 1) {
        out(b"/");
    }
}

/// The template, as a string: `GET /users/{id}/orders`.
pub fn template(method: &str, path: &str) -> String {
    let mut s = Vec::with_capacity(method.len() + path.len() + 8);
    emit(method, path, |b| s.extend_from_slice(b));
    String::from_utf8_lossy(&s).into_owned()
}

/// A 64-bit FNV-1a hash of the template, computed without building it.
pub fn hash(method: &str, path: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    emit(method, path, |b| {
        for &c in b {
            h ^= u64::from(c);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    });
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let cases = [
            ("GET", "/", "GET /"),
            ("GET", "", "GET /"),
            ("GET", "/users/42", "GET /users/{id}"),
            ("GET", "/users/42/", "GET /users/{id}/"),
            ("POST", "/users/42/orders?x=1", "POST /users/{id}/orders"),
            (
                "GET",
                "/o/123e4567-e89b-12d3-a456-426614174000/x",
                "GET /o/{uuid}/x",
            ),
            ("GET", "/blob/deadbeefdeadbeef00", "GET /blob/{hex}"),
            ("GET", "/blob/deadbeef", "GET /blob/deadbeef"),
            ("GET", "/v3/api", "GET /v3/api"),
            ("GET", "//a//b", "GET /a/b"),
            ("GET", "/a/b/c/d/e/f/g/h/i/j", "GET /a/b/c/d/e/f/g/h/..."),
            ("GET", &format!("/t/{}", "x".repeat(49)), "GET /t/{long}"),
            ("DELETE", "/a#frag", "DELETE /a"),
        ];
        for (m, p, want) in cases {
            assert_eq!(template(m, p), want, "{m} {p}");
        }
    }

    #[test]
    fn hash_matches_the_template_and_separates_kinds() {
        assert_eq!(hash("GET", "/users/1"), hash("GET", "/users/99999"));
        assert_ne!(hash("GET", "/users/1"), hash("POST", "/users/1"));
        assert_ne!(hash("GET", "/users/1"), hash("GET", "/users/1/orders"));
        assert_ne!(hash("GET", "/users"), hash("GET", "/users/"));
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for c in template("GET", "/users/7").bytes() {
            h ^= u64::from(c);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        assert_eq!(h, hash("GET", "/users/7"));
    }
}
