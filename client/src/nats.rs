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
    NATS_ENCODING, NATS_MORE, NATS_PART, NATS_POSITION, NATS_PREVIOUS, NATS_PUBLICATION, NatsFeed,
    SyncRecord,
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

/// Bytes of live messages held while a catch-up runs, at most: past it they are dropped,
/// and the gap they leave starts another catch-up once this one ends.
const HELD_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Live messages held while a catch-up runs, at most, whatever their size: a message
/// with an empty payload (the publisher's own "nothing to send", or a hostile one with
/// large headers) counts nothing against `HELD_BYTES_MAX`.
const HELD_MESSAGES_MAX: usize = 65_536;
/// How long heartbeats must name a head past the cursor, the cursor not moving and
/// nothing left to take, before a follower catches up from the stream.
const BEHIND_FOR: std::time::Duration = std::time::Duration::from_secs(3);

/// A catch-up being set up: the first message past the cursor found, its consumer made.
type Starting = tokio::task::JoinHandle<Result<Option<pull::Ordered>, NatsError>>;

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
/// `HELD_BYTES_MAX` and `HELD_MESSAGES_MAX`); then live again. The parts of a split
/// position are read from the stream, where they are in order and every one was stored
/// (a part heard live starts a catch-up), but for the next part of a position a
/// catch-up ended in the middle of, which is taken as heard. A follower whose heartbeats name a head past its cursor for
/// `BEHIND_FOR` while it has nothing to take catches up too (a lost last message before a
/// quiet spell). Every message passes the same rules ([`Taken`]), so duplicates are
/// skipped and a gap is never applied over.
pub struct NatsLines {
    stream: stream::Stream,
    subject: String,
    live: async_nats::Subscriber,
    beats: async_nats::Subscriber,
    /// A catch-up being set up, and why (a task: a cancelled `next` does not restart it).
    starting: Option<(Starting, Behind)>,
    /// The ordered consumer of a catch-up under way.
    catching_up: Option<pull::Ordered>,
    /// A catch-up to start, and why.
    wanted: Option<Behind>,
    /// Live messages heard during a catch-up, taken after it in order, and their bytes.
    held: VecDeque<async_nats::Message>,
    held_bytes: usize,
    /// Since when heartbeats have named a head past the cursor, and the cursor then.
    behind_since: Option<(tokio::time::Instant, i64)>,
    /// The feed's purge point when this follower opened.
    purged_through: i64,
    catch_ups: u64,
    /// Live messages at or before this position are dropped as if never heard (tests of
    /// lost messages).
    #[cfg(feature = "test-support")]
    lose_through: i64,
    taken: Taken,
}

impl Drop for NatsLines {
    fn drop(&mut self) {
        if let Some((task, _)) = &self.starting {
            task.abort();
        }
    }
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
    /// A part of a split position was heard live (the first held message): its parts
    /// are read from the stream. If the stream holds nothing past the cursor yet, that
    /// message is dropped (the stream will have it).
    Part,
}

/// What a follower has taken from the stream: the rules of `protocol::NatsFeed`, apart
/// from NATS itself.
#[derive(Debug, Default)]
struct Taken {
    /// Records of messages taken, not yet returned.
    pending: VecDeque<Frame>,
    /// The last position taken completely.
    cursor: i64,
    /// The split position whose parts are being taken, if any.
    partial: Option<Partial>,
}

/// A split position part-way taken: its position, the last part taken, and the
/// publication the parts came from ([`NATS_PUBLICATION`]; `None` where the publisher
/// did not name one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Partial {
    position: i64,
    last: i64,
    publication: Option<u64>,
}

impl Partial {
    /// Whether part `part` of `publication` at `position` is the next one to take.
    fn next_is(&self, position: i64, part: i64, publication: Option<u64>) -> bool {
        self.position == position
            && self.publication == publication
            && part == self.last.saturating_add(1)
    }

    /// Whether it is one taken already.
    fn has(&self, position: i64, part: i64, publication: Option<u64>) -> bool {
        self.position == position && self.publication == publication && part <= self.last
    }
}

