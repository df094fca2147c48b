//! Following an environment's change feed over NATS JetStream (feature `nats`), where the
//! control plane publishes it (`sync.nats_url`; [`Client::sync_nats`](crate::Client::sync_nats)
//! says where). [`NatsLines`] yields the same records as
//! [`Client::sync_stream`](crate::Client::sync_stream), so a follower applies either alike:
//! take a snapshot over HTTP, then follow from its cursor here.

use std::collections::VecDeque;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, stream};
use protocol::{NATS_MORE, NATS_POSITION, NATS_PREVIOUS, NatsFeed, SyncRecord};
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
    /// Records of messages taken, not yet returned.
    pending: VecDeque<SyncRecord>,
    /// The last position taken completely.
    cursor: i64,
}

impl std::fmt::Debug for NatsLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLines")
            .field("cursor", &self.cursor)
            .field("pending", &self.pending.len())
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
            None => held.last_sequence.saturating_add(1),
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
            pending: VecDeque::new(),
            cursor,
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
    pub async fn next(&mut self) -> Result<SyncRecord, NatsError> {
        loop {
            if let Some(record) = self.pending.pop_front() {
                return Ok(record);
            }
            tokio::select! {
                message = self.messages.next() => {
                    let message = message.ok_or(NatsError::Closed)?.map_err(nats)?;
                    self.take(message.headers.as_ref(), &message.payload)?;
                }
                beat = self.beats.next() => {
                    let beat = beat.ok_or(NatsError::Closed)?;
                    if let Ok(SyncRecord::Heartbeat { cursor, now }) =
                        serde_json::from_slice::<SyncRecord>(&beat.payload)
                        && cursor <= self.cursor
                    {
                        return Ok(SyncRecord::Heartbeat { cursor: self.cursor, now });
                    }
                }
            }
        }
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
        for line in payload.split(|byte| *byte == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let record: SyncRecord = serde_json::from_slice(line)
                .map_err(|error| NatsError::Decode(format!("a record at {position}: {error}")))?;
            // A message holds a run of positions; those this follower had (a cursor below
            // its own) are skipped. A line at its own cursor may belong to the position
            // after it (see `SyncRecord` cursors of shared positions): applied again.
            if record.cursor().is_some_and(|cursor| cursor < self.cursor) {
                continue;
            }
            self.pending.push_back(record);
        }
        let more = headers.is_some_and(|headers| headers.get(NATS_MORE).is_some());
        if !more {
            self.cursor = position;
        }
        Ok(())
    }
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
