//! The in-memory index of end user states, compact for the many and quick for the few:
//! every state is held encoded (its version, then the state in postcard: about 80 bytes
//! for an end user with one credit block, against about 600 as a decoded
//! [`EndUserState`]), and the states in use are held decoded beside them, in a bounded
//! cache that a periodic [`Index::sweep`] empties of those not used since the last one.
//!
//! A decision reads the decoded state (one lookup, as before); an end user's first
//! request after a quiet spell decodes theirs (a few microseconds, no disk). Both forms
//! come from one [`EndUserState`] and its one `decide`: there is no second decision
//! model to drift from the control plane's (docs/decisions.md).
//!
//! Locks: `encoded`, then `decoded`, never the other way; both are taken inside the end
//! user's pending lock where the caller holds one.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ledger::{EndUserId, EndUserState, StateParts};

/// At most this many states are held decoded (about 600 bytes each for a one-block
/// state): beyond it, a state is decoded for each use and not kept.
pub const DECODED_MAX: usize = 1 << 18;

/// Bytes of the version ahead of the postcard state.
const VERSION_BYTES: usize = 8;

/// A state that does not encode or decode (a bug or version skew).
#[derive(Debug, thiserror::Error)]
#[error("end user state encoding: {0}")]
pub struct EncodingError(String);

/// An end user's state as the index and the stored copy hold it: the version (8 bytes,
/// little-endian), then [`StateParts`] in postcard (whose first field is the end user's
/// id).
///
/// # Errors
/// A state serde cannot write (none the engine makes).
pub fn encode(state: &EndUserState) -> Result<Box<[u8]>, EncodingError> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let parts = state.clone().into_parts();
    // Encoded into a buffer kept for the thread, then copied at exactly its length (no
    // growing and shrinking per state).
    SCRATCH.with_borrow_mut(|scratch| {
        let mut out = std::mem::take(scratch);
        out.clear();
        out.extend_from_slice(&state.version().to_le_bytes());
        let out =
            postcard::to_extend(&parts, out).map_err(|error| EncodingError(error.to_string()))?;
        let bytes = Box::from(out.as_slice());
        if out.capacity() <= 64 * 1024 {
            *scratch = out;
        }
        Ok(bytes)
    })
}

/// The state `bytes` hold, checked as [`EndUserState::from_parts`] checks a stored one.
///
/// # Errors
/// Bytes that are not an encoded, valid state.
pub fn decode(bytes: &[u8]) -> Result<EndUserState, EncodingError> {
    let body = bytes
        .get(VERSION_BYTES..)
        .ok_or_else(|| EncodingError("shorter than its version".into()))?;
    let parts: StateParts =
        postcard::from_bytes(body).map_err(|error| EncodingError(error.to_string()))?;
    let mut state =
        EndUserState::from_parts(parts).map_err(|error| EncodingError(error.to_string()))?;
    state.shrink_to_fit();
    Ok(state)
}

/// The version at the head of encoded bytes.
fn version_of(bytes: &[u8]) -> Option<u64> {
    let head: [u8; VERSION_BYTES] = bytes.get(..VERSION_BYTES)?.try_into().ok()?;
    Some(u64::from_le_bytes(head))
}

/// The end user's id in encoded bytes (postcard's first field, read in place).
pub fn id_of(bytes: &[u8]) -> Option<&str> {
    let body = bytes.get(VERSION_BYTES..)?;
    postcard::take_from_bytes::<&str>(body)
        .ok()
        .map(|(id, _)| id)
}

#[derive(Debug)]
struct Decoded {
    state: Arc<EndUserState>,
    /// Used since the last sweep.
    used: AtomicBool,
}

/// Every end user's state, encoded, and the states in use, decoded.
#[derive(Debug)]
pub struct Index {
    hasher: RandomState,
    decoded_max: usize,
    encoded: RwLock<hashbrown::HashTable<Box<[u8]>>>,
    decoded: RwLock<HashMap<EndUserId, Decoded>>,
}

