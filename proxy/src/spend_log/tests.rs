use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;

use super::{Batch, RECORD_BYTES, SpendLog, Spent, Totals, Written};
use ledger::Credits;

const MB: u64 = 1 << 20;

fn lease(n: u8) -> String {
    ledger::LeaseId(ledger::Ulid(u128::from(n) << 64 | 7)).to_string()
}

fn spent(units: u64, cost: i64) -> Spent {
    Spent {
        units,
        cost: Credits::new(cost),
    }
}

fn totals(units: u64, cost: i64, requests: u64) -> Totals {
    Totals {
        units,
        cost: Credits::new(cost),
        requests,
    }
}

/// The segment files in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    crate::segments::files(dir)
}

#[test]
fn spend_is_summed_per_report_kept_across_a_reopen_and_gone_once_acknowledged() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, b) = (lease(1), lease(2));
    {
        let log = SpendLog::open(dir.path(), MB).expect("open");
        log.append(&a, 1, spent(3, 3)).expect("append");
        log.append(&a, 1, spent(2, 4)).expect("append");
        log.append(&a, 2, spent(1, 1)).expect("append");
        log.append(&b, 1, spent(5, 10)).expect("append");
        assert_eq!(log.totals(&a, 1).expect("totals"), totals(5, 7, 2));
        assert_eq!(log.len(), 4);
        log.acknowledge(&a, 1).expect("ack");
        assert_eq!(log.totals(&a, 1).expect("totals"), Totals::default());
        assert_eq!(
            log.index(),
            vec![(a.clone(), vec![2]), (b.clone(), vec![1])]
        );
        log.sync().expect("sync");
    }
    let log = SpendLog::open(dir.path(), MB).expect("reopen");
    assert_eq!(
        log.totals(&a, 1).expect("totals"),
        Totals::default(),
        "acknowledged"
    );
    assert_eq!(log.totals(&a, 2).expect("totals"), totals(1, 1, 1));
    assert_eq!(log.totals(&b, 1).expect("totals"), totals(5, 10, 1));
    assert_eq!(log.len(), 2);
    log.acknowledge(&a, 2).expect("ack");
    log.acknowledge(&b, 1).expect("ack");
    assert!(log.is_empty());
    assert_eq!(
        segments(dir.path()).len(),
        1,
        "settled segments are deleted; only the one appends go to is left"
    );
    assert!(log.bytes() <= 48, "{} bytes left", log.bytes());
    assert!(log.append("not-a-lease", 1, spent(1, 1)).is_err());
}

/// A crash mid-append leaves part of the last record: cut the file at every byte of it,
/// and the log reopens with every whole record and nothing of the torn one, then goes
/// on appending (to a new segment) and reopens again with both.
#[test]
fn a_record_cut_at_every_byte_is_ignored_and_nothing_before_it_is_lost() {
    let a = lease(1);
    for cut in 0..RECORD_BYTES {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = SpendLog::open(dir.path(), MB).expect("open");
            log.append(&a, 1, spent(1, 2)).expect("append");
            log.append(&a, 1, spent(1, 3)).expect("append");
            log.append(&a, 2, spent(9, 9)).expect("append");
        }
        let file = segments(dir.path()).pop().expect("a segment");
        let keep = u64::try_from(2 * RECORD_BYTES + cut).expect("fits");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|handle| handle.set_len(keep))
            .expect("cut");
        {
            let log = SpendLog::open(dir.path(), MB).expect("reopen after the cut");
            assert_eq!(
                log.totals(&a, 1).expect("totals"),
                totals(2, 5, 2),
                "cut at {cut}"
            );
            assert_eq!(
                log.totals(&a, 2).expect("totals"),
                Totals::default(),
                "cut at {cut}"
            );
            log.append(&a, 2, spent(4, 4))
                .expect("append after the cut");
        }
        let log = SpendLog::open(dir.path(), MB).expect("reopen");
        assert_eq!(
            log.totals(&a, 1).expect("totals"),
            totals(2, 5, 2),
            "cut at {cut}"
        );
        assert_eq!(
            log.totals(&a, 2).expect("totals"),
            totals(4, 4, 1),
            "cut at {cut}"
        );
    }
}

#[test]
fn a_last_record_that_fails_its_checksum_is_ignored() {
    let dir = tempfile::tempdir().expect("dir");
    let a = lease(3);
    {
        let log = SpendLog::open(dir.path(), MB).expect("open");
        log.append(&a, 1, spent(1, 1)).expect("append");
        log.append(&a, 1, spent(1, 100)).expect("append");
    }
    let file = segments(dir.path()).pop().expect("a segment");
    let mut bytes = std::fs::read(&file).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&file, &bytes).expect("write");
    let log = SpendLog::open(dir.path(), MB).expect("reopen");
    assert_eq!(log.totals(&a, 1).expect("totals"), totals(1, 1, 1));
}

