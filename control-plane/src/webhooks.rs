//! Webhook delivery (SPEC 11): Standard Webhooks signatures, a 10 s timeout, retries with
//! exponential backoff and jitter, at least once and in order per end user, with a guard
//! against server-side request forgery.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use ledger::Timestamp;
use sha2::Sha256;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::clock::Clock;
use crate::config::Config;
use crate::store::{
    AttemptRecord, DeliveryClaim, DeliveryJob, DeliveryLease, Env, Store, StoreError, StoreResult,
};

/// Delays before each retry (SPEC 11: about 5 s, 30 s, 2 m, 10 m, 30 m, 2 h, 6 h, 12 h);
/// after the last one the delivery is marked failed.
pub const RETRY_DELAYS_SECS: [i64; 8] = [5, 30, 120, 600, 1800, 7200, 21_600, 43_200];
/// Jitter added to each delay: up to this share of it (in percent).
pub const JITTER_PERCENT: i64 = 20;
/// How long a claimed delivery is leased before another worker may take it.
const LEASE_MILLIS: i64 = 60_000;
/// The most deliveries one claim takes.
const CLAIM_LEN_MAX: u32 = 64;
/// The most response bytes read from a receiver.
const RESPONSE_BYTES_MAX: usize = 64 * 1024;

/// A new endpoint secret: `whsec_` and 32 random bytes in base64.
pub fn generate_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("whsec_{}", STANDARD.encode(bytes))
}

/// The `webhook-signature` value: `v1,` and the base64 HMAC-SHA256 of
/// `{id}.{timestamp}.{body}` keyed with the secret's decoded bytes.
///
/// # Errors
/// A secret that is not `whsec_<base64>`.
pub fn sign(secret: &str, id: &str, timestamp_secs: i64, body: &[u8]) -> Result<String, String> {
    let key = secret
        .strip_prefix("whsec_")
        .ok_or("secret lacks the whsec_ prefix")?;
    let key = STANDARD
        .decode(key)
        .map_err(|error| format!("secret is not base64: {error}"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|error| error.to_string())?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// When to retry after `attempts` failed attempts, or `None` when they are used up.
/// `jitter` (0 to 1000, per mille of the allowed jitter) makes the choice testable.
pub fn retry_at(now: Timestamp, attempts: u32, jitter: i64) -> Option<Timestamp> {
    let index = usize::try_from(attempts).ok()?.checked_sub(1)?;
    let base_ms = RETRY_DELAYS_SECS.get(index)?.checked_mul(1000)?;
    let jitter_ms = base_ms
        .checked_mul(JITTER_PERCENT)?
        .checked_mul(jitter.clamp(0, 1000))?
        .checked_div(100_000)?;
    now.checked_add(ledger::Span::from_millis(base_ms.checked_add(jitter_ms)?))
        .ok()
}

/// Whether an address is private, loopback, link-local, or otherwise not a public host.
pub fn is_private(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let segments = v6.segments();
            let octets = v6.octets();
            // NAT64 (64:ff9b::/96, RFC 6052) carries an IPv4 address in its last 32 bits,
            // and 6to4 (2002::/16, RFC 3056) in bits 16 to 48: a gateway would forward
            // to that address, so it is judged as that address.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let v4 = Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]);
                return is_private(IpAddr::V4(v4));
            }
            if segments[0] == 0x2002 {
                let v4 = Ipv4Addr::new(octets[2], octets[3], octets[4], octets[5]);
                return is_private(IpAddr::V4(v4));
            }
            // The local-use NAT64 prefix (64:ff9b:1::/48, RFC 8215) is private by design.
            if segments[..3] == [0x64, 0xff9b, 1] {
                return true;
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
        }
    }
}

