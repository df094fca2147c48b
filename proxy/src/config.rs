//! The proxy's configuration: one TOML file, validated as a whole at start (and on every
//! SIGHUP reload), with a few environment overrides for deployment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration the proxy refuses, naming the setting at fault.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

fn invalid(setting: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.into(),
        message: message.into(),
    }
}

/// A secret from the file or the environment (the control plane key, the JWT secret):
/// usable through [`Secret::expose`], never printed (`Debug` shows `<redacted>`).
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

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect (`127.0.0.1:0` picks a free port).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `/healthz`, `/readyz`, `/metrics`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// The customer's API, `host:port` (plain HTTP on the same host or pod).
    pub upstream: String,
    /// The sled directory: replica and outbox.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// sled's page cache, in MiB.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
    pub control_plane: ControlPlane,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub failure: Failure,
    #[serde(default)]
    pub usage: UsageConfig,
    #[serde(default)]
    pub leases: LeaseConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    /// What a request that matches no route gets: `deny` (404 `no_route`, the default) or
    /// `pass` (forwarded ungated).
    #[serde(default)]
    pub unmatched: Unmatched,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

fn default_listen() -> String {
    "127.0.0.1:8081".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9091".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data/proxy")
}
fn default_cache_mb() -> u64 {
    64
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlane {
    /// e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// A key with the `sync` scope (and `write` for reservations) of the environment the
    /// proxy serves; `QS_PROXY_API_KEY` overrides it (keep secrets out of files).
    #[serde(default)]
    pub api_key: Option<Secret>,
}

/// How the proxy follows the control plane's change feed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Follow the feed from NATS JetStream at this address (e.g. `nats://127.0.0.1:4222`,
    /// credentials allowed), where the control plane publishes it (its own
    /// `sync.nats_url`); the HTTP stream is used while NATS is unreachable or the control
    /// plane does not publish there. Unset: the HTTP stream only. `QS_PROXY_NATS_URL`
    /// overrides it.
    #[serde(default)]
    pub nats_url: Option<Secret>,
}

