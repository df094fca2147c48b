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

/// Live messages held while a catch-up runs, at most: past it they are dropped, and the
/// gap they leave starts another catch-up once this one ends.
const HELD_MAX: usize = 4096;

/// A follower's view of one environment's feed on NATS, from a cursor on.
///
/// Two ways in, one order out. **Live**: a plain NATS subscription to the feed's subject
/// hears each message as the control plane publishes it (to the stream and to every
/// subscriber at once); this is the path of every change while a follower keeps up, and
/// it costs the NATS server one delivery per follower, not a consumer's bookkeeping.
/// **Catch-up**: where the follower is behind (it opened at an older cursor, or a live
/// message names a `previous` position it does not have: a message lost to a slow
/// consumer or a reconnect), an ordered JetStream consumer reads the stream from the
/// cursor until nothing is pending, while live messages wait in order (up to
/// `HELD_MAX`); then live again. A follower that heard nothing for two heartbeats that
/// each named a head past its cursor catches up too (a lost last message before a quiet
/// spell). Every message passes the same rules ([`Taken`]), so duplicates are skipped and
/// a gap is never applied over.
pub struct NatsLines {
    stream: stream::Stream,
    subject: String,
    live: async_nats::Subscriber,
    beats: async_nats::Subscriber,
    /// The ordered consumer of a catch-up under way.
    catching_up: Option<pull::Ordered>,
    /// A catch-up to start, and why (kept across a cancelled `next`).
    wanted: Option<Behind>,
    /// Live messages heard during a catch-up, taken after it in order.
    held: VecDeque<async_nats::Message>,
    /// The head a heartbeat named past this follower's cursor, with nothing taken since.
    beat_ahead: Option<i64>,
    /// The feed's purge point when this follower opened.
    purged_through: i64,
    catch_ups: u64,
    /// Live messages still to drop as if never heard (tests of lost messages).
    #[cfg(feature = "test-support")]
    to_lose: usize,
    taken: Taken,
}

/// Why a follower catches up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behind {
    /// It opened behind the stream's end, or heartbeats say it fell behind: the stream
    /// may hold nothing past the cursor yet (the publisher is behind), which is fine.
    Maybe,
    /// A live message went on from `previous`, past the cursor: the stream must hold what
    /// lies between, or the cursor has expired.
    Gap { previous: i64 },
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

/// Why a message could not be taken.
#[derive(Debug)]
enum Untaken {
    /// It goes on from a position after the cursor (`previous`): what lies between is
    /// missing.
    Gap {
        previous: i64,
    },
    Decode(String),
}

impl std::fmt::Debug for NatsLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLines")
            .field("cursor", &self.taken.cursor)
            .field("pending", &self.taken.pending.len())
            .field("catching_up", &self.catching_up.is_some())
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

