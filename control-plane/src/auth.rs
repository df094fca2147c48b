//! API keys (SPEC 2): `qs_live_<secret>` / `qs_test_<secret>`, 32 random bytes of secret,
//! stored only as a SHA-256 hash, compared in constant time, and carrying scopes.

pub mod cache;

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::Environment;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Catalog, keys, webhooks, settings.
    Admin,
    /// Usage, grants, reservations, subscriptions, test clock.
    Write,
    /// Checks, balances, ledger, lists.
    Read,
    /// The proxy's replication stream and usage batches.
    Sync,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Write => "write",
            Scope::Read => "read",
            Scope::Sync => "sync",
        }
    }
}

/// Every scope name a key may list; `*` means all.
pub const SCOPE_NAMES: [&str; 5] = ["admin", "write", "read", "sync", "*"];

/// Checks a requested scope list: not empty, only known names, no duplicates.
///
/// # Errors
/// A message naming the offending scope.
pub fn validate_scopes(scopes: &[String]) -> Result<Vec<String>, String> {
    if scopes.is_empty() {
        return Err("must list at least one scope (admin, write, read, sync, or \"*\")".into());
    }
    let mut seen: Vec<String> = Vec::new();
    for scope in scopes {
        if !SCOPE_NAMES.contains(&scope.as_str()) {
            return Err(format!(
                "`{scope}` is not one of admin, write, read, sync, *"
            ));
        }
        if !seen.contains(scope) {
            seen.push(scope.clone());
        }
    }
    Ok(seen)
}

/// The first of a new key's scopes that the creating key does not have itself, if any:
/// a key cannot make a key that may do more than itself (`*` only from a `*` key).
pub fn beyond(requested: &[String], caller: &[String]) -> Option<&'static str> {
    if caller.iter().any(|scope| scope == "*") {
        return None;
    }
    requested
        .iter()
        .find(|scope| !caller.iter().any(|own| own == *scope))
        .and_then(|scope| SCOPE_NAMES.iter().copied().find(|name| name == scope))
}

/// Whether `scopes` grant `wanted`.
pub fn allows(scopes: &[String], wanted: Scope) -> bool {
    scopes
        .iter()
        .any(|scope| scope == "*" || scope == wanted.as_str())
}

/// A freshly generated key: the full secret (shown once) and what is stored.
#[derive(Debug)]
pub struct NewKey {
    pub secret: String,
    pub prefix: String,
    pub hash: [u8; 32],
}

/// How many leading characters of a key are kept to recognise it.
const PREFIX_LEN: usize = 12;

/// Generates a key for `environment` from 32 bytes of the operating system's CSPRNG.
pub fn generate_key(environment: Environment) -> NewKey {
    let bytes: [u8; 32] = rand::random();
    let secret = format!(
        "qs_{}_{}",
        environment.as_str(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let prefix = secret.chars().take(PREFIX_LEN).collect();
    NewKey {
        hash: hash_key(&secret),
        secret,
        prefix,
    }
}

pub fn hash_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Constant-time comparison of two hashes.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// The environment a presented key claims by its prefix (`qs_live_` or `qs_test_`).
pub fn key_environment(secret: &str) -> Option<Environment> {
    if secret.starts_with("qs_live_") {
        Some(Environment::Live)
    } else if secret.starts_with("qs_test_") {
        Some(Environment::Test)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keys carry their environment, hash stably, and differ every time.
    #[test]
    fn keys_are_prefixed_hashed_and_random() {
        let a = generate_key(Environment::Live);
        let b = generate_key(Environment::Test);
        assert!(a.secret.starts_with("qs_live_") && b.secret.starts_with("qs_test_"));
        assert!(a.secret.len() >= 8 + 43, "32 bytes of base64");
        assert_eq!(key_environment(&b.secret), Some(Environment::Test));
        assert!(hashes_equal(&hash_key(&a.secret), &a.hash));
        assert!(!hashes_equal(&a.hash, &b.hash));
        assert_eq!(a.prefix.len(), PREFIX_LEN);
    }

    // Scope lists are validated and `*` grants everything.
    #[test]
    fn scopes() {
        assert!(validate_scopes(&[]).is_err());
        assert!(validate_scopes(&["root".into()]).is_err());
        assert_eq!(
            validate_scopes(&["read".into(), "read".into()]),
            Ok(vec!["read".to_string()])
        );
        assert!(allows(&["*".into()], Scope::Sync));
        assert!(!allows(&["read".into()], Scope::Write));
    }
}
