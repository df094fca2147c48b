//! Grants, blocks, voids, adjustments, balances and ledger entries (SPEC 3, 8).

use serde::{Deserialize, Serialize};

use crate::{FieldError, WireTime, end_user_id, feature_keys};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BlockSourceWire {
    Purchase,
    Promotion,
    Plan,
    Rollover,
    #[default]
    Manual,
}

impl From<ledger::BlockSource> for BlockSourceWire {
    fn from(source: ledger::BlockSource) -> BlockSourceWire {
        match source {
            ledger::BlockSource::Purchase => BlockSourceWire::Purchase,
            ledger::BlockSource::Promotion => BlockSourceWire::Promotion,
            ledger::BlockSource::Plan => BlockSourceWire::Plan,
            ledger::BlockSource::Rollover => BlockSourceWire::Rollover,
            ledger::BlockSource::Manual => BlockSourceWire::Manual,
        }
    }
}

fn default_priority() -> u16 {
    ledger::PRIORITY_DEFAULT
}

fn yes() -> bool {
    true
}

/// `POST /v1/credits/grants`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGrant {
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]+$"
    )]
    pub end_user_id: String,
    #[schema(minimum = 1)]
    pub amount: i64,
    #[serde(default = "default_priority")]
    #[schema(maximum = 1000)]
    pub priority: u16,
    #[serde(default)]
    pub effective_at: Option<WireTime>,
    #[serde(default)]
    pub expires_at: Option<WireTime>,
    #[serde(default)]
    pub source: BlockSourceWire,
    #[serde(default)]
    pub feature_keys: Option<Vec<String>>,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub price_paid: Option<i64>,
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z]{3}$")]
    pub currency: Option<String>,
    #[serde(default)]
    #[schema(max_length = 255)]
    pub external_payment_id: Option<String>,
    #[serde(default = "yes")]
    pub settles_debt: bool,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

impl CreateGrant {
    /// The end user and the engine's grant request.
    ///
    /// # Errors
    /// The field at fault (the engine checks the amounts and times).
    pub fn to_ledger(&self) -> Result<(ledger::EndUserId, ledger::GrantRequest), FieldError> {
        let end_user = end_user_id("end_user_id", &self.end_user_id)?;
        let source = match self.source {
            BlockSourceWire::Purchase => ledger::BlockSource::Purchase,
            BlockSourceWire::Promotion => ledger::BlockSource::Promotion,
            BlockSourceWire::Plan => {
                return Err(FieldError::new(
                    "source",
                    "`plan` blocks come from subscriptions only",
                ));
            }
            BlockSourceWire::Rollover => {
                return Err(FieldError::new(
                    "source",
                    "`rollover` blocks come from subscriptions only",
                ));
            }
            BlockSourceWire::Manual => ledger::BlockSource::Manual,
        };
        check_metadata("metadata", self.metadata.as_ref())?;
        if let Some(currency) = &self.currency {
            check_currency("currency", currency)?;
        }
        if self
            .external_payment_id
            .as_ref()
            .is_some_and(|id| id.len() > 255)
        {
            return Err(FieldError::new(
                "external_payment_id",
                "must be at most 255 bytes",
            ));
        }
        Ok((
            end_user,
            ledger::GrantRequest {
                amount: ledger::Credits::new(self.amount),
                priority: self.priority,
                effective_at: self.effective_at.map(|time| time.0),
                expires_at: self.expires_at.map(|time| time.0),
                source,
                feature_keys: feature_keys("feature_keys", self.feature_keys.as_deref())?,
                price_paid: self.price_paid,
                currency: self.currency.as_deref().map(std::sync::Arc::from),
                settles_debt: self.settles_debt,
            },
        ))
    }
}

/// The longest `reason` an adjustment or a void keeps, in characters.
pub const REASON_CHARS_MAX: usize = 1000;

/// A reason is kept with the entry: at most [`REASON_CHARS_MAX`] characters.
///
/// # Errors
/// A longer one, naming `field`.
pub fn check_reason(field: &str, reason: &str) -> Result<(), FieldError> {
    if reason.chars().count() > REASON_CHARS_MAX {
        return Err(FieldError::new(
            field,
            format!("must be at most {REASON_CHARS_MAX} characters"),
        ));
    }
    Ok(())
}

/// A currency is an ISO 4217 code: three ASCII letters (`usd`, `EUR`).
///
/// # Errors
/// Anything else, naming `field`.
pub fn check_currency(field: &str, currency: &str) -> Result<(), FieldError> {
    if currency.len() == 3 && currency.bytes().all(|byte| byte.is_ascii_alphabetic()) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "must be a three-letter ISO 4217 currency code such as `usd`",
        ))
    }
}

/// Metadata must be a JSON object of modest size.
pub fn check_metadata(field: &str, metadata: Option<&serde_json::Value>) -> Result<(), FieldError> {
    const METADATA_BYTES_MAX: usize = 16 * 1024;
    let Some(metadata) = metadata else {
        return Ok(());
    };
    if !metadata.is_object() {
        return Err(FieldError::new(field, "must be a JSON object"));
    }
    if metadata.to_string().len() > METADATA_BYTES_MAX {
        return Err(FieldError::new(
            field,
            format!("must be at most {METADATA_BYTES_MAX} bytes of JSON"),
        ));
    }
    Ok(())
}

