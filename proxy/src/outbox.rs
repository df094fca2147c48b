//! The usage outbox: every admitted request's usage (or reservation step) is appended
//! to the usage log (synced before the response is released, in `sync` durability); the
//! shipper hands the log on to sled once per round, in one transaction, and sends what
//! sled holds to the control plane in batches with per-event idempotency keys, deleting
//! records only once acknowledged. While the control plane is down, or refuses a whole
//! batch, records wait and the shipper backs off.
//!
//! Admitted usage is never deleted unacknowledged: a record the control plane refuses
//! for good (one event of a batch, or a reservation step) moves to the quarantine with
//! the refusal, where an operator can list it and replay it into the outbox
//! (`GET /quarantine`, `POST /quarantine/replay` on the admin port).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ledger::{Credits, EndUserId};
use protocol::{BatchStatus, CommitReservation, Problem, RecordUsage, UsageBatch, WireTime};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::config::Durability;
use crate::disk::{Acked, Disk, DiskError, Flusher, OutboxEntry};
use crate::replica::Replica;
use crate::usage_log::{Logged, Position, UsageLog};

mod quarantine;

pub use quarantine::{QuarantineEntry, Quarantined, ReplayError};

fn acked_entry(record: &Record, needed: u64, at_ms: i64) -> Result<OutboxEntry, String> {
    let acked = Acked {
        end_user_id: record.end_user_id.clone(),
        cost: record.pending,
        needed,
        at_ms,
    };
    let json = serde_json::to_vec(&acked).map_err(|error| error.to_string())?;
    Ok((record.key.as_bytes().to_vec(), json))
}

/// Whether an answer means "try again later" rather than "this will never pass": 5xx,
/// rate limiting, a key being rotated (401/403), a request still in flight (409, except
/// a key reused with another body, which never passes), a timeout. Usage is never
/// quarantined for those.
fn retryable(status: u16, code: &str) -> bool {
    code != "idempotency_key_reused"
        && (status >= 500 || matches!(status, 401 | 403 | 408 | 409 | 425 | 429))
}

/// Whether the control plane refused a call for good (the request itself is invalid).
/// Unreachable, undecodable and retryable answers are not.
fn refused_for_good(error: &client::Error) -> bool {
    error.status().is_some_and(|status| {
        status.is_client_error() && !retryable(status.as_u16(), error.code().unwrap_or(""))
    })
}

/// The control plane's problem behind an error, when it answered with one.
fn problem_of(error: &client::Error) -> Option<Problem> {
    match error {
        client::Error::Api { problem, .. } => Some(Problem::clone(problem)),
        _ => None,
    }
}

fn gauge_of(count: usize) -> f64 {
    f64::from(u32::try_from(count).unwrap_or(u32::MAX))
}

/// What the control plane must be told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Usage {
        feature_key: String,
        units: u64,
        timestamp_ms: i64,
        /// When the quota window the usage was admitted in resets, as the replica showed
        /// it: usage is aggregated only within one window.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window_ms: Option<i64>,
        /// A request's usage, never sent yet: it may be aggregated with others into one
        /// event (under a new key) before it is first sent. Records of older versions,
        /// lease reports' leftovers and lapsed commits are not.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        aggregable: bool,
        /// The earliest timestamp of the requests merged into this record, when it holds
        /// several (the group's span runs from here to `timestamp_ms`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_ms: Option<i64>,
    },
    /// Commit a control-plane reservation with the actual units.
    Commit {
        reservation_id: String,
        feature_key: String,
        units: u64,
    },
    /// Release a control-plane reservation (the upstream failed).
    Release { reservation_id: String },
    /// A reservation request got no answer: replay it under its idempotency key (which
    /// finds the hold if it was made, or makes one) and release what it returns.
    Unreserve {
        reserve_key: String,
        feature_key: String,
        units: u64,
        ttl_seconds: i64,
    },
}

impl Op {
    /// Usage sent as it is, under its record's key.
    pub fn usage(feature_key: String, units: u64, timestamp_ms: i64) -> Op {
        Op::Usage {
            feature_key,
            units,
            timestamp_ms,
            window_ms: None,
            aggregable: false,
            since_ms: None,
        }
    }

    /// A request's usage, admitted in the quota window that resets at `window_ms`: it may
    /// be aggregated with the same end user's other usage of the feature in that window
    /// (see [`Outbox::aggregating`]).
    pub fn request_usage(
        feature_key: String,
        units: u64,
        timestamp_ms: i64,
        window_ms: Option<i64>,
    ) -> Op {
        Op::Usage {
            feature_key,
            units,
            timestamp_ms,
            window_ms,
            aggregable: true,
            since_ms: None,
        }
    }
}

/// One outbox record: the operation, its idempotency key and the local spend it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: String,
    pub end_user_id: String,
    /// Credits counted in local pending for this record.
    pub pending: i64,
    pub op: Op,
}

/// What one shipping round learnt, written by [`Outbox::settle`].
#[derive(Debug, Default)]
struct Round {
    /// Acknowledged (or unreadable) records: they leave the outbox.
    done: Vec<Vec<u8>>,
    /// Acknowledged costs the replica may not show yet.
    acked: Vec<OutboxEntry>,
    /// Records refused for good, with the refusal.
    quarantine: Vec<(Vec<u8>, Record, Option<Problem>)>,
}

