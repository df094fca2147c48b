//! The control plane's clock: [`protocol::clock`]'s sources of now (the one place that
//! reads the system clock), and ids stamped with an operation's `now`.

pub use protocol::clock::{Clock, ManualClock, SystemClock};

use ledger::Timestamp;

/// ULIDs whose time part is the operation's `now` and whose other 80 bits are random.
#[derive(Debug)]
pub struct UlidSource {
    millis: u64,
}

impl UlidSource {
    pub fn at(now: Timestamp) -> UlidSource {
        UlidSource {
            millis: u64::try_from(now.as_millis()).unwrap_or(0),
        }
    }
}

impl ledger::IdSource for UlidSource {
    fn next_id(&mut self) -> ledger::Ulid {
        let random: u128 = rand::random::<u128>() & ((1u128 << 80) - 1);
        ledger::Ulid::from_parts(self.millis, random)
    }
}