/// What `NatsLines::next` heard.
enum Heard {
    CaughtUp(Option<Result<Box<jetstream::Message>, String>>),
    Live(Option<async_nats::Message>),
    Beat(Option<async_nats::Message>),
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
        // Both subscriptions start before the stream is read: a message published from
        // here on is heard live, found in the stream, or both (and taken once).
        let beats = client
            .subscribe(feed.heartbeat_subject.clone())
            .await
            .map_err(nats)?;
        let live = client.subscribe(feed.subject.clone()).await.map_err(nats)?;
        let stream = context.get_stream(&feed.stream).await.map_err(nats)?;
        let mut lines = NatsLines {
            stream,
            subject: feed.subject.clone(),
            live,
            beats,
            catching_up: None,
            wanted: Some(Behind::Maybe),
            held: VecDeque::new(),
            beat_ahead: None,
            purged_through: feed.purged_through,
            catch_ups: 0,
            #[cfg(feature = "test-support")]
            to_lose: 0,
            taken: Taken {
                pending: VecDeque::new(),
                cursor,
                partial: None,
            },
        };
        lines.catch_up().await?;
        // Opening is not counted: only the catch-ups following needed.
        lines.catch_ups = 0;
        Ok(lines)
    }

    /// How many times this follower has caught up from the stream since it opened (a
    /// lost live message, or a gap heartbeats revealed).
    #[must_use]
    pub fn catch_ups(&self) -> u64 {
        self.catch_ups
    }

    /// Drops the next `messages` heard live, as a slow consumer's overflow or a
    /// reconnect would (feature `test-support`).
    #[cfg(feature = "test-support")]
    pub fn lose_live(&mut self, messages: usize) {
        self.to_lose = messages;
    }

    /// Starts the catch-up `wanted` asks for, from the cursor: an ordered consumer from
    /// the first message past it, or nothing when the stream holds none (yet).
    async fn catch_up(&mut self) -> Result<(), NatsError> {
        let Some(why) = self.wanted else {
            return Ok(());
        };
        let cursor = self.taken.cursor;
        let held = self.stream.info().await.map_err(nats)?.state.clone();
        match first_after(&self.stream, &held, cursor).await? {
            Some((start_sequence, previous)) => {
                if previous > cursor {
                    return Err(NatsError::CursorExpired { cursor, previous });
                }
                let consumer = self
                    .stream
                    .create_consumer(pull::OrderedConfig {
                        deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
                        filter_subject: self.subject.clone(),
                        ..pull::OrderedConfig::default()
                    })
                    .await
                    .map_err(nats)?;
                self.catching_up = Some(consumer.messages().await.map_err(nats)?);
                self.catch_ups = self.catch_ups.saturating_add(1);
            }
            None => {
                // Nothing after the cursor is kept. Fine, unless a live message went on
                // from past it, or the feed was purged past it (an idle environment
                // whose stream aged to empty).
                if let Behind::Gap { previous } = why {
                    return Err(NatsError::CursorExpired { cursor, previous });
                }
                if self.purged_through > cursor {
                    return Err(NatsError::CursorExpired {
                        cursor,
                        previous: self.purged_through,
                    });
                }
            }
        }
        self.wanted = None;
        self.beat_ahead = None;
        Ok(())
    }

    /// The next record: the changes in feed order, and a heartbeat (carrying this
    /// follower's own cursor) whenever the control plane says the feed's head is one this
    /// follower has reached. Cancel-safe: a record not yet returned stays queued for the
    /// next call.
    ///
    /// # Errors
    /// `CursorExpired` on a gap the stream cannot fill (take a new snapshot); `Nats`,
    /// `Closed` or `Decode` when following broke (follow again from the cursor).
    pub async fn next(&mut self) -> Result<Frame, NatsError> {
        loop {
            if let Some(record) = self.taken.pending.pop_front() {
                return Ok(record);
            }
            if self.catching_up.is_none() {
                if self.wanted.is_some() {
                    self.catch_up().await?;
                    continue;
                }
                if let Some(message) = self.held.pop_front() {
                    self.take_live(message)?;
                    continue;
                }
            }
            let heard = {
                let catching_up = &mut self.catching_up;
                let caught_up = async {
                    match catching_up {
                        Some(messages) => messages.next().await.map(|message| {
                            message.map(Box::new).map_err(|error| error.to_string())
                        }),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    message = caught_up => Heard::CaughtUp(message),
                    message = self.live.next() => Heard::Live(message),
                    beat = self.beats.next() => Heard::Beat(beat),
                }
            };
            match heard {
                Heard::CaughtUp(message) => {
                    let message = message.ok_or(NatsError::Closed)?.map_err(NatsError::Nats)?;
                    let pending = message.info().map_err(nats)?.pending;
                    self.taken
                        .take(message.headers.as_ref(), &message.payload)
                        .map_err(|untaken| untaken.into_error(self.taken.cursor))?;
                    if pending == 0 {
                        self.catching_up = None;
                    }
                }
                Heard::Live(message) => {
                    let message = message.ok_or(NatsError::Closed)?;
                    #[cfg(feature = "test-support")]
                    if self.to_lose > 0 {
                        self.to_lose = self.to_lose.saturating_sub(1);
                        continue;
                    }
                    if self.catching_up.is_some() {
                        if self.held.len() < HELD_MAX {
                            self.held.push_back(message);
                        }
                    } else {
                        self.take_live(message)?;
                    }
                }
                Heard::Beat(beat) => {
                    let beat = beat.ok_or(NatsError::Closed)?;
                    let Ok(SyncRecord::Heartbeat { cursor: head, now }) =
                        serde_json::from_slice::<SyncRecord>(&beat.payload)
                    else {
                        continue;
                    };
                    if head <= self.taken.cursor {
                        self.beat_ahead = None;
                        let beat = SyncRecord::Heartbeat {
                            cursor: self.taken.cursor,
                            now,
                        };
                        return Ok(Frame::Record(beat));
                    }
                    let idle = self.catching_up.is_none() && self.held.is_empty();
                    if idle
                        && self
                            .beat_ahead
                            .is_some_and(|ahead| ahead > self.taken.cursor)
                    {
                        self.wanted = Some(Behind::Maybe);
                    }
                    self.beat_ahead = Some(head);
                }
            }
        }
    }

    /// Takes a message heard live; one that goes on from past the cursor waits (first in
    /// line) for a catch-up to fill the gap.
    fn take_live(&mut self, message: async_nats::Message) -> Result<(), NatsError> {
        match self.taken.take(message.headers.as_ref(), &message.payload) {
            Ok(()) => {
                self.beat_ahead = None;
                Ok(())
            }
            Err(Untaken::Gap { previous }) => {
                self.held.push_front(message);
                self.wanted = Some(Behind::Gap { previous });
                Ok(())
            }
            Err(Untaken::Decode(reason)) => Err(NatsError::Decode(reason)),
        }
    }
}

