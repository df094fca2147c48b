use std::path::Path;

use proptest::prelude::*;

use super::{FRAME_HEAD, KEY_BYTES, Logged, Position, UsageLog};

const MB: u64 = 1 << 20;

fn key(n: u8) -> [u8; KEY_BYTES] {
    let mut key = [0u8; KEY_BYTES];
    key[0] = 1;
    key[KEY_BYTES - 1] = n;
    key
}

fn json(n: u8) -> Vec<u8> {
    format!(r#"{{"key":"qsp_{n}","units":{n}}}"#).into_bytes()
}

/// The (key, json) of what is waiting, oldest first.
fn waiting(log: &UsageLog) -> Vec<([u8; KEY_BYTES], Vec<u8>)> {
    let taken = log.take(usize::MAX);
    let pairs = taken
        .iter()
        .map(|logged| (logged.key, logged.json.clone()))
        .collect();
    log.give_back(taken);
    pairs
}

fn expected(numbers: impl IntoIterator<Item = u8>) -> Vec<([u8; KEY_BYTES], Vec<u8>)> {
    numbers.into_iter().map(|n| (key(n), json(n))).collect()
}

/// The segment files in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    crate::segments::files(dir)
}

fn cut(file: &Path, length: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|handle| handle.set_len(length))
        .expect("cut");
}

#[test]
fn positions_sort_as_their_bytes_do_and_round_trip() {
    let positions = [
        Position {
            segment: 1,
            offset: 900,
        },
        Position {
            segment: 2,
            offset: 0,
        },
        Position {
            segment: 2,
            offset: 48,
        },
    ];
    for pair in positions.windows(2) {
        assert!(pair[0] < pair[1]);
        assert!(pair[0].to_bytes() < pair[1].to_bytes());
    }
    for position in positions {
        assert_eq!(Position::from_bytes(&position.to_bytes()), Some(position));
    }
    assert_eq!(Position::from_bytes(b"short"), None);
}

#[test]
fn records_wait_in_order_across_a_reopen_until_handed_on() {
    let dir = tempfile::tempdir().expect("dir");
    let handed_on = {
        let log = UsageLog::open(dir.path(), MB, None).expect("open");
        for n in 1..=4 {
            log.append(key(n), &json(n)).expect("append");
        }
        assert_eq!(waiting(&log), expected(1..=4));
        let taken = log.take(2);
        assert_eq!(taken.len(), 2);
        assert_eq!(log.waiting(), 2);
        taken.last().expect("two").end
    };
    // Reopened with the first two in sled: only the last two wait.
    let log = UsageLog::open(dir.path(), MB, Some(handed_on)).expect("reopen");
    assert_eq!(waiting(&log), expected(3..=4));
    // Reopened as if sled never took them: all four.
    drop(log);
    let log = UsageLog::open(dir.path(), MB, None).expect("reopen");
    assert_eq!(waiting(&log), expected(1..=4));
}

#[test]
fn records_given_back_come_before_later_ones() {
    let dir = tempfile::tempdir().expect("dir");
    let log = UsageLog::open(dir.path(), MB, None).expect("open");
    log.append(key(1), &json(1)).expect("append");
    log.append(key(2), &json(2)).expect("append");
    let taken = log.take(10);
    log.append(key(3), &json(3)).expect("append");
    log.give_back(taken);
    assert_eq!(waiting(&log), expected(1..=3));
}

/// A crash mid-append leaves part of the last record: cut the file at every byte of it,
/// and the log reopens with every whole record and nothing of the torn one, then goes
/// on appending (to a new segment) and reopens again with both.
#[test]
fn a_record_cut_at_every_byte_is_ignored_and_nothing_before_it_is_lost() {
    let last = FRAME_HEAD + KEY_BYTES + json(3).len();
    for at in 0..last {
        let dir = tempfile::tempdir().expect("dir");
        let whole = {
            let log = UsageLog::open(dir.path(), MB, None).expect("open");
            log.append(key(1), &json(1)).expect("append");
            log.append(key(2), &json(2)).expect("append");
            let whole = log.bytes();
            log.append(key(3), &json(3)).expect("append");
            whole
        };
        let file = segments(dir.path()).pop().expect("a segment");
        cut(&file, whole + u64::try_from(at).expect("fits"));
        {
            let log = UsageLog::open(dir.path(), MB, None).expect("reopen after the cut");
            assert_eq!(waiting(&log), expected(1..=2), "cut at {at}");
            log.append(key(4), &json(4)).expect("append after the cut");
        }
        let log = UsageLog::open(dir.path(), MB, None).expect("reopen");
        assert_eq!(
            waiting(&log),
            expected([1, 2, 4]),
            "cut at {at}: the torn record stays out, the next one is read"
        );
    }
}

