//! Instants on the wire: RFC 3339 strings.

use std::borrow::Cow;

use ledger::Timestamp;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::openapi::{KnownFormat, ObjectBuilder, RefOr, Schema, SchemaFormat, Type};

/// An instant written as RFC 3339 (`2026-11-24T10:00:00Z`); any offset is accepted on
/// the way in and stored as UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WireTime(pub Timestamp);

impl Serialize for WireTime {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for WireTime {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<WireTime, D::Error> {
        let text = Cow::<'de, str>::deserialize(deserializer)?;
        Timestamp::parse_rfc3339(&text)
            .map(WireTime)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{text}` is not an RFC 3339 time such as 2026-11-24T10:00:00Z"
                ))
            })
    }
}

impl From<Timestamp> for WireTime {
    fn from(value: Timestamp) -> WireTime {
        WireTime(value)
    }
}

impl utoipa::PartialSchema for WireTime {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .description(Some("RFC 3339 instant in UTC"))
            .into()
    }
}

impl utoipa::ToSchema for WireTime {}
