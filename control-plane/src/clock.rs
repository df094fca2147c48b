//! The one place that reads the system clock. Everything else takes `now` from a
//! [`Clock`], so tests can move time without sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ledger::Timestamp;

/// A source of the current instant.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> Timestamp;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp::from_millis(millis)
    }
}

/// A clock that moves only when told: for tests.
#[derive(Debug, Clone)]
pub struct ManualClock {
    millis: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock {
            millis: Arc::new(AtomicI64::new(start.as_millis())),
        }
    }

    pub fn set(&self, to: Timestamp) {
        self.millis.store(to.as_millis(), Ordering::SeqCst);
    }

    pub fn advance_ms(&self, millis: i64) {
        self.millis.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.millis.load(Ordering::SeqCst))
    }
}

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
