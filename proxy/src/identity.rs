//! Who is calling: the end user id from a header, or from the `sub` claim of a verified
//! bearer JWT (HS256 with a shared secret, RS256/ES256 with a public key).

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{ConfigError, IdentityConfig};

/// How the end user is found in a request.
#[derive(Clone)]
pub enum Identity {
    Header(http::HeaderName),
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
    },
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Header(name) => f.debug_tuple("Header").field(name).finish(),
            Identity::Jwt { validation, .. } => f
                .debug_struct("Jwt")
                .field("algorithms", &validation.algorithms)
                .finish_non_exhaustive(),
        }
    }
}

/// Why a request has no usable identity (answered 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the {0} header is missing")]
    Missing(String),
    #[error("the {0} header is not a valid end user id: {1}")]
    Invalid(String, String),
    #[error("the bearer token was refused: {0}")]
    Token(String),
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

const DEFAULT_HEADER: &str = "x-end-user-id";

impl Identity {
    /// # Errors
    /// A bad header name, an unknown algorithm, or a missing or unreadable key.
    pub fn from_config(config: &IdentityConfig) -> Result<Identity, ConfigError> {
        let err = |setting: &str, message: String| ConfigError {
            setting: setting.into(),
            message,
        };
        let Some(jwt) = &config.jwt else {
            let name = config.header.as_deref().unwrap_or(DEFAULT_HEADER);
            let header = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|error| err("identity.header", error.to_string()))?;
            return Ok(Identity::Header(header));
        };
        let algorithm = match jwt.algorithm.as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => {
                return Err(err(
                    "identity.jwt.algorithm",
                    format!("{other:?} is not one of HS256, RS256, ES256"),
                ));
            }
        };
        let key = if algorithm == Algorithm::HS256 {
            match jwt.secret.as_ref().map(crate::config::Secret::expose) {
                Some(secret) if secret.len() >= 16 => DecodingKey::from_secret(secret.as_bytes()),
                Some(_) => {
                    return Err(err(
                        "identity.jwt.secret",
                        "must be at least 16 bytes".into(),
                    ));
                }
                None => {
                    return Err(err(
                        "identity.jwt.secret",
                        "is required for HS256 (or set QS_PROXY_JWT_SECRET)".into(),
                    ));
                }
            }
        } else {
            let path = jwt.public_key_file.as_ref().ok_or_else(|| {
                err(
                    "identity.jwt.public_key_file",
                    format!("is required for {}", jwt.algorithm),
                )
            })?;
            let pem = std::fs::read(path).map_err(|error| {
                err(
                    "identity.jwt.public_key_file",
                    format!("{}: {error}", path.display()),
                )
            })?;
            let parsed = if algorithm == Algorithm::RS256 {
                DecodingKey::from_rsa_pem(&pem)
            } else {
                DecodingKey::from_ec_pem(&pem)
            };
            parsed.map_err(|error| {
                err(
                    "identity.jwt.public_key_file",
                    format!(
                        "{}: not a PEM public key for {}: {error}",
                        path.display(),
                        jwt.algorithm
                    ),
                )
            })?
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = jwt.leeway_secs;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(issuer) = &jwt.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &jwt.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        Ok(Identity::Jwt {
            key: Box::new(key),
            validation: Box::new(validation),
        })
    }

    /// The end user of a request.
    ///
    /// # Errors
    /// No identity, or one that is not valid (answered 401).
    pub fn end_user(&self, headers: &http::HeaderMap) -> Result<ledger::EndUserId, IdentityError> {
        match self {
            Identity::Header(name) => {
                let value = headers
                    .get(name)
                    .ok_or_else(|| IdentityError::Missing(name.to_string()))?;
                let text = value.to_str().map_err(|_| {
                    IdentityError::Invalid(name.to_string(), "not printable ASCII".into())
                })?;
                ledger::EndUserId::new(text)
                    .map_err(|error| IdentityError::Invalid(name.to_string(), error.to_string()))
            }
            Identity::Jwt { key, validation } => {
                let value = headers
                    .get(http::header::AUTHORIZATION)
                    .ok_or_else(|| IdentityError::Missing("authorization".into()))?;
                let token = value
                    .to_str()
                    .ok()
                    .and_then(|text| {
                        text.strip_prefix("Bearer ")
                            .or_else(|| text.strip_prefix("bearer "))
                    })
                    .ok_or_else(|| IdentityError::Token("want `Bearer <jwt>`".into()))?;
                let data = jsonwebtoken::decode::<Claims>(token.trim(), key, validation)
                    .map_err(|error| IdentityError::Token(error.to_string()))?;
                ledger::EndUserId::new(&data.claims.sub).map_err(|error| {
                    IdentityError::Token(format!("sub is not a valid end user id: {error}"))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{JwtConfig, Secret};
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &str = "a-test-secret-of-some-length";

    fn hs256() -> Identity {
        Identity::from_config(&IdentityConfig {
            header: None,
            jwt: Some(JwtConfig {
                algorithm: "HS256".into(),
                secret: Some(Secret::new(SECRET)),
                public_key_file: None,
                issuer: None,
                audience: None,
                leeway_secs: 0,
            }),
        })
        .expect("valid")
    }

    fn token(sub: &str, exp_offset: i64) -> String {
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs(),
        )
        .expect("fits");
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": sub, "exp": now + exp_offset}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encodes")
    }

    fn bearer(token: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        headers
    }

    #[test]
    fn the_default_header_names_the_end_user() {
        let identity = Identity::from_config(&IdentityConfig::default()).expect("valid");
        let mut headers = http::HeaderMap::new();
        assert_eq!(
            identity.end_user(&headers),
            Err(IdentityError::Missing("x-end-user-id".into()))
        );
        headers.insert("x-end-user-id", "user_1".parse().expect("header"));
        assert_eq!(identity.end_user(&headers).expect("ok").as_str(), "user_1");
        headers.insert("x-end-user-id", "".parse().expect("header"));
        assert!(matches!(
            identity.end_user(&headers),
            Err(IdentityError::Invalid(..))
        ));
        headers.insert("x-end-user-id", "x".repeat(257).parse().expect("header"));
        assert!(matches!(
            identity.end_user(&headers),
            Err(IdentityError::Invalid(..))
        ));
    }

    #[test]
    fn a_verified_jwt_gives_its_subject() {
        let identity = hs256();
        let headers = bearer(&token("user_7", 300));
        assert_eq!(identity.end_user(&headers).expect("ok").as_str(), "user_7");
    }

    #[test]
    fn expired_forged_or_missing_tokens_are_refused() {
        let identity = hs256();
        assert!(matches!(
            identity.end_user(&bearer(&token("user_7", -300))),
            Err(IdentityError::Token(_))
        ));
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "user_7", "exp": 4_000_000_000u64}),
            &EncodingKey::from_secret(b"another-secret-entirely"),
        )
        .expect("encodes");
        assert!(matches!(
            identity.end_user(&bearer(&forged)),
            Err(IdentityError::Token(_))
        ));
        assert!(matches!(
            identity.end_user(&http::HeaderMap::new()),
            Err(IdentityError::Missing(_))
        ));
    }

    fn keys(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/keys")
            .join(name)
    }

    fn asymmetric(algorithm: Algorithm, public: &str) -> Identity {
        Identity::from_config(&IdentityConfig {
            header: None,
            jwt: Some(JwtConfig {
                algorithm: format!("{algorithm:?}"),
                secret: None,
                public_key_file: Some(keys(public)),
                issuer: Some("https://auth.example.com".into()),
                audience: Some("my-api".into()),
                leeway_secs: 0,
            }),
        })
        .expect("valid")
    }

    fn signed(algorithm: Algorithm, key: &EncodingKey, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(algorithm), claims, key).expect("encodes")
    }

    #[test]
    fn rs256_and_es256_tokens_are_verified_with_the_public_key() {
        let exp = 4_000_000_000u64;
        let claims = serde_json::json!({"sub": "user_9", "exp": exp, "iss": "https://auth.example.com", "aud": "my-api"});
        let rsa =
            EncodingKey::from_rsa_pem(&std::fs::read(keys("rs256-private.pem")).expect("key"))
                .expect("rsa key");
        let ec = EncodingKey::from_ec_pem(&std::fs::read(keys("es256-private.pem")).expect("key"))
            .expect("ec key");
        for (algorithm, key, public) in [
            (Algorithm::RS256, &rsa, "rs256-public.pem"),
            (Algorithm::ES256, &ec, "es256-public.pem"),
        ] {
            let identity = asymmetric(algorithm, public);
            let token = signed(algorithm, key, &claims);
            assert_eq!(
                identity.end_user(&bearer(&token)).expect("ok").as_str(),
                "user_9"
            );
            // Another audience, or a token signed with the other algorithm's key: refused.
            let wrong_audience = signed(
                algorithm,
                key,
                &serde_json::json!({"sub": "user_9", "exp": exp, "iss": "https://auth.example.com", "aud": "other"}),
            );
            assert!(identity.end_user(&bearer(&wrong_audience)).is_err());
        }
        let es_identity = asymmetric(Algorithm::ES256, "es256-public.pem");
        assert!(
            es_identity
                .end_user(&bearer(&signed(Algorithm::RS256, &rsa, &claims)))
                .is_err()
        );
        // An HS256 token made with the public key as its secret (the classic confusion).
        let public_as_secret =
            EncodingKey::from_secret(&std::fs::read(keys("rs256-public.pem")).expect("key"));
        let rs_identity = asymmetric(Algorithm::RS256, "rs256-public.pem");
        assert!(
            rs_identity
                .end_user(&bearer(&signed(
                    Algorithm::HS256,
                    &public_as_secret,
                    &claims
                )))
                .is_err()
        );
    }

    #[test]
    fn unknown_algorithms_and_missing_keys_are_config_errors() {
        let mut config = JwtConfig {
            algorithm: "none".into(),
            secret: None,
            public_key_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 0,
        };
        let check = |jwt: &JwtConfig| {
            Identity::from_config(&IdentityConfig {
                header: None,
                jwt: Some(jwt.clone()),
            })
            .expect_err("refused")
            .setting
        };
        assert_eq!(check(&config), "identity.jwt.algorithm");
        config.algorithm = "RS256".into();
        assert_eq!(check(&config), "identity.jwt.public_key_file");
        config.algorithm = "HS256".into();
        config.secret = Some(Secret::new("short"));
        assert_eq!(check(&config), "identity.jwt.secret");
    }
}
