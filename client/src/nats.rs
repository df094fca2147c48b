//! Following an environment's change feed over NATS JetStream (feature `nats`), where the
//! control plane publishes it (`sync.nats_url`; [`Client::sync_nats`](crate::Client::sync_nats)
//! says where). [`NatsLines`] yields the same records as
//! [`Client::sync_stream`](crate::Client::sync_stream), so a follower applies either alike:
//! take a snapshot over HTTP, then follow from its cursor here.

use std::collections::VecDeque;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, stream};
use protocol::frames::{FEED_FRAMES, Frame};
use protocol::{
    NATS_ENCODING, NATS_MORE, NATS_PART, NATS_POSITION, NATS_PREVIOUS, NatsFeed, SyncRecord,
};
use tokio_stream::StreamExt;

/// Why following over NATS stopped.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The stream no longer holds every change after the cursor: take a new snapshot (the
    /// HTTP stream's `410 cursor_expired`).
    #[error(
        "the NATS stream no longer holds the changes after cursor {cursor} (it goes on after {previous}); take a new snapshot"
    )]
    CursorExpired { cursor: i64, previous: i64 },
    /// NATS could not be reached, or refused a request.
    #[error("NATS: {0}")]
    Nats(String),
    /// A message that is not what the control plane publishes.
    #[error("unexpected NATS message: {0}")]
    Decode(String),
    /// The subscription ended (the connection was closed).
    #[error("the NATS subscription ended")]
    Closed,
}

fn nats(error: impl std::fmt::Display) -> NatsError {
    NatsError::Nats(error.to_string())
}

/// A follower's view of one environment's feed on NATS, from a cursor on.
pub struct NatsLines {
    messages: pull::Ordered,
    beats: async_nats::Subscriber,
    taken: Taken,
}

/// What a follower has taken from the stream: the rules of `protocol::NatsFeed`, apart
/// from NATS itself.
#[derive(Debug, Default)]
struct Taken {
    /// Records of messages taken, not yet returned.
    pending: VecDeque<Frame>,
    /// The last position taken completely.
    cursor: i64,
    /// The position whose parts are being taken (a split position), if any.
    partial: Option<i64>,
}

impl std::fmt::Debug for NatsLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLines")
            .field("cursor", &self.taken.cursor)
            .field("pending", &self.taken.pending.len())
            .finish_non_exhaustive()
    }
}

impl NatsLines {
    /// Starts following `feed` after `cursor` (a snapshot's or the last record's).
    ///
    /// # Errors
    /// `CursorExpired` when the stream no longer holds what follows `cursor`; `Nats` when
    /// NATS cannot be reached or the stream does not exist.
    pub async fn open(
        client: &async_nats::Client,
        feed: &NatsFeed,
        cursor: i64,
    ) -> Result<NatsLines, NatsError> {
        let context = jetstream::new(client.clone());
        // Heartbeats are heard from before the stream is read, so none is missed between.
        let beats = client
            .subscribe(feed.heartbeat_subject.clone())
            .await
            .map_err(nats)?;
        let mut stream = context.get_stream(&feed.stream).await.map_err(nats)?;
        let held = stream.info().await.map_err(nats)?.state.clone();
        let next = first_after(&stream, &held, cursor).await?;
        let start_sequence = match next {
            Some((sequence, previous)) => {
                if previous > cursor {
                    return Err(NatsError::CursorExpired { cursor, previous });
                }
                sequence
            }
            None => {
                // Nothing after the cursor is kept: fine, unless the feed was purged past
                // it (an idle environment whose stream aged to empty).
                if feed.purged_through > cursor {
                    return Err(NatsError::CursorExpired {
                        cursor,
                        previous: feed.purged_through,
                    });
                }
                held.last_sequence.saturating_add(1)
            }
        };
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
                filter_subject: feed.subject.clone(),
                ..pull::OrderedConfig::default()
            })
            .await
            .map_err(nats)?;
        let messages = consumer.messages().await.map_err(nats)?;
        Ok(NatsLines {
            messages,
            beats,
            taken: Taken {
                pending: VecDeque::new(),
                cursor,
                partial: None,
            },
        })
    }

    /// The next record: the changes in feed order, and a heartbeat (carrying this
    /// follower's own cursor) whenever the control plane says the feed's head is one this
    /// follower has reached. Cancel-safe: a record not yet returned stays queued for the
    /// next call.
    ///
    /// # Errors
    /// `CursorExpired` on a gap (take a new snapshot); `Nats`, `Closed` or `Decode` when
    /// following broke (follow again from the cursor).
    pub async fn next(&mut self) -> Result<Frame, NatsError> {
        loop {
            if let Some(record) = self.taken.pending.pop_front() {
                return Ok(record);
            }
            tokio::select! {
                message = self.messages.next() => {
                    let message = message.ok_or(NatsError::Closed)?.map_err(nats)?;
                    self.taken.take(message.headers.as_ref(), &message.payload)?;
                }
                beat = self.beats.next() => {
                    let beat = beat.ok_or(NatsError::Closed)?;
                    if let Ok(SyncRecord::Heartbeat { cursor, now }) =
                        serde_json::from_slice::<SyncRecord>(&beat.payload)
                        && cursor <= self.taken.cursor
                    {
                        let beat = SyncRecord::Heartbeat { cursor: self.taken.cursor, now };
                        return Ok(Frame::Record(beat));
                    }
                }
            }
        }
    }
}