impl SyncConfig {
    /// The NATS address to follow the feed from, if one is set.
    pub fn nats_url(&self) -> Option<String> {
        self.nats_url
            .as_ref()
            .map(|url| url.expose().to_owned())
            .filter(|url| !url.is_empty())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The header carrying the end user id (default `x-end-user-id`), used when `jwt` is
    /// not set.
    #[serde(default)]
    pub header: Option<String>,
    /// Take the end user from the `sub` claim of a verified `Authorization: Bearer` JWT.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// The header the upstream reads the charged end user from (default
    /// `x-end-user-id`): the proxy removes whatever the client sent under this name and,
    /// on gated routes, sets the end user it charged (public and unmatched routes get
    /// none). The upstream can trust it because the client cannot set it.
    #[serde(default)]
    pub forward_header: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `HS256`, `RS256` or `ES256`.
    pub algorithm: String,
    /// HS256: the shared secret (or `QS_PROXY_JWT_SECRET`).
    #[serde(default)]
    pub secret: Option<Secret>,
    /// RS256 / ES256: a PEM public key file.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    #[serde(default)]
    pub issuer: Option<String>,
    /// The `aud` a token must carry: tokens your identity provider issued for other
    /// services must not pass here. Required unless `require_audience = false`.
    #[serde(default)]
    pub audience: Option<String>,
    /// `false` accepts tokens for any audience (when the secret or key signs tokens for
    /// this API only); the default `true` requires `audience`.
    #[serde(default = "default_true")]
    pub require_audience: bool,
    /// Clock skew allowed on `exp` / `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

fn default_leeway() -> u64 {
    30
}

fn default_true() -> bool {
    true
}

/// What a route does when the proxy cannot decide from fresh state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Admit (and still record usage), bounded by `outage_budget` when set.
    #[default]
    Open,
    /// Answer 503.
    Closed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// The replication stream silent longer than this = stale.
    #[serde(default = "default_staleness")]
    pub max_staleness_secs: u64,
    /// Routes without their own `on_unavailable` use this.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
}

impl Default for Failure {
    fn default() -> Failure {
        Failure {
            max_staleness_secs: default_staleness(),
            on_unavailable: OnUnavailable::Open,
        }
    }
}

fn default_staleness() -> u64 {
    30
}

/// When an admitted request's usage is on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Flushed before the response is released (concurrent requests share one flush).
    #[default]
    Sync,
    /// Flushed every `flush_interval_ms`: up to that much usage can be lost on a crash.
    Interval,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    #[serde(default)]
    pub durability: Durability,
    #[serde(default = "default_flush_interval")]
    pub flush_interval_ms: u64,
    /// Events per `/v1/usage/batch` call (1 to 1000).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How often the outbox is shipped when nothing wakes the shipper sooner.
    #[serde(default = "default_ship_interval")]
    pub ship_interval_ms: u64,
    /// Whether an upstream 5xx answer is charged (routes may override).
    #[serde(default)]
    pub charge_upstream_errors: bool,
    /// The most disk the lease spend log may take (`data_dir/spend`, KiB; 256 MiB by
    /// default, about 5.6 million requests' spend not yet reported): past it,
    /// lease spend cannot be recorded and requests gated by a lease are refused (503)
    /// until the control plane acknowledges older spend.
    #[serde(default = "default_spend_log_max_kb")]
    pub spend_log_max_kb: u64,
    /// The most disk the usage log may take (`data_dir/usage`, KiB; 64 MiB by default):
    /// requests' usage outside leases waits there until the shipper moves it to the
    /// outbox, every `ship_interval_ms` or so. Past it (the local store refusing writes
    /// for a long while), such usage cannot be recorded: routes failing closed refuse
    /// (503), routes failing open admit without the record (logged and counted).
    #[serde(default = "default_usage_log_max_kb")]
    pub usage_log_max_kb: u64,
    /// Requests' usage of one end user, feature and quota window within this many
    /// milliseconds leaves the proxy as one event, once the first is this old (0 to
    /// 60,000; 0: one event per request, shipped at once). The event is charged at the
    /// latest of their timestamps.
    #[serde(default = "default_aggregate_ms")]
    pub aggregate_ms: u64,
}

impl Default for UsageConfig {
    fn default() -> UsageConfig {
        UsageConfig {
            durability: Durability::Sync,
            flush_interval_ms: default_flush_interval(),
            batch_size: default_batch_size(),
            ship_interval_ms: default_ship_interval(),
            charge_upstream_errors: false,
            spend_log_max_kb: default_spend_log_max_kb(),
            usage_log_max_kb: default_usage_log_max_kb(),
            aggregate_ms: default_aggregate_ms(),
        }
    }
}

fn default_aggregate_ms() -> u64 {
    1000
}

/// The longest `usage.aggregate_ms` may be.
pub const AGGREGATE_MS_MAX: u64 = 60_000;

fn default_spend_log_max_kb() -> u64 {
    256 << 10
}

fn default_usage_log_max_kb() -> u64 {
    64 << 10
}

fn default_flush_interval() -> u64 {
    100
}
fn default_batch_size() -> usize {
    500
}
fn default_ship_interval() -> u64 {
    200
}

/// Leases (SPEC 12.1): credits the control plane holds for this proxy, per end user and
/// feature gated by balance, so that any number of proxies never admit more than the
/// balance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// `false` decides from the replica and local spend alone (one proxy per end user).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long a lease lives without a report that extends it (a crashed proxy's
    /// leases go back after this).
    #[serde(default = "default_lease_ttl")]
    pub ttl_secs: u64,
    /// A lease is sized to last this long at the rate the proxy observes.
    #[serde(default = "default_lease_horizon")]
    pub horizon_secs: u64,
    /// The smallest and largest lease asked for, in credits.
    #[serde(default = "default_lease_min")]
    pub min_credits: i64,
    #[serde(default = "default_lease_max")]
    pub max_credits: i64,
    /// How long a request whose lease is empty waits for the refill before the answer
    /// (402 when nothing is left, the failure policy when the control plane is away).
    #[serde(default = "default_lease_wait")]
    pub wait_ms: u64,
    /// How often spend is reported (and the lease extended) while it is used.
    #[serde(default = "default_lease_report")]
    pub report_interval_ms: u64,
    /// A lease unused this long is released.
    #[serde(default = "default_lease_idle")]
    pub idle_release_secs: u64,
}