/// What resolving a reservation step concluded.
#[derive(Debug)]
enum Resolution {
    /// Acknowledged, or nothing is left to do: the record leaves the outbox.
    Done,
    /// The reservation lapsed before its commit: the actual is charged as this usage.
    Replace(Record),
    /// Refused for good.
    Quarantine(Option<Problem>),
}

/// The outbox: enqueue on the request path, ship in the background.
#[derive(Debug)]
pub struct Outbox {
    disk: Disk,
    /// Where requests' records go first (one append each), to be handed on to sled in
    /// batches by the shipper.
    log: Arc<UsageLog>,
    /// Held while records move from the log to sled: one hand-on at a time, so the
    /// position stored in sled only moves forward.
    handing_on: tokio::sync::Mutex<()>,
    flusher: Arc<Flusher>,
    durability: Durability,
    wake: Notify,
    /// Records in the log and in sled (sled's own count walks the whole tree).
    depth: AtomicUsize,
    /// Records in the quarantine.
    quarantine_depth: AtomicUsize,
    /// Wake the shipper early once this many records wait (else it runs on its interval,
    /// so a busy proxy ships full batches rather than one call per request).
    wake_at: usize,
    /// Events per batch while the control plane (or what stands in front of it) answers
    /// 413: halved on each 413, doubled back on each accepted batch (`usize::MAX`: the
    /// configured size).
    batch_limit: AtomicUsize,
    /// The longest a group of aggregated usage may span, first to last timestamp, and
    /// how long a group waits for more (milliseconds; 0: every request's usage is its
    /// own event).
    aggregate_ms: i64,
    /// Past every record on disk at this run's start: what an earlier run left may have
    /// been sent, so only records after this are aggregated.
    start_mark: [u8; 16],
    /// The usage records this run sent that are still in the outbox: a record sent once
    /// (its answer lost) must be sent again under its own key, never merged.
    sent: std::sync::Mutex<std::collections::HashSet<Vec<u8>>>,
    /// The last round is under way (shutdown): nothing waits for more.
    draining: std::sync::atomic::AtomicBool,
    /// A seal, or records handed on from the usage log, were written to sled but may
    /// not be on disk yet: nothing is read to be sent before they are (a crash would
    /// bring back their parts, to be sent under their keys).
    unflushed_seal: std::sync::atomic::AtomicBool,
    /// New records' keys: ULIDs increasing within the run, from the generator that made
    /// the start mark, so every record this run pushes sorts after it.
    keys: Keys,
}

/// The generator of new records' keys.
struct Keys(std::sync::Mutex<ulid::Generator>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Keys")
    }
}

/// How many batches' worth of records a round reads when it aggregates (a group can
/// only take in records it sees).
const AGGREGATE_READ: usize = 16;

/// Where a run's sent mark starts: past now and past every record on disk (a clock
/// set back since the last run must not make its records look unsent). Unreadable:
/// past every key, so nothing is aggregated.
fn start_mark(disk: &Disk, now: [u8; 16]) -> [u8; 16] {
    match disk.outbox_last_key() {
        Ok(Some(last)) if last.as_slice() > now.as_slice() => {
            <[u8; 16]>::try_from(last.as_slice()).unwrap_or([u8::MAX; 16])
        }
        Ok(_) => now,
        Err(error) => {
            tracing::warn!(%error, "cannot read the outbox's last key; usage will not be aggregated this run");
            [u8::MAX; 16]
        }
    }
}

/// Records the usage log hands on to sled per transaction.
const HAND_ON_CHUNK: usize = 1024;

/// What one hand-on did: the position to let the log delete up to once sled has
/// flushed (`None`: nothing went in), how many records were merged away, and the
/// failure that stopped it, if one did (the chunks before it are in sled).
#[derive(Debug, Default)]
struct HandedOn {
    reached: Option<Position>,
    merged: usize,
    error: Option<DiskError>,
}

/// Moves every record waiting in `log` to the outbox in sled, with the log position
/// reached, a chunk per transaction, each chunk's usage merged first (`span_ms` > 0; see
/// [`premerge`]). A chunk sled refuses goes back to the log, and the hand-on stops there.
fn hand_on(disk: &Disk, log: &UsageLog, span_ms: i64) -> HandedOn {
    let mut done = HandedOn::default();
    loop {
        let chunk = log.take(HAND_ON_CHUNK);
        let Some(last) = chunk.last() else {
            return done;
        };
        let end = last.end;
        let (records, merged) = premerge(&chunk, span_ms);
        if let Err(error) = disk.outbox_absorb(&records, end) {
            log.give_back(chunk);
            done.error = Some(error);
            return done;
        }
        done.reached = Some(end);
        done.merged = done.merged.saturating_add(merged);
    }
}

/// An outbox record under its outbox (sled) key.
type Keyed = (Vec<u8>, Record);

/// A run of usage records becoming one event: where it starts in the round's list, the
/// earliest timestamp it holds, and the outbox keys of the records merged into it.
struct Group {
    at: usize,
    earliest_ms: i64,
    merged: Vec<Vec<u8>>,
}