/// A credit block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Block {
    pub id: String,
    pub end_user_id: String,
    pub amount: i64,
    pub remaining: i64,
    pub held: i64,
    pub priority: u16,
    pub effective_at: WireTime,
    pub expires_at: Option<WireTime>,
    pub source: BlockSourceWire,
    pub feature_keys: Option<Vec<String>>,
    pub price_paid: Option<i64>,
    pub currency: Option<String>,
    pub external_payment_id: Option<String>,
    pub settles_debt: bool,
    pub subscription_id: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    pub created_at: WireTime,
    pub voided_at: Option<WireTime>,
}

impl Block {
    /// The wire block, with the annotations the store keeps beside the engine's block.
    pub fn new(
        block: &ledger::Block,
        end_user: &ledger::EndUserId,
        external_payment_id: Option<String>,
        metadata: Option<serde_json::Value>,
    ) -> Block {
        Block {
            id: block.id.to_string(),
            end_user_id: end_user.to_string(),
            amount: block.amount.get(),
            remaining: block.remaining.get(),
            held: block.held.get(),
            priority: block.priority,
            effective_at: block.effective_at.into(),
            expires_at: block.expires_at.map(WireTime),
            source: block.source.into(),
            feature_keys: block
                .feature_keys
                .as_ref()
                .map(|keys| keys.iter().map(ToString::to_string).collect()),
            price_paid: block.price_paid,
            currency: block.currency.as_deref().map(str::to_owned),
            external_payment_id,
            settles_debt: block.settles_debt,
            subscription_id: block.subscription_id.map(|id| id.to_string()),
            metadata,
            created_at: block.created_at.into(),
            voided_at: block.voided_at.map(WireTime),
        }
    }
}

/// `POST /v1/credits/blocks/{id}/void`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoidBlock {
    #[serde(default)]
    #[schema(max_length = 1000)]
    pub reason: Option<String>,
}

/// `POST /v1/credits/adjustments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAdjustment {
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]+$"
    )]
    pub end_user_id: String,
    /// Positive creates a block; negative burns in burn order.
    pub amount: i64,
    #[schema(max_length = 1000)]
    pub reason: String,
    #[serde(default)]
    pub feature_keys: Option<Vec<String>>,
}

impl CreateAdjustment {
    /// # Errors
    /// The field at fault.
    pub fn to_ledger(&self) -> Result<(ledger::EndUserId, ledger::AdjustRequest), FieldError> {
        let end_user = end_user_id("end_user_id", &self.end_user_id)?;
        if self.reason.trim().is_empty() {
            return Err(FieldError::new("reason", "must not be empty"));
        }
        check_reason("reason", &self.reason)?;
        Ok((
            end_user,
            ledger::AdjustRequest {
                amount: ledger::Credits::new(self.amount),
                feature_keys: feature_keys("feature_keys", self.feature_keys.as_deref())?,
            },
        ))
    }
}

/// The answer to an adjustment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Adjustment {
    /// The ledger entry.
    pub id: String,
    pub end_user_id: String,
    pub amount: i64,
    /// The block a positive adjustment created.
    pub block: Option<Block>,
    /// Available credits afterwards.
    pub balance: i64,
}

/// `GET /v1/credits/balance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Balance {
    pub end_user_id: String,
    pub feature_key: Option<String>,
    pub available: i64,
    pub held: i64,
    pub debt: i64,
    /// Live blocks, in burn order.
    pub blocks: Vec<Block>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PartWire {
    pub block_id: String,
    pub amount: i64,
}

/// A ledger entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LedgerEntry {
    pub id: String,
    /// `grant`, `debit`, `hold`, `commit`, `release`, `expire`, `void`, `adjust`, `settle`.
    #[serde(rename = "type")]
    pub entry_type: String,
    pub end_user_id: String,
    pub feature_key: Option<String>,
    pub amount: i64,
    pub parts: Vec<PartWire>,
    /// The part of a debit no block covered.
    pub debt: i64,
    pub units: Option<u64>,
    pub reservation_id: Option<String>,
    /// The lease a hold, commit, release, expiry or debit belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    pub subscription_id: Option<String>,
    /// The block a grant or positive adjustment created.
    pub block_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub balance_after: i64,
    pub created_at: WireTime,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

impl LedgerEntry {
    pub fn new(
        entry: &ledger::Entry,
        idempotency_key: Option<String>,
        metadata: Option<serde_json::Value>,
    ) -> LedgerEntry {
        LedgerEntry {
            id: entry.id.to_string(),
            entry_type: entry.entry_type.as_str().to_owned(),
            end_user_id: entry.end_user_id.to_string(),
            feature_key: entry.feature_key.as_ref().map(ToString::to_string),
            amount: entry.amount.get(),
            parts: entry
                .parts
                .iter()
                .map(|part| PartWire {
                    block_id: part.block_id.to_string(),
                    amount: part.amount.get(),
                })
                .collect(),
            debt: entry.debt.get(),
            units: entry.units.map(ledger::Units::get),
            reservation_id: entry.reservation_id.map(|id| id.to_string()),
            lease_id: entry.lease_id.map(|id| id.to_string()),
            subscription_id: entry.subscription_id.map(|id| id.to_string()),
            block_id: entry.block.as_ref().map(|block| block.id.to_string()),
            idempotency_key,
            balance_after: entry.balance_after.get(),
            created_at: entry.created_at.into(),
            metadata,
        }
    }
}