/// What a message's headers say, read in one walk over them: a message is looked at
/// for up to nine of these, and each lookup by name walked every header and compared
/// names (10 % of a follower's CPU at 1,000 changes a second, docs/BENCHMARKS.md).
#[derive(Debug, Clone, Copy)]
struct Heads {
    /// Each number as read: `Err` names a header whose value is not one.
    position: Result<Option<i64>, &'static str>,
    previous: Result<Option<i64>, &'static str>,
    part: Result<Option<i64>, &'static str>,
    /// The publication a part names (hex), if any; a value that is not one is none.
    publication: Option<u64>,
    /// Whether the payload is frames (`FEED_FRAMES`) rather than NDJSON lines.
    framed: bool,
    /// Whether more parts of the position follow.
    more: bool,
}

impl Heads {
    /// Reads `headers` (the first value of each name counts).
    fn read(headers: Option<&async_nats::HeaderMap>) -> Heads {
        let mut heads = Heads {
            position: Ok(None),
            previous: Ok(None),
            part: Ok(None),
            publication: None,
            framed: false,
            more: false,
        };
        let Some(headers) = headers else {
            return heads;
        };
        let number =
            |name: &'static str, value: &str| value.parse::<i64>().map(Some).map_err(|_| name);
        for (name, values) in headers.iter() {
            let Some(value) = values.first().map(async_nats::HeaderValue::as_str) else {
                continue;
            };
            match AsRef::<str>::as_ref(name) {
                NATS_POSITION => heads.position = number(NATS_POSITION, value),
                NATS_PREVIOUS => heads.previous = number(NATS_PREVIOUS, value),
                NATS_PART => heads.part = number(NATS_PART, value),
                NATS_PUBLICATION => heads.publication = u64::from_str_radix(value, 16).ok(),
                NATS_ENCODING => heads.framed = value == FEED_FRAMES,
                NATS_MORE => heads.more = true,
                _ => {}
            }
        }
        heads
    }
}

