//! The replication protocol between the control plane and proxies (`/v1/sync/*`): NDJSON
//! records, one JSON object a line, or the same records in binary frames
//! ([`crate::frames`]).

use serde::{Deserialize, Serialize};

use crate::{CreateFeature, CreatePlan, CreateVariant, FieldError, Settings, WireTime};

/// A catalog object as replicated: id, key, parent (a variant's plan), archived, body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CatalogItem<T> {
    pub id: String,
    pub key: String,
    pub parent_id: Option<String>,
    pub archived: bool,
    pub body: T,
}

/// Everything of an environment's catalog that decisions depend on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CatalogSnapshot {
    pub features: Vec<CatalogItem<CreateFeature>>,
    pub plans: Vec<CatalogItem<CreatePlan>>,
    pub variants: Vec<CatalogItem<CreateVariant>>,
    pub settings: Settings,
}

fn id<T: std::str::FromStr<Err = String>>(field: &str, text: &str) -> Result<T, FieldError> {
    text.parse()
        .map_err(|error: String| FieldError::new(field, error))
}

impl CatalogSnapshot {
    /// The engine's catalog.
    ///
    /// # Errors
    /// A record that does not validate (names the object).
    pub fn to_ledger(&self) -> Result<ledger::Catalog, FieldError> {
        let mut catalog = ledger::Catalog::default();
        for item in &self.features {
            let feature = item.body.to_ledger()?;
            catalog.features.insert(feature.key.clone(), feature);
        }
        for item in &self.plans {
            let plan_id: ledger::PlanId = id("plans[].id", &item.id)?;
            catalog.plans.insert(plan_id, item.body.to_ledger(plan_id)?);
        }
        for item in &self.variants {
            let variant_id: ledger::VariantId = id("variants[].id", &item.id)?;
            let plan_id: ledger::PlanId = id(
                "variants[].parent_id",
                item.parent_id.as_deref().unwrap_or_default(),
            )?;
            catalog
                .variants
                .insert(variant_id, item.body.to_ledger(variant_id, plan_id)?);
        }
        catalog.settings = ledger::Settings {
            free_plan_variant_id: self
                .settings
                .free_plan_variant_id
                .as_deref()
                .map(|text| id::<ledger::VariantId>("settings.free_plan_variant_id", text))
                .transpose()?,
            low_balance_threshold: self
                .settings
                .low_balance_threshold
                .map(ledger::Credits::new),
        };
        Ok(catalog)
    }
}

/// One line of a snapshot or of the change stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SyncRecord {
    /// First line of a snapshot: the feed position it is consistent with (apply the
    /// stream from this cursor afterwards) and the environment's clock.
    Header {
        cursor: i64,
        clock_offset_ms: i64,
        now: WireTime,
    },
    /// The whole catalog (in a snapshot, and in the stream whenever it changes).
    Catalog {
        cursor: i64,
        catalog: CatalogSnapshot,
    },
    /// One end user's live state as of `version` (keep the highest version seen).
    EndUser {
        cursor: i64,
        end_user_id: String,
        version: u64,
        state: ledger::StateParts,
    },
    /// The test clock moved.
    Clock { cursor: i64, clock_offset_ms: i64 },
    /// Nothing new; sent every few seconds so a follower can measure staleness.
    Heartbeat { cursor: i64, now: WireTime },
    /// Last line of a snapshot.
    End { end_users: u64 },
}

impl SyncRecord {
    /// The feed position a record brings a follower to, if it carries one.
    pub fn cursor(&self) -> Option<i64> {
        match self {
            SyncRecord::Header { cursor, .. }
            | SyncRecord::Catalog { cursor, .. }
            | SyncRecord::EndUser { cursor, .. }
            | SyncRecord::Clock { cursor, .. }
            | SyncRecord::Heartbeat { cursor, .. } => Some(*cursor),
            SyncRecord::End { .. } => None,
        }
    }
}

/// The media type of snapshots and streams.
pub const NDJSON: &str = "application/x-ndjson";

/// Where the control plane publishes an environment's change feed on NATS JetStream
/// (`GET /v1/sync/nats`, when `sync.nats_url` is set).
///
/// Each message of `stream` holds the records of a run of consecutive feed positions, as
/// the binary frames the HTTP stream would send for them (`frames::FEED_FRAMES`, named by
/// the [`NATS_ENCODING`] header; a message without it holds NDJSON lines, as published
/// before frames existed), with two headers:
/// [`NATS_POSITION`], the run's last position, and [`NATS_PREVIOUS`], the position of the
/// message before it in the stream. Positions rise with the stream's sequence; a follower
/// at cursor `c` resumes at the first message whose position is above `c` (skipping its
/// lines whose cursor is below `c`), and must take a new snapshot when that message's
/// previous position is above `c` (what lay between is no longer kept). The message id
/// (`Nats-Msg-Id`) is the position, so a republish is deduplicated (the parts of a split
/// position are named by their publication too, [`NATS_PUBLICATION`]: one published
/// again after a failure is stored whole after the old parts, and a follower takes a
/// position's parts from one publication only).
/// `heartbeat_subject` carries a `SyncRecord::Heartbeat` every couple of seconds (plain
/// NATS, not kept): its cursor is the last position published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NatsFeed {
    /// The JetStream stream of this environment's feed.
    pub stream: String,
    /// The subject its messages are published on.
    pub subject: String,
    /// The plain subject of its heartbeats.
    pub heartbeat_subject: String,
    /// Changes up to this position are no longer kept (as the HTTP stream's 410 says): a
    /// follower behind it must take a new snapshot, even where the stream is empty.
    #[serde(default)]
    pub purged_through: i64,
}

/// The header naming a feed message's encoding: `frames::FEED_FRAMES`. Absent: NDJSON
/// lines.
pub const NATS_ENCODING: &str = "Qs-Encoding";
/// The header naming a feed message's position.
pub const NATS_POSITION: &str = "Qs-Position";
/// The header naming the position of the message before it in the stream.
pub const NATS_PREVIOUS: &str = "Qs-Previous";
/// The header on every message of a position split over several but its last: the
/// follower's cursor reaches the position only with the last.
pub const NATS_MORE: &str = "Qs-More";
/// The header numbering the parts of a position split over several messages (from 0): a
/// follower that meets a later part without the first has lost lines and re-snapshots.
pub const NATS_PART: &str = "Qs-Part";
/// The header naming the publication the parts of a split position belong to (hex): a
/// position published again (after a failure part-way through, or by a replica racing
/// another, whose refused parts subscribers still hear live) may split at other
/// boundaries, so a follower takes a position's parts from one publication only, and a
/// part of another is a gap. Absent (publishers before it): all parts are one
/// publication's.
pub const NATS_PUBLICATION: &str = "Qs-Publication";
