//! Subscribe tickets and webhook signatures, both HMAC-SHA256 under the hub secret (which is
//! kept in the state directory, so tickets stay valid across restarts).
//!
//! A ticket is `ngt1.{claims}.{mac}`: base64url (no padding) of a small JSON object (issuing
//! app, channels, expiry in Unix seconds) and of its MAC. Checking is pure: the caller passes
//! the current time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Prefix that marks a ticket (also when sent as a bearer credential).
pub const PREFIX: &str = "ngt1.";

/// What a ticket grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuing app.
    #[serde(rename = "a")]
    pub app: String,
    /// Channels (`app/channel`) it may subscribe to.
    #[serde(rename = "c")]
    pub channels: Vec<String>,
    /// Expiry, Unix seconds.
    #[serde(rename = "e")]
    pub expires: u64,
}

/// Why a ticket was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Not a ticket at all.
    #[error("ticket is malformed")]
    Malformed,
    /// The MAC does not match: altered or signed with another secret.
    #[error("ticket signature is not valid")]
    BadSignature,
    /// Past its expiry.
    #[error("ticket has expired")]
    Expired,
}

/// HMAC signer under the hub secret.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// A signer keyed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: secret.to_vec(),
        }
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC accepts any key length");
        for p in parts {
            m.update(p);
        }
        m
    }

    /// Hex HMAC of the parts (separated by a dot).
    pub fn sign_hex(&self, parts: &[&[u8]]) -> String {
        let mut joined: Vec<&[u8]> = Vec::with_capacity(parts.len() * 2);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                joined.push(b".");
            }
            joined.push(p);
        }
        hex::encode(self.mac(&joined).finalize().into_bytes())
    }

    /// A secret derived for `label` (e.g. one webhook subscription), hex.
    pub fn derive(&self, label: &str) -> String {
        self.sign_hex(&[b"derive", label.as_bytes()])
    }

    /// Make a ticket.
    pub fn issue(&self, claims: &Claims) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let mac = URL_SAFE_NO_PAD.encode(
            self.mac(&[PREFIX.as_bytes(), body.as_bytes()])
                .finalize()
                .into_bytes(),
        );
        format!("{PREFIX}{body}.{mac}")
    }

    /// Check a ticket at `now` (Unix seconds): signature first, then expiry.
    pub fn verify(&self, ticket: &str, now: u64) -> Result<Claims, TicketError> {
        let rest = ticket.strip_prefix(PREFIX).ok_or(TicketError::Malformed)?;
        let (body, mac) = rest.split_once('.').ok_or(TicketError::Malformed)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| TicketError::Malformed)?;
        self.mac(&[PREFIX.as_bytes(), body.as_bytes()])
            .verify_slice(&mac)
            .map_err(|_| TicketError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TicketError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TicketError::Malformed)?;
        if claims.expires <= now {
            return Err(TicketError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            app: "shop".into(),
            channels: vec!["shop/orders".into()],
            expires: 1000,
        }
    }

    #[test]
    fn accept_and_reject_table() {
        let s = Signer::new(b"0123456789abcdef0123456789abcdef");
        let other = Signer::new(b"another secret of thirty-two bytes");
        let t = s.issue(&claims());
        assert!(t.starts_with(PREFIX));
        assert_eq!(s.verify(&t, 999), Ok(claims()));
        let mut tampered_body = claims();
        tampered_body.channels.push("shop/admin".into());
        let forged = {
            let good = s.issue(&tampered_body);
            let (_, mac) = t.rsplit_once('.').expect("mac");
            let (head, _) = good.rsplit_once('.').expect("mac");
            format!("{head}.{mac}")
        };
        let cases: Vec<(String, u64, Result<Claims, TicketError>)> = vec![
            (t.clone(), 1000, Err(TicketError::Expired)),
            (t.clone(), 5000, Err(TicketError::Expired)),
            (other.issue(&claims()), 10, Err(TicketError::BadSignature)),
            (forged, 10, Err(TicketError::BadSignature)),
            (format!("{t}x"), 10, Err(TicketError::BadSignature)),
            (format!("{t}!"), 10, Err(TicketError::Malformed)),
            ("ngt1.".into(), 10, Err(TicketError::Malformed)),
            ("hello".into(), 10, Err(TicketError::Malformed)),
            (
                t.replacen("ngt1.", "ngt2.", 1),
                10,
                Err(TicketError::Malformed),
            ),
        ];
        for (ticket, now, want) in cases {
            assert_eq!(s.verify(&ticket, now), want, "{ticket}");
        }
    }

    #[test]
    fn every_changed_character_of_the_mac_is_refused() {
        let s = Signer::new(b"0123456789abcdef0123456789abcdef");
        let t = s.issue(&claims());
        let dot = t.rfind('.').expect("mac");
        for i in dot + 1..t.len() {
            for c in ['A', 'B', 'Q', 'g', '_'] {
                if t.as_bytes()[i] == c as u8 {
                    continue;
                }
                let mut changed = t.clone().into_bytes();
                changed[i] = c as u8;
                let changed = String::from_utf8(changed).expect("ascii");
                // The last character's spare bits make a non-canonical encoding: refused as
                // malformed rather than read as the same MAC.
                assert!(s.verify(&changed, 10).is_err(), "{changed}");
            }
        }
    }

    #[test]
    fn derived_secrets_differ_by_label() {
        let s = Signer::new(b"k");
        assert_eq!(s.derive("a"), s.derive("a"));
        assert_ne!(s.derive("a"), s.derive("b"));
        assert_eq!(s.derive("a").len(), 64);
    }
}
