//! The change feed as followers receive it: a read of the feed after a cursor turned into
//! records, as NDJSON lines or as binary frames (`protocol::frames`). Written once for
//! both transports, the HTTP change stream (`http/sync.rs`) and the NATS publisher
//! (`nats.rs`), so a follower gets the same bytes over either.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use ledger::EndUserId;
use protocol::{CatalogItem, CatalogSnapshot, SyncRecord};
use serde::Serialize;

use super::{AppState, StreamedState};
use crate::catalog::CatalogView;
use crate::error::ApiError;
use crate::store::Env;

/// How a follower takes the feed's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// NDJSON lines of `SyncRecord` (`application/x-ndjson`), for people and scripts.
    Json,
    /// Binary frames (`protocol::frames::FEED_FRAMES`), for followers that ask (and the
    /// NATS feed).
    Frames,
}

impl Encoding {
    /// The encoding an `Accept` header asks for: frames where it names their media type
    /// with a weight above 0 and at least the weight it gives NDJSON (named, or through
    /// `*/*` or `application/*`); JSON otherwise, as for no header.
    #[must_use]
    pub fn accepted(accept: Option<&str>) -> Encoding {
        let Some(accept) = accept else {
            return Encoding::Json;
        };
        // Weights in thousandths, as RFC 9110 writes them (at most three decimals).
        let (mut frames, mut json) = (0_u16, 0_u16);
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let essence = parts.next().unwrap_or_default().trim();
            let weight = parts
                .filter_map(|parameter| parameter.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(1000, |(_, value)| weight(value.trim()));
            if essence.eq_ignore_ascii_case(protocol::frames::FEED_FRAMES) {
                frames = frames.max(weight);
            } else if ["*/*", "application/*", protocol::NDJSON]
                .iter()
                .any(|json_range| essence.eq_ignore_ascii_case(json_range))
            {
                json = json.max(weight);
            }
        }
        if frames > 0 && frames >= json {
            Encoding::Frames
        } else {
            Encoding::Json
        }
    }

    /// The media type of a body in this encoding.
    #[must_use]
    pub fn media_type(self) -> &'static str {
        match self {
            Encoding::Json => protocol::NDJSON,
            Encoding::Frames => protocol::frames::FEED_FRAMES,
        }
    }
}

/// An `Accept` weight (`q`) in thousandths: `0` to `1` with up to three decimals; one that
/// does not parse counts as 0 (not acceptable).
fn weight(text: &str) -> u16 {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|byte| byte.is_ascii_digit()) {
        return 0;
    }
    let thousandths = format!("{fraction:0<3}").parse::<u16>().unwrap_or(0);
    match whole {
        "0" => thousandths,
        "1" if thousandths == 0 => 1000,
        _ => 0,
    }
}

/// One record of the feed in a follower's encoding (a line, newline included, or a frame)
/// and the feed position of the change it is for. Several may share a position; each but
/// the last of them carries the position before it as its cursor (see
/// [`AppState::feed_lines`]).
#[derive(Debug, Clone)]
pub struct FeedLine {
    pub position: i64,
    pub bytes: Bytes,
}

/// A read of the feed as lines, and the position a follower is at once it applied them.
#[derive(Debug, Clone)]
pub struct FeedRead {
    pub lines: Vec<FeedLine>,
    pub last: i64,
    /// More may follow `last` already: the read stopped at its limit, or it was the
    /// page of an earlier read (shared by this process's streams), which may end before
    /// the last commit.
    pub maybe_more: bool,
}

/// An end user's state read for the feed, encoded at most once per encoding however many
/// streams send it.
#[derive(Debug)]
pub struct EncodedState {
    parts: ledger::StateParts,
    json: OnceLock<Box<serde_json::value::RawValue>>,
    binary: OnceLock<Vec<u8>>,
}

impl EncodedState {
    #[must_use]
    pub fn new(parts: ledger::StateParts) -> EncodedState {
        EncodedState {
            parts,
            json: OnceLock::new(),
            binary: OnceLock::new(),
        }
    }

    fn json(&self) -> Result<&serde_json::value::RawValue, ApiError> {
        if let Some(json) = self.json.get() {
            return Ok(json);
        }
        let json = serde_json::value::to_raw_value(&self.parts)
            .map_err(|error| ApiError::Internal(error.to_string()))?;
        Ok(self.json.get_or_init(|| json))
    }

