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
    source: Source,
    stream: stream::Stream,
    subject: String,
    purged_through: i64,
    /// The live subject's messages (none from a control plane that publishes none).
    live: Option<async_nats::Subscriber>,
    beats: async_nats::Subscriber,
    /// Heartbeats in a row whose head this follower had not reached while its cursor
    /// stood at `stuck_at`.
    beats_ahead: u32,
    stuck_at: i64,
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
        // Heartbeats and live messages are heard from before the stream is read, so none
        // is missed between: whatever the stream stores after the read is also live.
        let beats = client
            .subscribe(feed.heartbeat_subject.clone())
            .await
            .map_err(nats)?;
        let live = if feed.live_subject.is_empty() {
            None
        } else {
            Some(
                client
                    .subscribe(feed.live_subject.clone())
                    .await
                    .map_err(nats)?,
            )
        };
        let stream = context.get_stream(&feed.stream).await.map_err(nats)?;
        let mut lines = NatsLines {
            source: Source::Behind,
            stream,
            subject: feed.subject.clone(),
            purged_through: feed.purged_through,
            live,
            beats,
            beats_ahead: 0,
            stuck_at: cursor,
            taken: Taken {
                pending: VecDeque::new(),
                cursor,
                partial: None,
            },
        };
        lines.catch_up().await?;
        Ok(lines)
    }

    /// Reads the stream from the cursor on: with an ordered consumer through what it holds
    /// now, then (where the control plane publishes live) from the live subject.
    async fn catch_up(&mut self) -> Result<(), NatsError> {
        let cursor = self.taken.cursor;
        let held = self.stream.info().await.map_err(nats)?.state.clone();
        let next = first_after(&self.stream, &held, cursor).await?;
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
                if self.purged_through > cursor {
                    return Err(NatsError::CursorExpired {
                        cursor,
                        previous: self.purged_through,
                    });
                }
                if self.live.is_some() {
                    self.source = Source::Live;
                    return Ok(());
                }
                held.last_sequence.saturating_add(1)
            }
        };
        let consumer = self
            .stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
                filter_subject: self.subject.clone(),
                ..pull::OrderedConfig::default()
            })
            .await
            .map_err(nats)?;
        let messages = consumer.messages().await.map_err(nats)?;
        self.taken.partial = None;
        self.source = Source::Stored {
            messages: Box::new(messages),
            through: held.last_sequence,
        };
        Ok(())
    }

    /// The next record: the changes in feed order, and a heartbeat (carrying this
    /// follower's own cursor) whenever the control plane says the feed's head is one this
    /// follower has reached. Cancel-safe: a record not yet returned stays queued for the
    /// next call, and a catch-up cut short starts again.
    ///
    /// # Errors
    /// `CursorExpired` on a gap the stream cannot fill (take a new snapshot); `Nats`,
    /// `Closed` or `Decode` when following broke (follow again from the cursor).
    pub async fn next(&mut self) -> Result<Frame, NatsError> {
        loop {
            if let Some(record) = self.taken.pending.pop_front() {
                return Ok(record);
            }
            if matches!(self.source, Source::Behind) {
                self.catch_up().await?;
                continue;
            }
            let event = match &mut self.source {
                Source::Stored { messages, .. } => tokio::select! {
                    message = messages.next() => Event::Stored(message),
                    beat = self.beats.next() => Event::Beat(beat),
                },
                Source::Live => {
                    let Some(live) = self.live.as_mut() else {
                        self.source = Source::Behind;
                        continue;
                    };
                    tokio::select! {
                        message = live.next() => Event::Live(message),
                        beat = self.beats.next() => Event::Beat(beat),
                    }
                }
                Source::Behind => continue,
            };
            match event {
                Event::Stored(message) => {
                    let message = message.ok_or(NatsError::Closed)?.map_err(nats)?;
                    self.taken
                        .take(message.headers.as_ref(), &message.payload)?;
                    let sequence = message.info().map_err(nats)?.stream_sequence;
                    if let Source::Stored { through, .. } = &self.source
                        && sequence >= *through
                        && self.live.is_some()
                    {
                        // Everything stored since the stream was read is also live.
                        self.source = Source::Live;
                    }
                }
                Event::Live(message) => {
                    let message = message.ok_or(NatsError::Closed)?;
                    if self.taken.gap(message.headers.as_ref())? {
                        // A live message was lost (a slow follower's are dropped): the
                        // stream has them.
                        self.source = Source::Behind;
                        continue;
                    }
                    self.taken
                        .take(message.headers.as_ref(), &message.payload)?;
                }
                Event::Beat(beat) => {
                    let beat = beat.ok_or(NatsError::Closed)?;
                    let Ok(SyncRecord::Heartbeat { cursor, now }) =
                        serde_json::from_slice::<SyncRecord>(&beat.payload)
                    else {
                        continue;
                    };
                    if cursor <= self.taken.cursor {
                        self.beats_ahead = 0;
                        let beat = SyncRecord::Heartbeat {
                            cursor: self.taken.cursor,
                            now,
                        };
                        return Ok(Frame::Record(beat));
                    }
                    // The head is past this follower. Normal while changes are on their
                    // way; but when its cursor has not moved for two heartbeats more, the
                    // last live messages were lost: read the stream.
                    if self.stuck_at == self.taken.cursor {
                        self.beats_ahead = self.beats_ahead.saturating_add(1);
                    } else {
                        self.stuck_at = self.taken.cursor;
                        self.beats_ahead = 1;
                    }
                    if self.beats_ahead > 2 && matches!(self.source, Source::Live) {
                        self.beats_ahead = 0;
                        self.source = Source::Behind;
                    }
                }
            }
        }
    }
}

