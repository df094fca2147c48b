//! Verifying QuotaStack webhook deliveries the Standard Webhooks way: HMAC-SHA256 over
//! `{webhook-id}.{webhook-timestamp}.{body}` with the secret's base64-decoded bytes,
//! compared in constant time, refusing timestamps more than five minutes away. The
//! `webhook-receiver` binary serves it; the integration guides use it in process.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// How far a delivery's timestamp may be from this machine's clock.
const TOLERANCE_SECS: i64 = 300;

/// Why a delivery was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    MissingHeader(&'static str),
    BadSecret,
    StaleTimestamp,
    BadSignature,
}

/// Verifies one delivery against `secret` (`whsec_<base64>`) at `now_secs`.
///
/// # Errors
/// The reason the delivery must be refused.
pub fn verify(
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    now_secs: i64,
) -> Result<(), Rejection> {
    let header = |name: &'static str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .ok_or(Rejection::MissingHeader(name))
    };
    let id = header("webhook-id")?;
    let timestamp = header("webhook-timestamp")?;
    let signatures = header("webhook-signature")?;
    let sent: i64 = timestamp.parse().map_err(|_| Rejection::StaleTimestamp)?;
    if (now_secs - sent).abs() > TOLERANCE_SECS {
        return Err(Rejection::StaleTimestamp);
    }
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").ok_or(Rejection::BadSecret)?)
        .map_err(|_| Rejection::BadSecret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| Rejection::BadSecret)?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = mac.finalize().into_bytes();
    // The header may carry several space-separated signatures (during secret rotation).
    let matches = signatures
        .split(' ')
        .filter_map(|signature| signature.strip_prefix("v1,"))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .any(|candidate| bool::from(candidate.as_slice().ct_eq(&expected[..])));
    if matches {
        Ok(())
    } else {
        Err(Rejection::BadSignature)
    }
}

/// This machine's clock in Unix seconds.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", id.parse().expect("header"));
        headers.insert("webhook-timestamp", timestamp.parse().expect("header"));
        headers.insert("webhook-signature", signature.parse().expect("header"));
        headers
    }

    // A signature made the Standard Webhooks way verifies; tampering, a wrong secret or
    // an old timestamp do not.
    #[test]
    fn verifies_standard_webhooks_signatures() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"type":"credits.low","timestamp":"2026-11-24T10:00:00Z","data":{}}"#;
        let key = STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("key");
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("mac");
        mac.update(b"evt_1.1700000000.");
        mac.update(body);
        let signature = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        let good = headers("evt_1", "1700000000", &signature);
        assert_eq!(verify(secret, &good, body, 1_700_000_010), Ok(()));
        assert_eq!(
            verify(secret, &good, b"{}", 1_700_000_010),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            verify("whsec_AAAA", &good, body, 1_700_000_010),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            verify(secret, &good, body, 1_700_001_000),
            Err(Rejection::StaleTimestamp)
        );
        let rotated = headers("evt_1", "1700000000", &format!("v1,AAAA {signature}"));
        assert_eq!(verify(secret, &rotated, body, 1_700_000_000), Ok(()));
    }
}