/// A full log refuses new spend with a clear error, loses nothing it holds, and takes
/// spend again once acknowledgements free its segments.
#[test]
fn a_full_log_refuses_clearly_keeps_what_it_has_and_recovers_when_acknowledged() {
    let dir = tempfile::tempdir().expect("dir");
    let a = lease(4);
    let max = u64::try_from(8 * RECORD_BYTES).expect("fits");
    {
        let log = SpendLog::open(dir.path(), max).expect("open");
        let mut taken = 0;
        let error = loop {
            match log.append(&a, 1, spent(1, 1)) {
                Ok(()) => taken += 1,
                Err(error) => break error,
            }
            assert!(taken <= 8, "the bound holds");
        };
        assert!(error.to_string().contains("spend log is full"), "{error}");
        assert_eq!(log.totals(&a, 1).expect("totals").requests, taken);
    }
    let log = SpendLog::open(dir.path(), max).expect("reopen");
    let held = log.totals(&a, 1).expect("totals");
    assert!(held.requests >= 1);
    assert!(
        log.append(&a, 2, spent(1, 1)).is_err(),
        "still full after a reopen"
    );
    log.acknowledge(&a, 1).expect("ack");
    log.append(&a, 2, spent(1, 1))
        .expect("room again once acknowledged");
    assert_eq!(log.totals(&a, 2).expect("totals"), totals(1, 1, 1));
}

#[test]
fn segments_roll_over_and_go_only_when_everything_in_them_is_acknowledged() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, b) = (lease(5), lease(6));
    // Segments of two records (a quarter of eight).
    let max = u64::try_from(8 * RECORD_BYTES).expect("fits");
    let log = SpendLog::open(dir.path(), max).expect("open");
    log.append(&a, 1, spent(1, 1)).expect("append");
    log.append(&b, 1, spent(1, 1)).expect("append");
    log.append(&a, 2, spent(1, 1)).expect("append");
    assert!(segments(dir.path()).len() >= 2, "rolled over");
    // b's spend keeps the first segment (and so every later one) whatever else is
    // acknowledged.
    log.acknowledge(&a, 1).expect("ack");
    log.acknowledge(&a, 2).expect("ack");
    drop(log);
    let log = SpendLog::open(dir.path(), max).expect("reopen");
    assert_eq!(log.index(), vec![(b.clone(), vec![1])]);
    log.acknowledge(&b, 1).expect("ack");
    assert_eq!(segments(dir.path()).len(), 1);
}

fn id(n: u8) -> ledger::LeaseId {
    ledger::LeaseId::parse(&lease(n)).expect("a lease id")
}

/// Requests answered in one pass queue their spends and share one write: the first
/// `write` puts every queued record in the file, the others find theirs there. Nothing
/// queued counts before it is written, and the bound counts what is queued.
#[test]
fn queued_spends_share_one_write_and_count_only_once_written() {
    let dir = tempfile::tempdir().expect("dir");
    let max = u64::try_from(8 * RECORD_BYTES).expect("fits");
    let log = SpendLog::open(dir.path(), max).expect("open");
    let first = log.queue(id(1), 1, spent(1, 2)).expect("queue");
    let second = log.queue(id(1), 1, spent(3, 4)).expect("queue");
    let third = log.queue(id(2), 1, spent(5, 6)).expect("queue");
    assert_eq!(log.bytes(), 0, "queued, not written");
    assert_eq!(log.totals(&lease(1), 1).expect("totals"), Totals::default());
    second.write().expect("one write for the three");
    let three = u64::try_from(3 * RECORD_BYTES).expect("fits");
    assert_eq!(log.bytes(), three);
    assert_eq!(log.totals(&lease(1), 1).expect("totals"), totals(4, 6, 2));
    assert_eq!(log.totals(&lease(2), 1).expect("totals"), totals(5, 6, 1));
    first.write().expect("already written");
    third.write().expect("already written");
    assert_eq!(log.bytes(), three, "written once");
    // Eight records fit: five more can be queued, the sixth is refused before any write.
    let queued: Vec<_> = (0..5)
        .map(|_| log.queue(id(3), 1, spent(1, 1)).expect("room"))
        .collect();
    assert!(!log.has_room());
    let error = log
        .queue(id(3), 1, spent(1, 1))
        .expect_err("full with the queue");
    assert!(error.to_string().contains("spend log is full"), "{error}");
    drop(queued);
    assert_eq!(log.totals(&lease(3), 1).expect("totals"), totals(5, 5, 5));
    log.sync().expect("sync");
    drop(log);
    let log = SpendLog::open(dir.path(), max).expect("reopen");
    assert_eq!(log.len(), 8);
}

