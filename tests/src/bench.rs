//! Helpers shared by the benchmarks under `tests/benches/`.

use std::sync::Arc;
use std::time::Duration;

use protocol::{CatalogSnapshot, SyncRecord, WireTime};

/// The value at `fraction` (0..=1) of sorted samples.
pub fn percentile(sorted: &[u64], fraction: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let last = sorted.len() - 1;
    #[allow(
        clippy::as_conversions,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = (fraction * last as f64).round() as usize;
    sorted[rank.min(last)]
}

/// This process's resident set, in bytes (from /proc).
pub fn rss_bytes(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib * 1024)
}

/// CPU time (user + system) a process has used.
pub fn cpu_time(pid: u32) -> Duration {
    let ticks_per_sec = 100u64; // Linux USER_HZ
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let Some(rest) = text.rsplit_once(')').map(|(_, rest)| rest) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks = fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    Duration::from_millis(ticks * 1000 / ticks_per_sec)
}

/// A deterministic pseudo-random sequence (xorshift64*), for picking end users.
#[derive(Debug, Clone)]
pub struct Picker(u64);

impl Picker {
    pub fn new(seed: u64) -> Picker {
        Picker(seed.max(1))
    }

    pub fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let value = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        usize::try_from(value % u64::try_from(bound).unwrap_or(1)).unwrap_or(0)
    }
}

/// A catalog with one metered feature, `api_calls` (1 credit a unit).
pub fn catalog() -> CatalogSnapshot {
    crate::from(serde_json::json!({
        "features": [{"id": "feat_01", "key": "api_calls", "parent_id": null, "archived": false,
                      "body": {"key": "api_calls", "name": "API calls", "type": "metered"}}],
        "plans": [], "variants": [],
        "settings": {"free_plan_variant_id": null, "low_balance_threshold": null}
    }))
}

/// An end user with one grant of `amount`, as of `now`.
pub fn user_state(
    id: &str,
    amount: i64,
    catalog: &ledger::Catalog,
    now: ledger::Timestamp,
) -> ledger::EndUserState {
    let mut state = ledger::EndUserState::new(ledger::EndUserId::new(id).expect("id"), now);
    let mut ids = ledger::SequentialIds::default();
    let mut cx = ledger::Cx {
        now,
        catalog,
        ids: &mut ids,
    };
    state
        .grant(
            &mut cx,
            ledger::GrantRequest::new(ledger::Credits::new(amount)),
        )
        .expect("grant");
    state.shrink_to_fit();
    state
}

/// A replica on a temporary sled directory holding `users` end users (`u0`, `u1`, …),
/// loaded the way the follower loads a snapshot: `begin_snapshot`, then each end user as
/// the binary frame the feed sends, the end line, and one persist.
pub fn loaded_replica(
    dir: &std::path::Path,
    users: usize,
    cache_mb: u64,
) -> Arc<proxy::replica::Replica> {
    let disk = proxy::disk::Disk::open(dir, cache_mb).expect("disk");
    let replica = Arc::new(
        proxy::replica::Replica::open(disk, Arc::new(proxy::pending::Pending::default()))
            .expect("replica"),
    );
    let snapshot = catalog();
    let ledger_catalog = snapshot.to_ledger().expect("catalog");
    let now = replica.now();
    replica.begin_snapshot().expect("begin");
    replica
        .apply(SyncRecord::Header {
            cursor: 1,
            clock_offset_ms: 0,
            now: WireTime(now),
        })
        .expect("header");
    replica
        .apply(SyncRecord::Catalog {
            cursor: 1,
            catalog: snapshot,
        })
        .expect("catalog");
    // One end user's state, given each end user's id: what the feed would carry.
    let template = user_state("u0", 1_000_000, &ledger_catalog, now).into_parts();
    for index in 0..users {
        let id = format!("u{index}");
        let mut parts = template.clone();
        parts.end_user_id = ledger::EndUserId::new(&id).expect("id");
        replica
            .apply(protocol::frames::Frame::EndUser(
                protocol::frames::EndUserFrame {
                    cursor: 1,
                    end_user_id: id,
                    version: parts.version,
                    state: protocol::frames::encode_state(&parts)
                        .expect("frame")
                        .into(),
                },
            ))
            .expect("user");
    }
    replica
        .apply(SyncRecord::End {
            end_users: u64::try_from(users).unwrap_or(0),
        })
        .expect("end");
    replica.finish_snapshot(1);
    replica.persist().expect("persist");
    replica
}
