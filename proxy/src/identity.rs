//! Who is calling: the end user id from a header, or from the `sub` claim of a verified
//! bearer JWT (HS256 with a shared secret, RS256/ES256 with a public key); and the header
//! the upstream learns it from, which only the proxy sets.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{ConfigError, IdentityConfig};

/// How the end user is found in a request, and how the upstream is told.
#[derive(Clone)]
pub struct Identity {
    source: Source,
    /// Removed from every request the proxy forwards, then set to the end user it charged
    /// on gated routes: what the upstream reads this header from is the proxy, never the
    /// client.
    pub forward_header: http::HeaderName,
}

/// Where the end user comes from.
#[derive(Clone)]
enum Source {
    Header(http::HeaderName),
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
    },
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut debug = f.debug_struct("Identity");
        match &self.source {
            Source::Header(name) => debug.field("header", name),
            Source::Jwt { validation, .. } => debug
                .field("jwt_algorithms", &validation.algorithms)
                .field("jwt_audience", &validation.aud),
        };
        debug
            .field("forward_header", &self.forward_header)
            .finish_non_exhaustive()
    }
}

/// Why a request has no usable identity: answered 401, except [`Repeated`] (400: the
/// request itself is ambiguous).
///
/// [`Repeated`]: IdentityError::Repeated
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the {0} header is missing")]
    Missing(String),
    #[error("the {0} header is not a valid end user id: {1}")]
    Invalid(String, String),
    #[error("the bearer token was refused: {0}")]
    Token(String),
    #[error("the {0} header is sent more than once: which end user is meant is ambiguous")]
    Repeated(String),
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

const DEFAULT_HEADER: &str = "x-end-user-id";

/// Headers the proxy will not overwrite with an end user id: the request would break
/// (framing, routing) or lose its credentials.
const NOT_FORWARDABLE: &[&str] = &[
    "authorization",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "cookie",
    "expect",
    "host",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The one value of `name`, refusing a request that sends it more than once (the proxy
/// and the upstream could read different copies).
fn single<'h>(
    headers: &'h http::HeaderMap,
    name: &http::HeaderName,
) -> Result<&'h http::HeaderValue, IdentityError> {
    let mut values = headers.get_all(name).iter();
    let value = values
        .next()
        .ok_or_else(|| IdentityError::Missing(name.to_string()))?;
    if values.next().is_some() {
        return Err(IdentityError::Repeated(name.to_string()));
    }
    Ok(value)
}

fn config_error(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.into(),
        message: message.into(),
    }
}