/// A last record whose bytes changed (a checksum failing), or whose length claims more
/// than a record can hold, is torn: ignored with what follows in its segment.
#[test]
fn a_last_record_that_fails_its_checksum_or_claims_too_much_is_ignored() {
    for (offset, value) in [(FRAME_HEAD + 3, 0x55u8), (0, 0xff), (3, 0x7f)] {
        let dir = tempfile::tempdir().expect("dir");
        let whole = {
            let log = UsageLog::open(dir.path(), MB, None).expect("open");
            log.append(key(1), &json(1)).expect("append");
            let whole = log.bytes();
            log.append(key(2), &json(2)).expect("append");
            whole
        };
        let file = segments(dir.path()).pop().expect("a segment");
        let mut bytes = std::fs::read(&file).expect("read");
        let at = usize::try_from(whole).expect("fits") + offset;
        bytes[at] ^= value;
        std::fs::write(&file, &bytes).expect("write");
        let log = UsageLog::open(dir.path(), MB, None).expect("reopen");
        assert_eq!(waiting(&log), expected([1]), "byte {offset} changed");
    }
}

/// A full log refuses new records with a clear error, loses nothing it holds, and takes
/// more once what it holds is handed on.
#[test]
fn a_full_log_refuses_clearly_keeps_what_it_has_and_recovers_once_handed_on() {
    let dir = tempfile::tempdir().expect("dir");
    let max = 8 << 10;
    let log = UsageLog::open(dir.path(), max, None).expect("open");
    let mut appended = 0u8;
    let error = loop {
        match log.append(key(appended), &json(appended)) {
            Ok(()) => appended += 1,
            Err(error) => break error,
        }
        assert!(appended < 250, "the bound never applied");
    };
    assert!(error.to_string().contains("usage log is full"), "{error}");
    assert!(!log.has_room());
    assert!(log.bytes() <= max);
    assert_eq!(log.waiting(), usize::from(appended));
    drop(log);
    let log = UsageLog::open(dir.path(), max, None).expect("reopen");
    assert_eq!(log.waiting(), usize::from(appended), "nothing lost");
    assert!(log.append(key(0), &json(0)).is_err(), "still full");
    let taken = log.take(usize::MAX);
    let end = taken.last().expect("records").end;
    log.handed_on(end);
    assert!(log.has_room(), "handed on, the space is free again");
    log.append(key(1), &json(1)).expect("append once handed on");
}

/// A record longer than any the proxy writes is refused (not written).
#[test]
fn an_oversized_record_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("dir");
    let log = UsageLog::open(dir.path(), 4 * MB, None).expect("open");
    let error = log
        .append(key(1), &vec![b'x'; 70_000])
        .expect_err("too long");
    assert!(error.to_string().contains("longer than"), "{error}");
    assert_eq!(log.bytes(), 0);
    assert_eq!(log.waiting(), 0);
}