/// What an [`Index::insert`] replaced, to be dropped outside the caller's locks.
#[derive(Debug)]
#[must_use = "dropped outside the caller's locks"]
pub struct Replaced {
    _encoded: Option<Box<[u8]>>,
    _decoded: Option<Arc<EndUserState>>,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Default for Index {
    fn default() -> Index {
        Index::with_decoded_max(DECODED_MAX)
    }
}

impl Index {
    /// An empty index that holds at most `decoded_max` states decoded.
    pub fn with_decoded_max(decoded_max: usize) -> Index {
        Index {
            hasher: RandomState::new(),
            decoded_max,
            encoded: RwLock::default(),
            decoded: RwLock::default(),
        }
    }

    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The end user's state: the decoded one when held (an `Arc` clone under a read lock),
    /// else decoded now and kept while [`DECODED_MAX`] allows.
    pub fn get(&self, end_user: &EndUserId) -> Option<Arc<EndUserState>> {
        if let Some(held) = read(&self.decoded).get(end_user) {
            if !held.used.load(Ordering::Relaxed) {
                held.used.store(true, Ordering::Relaxed);
            }
            return Some(held.state.clone());
        }
        let encoded = read(&self.encoded);
        let id = end_user.as_str();
        let bytes = encoded.find(self.hash(id), |bytes| id_of(bytes) == Some(id))?;
        let state = match decode(bytes) {
            Ok(state) => Arc::new(state),
            Err(error) => {
                // Only what `insert` checked is held: this is a bug, not bad input.
                tracing::error!(end_user = id, %error, "an indexed state would not decode");
                return None;
            }
        };
        // Under the encoded read lock: an `insert` of a newer version waits, so what is
        // kept here is never older than what the index holds.
        let mut decoded = write(&self.decoded);
        if let Some(held) = decoded.get(end_user) {
            return Some(held.state.clone());
        }
        if decoded.len() < self.decoded_max {
            decoded.insert(
                end_user.clone(),
                Decoded {
                    state: state.clone(),
                    used: AtomicBool::new(true),
                },
            );
        }
        Some(state)
    }

    /// The version held for the end user, without decoding.
    pub fn version(&self, end_user: &EndUserId) -> Option<u64> {
        let id = end_user.as_str();
        read(&self.encoded)
            .find(self.hash(id), |bytes| id_of(bytes) == Some(id))
            .and_then(|bytes| version_of(bytes))
    }

    /// The end user's encoded state (for the stored copy).
    pub fn encoded(&self, end_user: &EndUserId) -> Option<Box<[u8]>> {
        let id = end_user.as_str();
        read(&self.encoded)
            .find(self.hash(id), |bytes| id_of(bytes) == Some(id))
            .cloned()
    }

    /// Copies of the encoded states of the end users whose id `keep` accepts (the read
    /// lock is held for one walk of the index).
    pub fn encoded_where(&self, keep: impl Fn(&str) -> bool) -> Vec<Box<[u8]>> {
        read(&self.encoded)
            .iter()
            .filter(|bytes| id_of(bytes).is_some_and(&keep))
            .cloned()
            .collect()
    }

    /// Holds `bytes` (made by [`encode`] from `state`) as the end user's state, unless
    /// the one held is newer (two appliers racing cannot put an older state back). The
    /// decoded state replaces a decoded one held (an end user in use stays quick); an
    /// end user not in use is held encoded only.
    pub fn insert(&self, state: Arc<EndUserState>, bytes: Box<[u8]>) -> Replaced {
        let id = state.end_user_id().as_str();
        debug_assert_eq!(id_of(&bytes), Some(id));
        let hash = self.hash(id);
        let mut encoded = write(&self.encoded);
        let old_encoded = match encoded.entry(
            hash,
            |held| id_of(held) == Some(id),
            |held| self.hash(id_of(held).unwrap_or_default()),
        ) {
            hashbrown::hash_table::Entry::Occupied(entry)
                if version_of(entry.get()) > Some(state.version()) =>
            {
                return Replaced {
                    _encoded: Some(bytes),
                    _decoded: Some(state),
                };
            }
            hashbrown::hash_table::Entry::Occupied(mut entry) => {
                Some(std::mem::replace(entry.get_mut(), bytes))
            }
            hashbrown::hash_table::Entry::Vacant(entry) => {
                entry.insert(bytes);
                None
            }
        };
        let old_decoded = write(&self.decoded)
            .get_mut(state.end_user_id())
            .map(|held| std::mem::replace(&mut held.state, state));
        Replaced {
            _encoded: old_encoded,
            _decoded: old_decoded,
        }
    }

    /// Holds `bytes` (a stored state, checked by [`decode`]) at start, encoded only.
    ///
    /// # Errors
    /// Bytes that are not a valid state.
    pub fn load(&self, bytes: Box<[u8]>) -> Result<(), EncodingError> {
        let state = decode(&bytes)?;
        let _replaced = self.insert(Arc::new(state), bytes);
        Ok(())
    }

    /// End users held.
    pub fn len(&self) -> usize {
        read(&self.encoded).len()
    }

    /// Decoded states held (a gauge).
    pub fn decoded_len(&self) -> usize {
        read(&self.decoded).len()
    }

    /// Forgets the decoded states not used since the last sweep (they stay encoded) and
    /// starts a new period. Returns how many were forgotten.
    pub fn sweep(&self) -> usize {
        let mut forgotten = Vec::new();
        {
            let mut decoded = write(&self.decoded);
            decoded.retain(|_, held| {
                if held.used.swap(false, Ordering::Relaxed) {
                    true
                } else {
                    forgotten.push(held.state.clone());
                    false
                }
            });
            let kept = decoded.len();
            decoded.shrink_to(kept.saturating_mul(2));
        }
        forgotten.len()
    }
}

#[cfg(test)]
mod tests;
