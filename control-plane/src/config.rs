//! Configuration in two stages: the raw TOML (unknown keys are errors), then a validated
//! [`Config`] with typed addresses, sizes and durations. Secrets redact themselves.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use crate::store::{DatabaseUrl, Synchronous};

/// A secret string: usable, never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    rate_limit: RawRateLimit,
    #[serde(default)]
    idempotency: RawIdempotency,
    #[serde(default)]
    jobs: RawJobs,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    webhooks: RawWebhooks,
    #[serde(default)]
    sync: RawSync,
    #[serde(default)]
    console: RawConsole,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConsole {
    session_secret: Option<Secret>,
    session_hours: Option<u64>,
    secure_cookies: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSync {
    feed_retention_hours: Option<u64>,
    streams_per_key: Option<usize>,
    stream_max_secs: Option<u64>,
    nats_url: Option<String>,
    nats_linger_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWebhooks {
    allow_private_addresses: Option<bool>,
    timeout_secs: Option<u64>,
    concurrency: Option<usize>,
    per_environment: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    body_limit_bytes: Option<usize>,
    shutdown_grace_secs: Option<u64>,
    catalog_cache_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
    synchronous: Option<String>,
    read_connections: Option<u32>,
    max_connections: Option<u32>,
    group_commit_max: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    operator_token: Option<Secret>,
    key_cache_len: Option<usize>,
    key_cache_ttl_ms: Option<u64>,
    missing_key_cache_len: Option<usize>,
    missing_key_cache_ttl_ms: Option<u64>,
    failures_per_second: Option<u32>,
    failures_burst: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    requests_per_second: Option<u32>,
    burst: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdempotency {
    retention_hours: Option<u64>,
    usage_retention_days: Option<u64>,
    wait_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawJobs {
    interval_ms: Option<u64>,
    batch_len_max: Option<u32>,
    environment_budget_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Request bodies larger than this answer 413 (default 1 MiB).
    pub body_limit_bytes: usize,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// How long a cached catalog (with settings and test-clock offset) is used before it
    /// is read again: how soon a change made through another replica applies here.
    pub catalog_cache: Duration,
    pub database: DatabaseUrl,
    pub synchronous: Synchronous,
    /// Reader connections beside the single writer (SQLite).
    pub read_connections: u32,
    /// The most connections the PostgreSQL pool opens (default 16). Every in-flight
    /// mutation holds one for its transaction, so this bounds concurrent writes.
    pub max_connections: u32,
    /// The most concurrent operations one transaction carries, of one end user (group
    /// commit) and of an environment's end users together (default 64; 1 turns both
    /// off).
    pub group_commit_max: usize,
    /// Authorises `POST /v1/operator/tenants`; `None` disables the endpoint.
    pub operator_token: Option<Secret>,
    /// What authentication remembers, and the limit on failed authentications per client
    /// address (`[auth]`).
    pub key_cache: crate::auth::cache::KeyCacheLimits,
    /// Per tenant and environment (SPEC 2: default 2000/s, burst 4000).
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    /// How long idempotency keys are kept (SPEC 9: at least 24 h).
    pub idempotency_retention: Duration,
    /// How long usage event keys are kept (SPEC 9: 35 days).
    pub usage_key_retention: Duration,
    /// How long a request waits for an in-flight twin before answering 409 (SPEC 9: 10 s).
    pub idempotency_wait: Duration,
    /// How often the scheduler looks for due work.
    pub jobs_interval: Duration,
    /// The most end users one scheduler batch reads.
    pub jobs_batch_len_max: u32,
    /// How long one environment's due work may take of a scheduler pass before the pass
    /// moves on (the rest waits for the next pass): no tenant holds up another's.
    pub jobs_environment_budget: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Whether webhook URLs may point at private, loopback or link-local addresses
    /// (server-side request forgery guard; allow only for development).
    pub webhooks_allow_private: bool,
    /// How long one webhook delivery may take (SPEC 11: 10 s).
    pub webhook_timeout: Duration,
    /// How many deliveries run at once, in all.
    pub webhook_concurrency: usize,
    /// How many deliveries one environment may have in flight at once (its share of the
    /// worker: an endpoint that never answers holds only its own environment's share).
    pub webhook_per_environment: usize,
    /// How long the change feed keeps entries; a proxy further behind re-snapshots.
    pub feed_retention: Duration,
    /// Sync streams (snapshot or change stream) one API key may hold open at once on one
    /// server.
    pub streams_per_key: usize,
    /// How long one change stream stays open before the server ends it (the follower
    /// reconnects from its cursor and loses nothing): long-lived connections are spread
    /// again over replicas, and no stream outlives a deploy's drain by much.
    pub stream_max: Duration,
    /// Where to publish each environment's change feed on NATS JetStream besides the
    /// HTTP stream (`sync.nats_url`; `None`: HTTP only). It may carry credentials, so it
    /// never prints.
    pub nats_url: Option<Secret>,
    /// How long the NATS publisher lets commits gather before each publication, after
    /// one woke it or after the last publication caught up (`sync.nats_linger_ms`,
    /// 0..=1000, default 10): fewer, larger messages (NATS's and a follower's cost is
    /// mostly per message delivered to every follower) for this much more lag.
    pub nats_linger: Duration,
    /// The console's sessions (`[console]`, docs/console.md).
    pub console: ConsoleConfig,
}

/// How the console signs its sessions in.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Signs session cookies (`console.session_secret`, at least 32 characters). Unset,
    /// each process draws its own at start: sessions end with a restart and hold on one
    /// replica only.
    pub session_secret: Option<Secret>,
    /// How long a session lasts from sign-in (default 8 hours).
    pub session_length: Duration,
    /// Whether cookies are marked `Secure` even when a request does not say it came over
    /// TLS (`X-Forwarded-Proto: https` marks them so anyway).
    pub secure_cookies: bool,
}

/// Values given on the command line or in the environment, which win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub database_url: Option<String>,
    pub operator_token: Option<String>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl Config {
    /// Reads, parses and validates a configuration file, then applies `overrides`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or the field at fault.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string(), overrides)
    }

    /// Parses and validates configuration text (`origin` names it in errors).
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn parse(text: &str, origin: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: origin.to_owned(),
            message: error.to_string(),
        })?;
        Config::validate(raw, overrides)
    }

    /// The defaults alone (an in-memory database on a random port): for tests.
    pub fn for_tests() -> Config {
        let overrides = Overrides {
            database_url: Some(":memory:".into()),
            listen: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        };
        let mut config = Config::validate(RawConfig::default(), &overrides)
            .unwrap_or_else(|error| unreachable!("defaults are valid: {error}"));
        config.jobs_interval = Duration::from_millis(50);
        // Tests run their webhook receivers on loopback.
        config.webhooks_allow_private = true;
        config
    }

    fn validate(raw: RawConfig, overrides: &Overrides) -> Result<Config, ConfigError> {
        let listen = listen_address(overrides.listen.clone().or(raw.server.listen))?;
        let body_limit_bytes = raw.server.body_limit_bytes.unwrap_or(1024 * 1024);
        if !(1024..=64 * 1024 * 1024).contains(&body_limit_bytes) {
            return Err(invalid(
                "server.body_limit_bytes",
                "must be 1 KiB to 64 MiB",
            ));
        }
        let url = overrides
            .database_url
            .clone()
            .or(raw.database.url)
            .unwrap_or_else(|| "sqlite://data/quotastack.db".into());
        let database = parse_database_url(&url)?;
        let synchronous = synchronous(raw.database.synchronous.as_deref())?;
        let read_connections = ranged(
            "database.read_connections",
            raw.database.read_connections,
            4,
            1..=64,
        )?;
        let max_connections = ranged(
            "database.max_connections",
            raw.database.max_connections,
            16,
            1..=256,
        )?;
        let catalog_cache = Duration::from_millis(ranged(
            "server.catalog_cache_ms",
            raw.server.catalog_cache_ms,
            1000,
            0..=60_000,
        )?);
        let group_commit_max = ranged(
            "database.group_commit_max",
            raw.database.group_commit_max,
            64,
            1..=1024,
        )?;
        let operator_token = operator_token(
            overrides
                .operator_token
                .clone()
                .map(Secret::new)
                .or(raw.auth.operator_token.clone()),
        )?;
        let rate_limit_per_second = raw.rate_limit.requests_per_second.unwrap_or(2000);
        let rate_limit_burst = raw.rate_limit.burst.unwrap_or(4000);
        if rate_limit_per_second == 0 || rate_limit_burst == 0 {
            return Err(invalid(
                "rate_limit",
                "requests_per_second and burst must be positive",
            ));
        }
        let (idempotency_retention, usage_key_retention) = retention(&raw.idempotency)?;
        let log_format = log_format(overrides.log_format.clone().or(raw.log.format))?;
        let webhook_concurrency = raw.webhooks.concurrency.unwrap_or(16).clamp(1, 256);
        let jobs_interval_ms = ranged("jobs.interval_ms", raw.jobs.interval_ms, 1000, 10..=60_000)?;
        Ok(Config {
            listen,
            body_limit_bytes,
            shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_secs.unwrap_or(10)),
            catalog_cache,
            database,
            synchronous,
            read_connections,
            max_connections,
            group_commit_max,
            operator_token,
            key_cache: key_cache_limits(&raw.auth),
            rate_limit_per_second,
            rate_limit_burst,
            idempotency_retention,
            usage_key_retention,
            idempotency_wait: Duration::from_secs(raw.idempotency.wait_secs.unwrap_or(10)),
            jobs_interval: Duration::from_millis(jobs_interval_ms),
            jobs_batch_len_max: raw.jobs.batch_len_max.unwrap_or(500).clamp(1, 10_000),
            jobs_environment_budget: millis(raw.jobs.environment_budget_ms, 1000, 10..=60_000),
            log_format,
            log_level: (overrides.log_level.clone().or(raw.log.level)).unwrap_or("info".into()),
            webhooks_allow_private: raw.webhooks.allow_private_addresses.unwrap_or(false),
            webhook_timeout: secs(raw.webhooks.timeout_secs, 10, 1..=60),
            webhook_concurrency,
            webhook_per_environment: raw
                .webhooks
                .per_environment
                .unwrap_or(4)
                .clamp(1, webhook_concurrency),
            feed_retention: feed_retention(raw.sync.feed_retention_hours),
            streams_per_key: raw.sync.streams_per_key.unwrap_or(1000).clamp(1, 100_000),
            stream_max: secs(raw.sync.stream_max_secs, 3600, 1..=7 * 86_400),
            nats_url: nats_url(raw.sync.nats_url)?,
            nats_linger: millis(raw.sync.nats_linger_ms, 10, 0..=1000),
            console: console(raw.console)?,
        })
    }
}

