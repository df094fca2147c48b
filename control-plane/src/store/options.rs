//! Where a store's data lives and how it is synced: what opening one needs.

use std::fmt;

/// How SQLite syncs commits to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync on every commit: nothing acknowledged is ever lost.
    Full,
    /// WAL with fsync at checkpoints: survives a process crash, not a power cut.
    Normal,
}

/// Where the data lives.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A SQLite file (created if missing).
    SqliteFile(String),
    /// A private, throwaway SQLite database (tests): a file in a temporary directory of
    /// its own, never fsynced, removed when the store is dropped.
    SqliteMemory,
    /// A PostgreSQL database: the `postgres://` (or `postgresql://`) URL as given, with
    /// any connection parameters (`?options=-c search_path=...`, `sslmode=...`).
    Postgres(String),
}

/// By hand so that a password in a PostgreSQL URL never reaches a log (the whole
/// configuration is logged at debug level).
impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::SqliteFile(path) => f.debug_tuple("SqliteFile").field(path).finish(),
            DatabaseUrl::SqliteMemory => f.write_str("SqliteMemory"),
            DatabaseUrl::Postgres(url) => f
                .debug_tuple("Postgres")
                .field(&redact_password(url))
                .finish(),
        }
    }
}

/// The URL with its password (in the user info or a `password` parameter) replaced.
fn redact_password(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return "<unparsable URL>".into();
    };
    if url.password().is_some() && url.set_password(Some("redacted")).is_err() {
        return "<unparsable URL>".into();
    }
    if url.query_pairs().any(|(name, _)| name == "password") {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(name, value)| {
                let value = if name == "password" {
                    "redacted".into()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}