/// Merges `record` into its group's event `into` where it may (the caller has matched
/// end user, feature and quota window): the group then still spans at most `span_ms`
/// from its earliest timestamp, and holds no more than one event may (`UNITS_MAX`
/// units; pending spend within `i64`). `false`: nothing changed.
fn merge(into: &mut Record, group: &mut Group, record: &Record, span_ms: i64) -> bool {
    let (
        Op::Usage {
            units: total,
            timestamp_ms: latest,
            since_ms: since,
            ..
        },
        Op::Usage {
            units,
            timestamp_ms,
            ..
        },
    ) = (&mut into.op, &record.op)
    else {
        return false;
    };
    let earliest = group.earliest_ms.min(earliest_of(&record.op));
    let last = (*latest).max(*timestamp_ms);
    let (Some(sum), Some(pending)) = (
        total.checked_add(*units),
        into.pending.checked_add(record.pending),
    ) else {
        return false;
    };
    if sum > ledger::UNITS_MAX || last.checked_sub(earliest).is_none_or(|span| span > span_ms) {
        return false;
    }
    *total = sum;
    *latest = last;
    *since = Some(earliest);
    into.pending = pending;
    group.earliest_ms = earliest;
    true
}

/// The earliest timestamp a usage record holds (its own, or that of the first request
/// merged into it).
fn earliest_of(op: &Op) -> i64 {
    match op {
        Op::Usage {
            timestamp_ms,
            since_ms,
            ..
        } => since_ms.map_or(*timestamp_ms, |since| since.min(*timestamp_ms)),
        Op::Commit { .. } | Op::Release { .. } | Op::Unreserve { .. } => i64::MAX,
    }
}

/// What a request's usage may be merged with: the end user, the feature and the quota
/// window; `None` for anything that may not be merged.
fn aggregation_identity(record: &Record) -> Option<(String, String, Option<i64>)> {
    match &record.op {
        Op::Usage {
            feature_key,
            window_ms,
            aggregable: true,
            ..
        } => Some((record.end_user_id.clone(), feature_key.clone(), *window_ms)),
        _ => None,
    }
}

/// A usage log record on its way to sled: its outbox key and its JSON.
type LogEntry = ([u8; 16], Vec<u8>);

/// A record being merged: its key, the record when it could be read, its bytes unless
/// it changed.
type Merging<'a> = ([u8; 16], Option<Record>, Option<&'a [u8]>);

/// Merges a chunk of the usage log's records before they reach sled (`span_ms` > 0):
/// each end user's aggregable usage of a feature and window within the span becomes one
/// record, under the key of the first (so it sorts where that one did), still
/// aggregable, its earliest timestamp kept in `since_ms`. What cannot be read or merged
/// passes as it was. Returns the records for sled and how many were merged away.
fn premerge(chunk: &[Logged], span_ms: i64) -> (Vec<LogEntry>, usize) {
    if span_ms == 0 {
        let records = chunk
            .iter()
            .map(|logged| (logged.key, logged.json.clone()))
            .collect();
        return (records, 0);
    }
    let mut out: Vec<Merging<'_>> = Vec::with_capacity(chunk.len());
    let mut groups: Vec<Group> = Vec::new();
    let mut open: std::collections::HashMap<(String, String, Option<i64>), usize> =
        std::collections::HashMap::new();
    let mut merged = 0usize;
    for logged in chunk {
        let record = serde_json::from_slice::<Record>(&logged.json).ok();
        let identity = record.as_ref().and_then(aggregation_identity);
        let (Some(record), Some(identity)) = (record, identity) else {
            out.push((logged.key, None, Some(&logged.json)));
            continue;
        };
        if let Some(&index) = open.get(&identity)
            && let Some(group) = groups.get_mut(index)
            && let Some((_, Some(into), bytes)) = out.get_mut(group.at)
            && merge(into, group, &record, span_ms)
        {
            *bytes = None;
            merged = merged.saturating_add(1);
            continue;
        }
        open.insert(identity, groups.len());
        groups.push(Group {
            at: out.len(),
            earliest_ms: earliest_of(&record.op),
            merged: Vec::new(),
        });
        out.push((logged.key, Some(record), Some(&logged.json)));
    }
    let records = out
        .into_iter()
        .filter_map(|(key, record, bytes)| match (bytes, record) {
            (Some(bytes), _) => Some((key, bytes.to_vec())),
            (None, Some(record)) => serde_json::to_vec(&record).ok().map(|json| (key, json)),
            (None, None) => None,
        })
        .collect();
    (records, merged)
}

impl Outbox {
    /// Opens the outbox on `disk`, its usage log in `log_dir` (at most `log_max_bytes`):
    /// what the log holds that sled does not (a previous run's last records) is handed
    /// on to sled first, so the outbox starts with everything in sled.
    ///
    /// # Errors
    /// The log cannot be opened, or sled refused its records.
    pub fn open(
        disk: Disk,
        log_dir: &std::path::Path,
        log_max_bytes: u64,
        flusher: Arc<Flusher>,
        durability: Durability,
        batch_size: usize,
    ) -> Result<Outbox, DiskError> {
        let log = UsageLog::open(log_dir, log_max_bytes, disk.usage_log_handed_on()?)?;
        let left = log.waiting();
        let done = hand_on(&disk, &log, 0);
        if let Some(error) = done.error {
            return Err(error);
        }
        if let Some(handed_on) = done.reached {
            disk.flush()?;
            log.handed_on(handed_on);
            tracing::info!(
                records = left,
                "usage the previous run logged moved to the outbox"
            );
        }
        let depth = AtomicUsize::new(disk.outbox_len());
        let quarantine_depth = AtomicUsize::new(disk.quarantine_len());
        // The mark comes from the generator new keys come from, so every record pushed
        // in this run sorts after it.
        let mut keys = ulid::Generator::new();
        let now = keys.generate().unwrap_or_else(|_| ulid::Ulid::new());
        let start_mark = start_mark(&disk, now.to_bytes());
        Ok(Outbox {
            disk,
            log: Arc::new(log),
            handing_on: tokio::sync::Mutex::new(()),
            flusher,
            durability,
            wake: Notify::new(),
            depth,
            quarantine_depth,
            wake_at: batch_size.max(1),
            batch_limit: AtomicUsize::new(usize::MAX),
            aggregate_ms: 0,
            start_mark,
            sent: std::sync::Mutex::default(),
            draining: std::sync::atomic::AtomicBool::new(false),
            unflushed_seal: std::sync::atomic::AtomicBool::new(false),
            keys: Keys(std::sync::Mutex::new(keys)),
        })
    }

