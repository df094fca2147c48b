//! Replaying entries from zero (SPEC 3.4: replaying an end user's entries reproduces their
//! blocks exactly). Used by tests after every operation, and by audits of stored ledgers.

use std::collections::BTreeMap;

use crate::amount::{Credits, Overflow};
use crate::block::Block;
use crate::entry::{Entry, EntryType};
use crate::id::{BlockId, FeatureKey};

/// Blocks and debt rebuilt from entries alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Every block ever granted, as the entries leave it (spent ones included).
    pub blocks: BTreeMap<BlockId, Block>,
    pub debt: BTreeMap<FeatureKey, Credits>,
}

/// Why a list of entries does not replay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {entry}: {message}")]
pub struct ReplayError {
    pub entry: String,
    pub message: String,
}

/// Replays `entries` in order, applying each type's fixed effect (see [`EntryType`]).
///
/// # Errors
/// [`ReplayError`] naming the first entry that refers to an unknown block, takes more
/// than a block has, or overflows.
pub fn replay(entries: &[Entry]) -> Result<Replayed, ReplayError> {
    let mut replayed = Replayed::default();
    for entry in entries {
        apply(&mut replayed, entry).map_err(|message| ReplayError {
            entry: entry.id.to_string(),
            message,
        })?;
    }
    Ok(replayed)
}

fn apply(replayed: &mut Replayed, entry: &Entry) -> Result<(), String> {
    let overflow = |_: Overflow| "overflow".to_owned();
    if let Some(block) = &entry.block {
        replayed.blocks.insert(block.id, (**block).clone());
        return Ok(());
    }
    for part in &entry.parts {
        let block = replayed
            .blocks
            .get_mut(&part.block_id)
            .ok_or_else(|| format!("unknown block {}", part.block_id))?;
        let held = entry.reservation_id.is_some() || entry.lease_id.is_some();
        match (entry.entry_type, held) {
            (EntryType::Debit | EntryType::Adjust | EntryType::Settle, _) => {
                block.burn(part.amount).map_err(overflow)?
            }
            (EntryType::Hold, _) => {
                block.held = block.held.checked_add(part.amount).map_err(overflow)?
            }
            (EntryType::Commit, _) => {
                block.held = block.held.checked_sub(part.amount).map_err(overflow)?;
                block.burn(part.amount).map_err(overflow)?;
            }
            (EntryType::Release, _) | (EntryType::Expire, true) => {
                block.held = block.held.checked_sub(part.amount).map_err(overflow)?;
            }
            (EntryType::Expire, false) => block.expire(part.amount).map_err(overflow)?,
            (EntryType::Void, _) => {
                block.void(part.amount).map_err(overflow)?;
                block.voided_at.get_or_insert(entry.created_at);
            }
            (EntryType::Grant, _) => return Err("grant without its block".into()),
        }
        if block.held.is_negative() || block.held > block.remaining || block.remaining.is_negative()
        {
            return Err(format!("block {} out of bounds", part.block_id));
        }
    }
    if let Some(feature) = &entry.feature_key {
        let debt = replayed.debt.entry(feature.clone()).or_default();
        match entry.entry_type {
            EntryType::Debit => *debt = debt.checked_add(entry.debt).map_err(overflow)?,
            EntryType::Settle => *debt = debt.checked_sub(entry.amount).map_err(overflow)?,
            _ => {}
        }
        if debt.is_negative() {
            return Err(format!("debt for {feature} below zero"));
        }
    }
    replayed.debt.retain(|_, debt| debt.is_positive());
    Ok(())
}