/// A header that is not a number, as the error that says so.
fn bad_header(name: &str) -> NatsError {
    NatsError::Decode(format!("a bad `{name}` header"))
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
            .field("starting", &self.starting.is_some())
            .field("catching_up", &self.catching_up.is_some())
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

/// What `NatsLines::next` heard.
enum Heard {
    Started(Box<Result<Result<Option<pull::Ordered>, NatsError>, tokio::task::JoinError>>),
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
        let catching_up = start_catch_up(
            stream.clone(),
            feed.subject.clone(),
            cursor,
            Behind::Maybe,
            feed.purged_through,
        )
        .await?;
        Ok(NatsLines {
            stream,
            subject: feed.subject.clone(),
            live,
            beats,
            starting: None,
            catching_up,
            wanted: None,
            held: VecDeque::new(),
            held_bytes: 0,
            behind_since: None,
            purged_through: feed.purged_through,
            catch_ups: 0,
            #[cfg(feature = "test-support")]
            lose_through: i64::MIN,
            taken: Taken {
                pending: VecDeque::new(),
                cursor,
                partial: None,
            },
        })
    }

    /// How many times this follower has caught up from the stream since it opened (a
    /// lost live message, a split position, or a gap heartbeats revealed).
    #[must_use]
    pub fn catch_ups(&self) -> u64 {
        self.catch_ups
    }

    /// Drops the live messages whose position is at or before `position` as if never
    /// heard, as a slow consumer's overflow or a reconnect would (feature
    /// `test-support`).
    #[cfg(feature = "test-support")]
    pub fn lose_live_through(&mut self, position: i64) {
        self.lose_through = position;
    }

    fn hold(&mut self, message: async_nats::Message) {
        let bytes = message.payload.len();
        if self.held_bytes.saturating_add(bytes) <= HELD_BYTES_MAX
            && self.held.len() < HELD_MESSAGES_MAX
        {
            self.held_bytes = self.held_bytes.saturating_add(bytes);
            self.held.push_back(message);
        }
    }

    fn unhold(&mut self) -> Option<async_nats::Message> {
        let message = self.held.pop_front()?;
        self.held_bytes = self.held_bytes.saturating_sub(message.payload.len());
        Some(message)
    }

    /// Puts `message` back first in line, to be taken once a catch-up is done.
    fn hold_first(&mut self, message: async_nats::Message) {
        self.held_bytes = self.held_bytes.saturating_add(message.payload.len());
        self.held.push_front(message);
    }

    /// The next record: the changes in feed order, and a heartbeat (carrying this
    /// follower's own cursor) whenever the control plane says the feed's head is one this
    /// follower has reached. Cancel-safe: a record not yet returned stays queued for the
    /// next call, and a catch-up being set up goes on.
    ///
    /// # Errors
    /// `CursorExpired` on a gap the stream cannot fill (take a new snapshot); `Nats`,
    /// `Closed` or `Decode` when following broke (follow again from the cursor).
    pub async fn next(&mut self) -> Result<Frame, NatsError> {
        loop {
            if let Some(record) = self.taken.pending.pop_front() {
                return Ok(record);
            }
            if self.catching_up.is_none() && self.starting.is_none() {
                if let Some(why) = self.wanted.take() {
                    let task = tokio::spawn(start_catch_up(
                        self.stream.clone(),
                        self.subject.clone(),
                        self.taken.cursor,
                        why,
                        self.purged_through,
                    ));
                    self.starting = Some((task, why));
                    continue;
                }
                if let Some(message) = self.unhold() {
                    self.take_live(message)?;
                    continue;
                }
            }
            let heard = {
                let (starting, catching_up) = (&mut self.starting, &mut self.catching_up);
                let started = async {
                    match starting {
                        Some((task, _)) => task.await,
                        None => std::future::pending().await,
                    }
                };
                let caught_up = async {
                    match catching_up {
                        Some(messages) => messages.next().await.map(|message| {
                            message.map(Box::new).map_err(|error| error.to_string())
                        }),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    started = started => Heard::Started(Box::new(started)),
                    message = caught_up => Heard::CaughtUp(message),
                    message = self.live.next() => Heard::Live(message),
                    beat = self.beats.next() => Heard::Beat(beat),
                }
            };
            match heard {
                Heard::Started(started) => self.started(*started)?,
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
                    if Heads::read(message.headers.as_ref())
                        .position
                        .ok()
                        .flatten()
                        .is_some_and(|position| position <= self.lose_through)
                    {
                        continue;
                    }
                    if self.catching_up.is_some() || self.starting.is_some() {
                        self.hold(message);
                    } else {
                        self.take_live(message)?;
                    }
                }
                Heard::Beat(beat) => {
                    let beat = beat.ok_or(NatsError::Closed)?;
                    if let Some(fresh) = self.beat(&beat.payload) {
                        return Ok(fresh);
                    }
                }
            }
        }
    }

    /// A catch-up's setup finished: its consumer is read from now on (or, with nothing
    /// past the cursor in the stream, nothing is).
    fn started(
        &mut self,
        started: Result<Result<Option<pull::Ordered>, NatsError>, tokio::task::JoinError>,
    ) -> Result<(), NatsError> {
        let why = self.starting.take().map(|(_, why)| why);
        let consumer =
            started.map_err(|error| NatsError::Nats(format!("catching up: {error}")))??;
        self.behind_since = None;
        match consumer {
            Some(consumer) => {
                self.catching_up = Some(consumer);
                self.catch_ups = self.catch_ups.saturating_add(1);
            }
            None if why == Some(Behind::Part) => {
                self.unhold();
            }
            None => {}
        }
        Ok(())
    }

    /// A heartbeat: "fresh now" (returned) when this follower has reached the head it
    /// names; else, once it has named a head past the cursor for `BEHIND_FOR` while the
    /// cursor did not move and nothing waits to be taken, a catch-up.
    fn beat(&mut self, payload: &[u8]) -> Option<Frame> {
        let Ok(SyncRecord::Heartbeat { cursor: head, now }) =
            serde_json::from_slice::<SyncRecord>(payload)
        else {
            return None;
        };
        let cursor = self.taken.cursor;
        if head <= cursor {
            self.behind_since = None;
            return Some(Frame::from(SyncRecord::Heartbeat { cursor, now }));
        }
        let idle = self.catching_up.is_none() && self.starting.is_none() && self.held.is_empty();
        match self.behind_since {
            Some((since, at)) if at == cursor => {
                if idle && since.elapsed() >= BEHIND_FOR {
                    self.wanted = Some(Behind::Maybe);
                    self.behind_since = None;
                }
            }
            _ => self.behind_since = Some((tokio::time::Instant::now(), cursor)),
        }
        None
    }

    /// Takes a message heard live. One that goes on from past the cursor waits (first in
    /// line) for a catch-up to fill the gap; so does a part of a split position not
    /// taken yet, whose parts are read from the stream ([`live_part`]).
    fn take_live(&mut self, message: async_nats::Message) -> Result<(), NatsError> {
        let heads = Heads::read(message.headers.as_ref());
        if let (Ok(Some(position)), Ok(Some(part))) = (heads.position, heads.part) {
            match live_part(
                self.taken.cursor,
                self.taken.partial,
                (position, part, heads.publication),
            ) {
                LivePart::Take => {}
                LivePart::Drop => return Ok(()),
                LivePart::CatchUp => {
                    self.hold_first(message);
                    self.wanted = Some(Behind::Part);
                    return Ok(());
                }
            }
        }
        match self.taken.take_read(&heads, &message.payload) {
            Ok(()) => Ok(()),
            Err(Untaken::Gap { previous }) => {
                self.hold_first(message);
                self.wanted = Some(Behind::Gap { previous });
                Ok(())
            }
            Err(Untaken::Decode(reason)) => Err(NatsError::Decode(reason)),
        }
    }
}