    /// A new record's outbox key.
    fn next_key(&self) -> [u8; 16] {
        let generated = match self.keys.0.lock() {
            Ok(mut keys) => keys.generate(),
            Err(_) => Err(ulid::MonotonicError::Overflow),
        };
        // A fresh ULID when the generator cannot go on (never `Ulid::default()`: that is
        // the nil id, the same for every record).
        generated.unwrap_or_else(|_| ulid::Ulid::new()).to_bytes()
    }

    /// The same outbox, aggregating requests' usage before it is shipped: records of one
    /// end user, feature and quota window whose timestamps lie within `span` become one
    /// event with their units and pending spend summed, at the latest of their
    /// timestamps, under a new idempotency key. A group waits until its earliest record
    /// is `span` old (at shutdown, not at all), so each end user's usage of a feature
    /// leaves at most about once per `span`. The event replaces its parts on disk (one
    /// sled batch, flushed) before it is first sent, so a retry after a crash sends the
    /// same event again, never its parts. `Duration::ZERO` sends each request's usage as
    /// its own event, as soon as the shipper runs.
    #[must_use]
    pub fn aggregating(mut self, span: Duration) -> Outbox {
        self.aggregate_ms = i64::try_from(span.as_millis()).unwrap_or(i64::MAX);
        if self.aggregate_ms > 0 {
            // Groups wait for their span: the shipper runs on its interval, woken early
            // only by a backlog a round could not take in.
            self.wake_at = self.wake_at.saturating_mul(AGGREGATE_READ);
        }
        self
    }

    /// Appends a record to the usage log; with `sync` durability, returns once it is on
    /// disk.
    ///
    /// # Errors
    /// Storage failures (the caller must not release the response as if recorded).
    pub async fn push(&self, record: &Record) -> Result<(), DiskError> {
        let ticket = self.append(record)?;
        self.durable(ticket).await
    }

    /// Appends a record to the usage log (in the kernel: a killed process keeps it);
    /// [`Outbox::durable`] with the ticket waits for it to be on disk.
    ///
    /// # Errors
    /// The log is full or the disk refused the append: the record is not there.
    pub fn append(&self, record: &Record) -> Result<u64, DiskError> {
        let json = serde_json::to_vec(record)?;
        self.log.append(self.next_key(), &json)?;
        let depth = self.depth.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        metrics::counter!("qs_proxy_outbox_written_total").increment(1);
        if depth >= self.wake_at {
            self.wake.notify_one();
        }
        Ok(self.flusher.wrote())
    }

    /// With `sync` durability, waits until the append `ticket` is on disk.
    ///
    /// # Errors
    /// The sync failed: the record was appended but may not survive a power loss.
    pub async fn durable(&self, ticket: u64) -> Result<(), DiskError> {
        if self.durability == Durability::Sync {
            self.flusher.durable(ticket).await?;
        }
        Ok(())
    }

    /// Whether the usage log can take one more record (see `usage.usage_log_max_kb`).
    pub fn can_record(&self) -> bool {
        self.log.has_room()
    }

    /// The usage log (what the outbox's flusher syncs).
    pub fn log(&self) -> &UsageLog {
        &self.log
    }