impl Default for LeaseConfig {
    fn default() -> LeaseConfig {
        LeaseConfig {
            enabled: true,
            ttl_secs: default_lease_ttl(),
            horizon_secs: default_lease_horizon(),
            min_credits: default_lease_min(),
            max_credits: default_lease_max(),
            wait_ms: default_lease_wait(),
            report_interval_ms: default_lease_report(),
            idle_release_secs: default_lease_idle(),
        }
    }
}

fn default_lease_ttl() -> u64 {
    60
}
fn default_lease_horizon() -> u64 {
    5
}
fn default_lease_min() -> i64 {
    10
}
fn default_lease_max() -> i64 {
    100_000
}
fn default_lease_wait() -> u64 {
    100
}
fn default_lease_report() -> u64 {
    15_000
}
fn default_lease_idle() -> u64 {
    60
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    #[default]
    Deny,
    Pass,
}

/// One route: matched in order, first match wins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `GET`, `POST`, …; absent = any method.
    #[serde(default)]
    pub method: Option<String>,
    /// A prefix (`/v1/chat` matches `/v1/chat` and `/v1/chat/…`), or a glob when it holds
    /// `*`, `?` or `[` (`/v1/models/*/generate`; `*` stays within one segment, `**` spans).
    pub path: String,
    /// Forwarded without identity, decision or usage.
    #[serde(default)]
    pub public: bool,
    /// The feature a request uses (required unless `public`).
    #[serde(default)]
    pub feature: Option<String>,
    /// Fixed units per request (default 1).
    #[serde(default)]
    pub units: Option<u64>,
    /// Units from this request header instead (a missing or bad value is a 400).
    #[serde(default)]
    pub units_header: Option<String>,
    /// Reserve an estimate, forward, commit the actual from a response header.
    #[serde(default)]
    pub reserve: Option<ReserveConfig>,
    #[serde(default)]
    pub on_unavailable: Option<OnUnavailable>,
    /// Units one end user may use on this route while the proxy fails open.
    #[serde(default)]
    pub outage_budget: Option<u64>,
    #[serde(default)]
    pub charge_upstream_errors: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveConfig {
    /// Units held before forwarding.
    pub estimate: u64,
    /// A request header that may carry a better estimate (e.g. `max_tokens`).
    #[serde(default)]
    pub estimate_header: Option<String>,
    /// The upstream response header with the actual units (default `x-usage-units`).
    #[serde(default = "default_actual_header")]
    pub actual_header: String,
    /// How long the control plane keeps the hold if the proxy never resolves it (300 by
    /// default).
    #[serde(default)]
    pub ttl_secs: Option<i64>,
    /// The old spelling of `ttl_secs`: still accepted, with a deprecation warning.
    #[serde(default)]
    pub ttl_seconds: Option<i64>,
}

impl ReserveConfig {
    /// The hold's time to live: `ttl_secs`, else the deprecated `ttl_seconds` (logged),
    /// else 300 s.
    ///
    /// # Errors
    /// Both spellings set.
    pub fn ttl_secs(&self, at: &dyn Fn(&str) -> String) -> Result<i64, ConfigError> {
        match (self.ttl_secs, self.ttl_seconds) {
            (Some(_), Some(_)) => Err(ConfigError {
                setting: at("reserve.ttl_seconds"),
                message:
                    "is the old spelling of reserve.ttl_secs, which is also set; keep only ttl_secs"
                        .into(),
            }),
            (None, Some(ttl)) => {
                tracing::warn!(
                    setting = %at("reserve.ttl_seconds"),
                    "deprecated: write reserve.ttl_secs (ttl_seconds is still read)"
                );
                Ok(ttl)
            }
            (ttl, None) => Ok(ttl.unwrap_or(DEFAULT_RESERVE_TTL_SECS)),
        }
    }
}