/// What a follower does with a part of a split position heard live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LivePart {
    /// At or before the cursor (skipped by [`Taken::take`]), or the next part of the
    /// publication of the position the follower is in the middle of: taken as heard.
    Take,
    /// A part of that publication it has taken already (from the stream): dropped.
    Drop,
    /// A part of a position (or a publication of it) it has not started: its parts are
    /// read from the stream, in order.
    CatchUp,
}

/// [`LivePart`] for a follower at `cursor`, `partial` part-way through a split position,
/// hearing part `part` of `publication` at `position`. Without `Drop`, a catch-up that
/// ended part-way through a position (the rest not published yet) handed the part it
/// was started for back as new, and the follower caught up again, and again, for as
/// long as the rest took. Parts of another publication (the position published again,
/// split otherwise, or a racing replica's refused parts, which subscribers still hear)
/// are never taken after this one's: that would take some lines twice and others never.
fn live_part(
    cursor: i64,
    partial: Option<Partial>,
    (position, part, publication): (i64, i64, Option<u64>),
) -> LivePart {
    if position <= cursor {
        return LivePart::Take;
    }
    match partial {
        Some(partial) if partial.has(position, part, publication) => LivePart::Drop,
        Some(partial) if partial.next_is(position, part, publication) => LivePart::Take,
        _ => LivePart::CatchUp,
    }
}

