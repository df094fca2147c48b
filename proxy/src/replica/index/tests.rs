use std::sync::Barrier;

use ledger::{Catalog, Credits, Cx, GrantRequest, SequentialIds, Timestamp};

use super::*;

fn now() -> Timestamp {
    Timestamp::from_millis(1_780_000_000_000)
}

/// An end user with `grants` grants of 10 credits (each grant is a new version).
fn state(id: &str, grants: usize) -> EndUserState {
    let catalog = Catalog::default();
    let mut state = EndUserState::new(EndUserId::new(id).expect("id"), now());
    let mut ids = SequentialIds::default();
    let mut cx = Cx {
        now: now(),
        catalog: &catalog,
        ids: &mut ids,
    };
    for _ in 0..grants {
        state
            .grant(&mut cx, GrantRequest::new(Credits::new(10)))
            .expect("grant");
    }
    state
}

fn insert(index: &Index, state: EndUserState) {
    let bytes = encode(&state).expect("encode");
    let _replaced = index.insert(Arc::new(state), bytes);
}

fn id(text: &str) -> EndUserId {
    EndUserId::new(text).expect("id")
}

#[test]
fn a_state_encodes_compactly_and_decodes_to_itself() {
    let held = state("u1", 1);
    let bytes = encode(&held).expect("encode");
    assert!(bytes.len() < 100, "{} bytes", bytes.len());
    assert_eq!(version_of(&bytes), Some(held.version()));
    assert_eq!(id_of(&bytes), Some("u1"));
    let back = decode(&bytes).expect("decode");
    assert_eq!(back.into_parts(), held.into_parts());
    assert!(decode(&bytes[..bytes.len() - 1]).is_err(), "cut short");
    assert!(decode(&bytes[..4]).is_err(), "no version");
    assert_eq!(id_of(&bytes[..4]), None);
}

/// The encoding the stored copy depends on: if this changes, bump
/// `disk::REPLICA_FORMAT` (a stored copy in the old encoding must be dropped, not
/// misread), then update the bytes here.
#[test]
fn the_encoding_of_a_known_state_is_pinned() {
    let bytes = encode(&state("u1", 1)).expect("encode");
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    assert_eq!(
        hex, PINNED,
        "the encoding changed: bump disk::REPLICA_FORMAT"
    );
}

const PINNED: &str = "01000000000000000275310110000000000000000000000000000000011414006480a0a484ce67000400000001000080a0a484ce670000000000000000001400000080a0a484ce6701";

#[test]
fn a_state_is_decoded_on_first_use_and_forgotten_after_a_quiet_sweep() {
    let index = Index::default();
    insert(&index, state("u1", 2));
    assert_eq!(index.len(), 1);
    assert_eq!(index.decoded_len(), 0, "held encoded only");
    assert_eq!(index.version(&id("u1")), Some(2));
    assert_eq!(index.decoded_len(), 0, "the version reads without decoding");
    let first = index.get(&id("u1")).expect("held");
    assert_eq!(first.available(None, now()).expect("sum"), Credits::new(20));
    assert_eq!(index.decoded_len(), 1);
    let again = index.get(&id("u1")).expect("held");
    assert!(Arc::ptr_eq(&first, &again), "the decoded state is reused");
    assert_eq!(index.sweep(), 0, "used since the last sweep");
    assert_eq!(index.sweep(), 1, "not used since");
    assert_eq!(index.decoded_len(), 0);
    assert_eq!(index.get(&id("u1")).expect("still held").version(), 2);
    assert!(index.get(&id("u2")).is_none());
}

#[test]
fn a_newer_state_replaces_a_decoded_one_and_stays_encoded_otherwise() {
    let index = Index::default();
    insert(&index, state("u1", 1));
    insert(&index, state("u2", 1));
    index.get(&id("u1")).expect("decoded");
    insert(&index, state("u1", 3));
    insert(&index, state("u2", 3));
    assert_eq!(index.decoded_len(), 1, "u2 was not in use");
    assert_eq!(index.get(&id("u1")).expect("held").version(), 3);
    assert_eq!(index.get(&id("u2")).expect("held").version(), 3);
    assert_eq!(index.len(), 2);
    assert_eq!(
        index.encoded(&id("u1")).as_deref(),
        Some(&*encode(&state("u1", 3)).expect("encode"))
    );
}

#[test]
fn an_older_state_never_replaces_a_newer_one() {
    let index = Index::default();
    insert(&index, state("u1", 3));
    index.get(&id("u1")).expect("decoded");
    insert(&index, state("u1", 2));
    assert_eq!(index.version(&id("u1")), Some(3));
    assert_eq!(index.get(&id("u1")).expect("held").version(), 3);
}

#[test]
fn beyond_the_bound_states_are_decoded_for_each_use_and_not_kept() {
    let index = Index::with_decoded_max(2);
    for n in 0..5 {
        insert(&index, state(&format!("u{n}"), 1));
    }
    for n in 0..5 {
        let held = index.get(&id(&format!("u{n}"))).expect("held");
        assert_eq!(held.end_user_id().as_str(), format!("u{n}"));
    }
    assert_eq!(index.decoded_len(), 2);
}

#[test]
fn many_end_users_are_found_by_id() {
    let index = Index::default();
    for n in 0..2_000 {
        insert(&index, state(&format!("user-{n}"), 1 + n % 3));
    }
    assert_eq!(index.len(), 2_000);
    for n in 0..2_000 {
        let held = index.version(&id(&format!("user-{n}")));
        assert_eq!(held, Some(u64::try_from(1 + n % 3).expect("small")));
    }
}

/// A first use decoding the state while the feed installs a newer one: whichever wins,
/// the index never keeps the older state decoded.
#[test]
fn a_decode_racing_a_newer_state_never_keeps_the_older_one() {
    let states: Vec<EndUserState> = (1..=3).map(|grants| state("u1", grants)).collect();
    for round in 0..500 {
        let index = Index::default();
        insert(&index, states[0].clone());
        let start = Barrier::new(2);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                start.wait();
                insert(&index, states[1].clone());
                insert(&index, states[2].clone());
            });
            scope.spawn(|| {
                start.wait();
                for _ in 0..3 {
                    index.get(&id("u1")).expect("held");
                }
            });
        });
        assert_eq!(
            index.get(&id("u1")).expect("held").version(),
            3,
            "round {round}"
        );
    }
}