impl Untaken {
    /// The error a message read from the stream itself makes: there, a gap means the
    /// stream no longer holds what followed the cursor.
    fn into_error(self, cursor: i64) -> NatsError {
        match self {
            Untaken::Gap { previous } => NatsError::CursorExpired { cursor, previous },
            Untaken::Decode(reason) => NatsError::Decode(reason),
        }
    }
}

impl Taken {
    /// Takes one message: its records queue up unless this follower has them already.
    fn take(
        &mut self,
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
    ) -> Result<(), Untaken> {
        let decode = |error: NatsError| Untaken::Decode(error.to_string());
        let position = header(headers, NATS_POSITION)
            .map_err(decode)?
            .ok_or_else(|| Untaken::Decode("a message without a position".into()))?;
        let previous = header(headers, NATS_PREVIOUS).map_err(decode)?.unwrap_or(0);
        if position <= self.cursor {
            return Ok(());
        }
        if previous > self.cursor {
            return Err(Untaken::Gap { previous });
        }
        // A later part of a split position without its first: the first is missing.
        match header(headers, NATS_PART).map_err(decode)? {
            Some(0) => self.partial = Some(position),
            Some(_) if self.partial != Some(position) => {
                return Err(Untaken::Gap { previous: position });
            }
            _ => {}
        }
        let framed = headers
            .and_then(|headers| headers.get(NATS_ENCODING))
            .is_some_and(|encoding| encoding.as_str() == FEED_FRAMES);
        // A message holds a run of positions; those this follower had (a cursor below its
        // own) are skipped. A record at its own cursor may belong to the position after it
        // (see `SyncRecord` cursors of shared positions): applied again. A message is taken
        // whole or not at all.
        let cursor = self.cursor;
        let before = self.pending.len();
        let pending = &mut self.pending;
        let mut keep = |record: Frame| {
            if record.cursor().is_none_or(|at| at >= cursor) {
                pending.push_back(record);
            }
        };
        let decoded = if framed {
            protocol::frames::each_frame(payload, &mut keep)
                .map_err(|error| Untaken::Decode(format!("at {position}: {error}")))
        } else {
            ndjson(payload)
                .map(|records| records.into_iter().for_each(&mut keep))
                .map_err(|error| Untaken::Decode(format!("a record at {position}: {error}")))
        };
        if let Err(error) = decoded {
            self.pending.truncate(before);
            return Err(error);
        }
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
        // A frame cut short after whole ones: nothing of the message is taken.
        let mut cut = body.clone();
        cut.truncate(cut.len() - 1);
        let mut fresh = Taken {
            cursor: 2,
            ..Taken::default()
        };
        assert!(matches!(
            fresh.take(Some(&framed), &cut),
            Err(Untaken::Decode(_))
        ));
        assert!(fresh.pending.is_empty(), "taken whole or not at all");
        assert_eq!(fresh.cursor, 2);
        // Frames in a message not marked as frames are not lines: an error, not a guess.
        let mut unmarked = Taken {
            cursor: 2,
            ..Taken::default()
        };
        assert!(matches!(
            unmarked.take(Some(&headers(6, 2, None)), &body),
            Err(Untaken::Decode(_))
        ));
    }

    #[test]
    fn gaps_are_told_not_taken() {
        let mut behind = Taken {
            cursor: 2,
            ..Taken::default()
        };
        let gap = behind.take(Some(&headers(9, 5, None)), clock(9).as_bytes());
        assert!(matches!(gap, Err(Untaken::Gap { previous: 5 })));
        assert_eq!(behind.cursor, 2, "nothing taken past a gap");
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
        assert!(matches!(gap, Err(Untaken::Gap { previous: 7 })));
    }
}