/// Segments roll over at their size and go only once handed on; a new run never numbers
/// its segment at or before the handed-on position, even when every file is gone.
#[test]
fn segments_roll_over_go_once_handed_on_and_are_never_renumbered_backwards() {
    let dir = tempfile::tempdir().expect("dir");
    // 16 KiB segments (a quarter of 64 KiB).
    let log = UsageLog::open(dir.path(), 64 << 10, None).expect("open");
    let mut n = 0u8;
    while segments(dir.path()).len() < 3 {
        log.append(key(n), &json(n)).expect("append");
        n = n.wrapping_add(1);
    }
    let taken = log.take(usize::MAX);
    let last: Logged = taken.last().expect("records").clone();
    log.handed_on(taken[0].end);
    assert_eq!(
        segments(dir.path()).len(),
        3,
        "the first segment still holds records"
    );
    log.handed_on(last.end);
    assert_eq!(
        segments(dir.path()).len(),
        1,
        "only the segment appends go to is left"
    );
    drop(log);
    for file in segments(dir.path()) {
        std::fs::remove_file(file).expect("remove");
    }
    let log = UsageLog::open(dir.path(), 64 << 10, Some(last.end)).expect("reopen");
    log.append(key(9), &json(9)).expect("append");
    drop(log);
    let log = UsageLog::open(dir.path(), 64 << 10, Some(last.end)).expect("reopen");
    assert_eq!(
        waiting(&log),
        expected([9]),
        "a record after the handed-on position is not taken for handed on"
    );
}

#[derive(Debug, Clone)]
enum Step {
    Append(u8),
    Take(usize),
    /// Sled takes what was taken (and the log may delete it).
    Keep,
    /// Sled refuses what was taken.
    Refuse,
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => any::<u8>().prop_map(Step::Append),
        2 => (1usize..6).prop_map(Step::Take),
        2 => Just(Step::Keep),
        1 => Just(Step::Refuse),
        1 => Just(Step::Reopen),
    ]
}

proptest! {
    /// Against a naive model (a list of records and how many of them sled holds): every
    /// record is in sled or waiting in the log, once, in order, whatever the steps.
    #[test]
    fn the_log_agrees_with_a_naive_model(steps in proptest::collection::vec(step(), 1..60)) {
        let dir = tempfile::tempdir().expect("dir");
        // 8 KiB segments: a run of appends crosses several.
        let max = 32 << 10;
        let mut log = UsageLog::open(dir.path(), max, None).expect("open");
        let mut model: Vec<u8> = Vec::new();
        let mut in_sled: Vec<u8> = Vec::new();
        let mut handed_on: Option<Position> = None;
        let mut taken: Vec<Logged> = Vec::new();
        for step in steps {
            match step {
                Step::Append(n) => {
                    log.append(key(n), &json(n)).expect("append");
                    model.push(n);
                }
                Step::Take(count) => {
                    let mut more = log.take(count);
                    taken.append(&mut more);
                }
                Step::Keep => {
                    if let Some(last) = taken.last() {
                        handed_on = Some(last.end);
                        in_sled.extend(taken.drain(..).map(|logged| logged.key[KEY_BYTES - 1]));
                        log.handed_on(handed_on.unwrap_or_default());
                    }
                }
                Step::Refuse => log.give_back(std::mem::take(&mut taken)),
                Step::Reopen => {
                    taken.clear();
                    drop(log);
                    log = UsageLog::open(dir.path(), max, handed_on).expect("reopen");
                }
            }
        }
        log.give_back(taken);
        let left: Vec<u8> = waiting(&log).iter().map(|(key, _)| key[KEY_BYTES - 1]).collect();
        let mut all = in_sled.clone();
        all.extend(&left);
        prop_assert_eq!(all, model);
    }
}

/// A start keeps only segments with records waiting: restarts without usage (a proxy
/// whose requests all spend from leases) leave one empty segment, not one per start.
#[test]
fn restarts_without_usage_do_not_pile_up_segments() {
    let dir = tempfile::tempdir().expect("dir");
    for _ in 0..5 {
        let log = UsageLog::open(dir.path(), MB, None).expect("open");
        assert_eq!(log.waiting(), 0);
    }
    assert_eq!(segments(dir.path()).len(), 1);
    let log = UsageLog::open(dir.path(), MB, None).expect("open");
    log.append(key(1), &json(1)).expect("append");
    let end = log.take(1)[0].end;
    drop(log);
    // Handed on: the segment holding it goes at the next start.
    let log = UsageLog::open(dir.path(), MB, Some(end)).expect("open");
    assert_eq!(log.waiting(), 0);
    assert_eq!(segments(dir.path()).len(), 1);
}
