//! Identifiers: prefixed, sortable ids for the engine's own objects, and the tenant's own
//! names for end users and features.
//!
//! The engine never invents randomness: new ids come from an [`IdSource`] the caller
//! passes in (the control plane's makes ULIDs from its clock and a random generator; tests
//! count).

use std::fmt;
use std::sync::Arc;

use ulid::Ulid;

/// Where new ids come from. Ids must be unique per tenant and environment; sortable ids
/// (ULIDs whose time part is `now`) make ledger pages come out in creation order.
pub trait IdSource {
    fn next_id(&mut self) -> Ulid;
}

/// An [`IdSource`] that counts up from 1: deterministic, for tests and simulations.
#[derive(Debug, Default, Clone)]
pub struct SequentialIds {
    last: u128,
}

impl IdSource for SequentialIds {
    fn next_id(&mut self) -> Ulid {
        self.last = self.last.saturating_add(1);
        Ulid(self.last)
    }
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub Ulid);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn new(ids: &mut dyn IdSource) -> $name {
                $name(ids.next_id())
            }

            /// Parses `<prefix><26 Crockford base32 characters>`.
            pub fn parse(text: &str) -> Option<$name> {
                let rest = text.strip_prefix($prefix)?;
                Ulid::from_string(rest).ok().map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(text: &str) -> Result<$name, String> {
                $name::parse(text).ok_or_else(|| format!("`{text}` is not a valid {} id", $prefix))
            }
        }

        /// Text (`<prefix><ulid>`) in human-readable formats (JSON), the ULID's 16 bytes
        /// in binary ones (the feed's frames).
        #[cfg(feature = "serde")]
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.collect_str(self)
                } else {
                    serializer.serialize_bytes(&self.0.to_bytes())
                }
            }
        }

        #[cfg(feature = "serde")]
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<$name, D::Error> {
                if deserializer.is_human_readable() {
                    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                    text.parse().map_err(serde::de::Error::custom)
                } else {
                    deserializer.deserialize_bytes(UlidBytes).map($name)
                }
            }
        }
    };
}

/// Reads a ULID from its 16 bytes (binary formats).
#[cfg(feature = "serde")]
struct UlidBytes;

#[cfg(feature = "serde")]
impl serde::de::Visitor<'_> for UlidBytes {
    type Value = Ulid;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the 16 bytes of a ULID")
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Ulid, E> {
        <[u8; 16]>::try_from(bytes)
            .map(Ulid::from_bytes)
            .map_err(|_| E::invalid_length(bytes.len(), &self))
    }
}

/// Serde for validated names: strings on the wire, checked on the way in.
macro_rules! name_serde {
    ($name:ident) => {
        #[cfg(feature = "serde")]
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        #[cfg(feature = "serde")]
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(
                deserializer: D,
            ) -> Result<$name, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                $name::new(&text).map_err(|error| {
                    serde::de::Error::custom(format!("{}: {error}", stringify!($name)))
                })
            }
        }
    };
}

name_serde!(EndUserId);
name_serde!(FeatureKey);
name_serde!(Holder);

prefixed_id!(
    /// A credit block (`blk_…`).
    BlockId,
    "blk_"
);
prefixed_id!(
    /// A reservation (`rsv_…`).
    ReservationId,
    "rsv_"
);
prefixed_id!(
    /// A lease: credits held for one proxy (`lse_…`).
    LeaseId,
    "lse_"
);
prefixed_id!(
    /// A ledger entry (`led_…`).
    EntryId,
    "led_"
);
prefixed_id!(
    /// A subscription (`sub_…`).
    SubscriptionId,
    "sub_"
);
prefixed_id!(
    /// A plan (`plan_…`).
    PlanId,
    "plan_"
);
prefixed_id!(
    /// A plan variant (`var_…`).
    VariantId,
    "var_"
);
prefixed_id!(
    /// An event in the environment's log (`evt_…`).
    EventId,
    "evt_"
);

/// Why a tenant-chosen name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {max} bytes")]
    TooLong { max: usize },
    #[error("must not contain control characters")]
    ControlCharacter,
    #[error("may contain only a-z, 0-9, `_`, `.` and `-`")]
    BadCharacter,
    #[error("may contain only letters, digits, `_`, `.`, `:` and `-`")]
    BadHolderCharacter,
}

/// The tenant's own id for one of its customers: 1 to 256 bytes of UTF-8 without control
/// characters. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndUserId(Arc<str>);

impl EndUserId {
    pub const LEN_MAX: usize = 256;

    pub fn new(text: &str) -> Result<EndUserId, InvalidName> {
        if text.is_empty() {
            return Err(InvalidName::Empty);
        }
        if text.len() > Self::LEN_MAX {
            return Err(InvalidName::TooLong { max: Self::LEN_MAX });
        }
        if text.chars().any(char::is_control) {
            return Err(InvalidName::ControlCharacter);
        }
        Ok(EndUserId(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndUserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A feature's key: `[a-z0-9_.-]{1,64}`. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeatureKey(Arc<str>);

impl FeatureKey {
    pub const LEN_MAX: usize = 64;

    pub fn new(text: &str) -> Result<FeatureKey, InvalidName> {
        if text.is_empty() {
            return Err(InvalidName::Empty);
        }
        if text.len() > Self::LEN_MAX {
            return Err(InvalidName::TooLong { max: Self::LEN_MAX });
        }
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c);
        if !text.chars().all(allowed) {
            return Err(InvalidName::BadCharacter);
        }
        Ok(FeatureKey(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FeatureKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who holds a lease: a proxy's stable instance id, `[A-Za-z0-9_.:-]{1,128}`. Cheap to
/// clone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Holder(Arc<str>);

impl Holder {
    pub const LEN_MAX: usize = 128;

    pub fn new(text: &str) -> Result<Holder, InvalidName> {
        if text.is_empty() {
            return Err(InvalidName::Empty);
        }
        if text.len() > Self::LEN_MAX {
            return Err(InvalidName::TooLong { max: Self::LEN_MAX });
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_.:-".contains(c);
        if !text.chars().all(allowed) {
            return Err(InvalidName::BadHolderCharacter);
        }
        Ok(Holder(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