/// A spend whose request was dropped between queueing and writing is written as its
/// guard drops: it was taken from the lease, so it is reported and charged.
#[test]
fn a_queued_spend_dropped_unwritten_is_written() {
    let dir = tempfile::tempdir().expect("dir");
    {
        let log = SpendLog::open(dir.path(), MB).expect("open");
        drop(log.queue(id(1), 4, spent(2, 9)).expect("queue"));
        assert_eq!(log.totals(&lease(1), 4).expect("totals"), totals(2, 9, 1));
    }
    let log = SpendLog::open(dir.path(), MB).expect("reopen");
    assert_eq!(log.totals(&lease(1), 4).expect("totals"), totals(2, 9, 1));
}

/// A write the disk cut short and the log could not cut back leaves its first whole
/// records in the file, which a restart reads: the batch's outcome says those spends
/// were written and the rest failed. (The disk failure itself is not simulated here.)
#[test]
fn a_batch_outcome_fails_only_the_spends_past_the_whole_records_written() {
    let batch = Batch::default();
    assert!(batch.outcome(0).is_none(), "not written yet");
    batch
        .outcome
        .set(Written {
            whole: 2,
            error: Some("no space left on device".into()),
        })
        .expect("set once");
    assert!(batch.outcome(0).expect("written").is_ok());
    assert!(batch.outcome(1).expect("written").is_ok());
    let error = batch
        .outcome(2)
        .expect("written")
        .expect_err("not in the file");
    assert!(error.to_string().contains("no space left"), "{error}");
}

#[derive(Debug, Clone)]
enum Step {
    Append {
        lease: u8,
        sequence: u64,
        units: u64,
        cost: i64,
    },
    Ack {
        lease: u8,
        sequence: u64,
    },
    /// Spends queued together, then written by one of them (or by dropping them all).
    Batch {
        spends: Vec<(u8, u64, u64, i64)>,
        writer: usize,
        dropped: bool,
    },
    Reopen,
}

fn add(model: &mut BTreeMap<(String, u64), Totals>, n: u8, sequence: u64, units: u64, cost: i64) {
    let entry = model.entry((lease(n), sequence)).or_default();
    entry.units += units;
    entry.cost = entry.cost.checked_add(Credits::new(cost)).expect("small");
    entry.requests += 1;
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..3, 1u64..4, 0u64..5, 0i64..7).prop_map(|(lease, sequence, units, cost)| {
            Step::Append { lease, sequence, units, cost }
        }),
        3 => (0u8..3, 1u64..4).prop_map(|(lease, sequence)| Step::Ack { lease, sequence }),
        2 => (
            proptest::collection::vec((0u8..3, 1u64..4, 0u64..5, 0i64..7), 1..6),
            0usize..6,
            any::<bool>(),
        )
            .prop_map(|(spends, writer, dropped)| Step::Batch { spends, writer, dropped }),
        1 => Just(Step::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Against a naive model (a map of totals): every append, acknowledgement and
    /// reopen, with small segments so they roll over and are deleted.
    #[test]
    fn the_log_agrees_with_a_naive_model(steps in proptest::collection::vec(step(), 1..80)) {
        let dir = tempfile::tempdir().expect("dir");
        let max = u64::try_from(64 * RECORD_BYTES).expect("fits");
        let mut log = SpendLog::open(dir.path(), max).expect("open");
        let mut model: BTreeMap<(String, u64), Totals> = BTreeMap::new();
        for step in steps {
            match step {
                Step::Append { lease: n, sequence, units, cost } => {
                    if log.append(&lease(n), sequence, spent(units, cost)).is_ok() {
                        add(&mut model, n, sequence, units, cost);
                    }
                }
                Step::Batch { spends, writer, dropped } => {
                    let mut queued = Vec::new();
                    for (n, sequence, units, cost) in spends {
                        if let Ok(spend) = log.queue(id(n), sequence, spent(units, cost)) {
                            queued.push(spend);
                            add(&mut model, n, sequence, units, cost);
                        }
                    }
                    if !dropped && !queued.is_empty() {
                        let spend = queued.remove(writer % queued.len());
                        spend.write().expect("write");
                    }
                    drop(queued);
                }
                Step::Ack { lease: n, sequence } => {
                    log.acknowledge(&lease(n), sequence).expect("ack");
                    model.remove(&(lease(n), sequence));
                }
                Step::Reopen => {
                    drop(log);
                    log = SpendLog::open(dir.path(), max).expect("reopen");
                }
            }
            for n in 0..3u8 {
                for sequence in 1..4 {
                    let expected = model.get(&(lease(n), sequence)).copied().unwrap_or_default();
                    prop_assert_eq!(log.totals(&lease(n), sequence).expect("totals"), expected);
                }
            }
            let requests: u64 = model.values().map(|totals| totals.requests).sum();
            prop_assert_eq!(log.len(), requests);
        }
    }
}
