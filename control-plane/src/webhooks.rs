//! Webhook delivery (SPEC 11): Standard Webhooks signatures, a 10 s timeout, retries with
//! exponential backoff and jitter, at least once and in order per end user, with a guard
//! against server-side request forgery.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use ledger::Timestamp;
use sha2::Sha256;

use crate::error::ApiError;
use crate::service::AppState;
use crate::store::{AttemptRecord, DeliveryJob, Env};

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
    let base_millis = RETRY_DELAYS_SECS.get(index)?.checked_mul(1000)?;
    let jitter_millis = base_millis
        .checked_mul(JITTER_PERCENT)?
        .checked_mul(jitter.clamp(0, 1000))?
        .checked_div(100_000)?;
    now.checked_add(ledger::Span::from_millis(
        base_millis.checked_add(jitter_millis)?,
    ))
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

/// A resolver that refuses private addresses, so a host name cannot be pointed at the
/// internal network after it was accepted (DNS rebinding).
#[derive(Debug, Clone, Copy)]
struct PublicOnlyResolver;

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = addresses
                .into_iter()
                .filter(|address| !is_private(address.ip()))
                .collect();
            if public.is_empty() {
                let error: Box<dyn std::error::Error + Send + Sync> =
                    format!("{host} resolves to no public address").into();
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
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .user_agent(concat!("QuotaStack-Webhooks/", env!("CARGO_PKG_VERSION")));
    let builder = if allow_private {
        builder
    } else {
        builder.dns_resolver(Arc::new(PublicOnlyResolver))
    };
    builder.build()
}

/// Delivers every due webhook of `env`, repeatedly, until none is due. Returns how many
/// attempts were made.
///
/// # Errors
/// Store failures.
pub async fn deliver_due(state: &AppState, env: &Env) -> Result<usize, ApiError> {
    let mut attempts = 0usize;
    // Each pass may unblock the next event of an end user whose earlier one just went
    // through; bound the passes so a busy environment cannot hold the scheduler forever.
    for _ in 0..64 {
        let view = state.view(env).await?;
        let now = state.env_now(&view);
        let jobs = state
            .store()
            .claim_deliveries(env, now, LEASE_MILLIS, CLAIM_LEN_MAX)
            .await?;
        if jobs.is_empty() {
            break;
        }
        let mut running = tokio::task::JoinSet::new();
        for job in jobs {
            if running.len() >= state.config().webhook_concurrency
                && let Some(done) = running.join_next().await
            {
                record(state, done).await?;
            }
            let (state, env) = (state.clone(), env.clone());
            running.spawn(async move { attempt(&state, &env, job).await });
            attempts = attempts.saturating_add(1);
        }
        while let Some(done) = running.join_next().await {
            record(state, done).await?;
        }
    }
    Ok(attempts)
}

async fn record(
    state: &AppState,
    done: Result<AttemptRecord, tokio::task::JoinError>,
) -> Result<(), ApiError> {
    let attempt =
        done.map_err(|error| ApiError::Internal(format!("delivery task failed: {error}")))?;
    metrics::counter!("quotastack_webhook_attempts_total", "outcome" => if attempt.succeeded { "succeeded" } else { "failed" }).increment(1);
    state.store().record_attempt(&attempt).await?;
    Ok(())
}

/// One delivery attempt.
async fn attempt(state: &AppState, env: &Env, job: DeliveryJob) -> AttemptRecord {
    let number = job.attempts.saturating_add(1);
    let (response_status, error) = match send(state, &job).await {
        Ok(status) => (Some(status), None),
        Err(error) => (None, Some(error)),
    };
    let succeeded = response_status.is_some_and(|status| (200..300).contains(&status));
    let at = match state.view(env).await {
        Ok(view) => state.env_now(&view),
        Err(_) => state.real_now(),
    };
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
async fn send(state: &AppState, job: &DeliveryJob) -> Result<u16, String> {
    validate_url(&job.endpoint.url, state.config().webhooks_allow_private)?;
    let body = serde_json::to_vec(&serde_json::json!({
        "type": job.event.event_type,
        "timestamp": job.event.created_at,
        "data": job.event.data,
    }))
    .map_err(|error| error.to_string())?;
    // The signature's timestamp is the real time of sending: receivers compare it with
    // their own clock, whatever a test clock says.
    let timestamp = state.real_now().as_millis().div_euclid(1000);
    let signature = sign(&job.endpoint.secret, &job.event.id, timestamp, &body)?;
    let response = state
        .webhook_client()
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
        assert!(!is_private("93.184.216.34".parse().expect("ip")));
    }
}