/// Where a follower takes its messages from.
enum Source {
    /// The stream, through `through` (its last sequence when it was read).
    Stored {
        messages: Box<pull::Ordered>,
        through: u64,
    },
    /// The live subject: caught up.
    Live,
    /// A gap to fill from the stream before anything else.
    Behind,
}

/// What a follower heard.
#[allow(clippy::large_enum_variant)] // One lives on the stack per message, briefly.
enum Event {
    Stored(Option<Result<jetstream::Message, pull::OrderedError>>),
    Live(Option<async_nats::Message>),
    Beat(Option<async_nats::Message>),
}

impl Taken {
    /// Whether a live message shows that messages before it were missed (a message at or
    /// before the cursor is no gap: it is skipped).
    fn gap(&self, headers: Option<&async_nats::HeaderMap>) -> Result<bool, NatsError> {
        let position = header(headers, NATS_POSITION)?
            .ok_or_else(|| NatsError::Decode("a message without a position".into()))?;
        if position <= self.cursor {
            return Ok(false);
        }
        let previous = header(headers, NATS_PREVIOUS)?.unwrap_or(0);
        let lost_part = match header(headers, NATS_PART)? {
            Some(0) | None => false,
            Some(_) => self.partial != Some(position),
        };
        Ok(previous > self.cursor || lost_part)
    }

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
    fn a_live_message_after_a_lost_one_is_a_gap() {
        let taken = Taken {
            cursor: 5,
            ..Taken::default()
        };
        // Next in line, or already had: no gap.
        assert!(!taken.gap(Some(&headers(7, 5, None))).unwrap());
        assert!(!taken.gap(Some(&headers(5, 3, None))).unwrap());
        assert!(!taken.gap(Some(&headers(4, 9, None))).unwrap());
        // The message before it was lost.
        assert!(taken.gap(Some(&headers(9, 7, None))).unwrap());
        // A later part of a position whose first part was lost.
        assert!(taken.gap(Some(&headers(7, 5, Some((1, false))))).unwrap());
        assert!(!taken.gap(Some(&headers(7, 5, Some((0, true))))).unwrap());
        let mid = Taken {
            cursor: 5,
            partial: Some(7),
            ..Taken::default()
        };
        assert!(!mid.gap(Some(&headers(7, 5, Some((1, false))))).unwrap());
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