impl Taken {
    /// Takes one message: its records queue up unless this follower has them already.
    fn take(
        &mut self,
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
    ) -> Result<(), NatsError> {
        let position = header(headers, NATS_POSITION)?
            .ok_or_else(|| NatsError::Decode("a message without a position".into()))?;
        let previous = header(headers, NATS_PREVIOUS)?.unwrap_or(0);
        if position <= self.cursor {
            return Ok(());
        }
        if previous > self.cursor {
            return Err(NatsError::CursorExpired {
                cursor: self.cursor,
                previous,
            });
        }
        // A later part of a split position without its first: the first is gone.
        match header(headers, NATS_PART)? {
            Some(0) => self.partial = Some(position),
            Some(_) if self.partial != Some(position) => {
                return Err(NatsError::CursorExpired {
                    cursor: self.cursor,
                    previous: position,
                });
            }
            _ => {}
        }
        let framed = headers
            .and_then(|headers| headers.get(NATS_ENCODING))
            .is_some_and(|encoding| encoding.as_str() == FEED_FRAMES);
        let records = if framed {
            protocol::frames::frames(payload)
                .map_err(|error| NatsError::Decode(format!("at {position}: {error}")))?
        } else {
            ndjson(payload)
                .map_err(|error| NatsError::Decode(format!("a record at {position}: {error}")))?
        };
        // A message holds a run of positions; those this follower had (a cursor below its
        // own) are skipped. A record at its own cursor may belong to the position after it
        // (see `SyncRecord` cursors of shared positions): applied again.
        let cursor = self.cursor;
        self.pending.extend(
            records
                .into_iter()
                .filter(|record| record.cursor().is_none_or(|at| at >= cursor)),
        );
        let more = headers.is_some_and(|headers| headers.get(NATS_MORE).is_some());
        if !more {
            self.cursor = position;
            self.partial = None;
        }
        Ok(())
    }
}

/// The records of a message published as NDJSON lines (before frames existed).
fn ndjson(payload: &[u8]) -> Result<Vec<Frame>, serde_json::Error> {
    payload
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .map(|line| serde_json::from_slice::<SyncRecord>(line).map(Frame::Record))
        .collect()
}

fn header(headers: Option<&async_nats::HeaderMap>, name: &str) -> Result<Option<i64>, NatsError> {
    headers
        .and_then(|headers| headers.get(name))
        .map(|value| {
            value
                .as_str()
                .parse()
                .map_err(|_| NatsError::Decode(format!("a bad `{name}` header")))
        })
        .transpose()
}