fn default_actual_header() -> String {
    "x-usage-units".into()
}
/// A reservation route's hold lives this long unless the route says otherwise.
const DEFAULT_RESERVE_TTL_SECS: i64 = 300;

impl Config {
    /// Reads, applies environment overrides, and validates.
    ///
    /// # Errors
    /// The file cannot be read or parsed, or a setting is invalid (named).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| invalid(path.display().to_string(), error.to_string()))?;
        let mut config = Config::parse(&text)?;
        config.apply_env(|name| std::env::var(name).ok());
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML (without validating).
    ///
    /// # Errors
    /// Syntax errors and unknown settings, with their place.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|error| invalid("config", error.to_string()))
    }

    /// `QS_PROXY_LISTEN`, `QS_PROXY_ADMIN_LISTEN`, `QS_PROXY_UPSTREAM`,
    /// `QS_PROXY_DATA_DIR`, `QS_PROXY_CONTROL_PLANE_URL`, `QS_PROXY_API_KEY`,
    /// `QS_PROXY_JWT_SECRET`, `QS_PROXY_NATS_URL` override the file.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        if let Some(value) = var("QS_PROXY_LISTEN") {
            self.listen = value;
        }
        if let Some(value) = var("QS_PROXY_ADMIN_LISTEN") {
            self.admin_listen = value;
        }
        if let Some(value) = var("QS_PROXY_UPSTREAM") {
            self.upstream = value;
        }
        if let Some(value) = var("QS_PROXY_DATA_DIR") {
            self.data_dir = PathBuf::from(value);
        }
        if let Some(value) = var("QS_PROXY_CONTROL_PLANE_URL") {
            self.control_plane.url = value;
        }
        if let Some(value) = var("QS_PROXY_API_KEY") {
            self.control_plane.api_key = Some(Secret::new(value));
        }
        if let (Some(value), Some(jwt)) = (var("QS_PROXY_JWT_SECRET"), self.identity.jwt.as_mut()) {
            jwt.secret = Some(Secret::new(value));
        }
        if let Some(value) = var("QS_PROXY_NATS_URL") {
            self.sync.nats_url = Some(Secret::new(value));
        }
    }

    /// Checks every setting; the first one at fault is named.
    ///
    /// # Errors
    /// The setting and what is wrong with it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen
            .parse::<SocketAddr>()
            .map_err(|error| invalid("listen", format!("{error} (want ip:port)")))?;
        self.admin_listen
            .parse::<SocketAddr>()
            .map_err(|error| invalid("admin_listen", format!("{error} (want ip:port)")))?;
        let (host, port) = self
            .upstream
            .rsplit_once(':')
            .ok_or_else(|| invalid("upstream", "want host:port"))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |port| port == 0) {
            return Err(invalid("upstream", "want host:port with a port 1-65535"));
        }
        // The client checks the URL as it will use it.
        client::Client::new(&self.control_plane.url, "")
            .map_err(|error| invalid("control_plane.url", error.to_string()))?;
        match self.control_plane.api_key.as_ref().map(Secret::expose) {
            None | Some("") => {
                return Err(invalid(
                    "control_plane.api_key",
                    "is required (or set QS_PROXY_API_KEY): a key with the sync scope",
                ));
            }
            Some(_) => {}
        }
        if self.cache_mb == 0 {
            return Err(invalid("cache_mb", "must be at least 1"));
        }
        if let Some(url) = self.sync.nats_url.as_ref().map(Secret::expose)
            && !url.is_empty()
        {
            url.parse::<async_nats::ServerAddr>().map_err(|error| {
                invalid(
                    "sync.nats_url",
                    format!("must be a NATS address such as nats://127.0.0.1:4222 ({error})"),
                )
            })?;
        }
        if self.failure.max_staleness_secs == 0 {
            return Err(invalid("failure.max_staleness_secs", "must be at least 1"));
        }
        let leases = &self.leases;
        if !(5..=3600).contains(&leases.ttl_secs) {
            return Err(invalid("leases.ttl_secs", "must be 5 to 3600"));
        }
        if !(1..=300).contains(&leases.horizon_secs) {
            return Err(invalid("leases.horizon_secs", "must be 1 to 300"));
        }
        if leases.min_credits < 1 || leases.max_credits < leases.min_credits {
            return Err(invalid(
                "leases.min_credits",
                "must be at least 1 and at most leases.max_credits",
            ));
        }
        if leases.wait_ms > 10_000 {
            return Err(invalid("leases.wait_ms", "must be at most 10000"));
        }
        if !(10..=60_000).contains(&leases.report_interval_ms)
            || leases.report_interval_ms.saturating_mul(2) > leases.ttl_secs.saturating_mul(1000)
        {
            return Err(invalid(
                "leases.report_interval_ms",
                "must be 10 to 60000, and at most half of leases.ttl_secs",
            ));
        }
        if leases.idle_release_secs == 0 {
            return Err(invalid("leases.idle_release_secs", "must be at least 1"));
        }
        if !(1..=protocol::BATCH_EVENTS_MAX).contains(&self.usage.batch_size) {
            return Err(invalid(
                "usage.batch_size",
                format!("must be 1 to {}", protocol::BATCH_EVENTS_MAX),
            ));
        }
        if !(1..=1 << 30).contains(&self.usage.spend_log_max_kb) {
            return Err(invalid(
                "usage.spend_log_max_kb",
                "must be 1 to 1073741824 (1 TiB)",
            ));
        }
        if !(64..=1 << 30).contains(&self.usage.usage_log_max_kb) {
            return Err(invalid(
                "usage.usage_log_max_kb",
                "must be 64 to 1073741824 (1 TiB)",
            ));
        }
        if self.usage.aggregate_ms > AGGREGATE_MS_MAX {
            return Err(invalid(
                "usage.aggregate_ms",
                format!("must be 0 to {AGGREGATE_MS_MAX}"),
            ));
        }
        if self.usage.flush_interval_ms == 0 || self.usage.ship_interval_ms == 0 {
            return Err(invalid(
                "usage.flush_interval_ms",
                "flush_interval_ms and ship_interval_ms must be at least 1",
            ));
        }
        crate::identity::Identity::from_config(&self.identity)?;
        crate::routes::Routes::from_config(self)?;
        Ok(())
    }

    pub fn max_staleness(&self) -> Duration {
        Duration::from_secs(self.failure.max_staleness_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
upstream = "127.0.0.1:3000"
[control_plane]
url = "http://127.0.0.1:8080"
api_key = "qs_test_x"
[[routes]]
path = "/v1/chat"
feature = "chat_messages"
"#;

    fn check(text: &str) -> Result<Config, ConfigError> {
        let config = Config::parse(text)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn a_minimal_file_gets_the_documented_defaults() {
        let config = check(MINIMAL).expect("valid");
        assert_eq!(config.listen, "127.0.0.1:8081");
        assert_eq!(config.failure.max_staleness_secs, 30);
        assert_eq!(config.usage.durability, Durability::Sync);
        assert_eq!(config.usage.aggregate_ms, 1000);
        assert_eq!(config.unmatched, Unmatched::Deny);
        let identity = crate::identity::Identity::from_config(&config.identity).expect("valid");
        assert_eq!(identity.forward_header, "x-end-user-id");
    }

    #[test]
    fn a_jwt_audience_can_be_waived_only_explicitly() {
        let jwt = "[identity.jwt]\nalgorithm = \"HS256\"\nsecret = \"jwt-secret-of-some-length\"\n";
        let error = check(&format!("{MINIMAL}{jwt}")).expect_err("no audience");
        assert!(
            error.message.contains("require_audience = false"),
            "{error}"
        );
        check(&format!("{MINIMAL}{jwt}audience = \"my-api\"\n")).expect("an audience");
        check(&format!("{MINIMAL}{jwt}require_audience = false\n")).expect("waived");
    }

    #[test]
    fn errors_name_the_setting() {
        let cases = [
            (MINIMAL.replace("127.0.0.1:3000", "nope"), "upstream"),
            (
                MINIMAL.replace("api_key = \"qs_test_x\"", ""),
                "control_plane.api_key",
            ),
            (
                MINIMAL.replace("feature = \"chat_messages\"", ""),
                "routes[0].feature",
            ),
            (format!("{MINIMAL}units = 0\n"), "routes[0].units"),
            (
                format!("{MINIMAL}units = 2\nunits_header = \"x-n\"\n"),
                "routes[0]",
            ),
            (format!("{MINIMAL}colour = 1\n"), "config"),
            (
                MINIMAL.replace("http://127.0.0.1:8080", "ftp://127.0.0.1:8080"),
                "control_plane.url",
            ),
            (MINIMAL.replace("/v1/chat", "v1/chat"), "routes[0].path"),
            (
                format!(
                    "{MINIMAL}[identity.jwt]\nalgorithm = \"HS256\"\nsecret = \"jwt-secret-of-some-length\"\n"
                ),
                "identity.jwt.audience",
            ),
            (
                format!(
                    "{MINIMAL}[identity.jwt]\nalgorithm = \"HS256\"\nsecret = \"jwt-secret-of-some-length\"\naudience = \"a\"\nrequire_audience = false\n"
                ),
                "identity.jwt.require_audience",
            ),
            (
                format!("{MINIMAL}[identity]\nforward_header = \"authorization\"\n"),
                "identity.forward_header",
            ),
            (
                format!("{MINIMAL}[identity]\nforward_header = \"not a header\"\n"),
                "identity.forward_header",
            ),
            (
                format!("{MINIMAL}[sync]\nnats_url = \"nats://a b\"\n"),
                "sync.nats_url",
            ),
            (
                format!("{MINIMAL}[usage]\naggregate_ms = 60001\n"),
                "usage.aggregate_ms",
            ),
            (
                format!("{MINIMAL}[usage]\nusage_log_max_kb = 63\n"),
                "usage.usage_log_max_kb",
            ),
            (
                format!("{MINIMAL}[usage]\nusage_log_max_kb = 1073741825\n"),
                "usage.usage_log_max_kb",
            ),
        ];
        for (text, setting) in cases {
            let error = check(&text).expect_err(setting);
            assert_eq!(error.setting, setting, "{error}");
        }
    }

    #[test]
    fn the_shipped_config_file_is_valid_once_given_a_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/proxy.toml");
        let text = std::fs::read_to_string(&path).expect("config/proxy.toml");
        let mut config = Config::parse(&text).expect("config/proxy.toml parses");
        assert!(
            config.validate().is_err(),
            "the shipped file holds no key: it comes from QS_PROXY_API_KEY"
        );
        config.apply_env(|name| (name == "QS_PROXY_API_KEY").then(|| "qs_test_k".to_owned()));
        config.validate().expect("config/proxy.toml is valid");
        assert_eq!(config.routes.len(), 3);
    }

    #[test]
    fn debug_never_prints_the_key_or_the_jwt_secret() {
        let text = format!(
            "{}\n[identity.jwt]\nalgorithm = \"HS256\"\nsecret = \"jwt-secret-of-some-length\"\naudience = \"my-api\"\n",
            MINIMAL.replace("qs_test_x", "qs_test_secret_key_material_0123456789")
        );
        let config = check(&text).expect("valid");
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("qs_test_secret_key_material"),
            "{printed}"
        );
        assert!(!printed.contains("jwt-secret-of-some-length"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut config = Config::parse(MINIMAL).expect("parses");
        config.apply_env(|name| match name {
            "QS_PROXY_API_KEY" => Some("qs_test_from_env".into()),
            "QS_PROXY_LISTEN" => Some("127.0.0.1:0".into()),
            _ => None,
        });
        assert_eq!(
            config.control_plane.api_key.as_ref().map(Secret::expose),
            Some("qs_test_from_env")
        );
        assert_eq!(config.listen, "127.0.0.1:0");
    }
}
