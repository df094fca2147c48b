//! Rows read the same way from either backend, so that each record is decoded once:
//! [`Columns`] names the few column types the stores use, for sqlx's SQLite and
//! PostgreSQL rows and for rusqlite's rows; the decoders below build records on it.

use ledger::{EndUserState, StateParts, Timestamp};
use serde::de::DeserializeOwned;

use super::{
    ApiKeyRecord, CatalogRecord, EndpointRecord, Environment, EventRecord, StoreError, StoreResult,
};

/// The column types the stores read, by column name.
pub(crate) trait Columns {
    fn text(&self, column: &str) -> StoreResult<String>;
    fn text_opt(&self, column: &str) -> StoreResult<Option<String>>;
    fn int(&self, column: &str) -> StoreResult<i64>;
    fn int_opt(&self, column: &str) -> StoreResult<Option<i64>>;
    fn bytes(&self, column: &str) -> StoreResult<Vec<u8>>;
    fn flag(&self, column: &str) -> StoreResult<bool>;

    /// A JSON text column, parsed.
    fn json<T: DeserializeOwned>(&self, column: &str) -> StoreResult<T> {
        Ok(serde_json::from_str(&self.text(column)?)?)
    }

    /// An instant stored as milliseconds since the epoch.
    fn time(&self, column: &str) -> StoreResult<Timestamp> {
        Ok(Timestamp::from_millis(self.int(column)?))
    }

    fn time_opt(&self, column: &str) -> StoreResult<Option<Timestamp>> {
        Ok(self.int_opt(column)?.map(Timestamp::from_millis))
    }

    /// The row's `environment` column.
    fn environment(&self) -> StoreResult<Environment> {
        let text = self.text("environment")?;
        Environment::parse(&text).ok_or_else(|| corrupt(format!("environment `{text}`")))
    }
}

/// `Columns` for an sqlx row type, through `sqlx::Row::try_get`.
macro_rules! sqlx_columns {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, column: &str) -> StoreResult<String> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn text_opt(&self, column: &str) -> StoreResult<Option<String>> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn int(&self, column: &str) -> StoreResult<i64> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn int_opt(&self, column: &str) -> StoreResult<Option<i64>> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn bytes(&self, column: &str) -> StoreResult<Vec<u8>> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn flag(&self, column: &str) -> StoreResult<bool> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
        }
    };
}

sqlx_columns!(sqlx::sqlite::SqliteRow);
sqlx_columns!(sqlx::postgres::PgRow);

impl Columns for rusqlite::Row<'_> {
    fn text(&self, column: &str) -> StoreResult<String> {
        Ok(self.get(column)?)
    }
    fn text_opt(&self, column: &str) -> StoreResult<Option<String>> {
        Ok(self.get(column)?)
    }
    fn int(&self, column: &str) -> StoreResult<i64> {
        Ok(self.get(column)?)
    }
    fn int_opt(&self, column: &str) -> StoreResult<Option<i64>> {
        Ok(self.get(column)?)
    }
    fn bytes(&self, column: &str) -> StoreResult<Vec<u8>> {
        Ok(self.get(column)?)
    }
    fn flag(&self, column: &str) -> StoreResult<bool> {
        Ok(self.get(column)?)
    }
}

/// Stored data that does not parse or breaks an invariant.
pub(crate) fn corrupt(message: impl Into<String>) -> StoreError {
    StoreError::Corrupt(message.into())
}

/// Whether a database error is a broken uniqueness rule.
pub(crate) fn unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.is_unique_violation())
}

/// An end user's state from its stored JSON, checked.
pub(crate) fn parse_state(text: &str) -> StoreResult<EndUserState> {
    let parts: StateParts = serde_json::from_str(text)?;
    EndUserState::from_parts(parts).map_err(|violation| corrupt(violation.to_string()))
}

/// An API key's row (`api_keys.*`).
pub(crate) fn api_key(row: &impl Columns) -> StoreResult<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: row.text("id")?,
        tenant_id: row.text("tenant_id")?,
        environment: row.environment()?,
        name: row.text_opt("name")?,
        scopes: row.json("scopes")?,
        prefix: row.text("prefix")?,
        key_hash: row
            .bytes("key_hash")?
            .try_into()
            .map_err(|_| corrupt("key hash length"))?,
        created_at: row.time("created_at")?,
        revoked_at: row.time_opt("revoked_at")?,
    })
}

/// A catalog object's row (`id, key, parent_id, body, archived, created_at`).
pub(crate) fn catalog_record<T: DeserializeOwned>(
    row: &impl Columns,
) -> StoreResult<CatalogRecord<T>> {
    Ok(CatalogRecord {
        id: row.text("id")?,
        key: row.text("key")?,
        parent_id: row.text_opt("parent_id")?,
        body: row.json("body")?,
        archived: row.flag("archived")?,
        created_at: row.time("created_at")?,
    })
}

/// The names a query gives a webhook endpoint's columns (a delivery claim joins them
/// under other names).
#[derive(Debug, Clone, Copy)]
pub(crate) struct EndpointColumns {
    pub(crate) id: &'static str,
    pub(crate) created_at: &'static str,
    pub(crate) updated_at: &'static str,
}

impl EndpointColumns {
    /// `webhook_endpoints.*` as they are.
    pub(crate) const TABLE: EndpointColumns = EndpointColumns {
        id: "id",
        created_at: "created_at",
        updated_at: "updated_at",
    };
    /// As a delivery claim selects them beside the delivery's own.
    pub(crate) const JOINED: EndpointColumns = EndpointColumns {
        id: "endpoint_id",
        created_at: "endpoint_created_at",
        updated_at: "endpoint_updated_at",
    };
}

/// A webhook endpoint's row (`url`, `event_types` and `secret` under their own names).
pub(crate) fn endpoint(row: &impl Columns, names: EndpointColumns) -> StoreResult<EndpointRecord> {
    Ok(EndpointRecord {
        id: row.text(names.id)?,
        url: row.text("url")?,
        event_types: row
            .text_opt("event_types")?
            .map(|text| serde_json::from_str(&text))
            .transpose()?,
        secret: row.text("secret")?,
        created_at: row.time(names.created_at)?,
        updated_at: row.time(names.updated_at)?,
    })
}

/// An entry's figures for charts (`seq, type, created_at, amount, balance_after`).
pub(crate) fn entry_point(row: &impl Columns) -> StoreResult<crate::store::EntryPoint> {
    Ok(crate::store::EntryPoint {
        seq: row.int("seq")?,
        entry_type: row.text("type")?,
        created_at: row.time("created_at")?,
        amount: row.int("amount")?,
        balance_after: row.int("balance_after")?,
    })
}

/// An event's row (`seq`, `body`).
pub(crate) fn event(row: &impl Columns) -> StoreResult<EventRecord> {
    Ok(EventRecord {
        seq: row.int("seq")?,
        event: row.json("body")?,
    })
}