/// `sync.feed_retention_hours`: a week by default, an hour to a year.
fn feed_retention(hours: Option<u64>) -> Duration {
    let secs_of = hours.map(|hours| hours.saturating_mul(3600));
    secs(secs_of, 168 * 3600, 3600..=24 * 365 * 3600)
}

/// `[console]`: the session secret at least 32 characters when set.
fn console(raw: RawConsole) -> Result<ConsoleConfig, ConfigError> {
    if let Some(secret) = &raw.session_secret
        && secret.expose().len() < 32
    {
        return Err(invalid(
            "console.session_secret",
            "must be at least 32 characters",
        ));
    }
    Ok(ConsoleConfig {
        session_secret: raw.session_secret,
        session_length: secs(
            raw.session_hours.map(|hours| hours.saturating_mul(3600)),
            8 * 3600,
            300..=7 * 86_400,
        ),
        secure_cookies: raw.secure_cookies.unwrap_or(false),
    })
}

/// `sync.nats_url`, checked to be a NATS server address (an empty string is unset).
fn nats_url(url: Option<String>) -> Result<Option<Secret>, ConfigError> {
    let Some(url) = url.filter(|url| !url.trim().is_empty()) else {
        return Ok(None);
    };
    url.parse::<async_nats::ServerAddr>().map_err(|error| {
        invalid(
            "sync.nats_url",
            format!("must be a NATS address such as nats://127.0.0.1:4222 ({error})"),
        )
    })?;
    Ok(Some(Secret::new(url)))
}