    fn binary(&self) -> Result<&[u8], ApiError> {
        if let Some(binary) = self.binary.get() {
            return Ok(binary);
        }
        let binary = protocol::frames::encode_state(&self.parts)
            .map_err(|error| ApiError::Internal(error.to_string()))?;
        Ok(self.binary.get_or_init(|| binary))
    }
}

/// Resolves when another process announced a commit; never where the store hears of
/// none, and `None` once it no longer can.
pub async fn heard(elsewhere: Option<&mut tokio::sync::watch::Receiver<u64>>) -> Option<()> {
    match elsewhere {
        Some(receiver) => receiver.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// The catalog as a snapshot or a stream carries it.
#[must_use]
pub fn catalog_snapshot(view: &CatalogView) -> CatalogSnapshot {
    fn items<T: Clone>(records: &[crate::store::CatalogRecord<T>]) -> Vec<CatalogItem<T>> {
        records
            .iter()
            .map(|record| CatalogItem {
                id: record.id.clone(),
                key: record.key.clone(),
                parent_id: record.parent_id.clone(),
                archived: record.archived,
                body: record.body.clone(),
            })
            .collect()
    }
    CatalogSnapshot {
        features: items(&view.features),
        plans: items(&view.plans),
        variants: items(&view.variants),
        settings: view.env.settings.clone(),
    }
}

/// A record in `encoding`: one NDJSON line or one frame.
///
/// # Errors
/// `Internal` when it does not serialise (it always does).
pub fn line(record: &SyncRecord, encoding: Encoding) -> Result<Bytes, ApiError> {
    let bytes = match encoding {
        Encoding::Json => {
            let mut bytes = serde_json::to_vec(record)
                .map_err(|error| ApiError::Internal(error.to_string()))?;
            bytes.push(b'\n');
            bytes
        }
        Encoding::Frames => protocol::frames::record_frame(record)
            .map_err(|error| ApiError::Internal(error.to_string()))?,
    };
    Ok(Bytes::from(bytes))
}

/// `SyncRecord::EndUser` with its state already serialised (byte for byte the same line).
#[derive(Serialize)]
#[serde(tag = "type", rename = "end_user")]
struct EndUserLine<'a> {
    cursor: i64,
    end_user_id: &'a str,
    version: u64,
    state: &'a serde_json::value::RawValue,
}

fn end_user_line(
    cursor: i64,
    end_user: &EndUserId,
    streamed: &StreamedState,
    encoding: Encoding,
) -> Result<Bytes, ApiError> {
    let bytes = match encoding {
        Encoding::Json => {
            let record = EndUserLine {
                cursor,
                end_user_id: end_user.as_str(),
                version: streamed.version,
                state: streamed.state.json()?,
            };
            let mut bytes = serde_json::to_vec(&record)
                .map_err(|error| ApiError::Internal(error.to_string()))?;
            bytes.push(b'\n');
            bytes
        }
        Encoding::Frames => protocol::frames::end_user_frame(
            cursor,
            end_user.as_str(),
            streamed.version,
            streamed.state.binary()?,
        )
        .map_err(|error| ApiError::Internal(error.to_string()))?,
    };
    Ok(Bytes::from(bytes))
}

impl AppState {
    /// The feed after `cursor` (the first `limit` positions) as lines, or `None` when
    /// nothing follows it. Each end user appears once, at the position of its last change
    /// in this read, in position order; a catalog change as the catalog and the clock.
    /// Several end users may share a position: each line but the last of them carries the
    /// position before it, so that a follower resuming from any line is sent the rest
    /// again.
    ///
    /// # Errors
    /// Store failures.
    pub async fn feed_lines(
        &self,
        env: &Env,
        cursor: i64,
        limit: u32,
        encoding: Encoding,
    ) -> Result<Option<FeedRead>, ApiError> {
        let (changes, read_here) = self.changes_after_read(env, cursor, limit).await?;
        let Some(last) = changes.last() else {
            return Ok(None);
        };
        let mut latest: BTreeMap<Option<EndUserId>, i64> = BTreeMap::new();
        for change in changes.iter() {
            latest.insert(change.end_user_id.clone(), change.seq);
        }
        let mut ordered: Vec<(i64, Option<EndUserId>)> =
            latest.into_iter().map(|(user, seq)| (seq, user)).collect();
        ordered.sort();
        let mut lines = Vec::with_capacity(ordered.len());
        for (index, (position, user)) in ordered.iter().enumerate() {
            let shared = ordered
                .get(index.saturating_add(1))
                .is_some_and(|(next, _)| next == position);
            let position = *position;
            let cursor = if shared {
                position.saturating_sub(1)
            } else {
                position
            };
            match user {
                Some(end_user) => {
                    if let Some(streamed) = self.state_for_feed(env, end_user, position).await? {
                        lines.push(FeedLine {
                            position,
                            bytes: end_user_line(cursor, end_user, &streamed, encoding)?,
                        });
                    }
                }
                None => {
                    self.invalidate(env);
                    let view = self.view(env).await?;
                    let catalog = SyncRecord::Catalog {
                        cursor,
                        catalog: catalog_snapshot(&view),
                    };
                    let clock = SyncRecord::Clock {
                        cursor,
                        clock_offset_ms: view.env.clock_offset_ms,
                    };
                    lines.push(FeedLine {
                        position,
                        bytes: line(&catalog, encoding)?,
                    });
                    lines.push(FeedLine {
                        position,
                        bytes: line(&clock, encoding)?,
                    });
                }
            }
        }
        Ok(Some(FeedRead {
            lines,
            last: last.seq,
            // `limit` counts positions and a position may hold several records (one
            // per end user it changed), so this may say "more" of a page that holds
            // them all: one more read, never a commit left behind.
            maybe_more: !read_here || changes.len() >= usize::try_from(limit).unwrap_or(usize::MAX),
        }))
    }

    /// `end_user`'s state including the change at feed position `at`: as another follower
    /// of this process was sent it, else read (and kept for the others). `None`: no such
    /// end user.
    async fn state_for_feed(
        &self,
        env: &Env,
        end_user: &EndUserId,
        at: i64,
    ) -> Result<Option<StreamedState>, ApiError> {
        if let Some(streamed) = self.streamed_state(env, end_user, at) {
            metrics::counter!("quotastack_sync_state_reads_total", "source" => "shared")
                .increment(1);
            return Ok(Some(streamed));
        }
        metrics::counter!("quotastack_sync_state_reads_total", "source" => "store").increment(1);
        let Some(user) = self.store().load_state(env, end_user).await? else {
            return Ok(None);
        };
        let version = user.version();
        let streamed = StreamedState {
            includes: at,
            version,
            state: Arc::new(EncodedState::new(user.into_parts())),
        };
        self.remember_streamed_state(env, end_user, streamed.clone());
        Ok(Some(streamed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_state_line_is_the_records_line_byte_for_byte() {
        let end_user = EndUserId::new("user_1").expect("id");
        let user = ledger::EndUserState::new(end_user.clone(), ledger::Timestamp::from_millis(5));
        let version = user.version();
        let parts = user.into_parts();
        let streamed = StreamedState {
            includes: 7,
            version,
            state: Arc::new(EncodedState::new(parts.clone())),
        };
        let record = SyncRecord::EndUser {
            cursor: 6,
            end_user_id: end_user.to_string(),
            version,
            state: parts,
        };
        for encoding in [Encoding::Json, Encoding::Frames] {
            assert_eq!(
                end_user_line(6, &end_user, &streamed, encoding).expect("line"),
                line(&record, encoding).expect("line"),
                "{encoding:?}"
            );
        }
    }

    #[test]
    fn frames_are_taken_only_where_accept_names_them() {
        let frames = protocol::frames::FEED_FRAMES;
        assert_eq!(Encoding::accepted(None), Encoding::Json);
        assert_eq!(Encoding::accepted(Some("*/*")), Encoding::Json);
        assert_eq!(Encoding::accepted(Some(frames)), Encoding::Frames);
        assert_eq!(
            Encoding::accepted(Some(&format!("application/x-ndjson;q=0.5, {frames}"))),
            Encoding::Frames
        );
        // Weights are read: refused, or preferred less than NDJSON, frames are not sent.
        for accept in [
            format!("{frames};q=0"),
            format!("{frames}; q=0.000"),
            format!("{frames};q=0.2, application/x-ndjson"),
            format!("{frames};q=0.2, */*;q=0.9"),
            format!("{frames};q=nonsense"),
            format!("{frames}-v2"),
        ] {
            assert_eq!(
                Encoding::accepted(Some(&accept)),
                Encoding::Json,
                "{accept}"
            );
        }
        for accept in [
            format!("{frames};q=0.5, */*;q=0.1"),
            format!("{}; Q=1.0", frames.to_uppercase()),
            format!("application/x-ndjson;q=0.7, {frames};q=0.7"),
        ] {
            assert_eq!(
                Encoding::accepted(Some(&accept)),
                Encoding::Frames,
                "{accept}"
            );
        }
    }
}