/// The first message whose position is after `cursor` (positions rise with the stream's
/// sequence): its sequence and previous position, or `None` when every message is at or
/// before `cursor`. A binary search, a few reads however long the stream.
async fn first_after(
    stream: &stream::Stream,
    held: &stream::State,
    cursor: i64,
) -> Result<Option<(u64, i64)>, NatsError> {
    if held.messages == 0 {
        return Ok(None);
    }
    let read = |sequence: u64| async move {
        let message = stream.get_raw_message(sequence).await.map_err(nats)?;
        let position = header(Some(&message.headers), NATS_POSITION)?
            .ok_or_else(|| NatsError::Decode(format!("message {sequence} has no position")))?;
        let previous = header(Some(&message.headers), NATS_PREVIOUS)?.unwrap_or(0);
        Ok::<_, NatsError>((position, previous))
    };
    let (mut low, mut high) = (held.first_sequence, held.last_sequence);
    if read(high).await?.0 <= cursor {
        return Ok(None);
    }
    // Invariant: the message at `high` is after the cursor; none before `low` is.
    while low < high {
        let middle = low.saturating_add(high.saturating_sub(low) / 2);
        if read(middle).await?.0 > cursor {
            high = middle;
        } else {
            low = middle.saturating_add(1);
        }
    }
    let (_, previous) = read(high).await?;
    Ok(Some((high, previous)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    fn headers(position: i64, previous: i64, part: Option<(i64, bool)>) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(NATS_POSITION, position.to_string().as_str());
        headers.insert(NATS_PREVIOUS, previous.to_string().as_str());
        if let Some((part, more)) = part {
            headers.insert(NATS_PART, part.to_string().as_str());
            if more {
                headers.insert(NATS_MORE, "1");
            }
        }
        headers
    }

    fn clock(cursor: i64) -> String {
        format!("{{\"type\":\"clock\",\"cursor\":{cursor},\"clock_offset_ms\":{cursor}}}\n")
    }

    fn cursors(taken: &mut Taken) -> Vec<i64> {
        taken
            .pending
            .drain(..)
            .filter_map(|record| record.cursor())
            .collect()
    }

    #[test]
    fn a_run_is_taken_from_the_follower_s_cursor_on() {
        // A run of positions 3..=6; position 5 is shared by two lines (the first carries 4).
        let body = [clock(3), clock(4), clock(5), clock(6)].concat();
        let mut fresh = Taken {
            cursor: 2,
            ..Taken::default()
        };
        fresh
            .take(Some(&headers(6, 2, None)), body.as_bytes())
            .unwrap();
        assert_eq!(cursors(&mut fresh), [3, 4, 5, 6]);
        assert_eq!(fresh.cursor, 6);
        // A follower that stopped inside the run (at 4, say mid-position 5) gets from its
        // cursor on: the line at its own cursor may belong to the next position.
        let mut resumed = Taken {
            cursor: 4,
            ..Taken::default()
        };
        resumed
            .take(Some(&headers(6, 2, None)), body.as_bytes())
            .unwrap();
        assert_eq!(cursors(&mut resumed), [4, 5, 6]);
        // A message at or before the cursor is skipped whole.
        resumed
            .take(Some(&headers(6, 2, None)), body.as_bytes())
            .unwrap();
        assert!(resumed.pending.is_empty());
    }

    #[test]
    fn a_framed_run_is_taken_like_lines() {
        let body: Vec<u8> = (3..=6)
            .flat_map(|cursor| {
                protocol::frames::record_frame(&SyncRecord::Clock {
                    cursor,
                    clock_offset_ms: cursor,
                })
                .unwrap()
            })
            .collect();
        let mut framed = headers(6, 2, None);
        framed.insert(NATS_ENCODING, FEED_FRAMES);
        let mut resumed = Taken {
            cursor: 4,
            ..Taken::default()
        };
        resumed.take(Some(&framed), &body).unwrap();
        assert_eq!(cursors(&mut resumed), [4, 5, 6]);
        assert_eq!(resumed.cursor, 6);
        // Frames in a message not marked as frames are not lines: an error, not a guess.
        let mut unmarked = Taken {
            cursor: 2,
            ..Taken::default()
        };
        assert!(matches!(
            unmarked.take(Some(&headers(6, 2, None)), &body),
            Err(NatsError::Decode(_))
        ));
    }

    #[test]
    fn gaps_are_told_as_expired_cursors() {
        let mut behind = Taken {
            cursor: 2,
            ..Taken::default()
        };
        let gap = behind.take(Some(&headers(9, 5, None)), clock(9).as_bytes());
        assert!(matches!(
            gap,
            Err(NatsError::CursorExpired {
                cursor: 2,
                previous: 5
            })
        ));
        // A split position: its parts move the cursor only at the last.
        let mut split = Taken {
            cursor: 5,
            ..Taken::default()
        };
        split
            .take(Some(&headers(7, 5, Some((0, true)))), clock(6).as_bytes())
            .unwrap();
        assert_eq!(split.cursor, 5);
        split
            .take(Some(&headers(7, 5, Some((1, false)))), clock(7).as_bytes())
            .unwrap();
        assert_eq!(split.cursor, 7);
        // A later part without the first (aged out of the stream) is a gap too.
        let mut lost = Taken {
            cursor: 5,
            ..Taken::default()
        };
        let gap = lost.take(Some(&headers(7, 5, Some((1, false)))), clock(7).as_bytes());
        assert!(matches!(gap, Err(NatsError::CursorExpired { .. })));
    }
}