/// `value` (or `default` when unset) if it is within `range`; else the error naming
/// `field` and the range.
fn ranged<T>(
    field: &'static str,
    value: Option<T>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: PartialOrd + fmt::Display + Copy,
{
    let value = value.unwrap_or(default);
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            field,
            format!("must be {} to {}", range.start(), range.end()),
        ))
    }
}

/// Seconds from `value` (or `default`), brought within `range`.
fn secs(value: Option<u64>, default: u64, range: std::ops::RangeInclusive<u64>) -> Duration {
    Duration::from_secs(value.unwrap_or(default).clamp(*range.start(), *range.end()))
}

/// Milliseconds from `value` (or `default`), brought within `range`.
fn millis(value: Option<u64>, default: u64, range: std::ops::RangeInclusive<u64>) -> Duration {
    Duration::from_millis(value.unwrap_or(default).clamp(*range.start(), *range.end()))
}

/// `auth.operator_token` (or `--operator-token`): at least 16 characters when set.
fn operator_token(token: Option<Secret>) -> Result<Option<Secret>, ConfigError> {
    if let Some(token) = &token
        && token.expose().len() < 16
    {
        return Err(invalid(
            "auth.operator_token",
            "must be at least 16 characters",
        ));
    }
    Ok(token)
}

/// How long idempotency records and usage event keys are kept: at least SPEC 9's 24
/// hours and 35 days.
fn retention(raw: &RawIdempotency) -> Result<(Duration, Duration), ConfigError> {
    let hours = raw.retention_hours.unwrap_or(24);
    if hours < 24 {
        return Err(invalid(
            "idempotency.retention_hours",
            "must be at least 24 (SPEC 9)",
        ));
    }
    let days = raw.usage_retention_days.unwrap_or(35);
    if days < 35 {
        return Err(invalid(
            "idempotency.usage_retention_days",
            "must be at least 35 (SPEC 9)",
        ));
    }
    Ok((
        Duration::from_secs(hours.saturating_mul(3600)),
        Duration::from_secs(days.saturating_mul(86_400)),
    ))
}

