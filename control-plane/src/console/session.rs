//! Console sessions: a signed cookie, checked on every request.
//!
//! The cookie holds what the session was signed in with (the API key's hash, or the
//! operator's tenant and environment with the operator token's hash), when it ends and a
//! random nonce, signed with HMAC-SHA-256 under the console's key. Nothing is kept on
//! the server but the nonces of sessions signed out here, so any replica sharing
//! `console.session_secret` resumes a session. Every request checks the key again
//! (revoked: signed out) and spends the environment's rate limit like an API call.
//! Forms carry a CSRF token derived from the nonce, so it is bound to the session.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The cookie's name.
pub const COOKIE: &str = "qs_console";

/// The longest cookie value read (a real one is ~250 bytes).
const COOKIE_LEN_MAX: usize = 1024;

/// What a session was signed in with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "as", rename_all = "snake_case")]
pub enum Principal {
    /// An API key, by its hash (hex).
    Key { hash: String },
    /// The operator token (its keyed tag, [`Signer::operator_tag`]: the cookie is
    /// signed, not encrypted, and a bare hash of a weak token could be guessed from it),
    /// acting in one tenant's environment.
    Operator {
        tag: String,
        tenant: String,
        /// `live` or `test`.
        environment: String,
    },
}

/// A session's signed content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub principal: Principal,
    /// Milliseconds since the epoch (real clock) when the session ends.
    pub expires_ms: i64,
    /// 16 random bytes, hex: names the session (sign-out, CSRF).
    pub nonce: String,
}

/// Signs and checks cookies and CSRF tokens under one key.
#[derive(Clone)]
pub struct Signer {
    key: [u8; 32],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<redacted>)")
    }
}

impl Signer {
    /// A signer whose key is derived from `secret`, or drawn at random without one.
    pub fn new(secret: Option<&str>) -> Signer {
        let key = match secret {
            Some(secret) => {
                let mut mac = Hmac::<Sha256>::new_from_slice(b"quotastack console session")
                    .unwrap_or_else(|_| unreachable_mac());
                mac.update(secret.as_bytes());
                mac.finalize().into_bytes().into()
            }
            None => rand::random(),
        };
        Signer { key }
    }

    fn mac(&self, purpose: &[u8], data: &[u8]) -> [u8; 32] {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable_mac());
        mac.update(purpose);
        mac.update(b"\0");
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// The cookie value for `claims`.
    pub fn seal(&self, claims: &Claims) -> String {
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let tag = self.mac(b"cookie", &payload);
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The claims of a cookie value this signer sealed and that has not ended at
    /// `now_ms`; `None` for anything else.
    pub fn open(&self, value: &str, now_ms: i64) -> Option<Claims> {
        if value.len() > COOKIE_LEN_MAX {
            return None;
        }
        let (payload, tag) = value.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let expected = self.mac(b"cookie", &payload);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            expected.as_slice(),
            tag.as_slice(),
        )) {
            return None;
        }
        let claims: Claims = serde_json::from_slice(&payload).ok()?;
        (claims.expires_ms > now_ms).then_some(claims)
    }

    /// The operator token's tag in a session (hex): an HMAC under this signer's key.
    pub fn operator_tag(&self, token: &str) -> String {
        hex(&self.mac(b"operator", token.as_bytes()))
    }

    /// Whether `tag` is `token`'s.
    pub fn operator_tag_matches(&self, tag: &str, token: &str) -> bool {
        let expected = self.operator_tag(token);
        bool::from(subtle::ConstantTimeEq::ct_eq(
            expected.as_bytes(),
            tag.as_bytes(),
        ))
    }

    /// The CSRF token of the session named by `nonce`.
    pub fn csrf(&self, nonce: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(b"csrf", nonce.as_bytes()))
    }

    /// Whether `token` is the CSRF token of the session named by `nonce`.
    pub fn csrf_matches(&self, nonce: &str, token: &str) -> bool {
        let expected = self.csrf(nonce);
        bool::from(subtle::ConstantTimeEq::ct_eq(
            expected.as_bytes(),
            token.as_bytes(),
        ))
    }
}

/// HMAC takes a key of any length, so building one never fails.
fn unreachable_mac() -> Hmac<Sha256> {
    unreachable!("HMAC-SHA-256 accepts keys of every length")
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
            let _ = write!(text, "{byte:02x}");
            text
        })
}

/// The 32 bytes a hex string of 64 digits spells.
pub fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (index, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A fresh nonce: 16 random bytes, hex.
pub fn nonce() -> String {
    hex(&rand::random::<[u8; 16]>())
}

/// The value of cookie `name` in a `Cookie` header, if present.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(expires_ms: i64) -> Claims {
        Claims {
            principal: Principal::Key {
                hash: hex(&[7; 32]),
            },
            expires_ms,
            nonce: nonce(),
        }
    }

    // A sealed cookie opens under the same key until it ends, and under no other key;
    // any change to it is refused.
    #[test]
    fn cookies_are_signed_and_end() {
        let signer = Signer::new(Some("a secret of at least thirty-two characters"));
        let sealed = signer.seal(&claims(2_000));
        assert_eq!(
            signer.open(&sealed, 1_000),
            Some(claims_of(&signer, &sealed))
        );
        assert_eq!(signer.open(&sealed, 2_000), None, "ended");
        assert_eq!(
            Signer::new(Some("another secret of thirty-two characters")).open(&sealed, 1_000),
            None
        );
        assert_eq!(Signer::new(None).open(&sealed, 1_000), None);
        let (payload, tag) = sealed.split_once('.').unwrap_or_default();
        let mut forged = URL_SAFE_NO_PAD.decode(payload).unwrap_or_default();
        if let Some(byte) = forged.iter_mut().find(|byte| **byte == b'7') {
            *byte = b'8';
        }
        assert_eq!(
            signer.open(&format!("{}.{tag}", URL_SAFE_NO_PAD.encode(forged)), 1_000),
            None
        );
        assert_eq!(signer.open("garbage", 1_000), None);
        assert_eq!(signer.open(&"a.".repeat(600), 1_000), None);
    }

    fn claims_of(signer: &Signer, sealed: &str) -> Claims {
        signer.open(sealed, 0).unwrap_or_else(|| claims(0))
    }

    // A CSRF token belongs to one session.
    #[test]
    fn csrf_tokens_are_bound_to_the_session() {
        let signer = Signer::new(None);
        let token = signer.csrf("n1");
        assert!(signer.csrf_matches("n1", &token));
        assert!(!signer.csrf_matches("n2", &token));
        assert!(!signer.csrf_matches("n1", ""));
    }

    #[test]
    fn hex_round_trips_and_cookies_parse() {
        let bytes = [0xab; 32];
        assert_eq!(unhex32(&hex(&bytes)), Some(bytes));
        assert_eq!(unhex32("zz"), None);
        assert_eq!(cookie("a=1; qs_console=x.y; b=2", COOKIE), Some("x.y"));
        assert_eq!(cookie("a=1", COOKIE), None);
    }
}