impl Identity {
    /// # Errors
    /// A bad header name, an unknown algorithm, a missing or unreadable key, a JWT
    /// configuration without an audience (unless explicitly waived).
    pub fn from_config(config: &IdentityConfig) -> Result<Identity, ConfigError> {
        let forward = config.forward_header.as_deref().unwrap_or(DEFAULT_HEADER);
        let forward_header = http::HeaderName::from_bytes(forward.as_bytes())
            .map_err(|error| config_error("identity.forward_header", error.to_string()))?;
        if NOT_FORWARDABLE.contains(&forward_header.as_str()) {
            return Err(config_error(
                "identity.forward_header",
                format!("{forward:?} carries the request itself; name a header of its own"),
            ));
        }
        let source = match &config.jwt {
            None => {
                let name = config.header.as_deref().unwrap_or(DEFAULT_HEADER);
                let header = http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|error| config_error("identity.header", error.to_string()))?;
                Source::Header(header)
            }
            Some(jwt) => Source::jwt(jwt)?,
        };
        Ok(Identity {
            source,
            forward_header,
        })
    }

    /// The end user of a request.
    ///
    /// # Errors
    /// No identity, or one that is not valid (answered 401), or one sent twice (400).
    pub fn end_user(&self, headers: &http::HeaderMap) -> Result<ledger::EndUserId, IdentityError> {
        match &self.source {
            Source::Header(name) => {
                let value = single(headers, name)?;
                let text = value.to_str().map_err(|_| {
                    IdentityError::Invalid(name.to_string(), "not printable ASCII".into())
                })?;
                ledger::EndUserId::new(text)
                    .map_err(|error| IdentityError::Invalid(name.to_string(), error.to_string()))
            }
            Source::Jwt { key, validation } => {
                let value = single(headers, &http::header::AUTHORIZATION)?;
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

impl Source {
    fn jwt(jwt: &crate::config::JwtConfig) -> Result<Source, ConfigError> {
        let algorithm = match jwt.algorithm.as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => {
                return Err(config_error(
                    "identity.jwt.algorithm",
                    format!("{other:?} is not one of HS256, RS256, ES256"),
                ));
            }
        };
        let key = if algorithm == Algorithm::HS256 {
            match jwt.secret.as_ref().map(crate::config::Secret::expose) {
                Some(secret) if secret.len() >= 16 => DecodingKey::from_secret(secret.as_bytes()),
                Some(_) => {
                    return Err(config_error(
                        "identity.jwt.secret",
                        "must be at least 16 bytes",
                    ));
                }
                None => {
                    return Err(config_error(
                        "identity.jwt.secret",
                        "is required for HS256 (or set QS_PROXY_JWT_SECRET)",
                    ));
                }
            }
        } else {
            let path = jwt.public_key_file.as_ref().ok_or_else(|| {
                config_error(
                    "identity.jwt.public_key_file",
                    format!("is required for {}", jwt.algorithm),
                )
            })?;
            let pem = std::fs::read(path).map_err(|error| {
                config_error(
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
                config_error(
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
        validation.validate_nbf = true;
        // jsonwebtoken checks `iss` and `aud` only when a token carries them: a
        // configured one must also be required.
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &jwt.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match (&jwt.audience, jwt.require_audience) {
            (Some(audience), true) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            (None, false) => validation.validate_aud = false,
            (None, true) => {
                return Err(config_error(
                    "identity.jwt.audience",
                    "is required: the `aud` your tokens are issued for this API (or set \
                     require_audience = false to accept tokens issued for any audience)",
                ));
            }
            (Some(_), false) => {
                return Err(config_error(
                    "identity.jwt.require_audience",
                    "is false while audience is set: keep one of them",
                ));
            }
        }
        validation.set_required_spec_claims(&required);
        Ok(Source::Jwt {
            key: Box::new(key),
            validation: Box::new(validation),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{JwtConfig, Secret};
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &str = "a-test-secret-of-some-length";

    fn hs256() -> Identity {
        hs256_with(None, false)
    }

    /// HS256 with `audience` (required when given).
    fn hs256_with(audience: Option<&str>, require_audience: bool) -> Identity {
        Identity::from_config(&IdentityConfig {
            header: None,
            jwt: Some(JwtConfig {
                algorithm: "HS256".into(),
                secret: Some(Secret::new(SECRET)),
                public_key_file: None,
                issuer: None,
                audience: audience.map(str::to_owned),
                require_audience,
                leeway_secs: 0,
            }),
            forward_header: None,
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
                require_audience: true,
                leeway_secs: 0,
            }),
            forward_header: None,
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
        // Without the configured issuer or audience at all: refused too.
        for claims in [
            serde_json::json!({"sub": "user_9", "exp": exp, "aud": "my-api"}),
            serde_json::json!({"sub": "user_9", "exp": exp, "iss": "https://auth.example.com"}),
        ] {
            let identity = asymmetric(Algorithm::ES256, "es256-public.pem");
            assert!(
                identity
                    .end_user(&bearer(&signed(Algorithm::ES256, &ec, &claims)))
                    .is_err(),
                "{claims}"
            );
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
            audience: Some("my-api".into()),
            require_audience: true,
            leeway_secs: 0,
        };
        let check = |jwt: &JwtConfig| {
            Identity::from_config(&IdentityConfig {
                header: None,
                jwt: Some(jwt.clone()),
                forward_header: None,
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
        // Neither an audience nor an explicit waiver: tokens issued for any other service
        // of the same identity provider would pass.
        config.secret = Some(Secret::new(SECRET));
        config.audience = None;
        assert_eq!(check(&config), "identity.jwt.audience");
        config.audience = Some("my-api".into());
        config.require_audience = false;
        assert_eq!(check(&config), "identity.jwt.require_audience");
    }

    fn now_secs() -> i64 {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs(),
        )
        .expect("fits")
    }

    fn hs256_token(claims: &serde_json::Value) -> String {
        signed(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            claims,
        )
    }

    #[test]
    fn a_token_not_valid_yet_is_refused() {
        let identity = hs256();
        let now = now_secs();
        let early =
            hs256_token(&serde_json::json!({"sub": "u", "exp": now + 600, "nbf": now + 300}));
        assert!(matches!(
            identity.end_user(&bearer(&early)),
            Err(IdentityError::Token(_))
        ));
        let valid =
            hs256_token(&serde_json::json!({"sub": "u", "exp": now + 600, "nbf": now - 10}));
        assert_eq!(
            identity.end_user(&bearer(&valid)).expect("ok").as_str(),
            "u"
        );
    }

    #[test]
    fn a_token_for_another_audience_or_none_is_refused() {
        let identity = hs256_with(Some("my-api"), true);
        let exp = now_secs() + 300;
        let mine = hs256_token(&serde_json::json!({"sub": "u", "exp": exp, "aud": "my-api"}));
        assert_eq!(identity.end_user(&bearer(&mine)).expect("ok").as_str(), "u");
        for claims in [
            serde_json::json!({"sub": "u", "exp": exp, "aud": "billing-api"}),
            serde_json::json!({"sub": "u", "exp": exp}),
        ] {
            assert!(
                matches!(
                    identity.end_user(&bearer(&hs256_token(&claims))),
                    Err(IdentityError::Token(_))
                ),
                "{claims}"
            );
        }
        // Waived explicitly: any audience passes.
        let any = hs256_with(None, false);
        let other = hs256_token(&serde_json::json!({"sub": "u", "exp": exp, "aud": "billing-api"}));
        assert!(any.end_user(&bearer(&other)).is_ok());
    }

    #[test]
    fn an_identity_sent_twice_is_refused() {
        let identity = Identity::from_config(&IdentityConfig::default()).expect("valid");
        let mut headers = http::HeaderMap::new();
        headers.append("x-end-user-id", "user_1".parse().expect("header"));
        headers.append("x-end-user-id", "user_2".parse().expect("header"));
        assert_eq!(
            identity.end_user(&headers),
            Err(IdentityError::Repeated("x-end-user-id".into()))
        );
        let jwt = hs256();
        let mut headers = bearer(&token("user_7", 300));
        headers.append(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token("user_8", 300))
                .parse()
                .expect("header"),
        );
        assert_eq!(
            jwt.end_user(&headers),
            Err(IdentityError::Repeated("authorization".into()))
        );
    }

    #[test]
    fn the_forward_header_defaults_to_x_end_user_id_and_cannot_be_a_request_header() {
        let default = Identity::from_config(&IdentityConfig::default()).expect("valid");
        assert_eq!(default.forward_header, "x-end-user-id");
        let custom = Identity::from_config(&IdentityConfig {
            forward_header: Some("X-Charged-User".into()),
            ..IdentityConfig::default()
        })
        .expect("valid");
        assert_eq!(custom.forward_header, "x-charged-user");
        for name in ["host", "Authorization", "content-length", "bad name"] {
            let error = Identity::from_config(&IdentityConfig {
                forward_header: Some(name.into()),
                ..IdentityConfig::default()
            })
            .expect_err(name);
            assert_eq!(error.setting, "identity.forward_header", "{name}");
        }
    }
}