/// `server.listen` (or `--listen`): 127.0.0.1:8080 by default.
fn listen_address(text: Option<String>) -> Result<SocketAddr, ConfigError> {
    let text = text.unwrap_or_else(|| "127.0.0.1:8080".into());
    text.parse().map_err(|_| {
        invalid(
            "server.listen",
            format!("`{text}` is not an address such as 127.0.0.1:8080"),
        )
    })
}

/// `database.synchronous`: `full` (the default) or `normal`.
fn synchronous(text: Option<&str>) -> Result<Synchronous, ConfigError> {
    match text.unwrap_or("full") {
        "full" => Ok(Synchronous::Full),
        "normal" => Ok(Synchronous::Normal),
        other => Err(invalid(
            "database.synchronous",
            format!("`{other}` is not `full` or `normal`"),
        )),
    }
}

/// `log.format` (or `--log-format`): `text` (the default) or `json`.
fn log_format(text: Option<String>) -> Result<LogFormat, ConfigError> {
    match text.as_deref().unwrap_or("text") {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(invalid(
            "log.format",
            format!("`{other}` is not `text` or `json`"),
        )),
    }
}

fn key_cache_limits(raw: &RawAuth) -> crate::auth::cache::KeyCacheLimits {
    let defaults = crate::auth::cache::KeyCacheLimits::default();
    let millis = |value: Option<u64>, default: ledger::Span| {
        value.map_or(default, |ms| {
            ledger::Span::from_millis(i64::try_from(ms.clamp(0, 3_600_000)).unwrap_or(0))
        })
    };
    crate::auth::cache::KeyCacheLimits {
        found_len: raw
            .key_cache_len
            .unwrap_or(defaults.found_len)
            .clamp(1, 1_000_000),
        found_ttl: millis(raw.key_cache_ttl_ms, defaults.found_ttl),
        missing_len: raw
            .missing_key_cache_len
            .unwrap_or(defaults.missing_len)
            .clamp(1, 1_000_000),
        missing_ttl: millis(raw.missing_key_cache_ttl_ms, defaults.missing_ttl),
        failures_per_second: raw
            .failures_per_second
            .unwrap_or(defaults.failures_per_second)
            .clamp(1, 100_000),
        failures_burst: raw
            .failures_burst
            .unwrap_or(defaults.failures_burst)
            .clamp(1, 1_000_000),
    }
}