/// Checks a webhook URL: http(s), a host, and (unless allowed) no private IP literal.
/// Host names are checked again when resolved at delivery.
///
/// # Errors
/// A message naming what is wrong.
pub fn validate_url(text: &str, allow_private: bool) -> Result<url::Url, String> {
    if text.len() > crate::limits::WEBHOOK_URL_BYTES_MAX {
        return Err(format!(
            "must be at most {} bytes",
            crate::limits::WEBHOOK_URL_BYTES_MAX
        ));
    }
    let url = url::Url::parse(text).map_err(|error| format!("`{text}` is not a URL: {error}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err("must be an http or https URL".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    let host = url.host().ok_or("must name a host")?;
    let literal = match host {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(domain) => (domain.eq_ignore_ascii_case("localhost")
            || domain.to_ascii_lowercase().ends_with(".localhost"))
        .then_some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
    };
    if !allow_private && literal.is_some_and(is_private) {
        return Err("must not point at a private, loopback or link-local address".into());
    }
    Ok(url)
}

/// How the delivery clients resolve host names: public addresses only, so a host name
/// cannot be pointed at the internal network after it was accepted (DNS rebinding); or
/// nothing at all, for the fallback client that must not reach anything.
#[derive(Debug, Clone, Copy)]
enum Resolver {
    PublicOnly,
    Nothing,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (host, resolver) = (name.as_str().to_owned(), *self);
        Box::pin(async move {
            let public: Vec<SocketAddr> = match resolver {
                Resolver::Nothing => Vec::new(),
                Resolver::PublicOnly => tokio::net::lookup_host((host.as_str(), 0))
                    .await?
                    .filter(|address| !is_private(address.ip()))
                    .collect(),
            };
            if public.is_empty() {
                let error: Box<dyn std::error::Error + Send + Sync> = match resolver {
                    Resolver::Nothing => {
                        format!("the webhook client is unavailable; not resolving {host}")
                    }
                    Resolver::PublicOnly => format!("{host} resolves to no public address"),
                }
                .into();
                return Err(error);
            }
            let iter: reqwest::dns::Addrs = Box::new(public.into_iter());
            Ok(iter)
        })
    }
}

/// The HTTP client deliveries use: no redirects, a timeout, and the public-only resolver
/// unless private addresses are allowed.
///
/// # Errors
/// When the client cannot be built.
pub fn client(timeout: Duration, allow_private: bool) -> Result<reqwest::Client, reqwest::Error> {
    // No proxy from the environment (`HTTP_PROXY`…): a proxy would resolve the host
    // itself, past the public-only resolver.
    let builder = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .user_agent(concat!("QuotaStack-Webhooks/", env!("CARGO_PKG_VERSION")));
    let builder = if allow_private {
        builder
    } else {
        builder.dns_resolver(Arc::new(Resolver::PublicOnly))
    };
    builder.build()
}

/// What delivering webhooks needs: the store, an HTTP client guarded against
/// server-side request forgery, the clock, and the worker's settings; plus which
/// environments a test-clock advance is settling (the worker leaves them alone). The
/// service keeps one and hands it to the worker and to [`settle`].
#[derive(Debug)]
pub struct Deliveries {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    client: reqwest::Client,
    scan_interval: Duration,
    per_environment: usize,
    concurrency: usize,
    allow_private: bool,
    settling: Mutex<HashSet<Env>>,
    /// Wakes the worker (a settled environment is free again).
    wake: Notify,
}

impl Deliveries {
    pub fn new(config: &Config, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Deliveries {
        let client =
            client(config.webhook_timeout, config.webhooks_allow_private).unwrap_or_else(|error| {
                // Building a client fails only when the TLS backend cannot start;
                // deliveries then fail (and retry) with that error rather than going out
                // unguarded.
                tracing::error!(%error, "cannot build the webhook client");
                reqwest::Client::builder()
                    .timeout(config.webhook_timeout)
                    .redirect(reqwest::redirect::Policy::none())
                    .dns_resolver(Arc::new(Resolver::Nothing))
                    .build()
                    .unwrap_or_default()
            });
        Deliveries {
            store,
            clock,
            client,
            scan_interval: config.jobs_interval,
            per_environment: config.webhook_per_environment,
            concurrency: config.webhook_concurrency,
            allow_private: config.webhooks_allow_private,
            settling: Mutex::default(),
            wake: Notify::new(),
        }
    }

    fn lock_settling(&self) -> std::sync::MutexGuard<'_, HashSet<Env>> {
        self.settling.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks `env` as being settled by a test-clock advance (the worker leaves it alone)
    /// until the guard is dropped.
    pub fn settling(self: &Arc<Self>, env: &Env) -> Settling {
        self.lock_settling().insert(env.clone());
        Settling {
            deliveries: Arc::clone(self),
            env: env.clone(),
        }
    }

    /// Whether a test-clock advance is settling `env`'s webhooks.
    pub fn is_settling(&self, env: &Env) -> bool {
        self.lock_settling().contains(env)
    }

    /// The environment's instant, given its test clock's offset.
    fn env_now(&self, clock_offset_ms: i64) -> Timestamp {
        let now = self.clock.now();
        now.checked_add(ledger::Span::from_millis(clock_offset_ms))
            .unwrap_or(now)
    }
}

/// Marks an environment as being settled by a test-clock advance until dropped.
#[derive(Debug)]
pub struct Settling {
    deliveries: Arc<Deliveries>,
    env: Env,
}

impl Drop for Settling {
    fn drop(&mut self) {
        self.deliveries.lock_settling().remove(&self.env);
        self.deliveries.wake.notify_one();
    }
}

/// The delivery worker: its own task, apart from the scheduler, so a slow receiver holds
/// up nobody's due work. It claims each environment's due deliveries on every scan
/// (`jobs.interval_ms`) and whenever one of that environment's attempts ends, with at most
/// `webhooks.per_environment` attempts in flight per environment and
/// `webhooks.concurrency` in all: an environment whose endpoint never answers ties up its
/// own share for at most `webhooks.timeout_secs` an attempt, never the other
/// environments' deliveries.
pub async fn run(deliveries: Arc<Deliveries>, mut stop: watch::Receiver<bool>) {
    let mut scan = tokio::time::interval(deliveries.scan_interval);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut worker = Worker {
        deliveries,
        running: JoinSet::new(),
        in_flight: HashMap::new(),
        offsets: HashMap::new(),
    };
    let deliveries = Arc::clone(&worker.deliveries);
    loop {
        tokio::select! {
            _ = scan.tick() => worker.scan().await,
            () = deliveries.wake.notified() => worker.scan().await,
            Some(done) = worker.running.join_next(), if !worker.running.is_empty() => {
                if let Some(env) = worker.finished(done).await {
                    worker.fill(&env).await;
                }
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    // Attempts cut short here are leased; another worker retries them when the lease
    // ends (at least once).
    worker.running.abort_all();
    tracing::info!("webhook worker stopped");
}

struct Worker {
    deliveries: Arc<Deliveries>,
    running: JoinSet<(Env, AttemptRecord)>,
    /// Attempts in flight per environment.
    in_flight: HashMap<Env, usize>,
    /// Each environment's test clock offset, as of the last scan.
    offsets: HashMap<Env, i64>,
}

impl Worker {
    /// Claims what every environment has due, within each one's share.
    async fn scan(&mut self) {
        let environments = match self.deliveries.store.environments().await {
            Ok(environments) => environments,
            Err(error) => {
                tracing::warn!(%error, "webhook worker cannot list environments");
                return;
            }
        };
        self.offsets = environments.iter().cloned().collect();
        for (env, _) in environments {
            self.fill(&env).await;
        }
    }

    /// Claims and starts `env`'s due deliveries, up to its share of free slots.
    async fn fill(&mut self, env: &Env) {
        let deliveries = &self.deliveries;
        let in_flight = self.in_flight.get(env).copied().unwrap_or(0);
        let room = deliveries
            .per_environment
            .saturating_sub(in_flight)
            .min(deliveries.concurrency.saturating_sub(self.running.len()));
        if room == 0 || deliveries.is_settling(env) {
            return;
        }
        let offset = self.offsets.get(env).copied().unwrap_or(0);
        let jobs = match claim(deliveries, env, deliveries.env_now(offset), room).await {
            Ok(jobs) => jobs,
            Err(error) => {
                tracing::warn!(tenant = %env.tenant_id, environment = %env.environment, %error, "claiming webhook deliveries failed");
                return;
            }
        };
        for job in jobs {
            *self.in_flight.entry(env.clone()).or_insert(0) += 1;
            let (deliveries, env) = (Arc::clone(&self.deliveries), env.clone());
            self.running.spawn(async move {
                let at = deliveries.env_now(offset);
                let record = attempt(&deliveries, job, at).await;
                (env, record)
            });
        }
    }

    /// Records a finished attempt; returns its environment.
    async fn finished(
        &mut self,
        done: Result<(Env, AttemptRecord), tokio::task::JoinError>,
    ) -> Option<Env> {
        let (env, record) = match done {
            Ok(done) => done,
            Err(error) => {
                tracing::error!(%error, "a webhook delivery task failed");
                return None;
            }
        };
        if let Some(count) = self.in_flight.get_mut(&env) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.in_flight.remove(&env);
            }
        }
        if let Err(error) = save(&self.deliveries, &record).await {
            // The delivery stays leased and is retried when the lease ends.
            tracing::error!(tenant = %env.tenant_id, %error, "recording a webhook attempt failed; the delivery is retried");
        }
        Some(env)
    }
}

/// Claims up to `len` of `env`'s deliveries due by `due_by` (the environment's clock),
/// leased for [`LEASE_MILLIS`] on the real clock.
async fn claim(
    deliveries: &Deliveries,
    env: &Env,
    due_by: Timestamp,
    len: usize,
) -> StoreResult<Vec<DeliveryJob>> {
    let now = deliveries.clock.now();
    let lease = DeliveryLease {
        now,
        until: now
            .checked_add(ledger::Span::from_millis(LEASE_MILLIS))
            .unwrap_or(now),
    };
    let len = u32::try_from(len)
        .unwrap_or(CLAIM_LEN_MAX)
        .min(CLAIM_LEN_MAX);
    deliveries
        .store
        .claim_deliveries(
            env,
            &DeliveryClaim {
                due_by,
                lease,
                limit: len,
            },
        )
        .await
}

async fn save(deliveries: &Deliveries, attempt: &AttemptRecord) -> StoreResult<()> {
    metrics::counter!("quotastack_webhook_attempts_total", "outcome" => if attempt.succeeded { "succeeded" } else { "failed" }).increment(1);
    deliveries.store.record_attempt(attempt).await
}

/// What [`settle`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// Delivery attempts made.
    pub attempts: usize,
    /// Deliveries still pending and due by the target instant.
    pub pending: u64,
}

/// The most attempts one [`settle`] makes.
pub const SETTLE_ATTEMPTS_MAX: usize = 10_000;

/// Delivers everything of `env` that falls due by `target` (the environment's clock), in
/// the environment's time rather than in real time: each attempt is made as of the
/// instant it fell due, so its retries (5 s, 30 s, … later on that clock) fall due within
/// the same call when they come before `target`, and a receiver that fails is never
/// waited on in real time. Order per end user holds as always (the claim's rule). Stops at
/// `deadline` (real time) or after [`SETTLE_ATTEMPTS_MAX`] attempts; the answer says
/// what is still pending. While it runs, the worker leaves `env` alone; deliveries the
/// worker (or another replica) holds are waited for until `deadline` when
/// `wait_for_held`, else left to it.
///
/// # Errors
/// Store failures, or a delivery task that panicked.
pub async fn settle(
    deliveries: &Arc<Deliveries>,
    env: &Env,
    target: Timestamp,
    deadline: tokio::time::Instant,
    wait_for_held: bool,
) -> StoreResult<Settled> {
    let _settling = deliveries.settling(env);
    let mut settled = Settled::default();
    // The virtual instant each (endpoint, end user) was last attempted at: a later
    // event's attempt never happens before an earlier one's.
    let mut last_at: HashMap<(String, Option<String>), Timestamp> = HashMap::new();
    let concurrency = deliveries.per_environment.max(1);
    while tokio::time::Instant::now() < deadline && settled.attempts < SETTLE_ATTEMPTS_MAX {
        let room = concurrency.min(SETTLE_ATTEMPTS_MAX.saturating_sub(settled.attempts));
        let jobs = claim(deliveries, env, target, room).await?;
        if jobs.is_empty() {
            if !wait_for_held || deliveries.store.pending_deliveries(env, target).await? == 0 {
                break;
            }
            // Due, but held by another worker's lease (or waiting behind one that is):
            // look again shortly.
            tokio::time::sleep(SETTLE_POLL).await;
            continue;
        }
        let mut running = JoinSet::new();
        for job in jobs {
            let order = (job.endpoint.id.clone(), job.event.end_user_id.clone());
            let at = job.due_at.max(job.event.created_at.0).min(target);
            let at = last_at.get(&order).map_or(at, |last| at.max(*last));
            last_at.insert(order, at);
            let deliveries = Arc::clone(deliveries);
            running.spawn(async move { attempt(&deliveries, job, at).await });
            settled.attempts = settled.attempts.saturating_add(1);
        }
        while let Some(done) = running.join_next().await {
            let record =
                done.map_err(|error| StoreError::Fatal(format!("delivery task failed: {error}")))?;
            save(deliveries, &record).await?;
        }
    }
    settled.pending = deliveries.store.pending_deliveries(env, target).await?;
    Ok(settled)
}

/// How often [`settle`] looks again for deliveries another worker holds.
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// One delivery attempt, made as of `at` (the environment's clock): its retry time is
/// counted from there.
async fn attempt(deliveries: &Deliveries, job: DeliveryJob, at: Timestamp) -> AttemptRecord {
    let number = job.attempts.saturating_add(1);
    let (response_status, error) = match send(deliveries, &job).await {
        Ok(status) => (Some(status), None),
        Err(error) => (None, Some(error)),
    };
    let succeeded = response_status.is_some_and(|status| (200..300).contains(&status));
    let retry_at = if succeeded {
        None
    } else {
        retry_at(at, number, rand::random_range(0..=1000))
    };
    if !succeeded {
        tracing::info!(endpoint = %job.endpoint.id, event = %job.event.id, attempt = number, status = ?response_status, error = ?error, retry = retry_at.is_some(), "webhook delivery failed");
    }
    AttemptRecord {
        delivery_id: job.delivery_id,
        attempt: number,
        at,
        succeeded,
        response_status,
        error,
        retry_at,
    }
}

/// Sends the event; answers the response status, or why there was none.
async fn send(deliveries: &Deliveries, job: &DeliveryJob) -> Result<u16, String> {
    validate_url(&job.endpoint.url, deliveries.allow_private)?;
    let body = serde_json::to_vec(&serde_json::json!({
        "type": job.event.event_type,
        "timestamp": job.event.created_at,
        "data": job.event.data,
    }))
    .map_err(|error| error.to_string())?;
    // The signature's timestamp is the real time of sending: receivers compare it with
    // their own clock, whatever a test clock says.
    let timestamp = deliveries.clock.now().as_millis().div_euclid(1000);
    let signature = sign(&job.endpoint.secret, &job.event.id, timestamp, &body)?;
    let response = deliveries
        .client
        .post(&job.endpoint.url)
        .header("content-type", "application/json")
        .header("webhook-id", &job.event.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status().as_u16();
    let mut response = response;
    let mut read = 0usize;
    while let Ok(Some(chunk)) = response.chunk().await {
        read = read.saturating_add(chunk.len());
        if read >= RESPONSE_BYTES_MAX {
            break;
        }
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Retries grow on the SPEC schedule, with jitter within 20 %, and stop after eight.
    #[test]
    fn retry_schedule() {
        let now = Timestamp::from_millis(0);
        assert_eq!(retry_at(now, 1, 0), Some(Timestamp::from_millis(5_000)));
        assert_eq!(retry_at(now, 1, 1000), Some(Timestamp::from_millis(6_000)));
        assert_eq!(retry_at(now, 3, 0), Some(Timestamp::from_millis(120_000)));
        assert_eq!(
            retry_at(now, 8, 0),
            Some(Timestamp::from_millis(43_200_000))
        );
        assert_eq!(retry_at(now, 9, 0), None);
        assert_eq!(retry_at(now, 0, 0), None);
    }

    // The SSRF guard refuses private targets unless allowed.
    #[test]
    fn url_validation() {
        for bad in [
            "ftp://example.com/x",
            "http://127.0.0.1/x",
            "http://10.1.2.3/",
            "http://[::1]/",
            "http://localhost:8080/",
            "http://169.254.169.254/latest",
            "http://user:pw@example.com/",
        ] {
            assert!(validate_url(bad, false).is_err(), "{bad}");
        }
        assert!(validate_url("https://hooks.example.com/quotastack", false).is_ok());
        assert!(validate_url("http://127.0.0.1:9000/hook", true).is_ok());
        assert!(is_private("::ffff:192.168.1.1".parse().expect("ip")));
        // NAT64 and 6to4 addresses carry an IPv4 address a gateway would reach.
        for embedded in [
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::10.0.0.1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "64:ff9b:1::1",
        ] {
            assert!(is_private(embedded.parse().expect("ip")), "{embedded}");
            assert!(
                validate_url(&format!("http://[{embedded}]/hook"), false).is_err(),
                "{embedded}"
            );
        }
        assert!(!is_private("64:ff9b::5db8:d822".parse().expect("ip")));
        assert!(!is_private("2002:5db8:d822::1".parse().expect("ip")));
        assert!(!is_private("93.184.216.34".parse().expect("ip")));
    }
}