    /// Hands what the usage log holds on to sled (flushed), then lets the log delete it;
    /// off the runtime's thread (sled's transactions block).
    ///
    /// # Errors
    /// sled refused the records or the flush (they stay in the log for the next round).
    async fn take_in(&self) -> Result<(), String> {
        let _one_at_a_time = self.handing_on.lock().await;
        if self.log.waiting() == 0 {
            return Ok(());
        }
        let (disk, log, span_ms) = (self.disk.clone(), Arc::clone(&self.log), self.aggregate_ms);
        let done = tokio::task::spawn_blocking(move || hand_on(&disk, &log, span_ms))
            .await
            .map_err(|error| error.to_string())?;
        if done.reached.is_some() {
            // Marked after the writes: a flush that began before them cleared the
            // mark first (see `flush`).
            self.unflushed_seal.store(true, Ordering::Release);
        }
        if done.merged > 0 {
            let _ = self
                .depth
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |depth| {
                    Some(depth.saturating_sub(done.merged))
                });
            metrics::counter!("qs_proxy_usage_aggregated_total")
                .increment(u64::try_from(done.merged).unwrap_or(u64::MAX));
        }
        if let Some(handed_on) = done.reached {
            self.flush().await?;
            self.log.handed_on(handed_on);
        }
        match done.error {
            Some(error) => Err(error.to_string()),
            None => Ok(()),
        }
    }

    /// Hands the usage log on to sled every `interval`, whether or not the control plane
    /// answers (shipping backs off in an outage; the log must not fill meanwhile). Once
    /// more at `stop`.
    pub async fn hand_on_loop(
        self: Arc<Self>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stop.changed() => {
                    if let Err(error) = self.take_in().await {
                        tracing::error!(%error, "could not hand the usage log on to the outbox at shutdown; the next start will");
                    }
                    return;
                }
            }
            if let Err(error) = self.take_in().await {
                tracing::warn!(%error, waiting = self.log.waiting(), "could not hand the usage log on to the outbox; will retry");
            }
        }
    }

    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    /// Records in the quarantine.
    pub fn quarantine_depth(&self) -> usize {
        self.quarantine_depth.load(Ordering::Acquire)
    }

    fn remove(&self, keys: &[Vec<u8>]) -> Result<(), String> {
        self.disk
            .outbox_remove(keys)
            .map_err(|error| error.to_string())?;
        self.forget_sent(keys);
        let _ = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |depth| {
                Some(depth.saturating_sub(keys.len()))
            });
        Ok(())
    }

    /// Writes what a shipping round learnt: acknowledged costs first (before their records
    /// leave the outbox), then the refused records into the quarantine, then the
    /// acknowledged records out of the outbox.
    fn settle(&self, replica: &Replica, round: Round) -> Result<(), String> {
        self.disk
            .acked_put(&round.acked)
            .map_err(|error| error.to_string())?;
        let refused: Vec<Vec<u8>> = round
            .quarantine
            .iter()
            .map(|(key, _, _)| key.clone())
            .collect();
        self.quarantine(replica, round.quarantine)?;
        self.forget_sent(&refused);
        self.remove(&round.done)
    }

    /// Records left by a previous run, to count their spend as pending again.
    ///
    /// # Errors
    /// Storage failures.
    pub fn restore_pending(&self, replica: &Replica) -> Result<usize, DiskError> {
        let mut count = 0usize;
        for (_, json) in self.disk.outbox_head(usize::MAX)? {
            let record: Record = serde_json::from_slice(&json)?;
            if let Ok(end_user) = EndUserId::new(&record.end_user_id) {
                replica.pending.add(&end_user, Credits::new(record.pending));
            }
            count = count.saturating_add(1);
        }
        Ok(count)
    }

    /// Ships until `stop`, then one last time (bounded) before returning.
    pub async fn ship(
        self: Arc<Self>,
        client: client::Client,
        replica: Arc<Replica>,
        batch_size: usize,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::ZERO;
        loop {
            let wait = if backoff.is_zero() { interval } else { backoff };
            tokio::select! {
                () = self.wake.notified(), if backoff.is_zero() => {}
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {
                    self.draining.store(true, Ordering::Release);
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.ship_once(&client, &replica, batch_size)).await;
                    return;
                }
            }
            match self.ship_once(&client, &replica, batch_size).await {
                Ok(more) => {
                    backoff = Duration::ZERO;
                    metrics::gauge!("qs_proxy_control_plane_up").set(1.0);
                    if more {
                        self.wake.notify_one();
                    }
                }
                Err(error) => {
                    metrics::gauge!("qs_proxy_control_plane_up").set(0.0);
                    backoff = (backoff.saturating_mul(2))
                        .clamp(Duration::from_millis(100), Duration::from_secs(10));
                    tracing::warn!(%error, ?backoff, depth = self.depth(), "shipping usage failed; will retry");
                }
            }
            metrics::gauge!("qs_proxy_outbox_depth").set(gauge_of(self.depth()));
            metrics::gauge!("qs_proxy_quarantine_depth").set(gauge_of(self.quarantine_depth()));
        }
    }

    /// Ships one batch. `Ok(true)` when more records are waiting.
    ///
    /// # Errors
    /// The control plane is unreachable, failing, or refused the whole batch (nothing was
    /// deleted that was not acknowledged; the caller backs off and tries again).
    pub async fn ship_once(
        &self,
        client: &client::Client,
        replica: &Replica,
        batch_size: usize,
    ) -> Result<bool, String> {
        self.take_in().await?;
        let limit = batch_size
            .min(self.batch_limit.load(Ordering::Acquire))
            .max(1);
        let read = if self.aggregate_ms > 0 {
            limit.saturating_mul(AGGREGATE_READ)
        } else {
            limit
        };
        let head = {
            // No hand-on half done (its records in sled, not yet flushed) while the
            // round reads what to send.
            let _no_hand_on = self.handing_on.lock().await;
            if self.unflushed_seal.load(Ordering::Acquire) {
                self.flush().await?;
            }
            self.disk
                .outbox_head(read)
                .map_err(|error| error.to_string())?
        };
        if head.is_empty() {
            return Ok(false);
        }
        let full = head.len() >= read;
        let mut usage: Vec<Keyed> = Vec::new();
        let mut round = Round::default();
        for (key, json) in head {
            let record: Record = match serde_json::from_slice(&json) {
                Ok(record) => record,
                Err(error) => {
                    tracing::error!(%error, "dropping an unreadable outbox record");
                    round.done.push(key);
                    continue;
                }
            };
            match &record.op {
                Op::Usage { .. } => usage.push((key, record)),
                Op::Commit { .. } | Op::Release { .. } | Op::Unreserve { .. } => {
                    // Resolve reservations in order with the usage before them.
                    if !usage.is_empty() {
                        break;
                    }
                    // What was resolved before must not be sent (and confirmed) twice.
                    let resolved = match self.resolve(client, replica, &record).await {
                        Ok(resolved) => resolved,
                        Err(error) => {
                            self.settle(replica, round)?;
                            return Err(error);
                        }
                    };
                    match resolved {
                        Resolution::Done => round.done.push(key),
                        Resolution::Quarantine(problem) => {
                            round.quarantine.push((key, record, problem));
                        }
                        Resolution::Replace(replacement) => {
                            self.settle(replica, round)?;
                            let json = serde_json::to_vec(&replacement)
                                .map_err(|error| error.to_string())?;
                            self.disk
                                .outbox_put(&key, &json)
                                .map_err(|error| error.to_string())?;
                            return Ok(true);
                        }
                    }
                }
            }
        }
        let (usage, overflow) = match self
            .aggregate(usage, replica.now().as_millis(), limit)
            .await
        {
            Ok(ready) => ready,
            Err(error) => {
                // Reservation steps resolved above must not be resolved (and
                // confirmed) again.
                self.settle(replica, round)?;
                return Err(error);
            }
        };
        if !usage.is_empty()
            && let Err(error) = self.ship_usage(client, replica, &usage, &mut round).await
        {
            self.settle(replica, round)?;
            return Err(error);
        }
        // Only a round that moved something goes again at once: one that found only
        // groups still waiting leaves them to the interval.
        let moved = !usage.is_empty() || !round.done.is_empty() || !round.quarantine.is_empty();
        self.settle(replica, round)?;
        Ok(moved && (full || overflow))
    }

    /// The usage to send this round, at most `limit` events, and whether more is ready:
    /// with aggregation on, the round's aggregable usage merged into one event per group
    /// (see [`Outbox::aggregating`]), groups younger than the span left to wait for more
    /// (untouched on disk), and the merged groups made durable before any is sent.
    ///
    /// # Errors
    /// The groups could not be written or flushed (nothing is sent then; the records
    /// stay as they were, or as the groups, whichever sled kept).
    async fn aggregate(
        &self,
        usage: Vec<Keyed>,
        now_ms: i64,
        limit: usize,
    ) -> Result<(Vec<Keyed>, bool), String> {
        if self.aggregate_ms == 0 {
            return Ok((usage, false));
        }
        if self.unflushed_seal.load(Ordering::Acquire) {
            // An earlier seal reached sled but not the disk: nothing goes out before it
            // does (a crash would bring back its parts, to be sent under their keys).
            self.flush().await?;
        }
        let (mut kept, groups) = self.group(usage)?;
        let draining = self.draining.load(Ordering::Acquire);
        let mut waiting = vec![false; kept.len()];
        let mut merged_into: Vec<Option<Vec<Vec<u8>>>> = vec![None; kept.len()];
        for group in groups {
            if let Some(slot) = waiting.get_mut(group.at) {
                // A group dated after now (a clock set back) does not wait for the
                // clock to catch up.
                *slot = !draining
                    && now_ms
                        .checked_sub(group.earliest_ms)
                        .is_some_and(|age| (0..self.aggregate_ms).contains(&age));
            }
            if let Some(slot) = merged_into.get_mut(group.at) {
                *slot = Some(group.merged);
            }
        }
        let mut ready = Vec::new();
        let mut overflow = false;
        let mut removed = Vec::new();
        let mut written = Vec::new();
        for ((entry, waits), merged) in kept.drain(..).zip(waiting).zip(merged_into) {
            if waits {
                continue;
            }
            if ready.len() >= limit {
                overflow = true;
                break;
            }
            let (key, mut record) = entry;
            if let Some(merged) = merged.filter(|merged| !merged.is_empty()) {
                record.key = format!("qsa_{}", ulid::Ulid::new());
                if let Op::Usage { aggregable, .. } = &mut record.op {
                    *aggregable = false;
                }
                let json = serde_json::to_vec(&record).map_err(|error| error.to_string())?;
                written.push((key.clone(), json));
                removed.extend(merged);
            }
            ready.push((key, record));
        }
        if !removed.is_empty() {
            self.seal(&removed, &written).await?;
        }
        Ok((ready, overflow))
    }

    /// The round's usage with each group of aggregable records as its first record, the
    /// others merged into it (in memory), and the groups: where each starts in the list.
    fn group(&self, usage: Vec<Keyed>) -> Result<(Vec<Keyed>, Vec<Group>), String> {
        let sent = self
            .sent
            .lock()
            .map_err(|_| "the outbox's sent set is poisoned".to_owned())?;
        let mut kept: Vec<Keyed> = Vec::with_capacity(usage.len());
        let mut groups: Vec<Group> = Vec::new();
        let mut open: std::collections::HashMap<(String, String, Option<i64>), usize> =
            std::collections::HashMap::new();
        for (key, record) in usage {
            let group = aggregation_identity(&record)
                .filter(|_| key.as_slice() > self.start_mark.as_slice() && !sent.contains(&key));
            let Some(identity) = group else {
                kept.push((key, record));
                continue;
            };
            if let Some(&index) = open.get(&identity)
                && let Some(group) = groups.get_mut(index)
                && let Some((_, into)) = kept.get_mut(group.at)
                && merge(into, group, &record, self.aggregate_ms)
            {
                group.merged.push(key);
                continue;
            }
            open.insert(identity, groups.len());
            groups.push(Group {
                at: kept.len(),
                earliest_ms: earliest_of(&record.op),
                merged: Vec::new(),
            });
            kept.push((key, record));
        }
        Ok((kept, groups))
    }

    /// Replaces merged records by their groups' events on disk, all or nothing, and
    /// flushes.
    async fn seal(&self, removed: &[Vec<u8>], written: &[OutboxEntry]) -> Result<(), String> {
        self.disk
            .outbox_replace(removed, written)
            .map_err(|error| error.to_string())?;
        // Set after the write: a flush that began before it cleared the mark first.
        self.unflushed_seal.store(true, Ordering::Release);
        let _ = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |depth| {
                Some(depth.saturating_sub(removed.len()))
            });
        metrics::counter!("qs_proxy_usage_aggregated_total")
            .increment(u64::try_from(removed.len()).unwrap_or(u64::MAX));
        self.flush().await
    }

    /// Flushes the outbox to disk (after a seal or a hand-on). The unflushed mark is
    /// cleared before the flush starts (whatever set it before then, it covers; a
    /// write marked later stays marked) and set again if the flush fails.
    async fn flush(&self) -> Result<(), String> {
        self.unflushed_seal.store(false, Ordering::Release);
        let disk = self.disk.clone();
        let flushed = tokio::task::spawn_blocking(move || crate::disk::Flush::flush(&disk))
            .await
            .map_err(|error| error.to_string())
            .and_then(|flushed| flushed.map_err(|error| error.to_string()));
        if flushed.is_err() {
            self.unflushed_seal.store(true, Ordering::Release);
        }
        flushed
    }

    /// Notes that `keys` may have been sent from now on.
    fn note_sent<'k>(&self, keys: impl Iterator<Item = &'k Vec<u8>>) -> Result<(), String> {
        if self.aggregate_ms == 0 {
            return Ok(());
        }
        let mut sent = self
            .sent
            .lock()
            .map_err(|_| "the outbox's sent set is poisoned".to_owned())?;
        sent.extend(keys.cloned());
        Ok(())
    }

    /// Records that left the outbox no longer need remembering as sent.
    fn forget_sent(&self, keys: &[Vec<u8>]) {
        if let Ok(mut sent) = self.sent.lock()
            && !sent.is_empty()
        {
            for key in keys {
                sent.remove(key);
            }
        }
    }

    /// Sends one batch of usage records and notes each event's answer in `round`.
    ///
    /// # Errors
    /// The batch call failed as a whole: every record stays for the next try.
    async fn ship_usage(
        &self,
        client: &client::Client,
        replica: &Replica,
        usage: &[Keyed],
        round: &mut Round,
    ) -> Result<(), String> {
        let events: Vec<RecordUsage> = usage
            .iter()
            .filter_map(|(_, record)| match &record.op {
                Op::Usage {
                    feature_key,
                    units,
                    timestamp_ms,
                    ..
                } => Some(RecordUsage {
                    end_user_id: record.end_user_id.clone(),
                    feature_key: feature_key.clone(),
                    units: *units,
                    timestamp: Some(WireTime(ledger::Timestamp::from_millis(*timestamp_ms))),
                    metadata: None,
                    strict: false,
                    idempotency_key: Some(record.key.clone()),
                }),
                Op::Commit { .. } | Op::Release { .. } | Op::Unreserve { .. } => None,
            })
            .collect();
        // From here on, an answer lost could mean they were recorded: none of them is
        // aggregated into another event any more.
        self.note_sent(usage.iter().map(|(key, _)| key))?;
        let answer = match client.record_usage_batch(&UsageBatch { events }).await {
            Ok(answer) => answer,
            Err(error) => {
                if refused_for_good(&error) {
                    // Not about one event: the batch call itself (an ingress 404 or 413
                    // during a deploy, a proxy misconfigured). Nothing is dropped.
                    let status = error.status().map_or(0, |status| status.as_u16());
                    tracing::error!(%error, status, events = usage.len(), "the control plane refused a whole usage batch; keeping every event and retrying with backoff");
                    metrics::counter!("qs_proxy_batch_refused_total", "status" => status.to_string())
                        .increment(1);
                    if status == 413 {
                        self.batch_limit
                            .store((usage.len() / 2).max(1), Ordering::Release);
                    }
                }
                return Err(error.to_string());
            }
        };
        let _ = self
            .batch_limit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |limit| {
                Some(limit.saturating_mul(2))
            });
        for result in answer.results {
            let Some((key, record)) = usage.get(result.index) else {
                continue;
            };
            let end_user = EndUserId::new(&record.end_user_id).ok();
            match result.status {
                BatchStatus::Created | BatchStatus::Duplicate => {
                    if let Some(end_user) = &end_user
                        && let Some(needed) = replica.pending.confirm(
                            end_user,
                            Credits::new(record.pending),
                            result.version,
                            || replica.version(end_user),
                        )
                    {
                        round
                            .acked
                            .push(acked_entry(record, needed, replica.wall_ms())?);
                    }
                    metrics::counter!("qs_proxy_usage_shipped_total").increment(1);
                    round.done.push(key.clone());
                }
                BatchStatus::Error => {
                    let problem = result.error;
                    if problem
                        .as_ref()
                        .is_none_or(|problem| retryable(problem.status, &problem.code))
                    {
                        // Keep it; the next round retries.
                        continue;
                    }
                    round
                        .quarantine
                        .push((key.clone(), record.clone(), problem));
                }
            }
        }
        Ok(())
    }

    /// Acknowledged costs left by a previous run that the stored replica does not show
    /// yet count as pending again (the others are forgotten).
    ///
    /// # Errors
    /// Storage failures.
    pub fn restore_acked(&self, replica: &Replica) -> Result<usize, DiskError> {
        let mut shown = Vec::new();
        let mut restored = 0usize;
        for (key, json) in self.disk.acked_all()? {
            let acked: Acked = serde_json::from_slice(&json)?;
            let Ok(end_user) = EndUserId::new(&acked.end_user_id) else {
                shown.push(key);
                continue;
            };
            if replica
                .version(&end_user)
                .is_some_and(|held| held >= acked.needed)
            {
                shown.push(key);
            } else {
                replica.pending.restore_confirmed(
                    &end_user,
                    Credits::new(acked.cost),
                    acked.needed,
                );
                restored = restored.saturating_add(1);
            }
        }
        self.disk.acked_remove(&shown)?;
        Ok(restored)
    }

    /// Commits or releases a reservation.
    async fn resolve(
        &self,
        client: &client::Client,
        replica: &Replica,
        record: &Record,
    ) -> Result<Resolution, String> {
        let keyed = client.with_key(&record.key);
        let end_user = EndUserId::new(&record.end_user_id).ok();
        let outcome = match &record.op {
            Op::Commit {
                reservation_id,
                units,
                ..
            } => {
                keyed
                    .commit_reservation(
                        reservation_id,
                        &CommitReservation {
                            units: Some(*units),
                            amount: None,
                        },
                    )
                    .await
            }
            Op::Release { reservation_id } => keyed.release_reservation(reservation_id).await,
            Op::Unreserve {
                reserve_key,
                feature_key,
                units,
                ttl_seconds,
            } => {
                let found = client
                    .with_key(reserve_key)
                    .reserve(&protocol::CreateReservation {
                        end_user_id: record.end_user_id.clone(),
                        feature_key: feature_key.clone(),
                        units: Some(*units),
                        amount: None,
                        ttl_seconds: Some(*ttl_seconds),
                    })
                    .await;
                match found {
                    Ok(reservation) => keyed.release_reservation(&reservation.id).await,
                    // Refused now (402, 403, …), so never made before either: nothing is
                    // held, which is what this record is for.
                    Err(error) if refused_for_good(&error) => {
                        tracing::info!(key = %record.key, %error, "the reservation that got no answer was never made; nothing to release");
                        return Ok(Resolution::Done);
                    }
                    Err(error) => Err(error),
                }
            }
            Op::Usage { .. } => return Ok(Resolution::Done),
        };
        match outcome {
            Ok(reservation) => {
                if let Some(end_user) = &end_user
                    && let Some(needed) = replica.pending.confirm(
                        end_user,
                        Credits::new(record.pending),
                        reservation.version,
                        || replica.version(end_user),
                    )
                {
                    self.disk
                        .acked_put(&[acked_entry(record, needed, replica.wall_ms())?])
                        .map_err(|error| error.to_string())?;
                }
                Ok(Resolution::Done)
            }
            Err(error) if error.code() == Some("reservation_not_active") => {
                Ok(self.not_active(replica, record, &error))
            }
            Err(error) if !refused_for_good(&error) => Err(error.to_string()),
            Err(error) => Ok(Resolution::Quarantine(problem_of(&error))),
        }
    }

    /// A reservation step found the reservation no longer active; the problem's
    /// `current_status` says what became of it.
    fn not_active(&self, replica: &Replica, record: &Record, error: &client::Error) -> Resolution {
        if let Op::Commit {
            units, feature_key, ..
        } = &record.op
        {
            let problem = problem_of(error);
            let status = problem
                .as_ref()
                .and_then(|problem| problem.current_status.as_deref());
            return match status {
                // The hold lapsed before the commit arrived: the work was done, so its
                // actual is charged as plain usage (under a key of its own).
                Some("expired" | "released") => {
                    tracing::warn!(key = %record.key, status, "reservation lapsed before its commit; charging the actual as usage");
                    Resolution::Replace(Record {
                        key: format!("{}-usage", record.key),
                        end_user_id: record.end_user_id.clone(),
                        pending: record.pending,
                        op: Op::usage(feature_key.clone(), *units, replica.now().as_millis()),
                    })
                }
                // An earlier try of this commit succeeded and its answer was lost (kept
                // beyond the idempotency retention): it is charged already.
                Some("committed") => {
                    tracing::warn!(key = %record.key, "the reservation was committed already (an earlier try's answer was lost); not charging it again");
                    // Long ago (beyond the key's retention): the replica shows it.
                    if let Ok(end_user) = EndUserId::new(&record.end_user_id) {
                        replica
                            .pending
                            .drop_unconfirmed(&end_user, Credits::new(record.pending));
                    }
                    Resolution::Done
                }
                // Nobody can tell whether it was charged: an operator decides.
                _ => Resolution::Quarantine(problem),
            };
        }
        // A release (or the release after an unanswered hold) of a reservation that is
        // no longer active: nothing is held any more, which is what it was for.
        tracing::info!(key = %record.key, %error, "the reservation to release is no longer active; nothing to do");
        if let Ok(end_user) = EndUserId::new(&record.end_user_id) {
            replica
                .pending
                .drop_unconfirmed(&end_user, Credits::new(record.pending));
        }
        Resolution::Done
    }
}

#[cfg(test)]
mod tests;