fn parse_database_url(url: &str) -> Result<DatabaseUrl, ConfigError> {
    if url == ":memory:" || url == "sqlite::memory:" || url == "sqlite://:memory:" {
        return Ok(DatabaseUrl::SqliteMemory);
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        if path.is_empty() {
            return Err(invalid("database.url", "names no file"));
        }
        return Ok(DatabaseUrl::SqliteFile(path.to_owned()));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(DatabaseUrl::Postgres(url.to_owned()));
    }
    Err(invalid(
        "database.url",
        format!("`{url}` is not sqlite://<file>, :memory: or postgres://…"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a configuration file's text is refused with.
    fn refused(text: &str) -> ConfigError {
        Config::parse(text, "t.toml", &Overrides::default()).expect_err(text)
    }

    // The shipped file parses and validates as it is.
    #[test]
    fn the_shipped_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/control-plane.toml");
        let config =
            Config::load(&path, &Overrides::default()).expect("config/control-plane.toml is valid");
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(
            config.database,
            DatabaseUrl::SqliteFile("data/quotastack.db".into())
        );
    }

    #[test]
    fn every_spelling_of_memory_is_the_private_database() {
        for url in [":memory:", "sqlite::memory:", "sqlite://:memory:"] {
            assert!(
                matches!(parse_database_url(url), Ok(DatabaseUrl::SqliteMemory)),
                "{url}"
            );
        }
        assert!(matches!(
            parse_database_url("sqlite://data/q.db"),
            Ok(DatabaseUrl::SqliteFile(path)) if path == "data/q.db"
        ));
    }

    // Unknown keys, bad values and unsupported URLs are errors that name what is wrong;
    // overrides win over the file; secrets never print.
    #[test]
    fn bad_configs_are_refused_clearly() {
        let none = Overrides::default();
        let unknown = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n",
            "t.toml",
            &none,
        )
        .expect_err("unknown key");
        assert!(unknown.to_string().contains("lisen"), "{unknown}");
        let listen = refused("[server]\nlisten = \"nowhere\"\n");
        assert!(listen.to_string().starts_with("server.listen"), "{listen}");
        let database = refused("[database]\nurl = \"mysql://x\"\n");
        assert!(
            database.to_string().starts_with("database.url"),
            "{database}"
        );
        let short = refused("[auth]\noperator_token = \"short\"\n");
        assert!(
            short.to_string().starts_with("auth.operator_token"),
            "{short}"
        );
        let nats = refused("[sync]\nnats_url = \"nats://a b\"\n");
        assert!(nats.to_string().starts_with("sync.nats_url"), "{nats}");
        let nats = Config::parse(
            "[sync]\nnats_url = \"nats://feed:hunter2@127.0.0.1:4222\"\n",
            "t.toml",
            &none,
        )
        .expect("a NATS address with credentials");
        assert!(nats.nats_url.is_some());
        assert!(
            !format!("{nats:?}").contains("hunter2"),
            "redacted in Debug"
        );
        let retention = refused("[idempotency]\nretention_hours = 1\n");
        assert!(
            retention.to_string().contains("retention_hours"),
            "{retention}"
        );

        let overrides = Overrides {
            listen: Some("127.0.0.1:9999".into()),
            operator_token: Some("a-long-operator-token".into()),
            ..Overrides::default()
        };
        let config = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\n", "t.toml", &overrides)
            .expect("valid");
        assert_eq!(config.listen.port(), 9999);
        assert!(
            !format!("{config:?}").contains("a-long-operator-token"),
            "secrets are redacted in Debug"
        );
    }

    // PostgreSQL URLs are accepted as given, their passwords never print, and the pool
    // size is bounded.
    #[test]
    fn postgres_urls_and_pool_size() {
        let none = Overrides::default();
        for url in [
            "postgres://qs:hunter2@db.internal:5432/quotastack?sslmode=require",
            "postgresql://qs@db.internal/quotastack?password=hunter2",
        ] {
            let config = Config::parse(&format!("[database]\nurl = \"{url}\"\n"), "t.toml", &none)
                .expect("valid");
            assert_eq!(config.database, DatabaseUrl::Postgres(url.into()));
            assert_eq!(config.max_connections, 16);
            let printed = format!("{config:?}");
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(printed.contains("db.internal"), "{printed}");
        }
        let sized =
            Config::parse("[database]\nmax_connections = 64\n", "t.toml", &none).expect("valid");
        assert_eq!(sized.max_connections, 64);
        let zero = refused("[database]\nmax_connections = 0\n");
        assert!(
            zero.to_string().starts_with("database.max_connections"),
            "{zero}"
        );
    }

    #[test]
    fn group_commit_and_catalog_cache_are_bounded() {
        let none = Overrides::default();
        let defaults = Config::parse("", "t.toml", &none).expect("valid");
        assert_eq!(defaults.group_commit_max, 64);
        assert_eq!(defaults.catalog_cache, Duration::from_secs(1));
        let set = Config::parse(
            "[database]\ngroup_commit_max = 1\n[server]\ncatalog_cache_ms = 0\n",
            "t.toml",
            &none,
        )
        .expect("valid");
        assert_eq!(
            (set.group_commit_max, set.catalog_cache),
            (1, Duration::ZERO)
        );
        for (text, field) in [
            (
                "[database]\ngroup_commit_max = 0\n",
                "database.group_commit_max",
            ),
            (
                "[database]\ngroup_commit_max = 5000\n",
                "database.group_commit_max",
            ),
            (
                "[server]\ncatalog_cache_ms = 600000\n",
                "server.catalog_cache_ms",
            ),
        ] {
            let error = Config::parse(text, "t.toml", &none).expect_err(text);
            assert!(error.to_string().starts_with(field), "{error}");
        }
    }
}