/// Sets up a catch-up from `cursor`: an ordered consumer from the first message of the
/// stream past it, or `None` when the stream holds none (yet).
async fn start_catch_up(
    mut stream: stream::Stream,
    subject: String,
    cursor: i64,
    why: Behind,
    purged_through: i64,
) -> Result<Option<pull::Ordered>, NatsError> {
    let held = stream.info().await.map_err(nats)?.state.clone();
    match first_after(&stream, &held, cursor).await? {
        Some((start_sequence, previous)) => {
            if previous > cursor {
                return Err(NatsError::CursorExpired { cursor, previous });
            }
            let consumer = stream
                .create_consumer(pull::OrderedConfig {
                    deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
                    filter_subject: subject,
                    ..pull::OrderedConfig::default()
                })
                .await
                .map_err(nats)?;
            Ok(Some(consumer.messages().await.map_err(nats)?))
        }
        None => {
            // Nothing after the cursor is kept. Fine, unless a live message went on from
            // past it, or the feed was purged past it (an idle environment whose stream
            // aged to empty).
            if let Behind::Gap { previous } = why {
                return Err(NatsError::CursorExpired { cursor, previous });
            }
            if purged_through > cursor {
                return Err(NatsError::CursorExpired {
                    cursor,
                    previous: purged_through,
                });
            }
            Ok(None)
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
        payload: &bytes::Bytes,
    ) -> Result<(), Untaken> {
        self.take_read(&Heads::read(headers), payload)
    }

    /// [`Taken::take`] of a message whose headers were read already.
    fn take_read(&mut self, heads: &Heads, payload: &bytes::Bytes) -> Result<(), Untaken> {
        let decode = |name: &str| Untaken::Decode(bad_header(name).to_string());
        let position = heads
            .position
            .map_err(decode)?
            .ok_or_else(|| Untaken::Decode("a message without a position".into()))?;
        let previous = heads.previous.map_err(decode)?.unwrap_or(0);
        if position <= self.cursor {
            return Ok(());
        }
        if previous > self.cursor {
            return Err(Untaken::Gap { previous });
        }
        // A part of a split position that does not follow the part before it (a later
        // part without the first, with one missing between, or of another publication
        // of the position): a gap. A part 0 starts the position (again).
        let publication = heads.publication;
        match heads.part.map_err(decode)? {
            Some(0) => {
                self.partial = Some(Partial {
                    position,
                    last: 0,
                    publication,
                });
            }
            Some(part) => match &mut self.partial {
                Some(partial) if partial.next_is(position, part, publication) => {
                    partial.last = part;
                }
                _ => return Err(Untaken::Gap { previous: position }),
            },
            None => {}
        }
        let framed = heads.framed;
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
        let more = heads.more;
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
        .map(|line| serde_json::from_slice::<SyncRecord>(line).map(Frame::from))
        .collect()
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
        let heads = Heads::read(Some(&message.headers));
        let position = heads
            .position
            .map_err(bad_header)?
            .ok_or_else(|| NatsError::Decode(format!("message {sequence} has no position")))?;
        let previous = heads.previous.map_err(bad_header)?.unwrap_or(0);
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
        let body = bytes::Bytes::from([clock(3), clock(4), clock(5), clock(6)].concat());
        let mut fresh = Taken {
            cursor: 2,
            ..Taken::default()
        };
        fresh.take(Some(&headers(6, 2, None)), &body).unwrap();
        assert_eq!(cursors(&mut fresh), [3, 4, 5, 6]);
        assert_eq!(fresh.cursor, 6);
        // A follower that stopped inside the run (at 4, say mid-position 5) gets from its
        // cursor on: the line at its own cursor may belong to the next position.
        let mut resumed = Taken {
            cursor: 4,
            ..Taken::default()
        };
        resumed.take(Some(&headers(6, 2, None)), &body).unwrap();
        assert_eq!(cursors(&mut resumed), [4, 5, 6]);
        // A message at or before the cursor is skipped whole.
        resumed.take(Some(&headers(6, 2, None)), &body).unwrap();
        assert!(resumed.pending.is_empty());
    }

    #[test]
    fn a_framed_run_is_taken_like_lines() {
        let body: bytes::Bytes = (3..=6)
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

    /// The headers of part `part` of position 7 (after 5) in publication `publication`.
    fn part_of(part: i64, more: bool, publication: u64) -> async_nats::HeaderMap {
        let mut headers = headers(7, 5, Some((part, more)));
        headers.insert(NATS_PUBLICATION, format!("{publication:016x}").as_str());
        headers
    }

    #[test]
    fn a_live_part_is_taken_dropped_or_read_from_the_stream() {
        let (a, b) = (Some(0xa), Some(0xb));
        let partial = |last, publication| {
            Some(Partial {
                position: 7,
                last,
                publication,
            })
        };
        // Not started: the position's parts come from the stream.
        assert_eq!(live_part(5, None, (7, 0, a)), LivePart::CatchUp);
        assert_eq!(live_part(5, None, (7, 1, a)), LivePart::CatchUp);
        // A catch-up took part 0 and ended there (the rest not published yet): the live
        // part 0 it was started for is dropped, not caught up for again; part 1 heard
        // live is taken as heard; a part further on (one lost between) is read from the
        // stream.
        assert_eq!(live_part(5, partial(0, a), (7, 0, a)), LivePart::Drop);
        assert_eq!(live_part(5, partial(0, a), (7, 1, a)), LivePart::Take);
        assert_eq!(live_part(5, partial(0, a), (7, 2, a)), LivePart::CatchUp);
        assert_eq!(live_part(5, partial(2, a), (7, 1, a)), LivePart::Drop);
        // Another publication of the position (published again and split otherwise, or
        // a racing replica's refused parts, which subscribers hear all the same): never
        // taken after this one's parts, nor dropped as taken; read from the stream.
        assert_eq!(live_part(5, partial(0, a), (7, 1, b)), LivePart::CatchUp);
        assert_eq!(live_part(5, partial(0, a), (7, 0, b)), LivePart::CatchUp);
        // A part of another position than the one in the middle of.
        assert_eq!(live_part(5, partial(0, a), (9, 0, a)), LivePart::CatchUp);
        // At or before the cursor: `Taken::take` skips it.
        assert_eq!(live_part(7, None, (7, 3, a)), LivePart::Take);

        // What `Taken::take` does with parts: one publication's parts in order complete
        // the position; a part of another publication after them is a gap; a part 0
        // starts the position again.
        let mut taken = Taken {
            cursor: 5,
            ..Taken::default()
        };
        taken
            .take(Some(&part_of(0, true, 0xa)), &clock(6).into())
            .unwrap();
        assert_eq!(
            live_part(taken.cursor, taken.partial, (7, 1, a)),
            LivePart::Take
        );
        taken
            .take(Some(&part_of(0, true, 0xb)), &clock(6).into())
            .unwrap();
        let mixed = taken.take(Some(&part_of(1, false, 0xa)), &clock(7).into());
        assert!(matches!(mixed, Err(Untaken::Gap { previous: 7 })));
        assert_eq!(
            taken.cursor, 5,
            "not past the position on a mix of publications"
        );
        taken
            .take(Some(&part_of(1, false, 0xb)), &clock(7).into())
            .unwrap();
        assert_eq!(taken.cursor, 7);
    }

    #[test]
    fn gaps_are_told_not_taken() {
        let mut behind = Taken {
            cursor: 2,
            ..Taken::default()
        };
        let gap = behind.take(Some(&headers(9, 5, None)), &clock(9).into());
        assert!(matches!(gap, Err(Untaken::Gap { previous: 5 })));
        assert_eq!(behind.cursor, 2, "nothing taken past a gap");
        // A split position: its parts move the cursor only at the last.
        let mut split = Taken {
            cursor: 5,
            ..Taken::default()
        };
        split
            .take(Some(&headers(7, 5, Some((0, true)))), &clock(6).into())
            .unwrap();
        assert_eq!(split.cursor, 5);
        split
            .take(Some(&headers(7, 5, Some((1, false)))), &clock(7).into())
            .unwrap();
        assert_eq!(split.cursor, 7);
        // A later part without the first (aged out of the stream) is a gap too.
        let mut lost = Taken {
            cursor: 5,
            ..Taken::default()
        };
        let gap = lost.take(Some(&headers(7, 5, Some((1, false)))), &clock(7).into());
        assert!(matches!(gap, Err(Untaken::Gap { previous: 7 })));
        // A part missing between two others is a gap, and the last part then moves
        // nothing; the position published again from its first part is taken.
        let mut middle = Taken {
            cursor: 5,
            ..Taken::default()
        };
        middle
            .take(Some(&headers(7, 5, Some((0, true)))), &clock(6).into())
            .unwrap();
        let gap = middle.take(Some(&headers(7, 5, Some((2, false)))), &clock(7).into());
        assert!(matches!(gap, Err(Untaken::Gap { previous: 7 })));
        assert_eq!(middle.cursor, 5);
        for (part, more) in [(0, true), (1, true), (2, false)] {
            middle
                .take(Some(&headers(7, 5, Some((part, more)))), &clock(7).into())
                .unwrap();
        }
        assert_eq!(middle.cursor, 7);
    }

    #[test]
    fn a_message_s_headers_are_read_in_one_walk() {
        let mut all = headers(7, 5, Some((2, true)));
        all.insert(NATS_PUBLICATION, "00000000000000ff");
        all.insert(NATS_ENCODING, FEED_FRAMES);
        all.insert("Nats-Msg-Id", "7.2.00000000000000ff");
        let heads = Heads::read(Some(&all));
        assert_eq!(heads.position, Ok(Some(7)));
        assert_eq!(heads.previous, Ok(Some(5)));
        assert_eq!(heads.part, Ok(Some(2)));
        assert_eq!(heads.publication, Some(0xff));
        assert!(heads.framed && heads.more);

        let none = Heads::read(None);
        assert_eq!(none.position, Ok(None));
        assert!(!none.framed && !none.more && none.publication.is_none());

        // A value that is not a number names its header when the message is taken; a
        // publication that is not hex is none; another encoding is lines.
        let mut bad = async_nats::HeaderMap::new();
        bad.insert(NATS_POSITION, "7");
        bad.insert(NATS_PREVIOUS, "five");
        bad.insert(NATS_PUBLICATION, "not hex");
        bad.insert(NATS_ENCODING, "application/x-ndjson");
        let heads = Heads::read(Some(&bad));
        assert_eq!(heads.previous, Err(NATS_PREVIOUS));
        assert_eq!(heads.publication, None);
        assert!(!heads.framed);
        let mut taken = Taken::default();
        match taken.take(Some(&bad), &clock(7).into()) {
            Err(Untaken::Decode(reason)) => assert!(reason.contains(NATS_PREVIOUS), "{reason}"),
            other => panic!("a decode error, not {other:?}"),
        }
        assert_eq!(taken.cursor, 0);
    }
}
