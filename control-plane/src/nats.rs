//! The change feed on NATS JetStream (`sync.nats_url`), beside the HTTP stream: each
//! environment's committed feed, in feed order, in a JetStream stream of its own, so that
//! thousands of proxies follow it from NATS rather than each holding a stream to a
//! replica. The wire format is `protocol::NatsFeed`'s.
//!
//! Every process publishes what it commits (the environments it marked in
//! `AppState::notify_changes`; consecutive positions share a message), letting commits
//! gather for `sync.nats_linger_ms` whenever it has caught up, also under a steady load;
//! and once a second it sweeps every environment's feed head, publishing whatever no
//! process has (a commit whose process died before publishing it, or anything committed
//! while NATS was down). Messages are published with the stream's
//! last sequence as the expected one: two processes publishing one environment never
//! interleave or skip, the loser reloads where the stream is and goes on from there. The
//! position is the message id too, so a republish within the duplicate window is dropped.
//! Only what the feed shows is published, so nothing uncommitted is. While NATS is
//! unreachable nothing is tried; the client's `Connected` event (the first connection,
//! made in the background, and every reconnect) wakes the publisher at once.
//!
//! The sweep also sends each environment's heartbeat (plain NATS): the feed's head and the
//! environment's time, which a follower that has applied up to that head takes as "fresh
//! as of now".

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use axum::body::Bytes;
use protocol::{
    NATS_ENCODING, NATS_MORE, NATS_PART, NATS_POSITION, NATS_PREVIOUS, NATS_PUBLICATION, NatsFeed,
    SyncRecord,
};
use tokio::sync::watch;

use crate::service::AppState;
use crate::service::feed::{Encoding, FeedLine, line};
use crate::store::{Env, EnvHead};

/// How often every environment's head is looked at (and its heartbeat sent).
const SWEEP: Duration = Duration::from_secs(1);
/// After the client tells of a connection, how often and how many times its state is
/// looked at until it shows it.
const CONNECTED_CHECK: Duration = Duration::from_millis(5);
const CONNECTED_CHECKS: u32 = 40;
/// Feed positions read at a time.
const PAGE_LEN: u32 = 500;
/// Pages one environment publishes before the others get their turn.
const PAGES_PER_TURN: usize = 4;
/// Environments read per page of a sweep.
const HEADS_PAGE: u32 = 1000;
/// How long JetStream remembers a message id (a republish within it is dropped).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long a JetStream request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest message body published (half the default `max_payload` of 1 MiB): a
/// position whose lines are larger is split over several messages.
const BODY_MAX: usize = 512 * 1024;
/// Consecutive positions share one message while it stays within this: with thousands of
/// followers NATS's cost is per message delivered, so when the publisher falls behind
/// (commits faster than it publishes) its messages grow instead of its lag.
const RUN_MAX: usize = 64 * 1024;

/// An environment's stream, subject and heartbeat subject.
#[must_use]
pub fn feed_names(env: &Env) -> NatsFeed {
    let tenant = token(&env.tenant_id);
    let environment = env.environment.as_str();
    NatsFeed {
        stream: format!("QS_FEED_{tenant}_{environment}"),
        subject: format!("qs.feed.{tenant}.{environment}"),
        heartbeat_subject: format!("qs.beat.{tenant}.{environment}"),
        purged_through: 0,
    }
}

/// A tenant id as one token of a subject and a part of a stream name: as it is when it
/// holds only letters, digits, `_` and `-` (every id the control plane makes), else
/// `x` and its bytes in hex (no two ids share a token).
fn token(id: &str) -> String {
    if !id.is_empty()
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
    {
        return id.to_owned();
    }
    let mut hex = String::with_capacity(id.len().saturating_mul(2).saturating_add(1));
    hex.push('x');
    for byte in id.bytes() {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// The stream of `env`'s feed, created (or its retention brought up to date) as needed.
///
/// # Errors
/// NATS failures.
pub async fn ensure_stream(
    context: &jetstream::Context,
    env: &Env,
    retention: Duration,
) -> Result<stream::Stream, async_nats::Error> {
    let names = feed_names(env);
    let wanted = stream::Config {
        name: names.stream.clone(),
        subjects: vec![names.subject],
        max_age: retention,
        duplicate_window: DUPLICATE_WINDOW,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        ..stream::Config::default()
    };
    let mut stream = context.get_or_create_stream(wanted.clone()).await?;
    if stream.info().await?.config.max_age != retention {
        context.update_stream(wanted).await?;
    }
    Ok(stream)
}

/// Where an environment's stream is: its last sequence and the last feed position it
/// holds completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Published {
    sequence: u64,
    position: i64,
}

/// Why a publication stopped.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Another process published to the stream meanwhile: reload and go on.
    #[error("another process published first")]
    Raced,
    #[error("NATS: {0}")]
    Nats(String),
    #[error("store: {0}")]
    Store(String),
}

fn nats_failure(error: impl std::fmt::Display) -> Failure {
    Failure::Nats(error.to_string())
}

/// The publisher: one per process, a task of its own ([`run`]).
#[derive(Debug)]
struct Publisher {
    state: AppState,
    client: async_nats::Client,
    context: jetstream::Context,
    /// Each environment's stream as this process last knew it.
    published: HashMap<Env, Published>,
    /// Environments with more to publish, in turn (and the same as a set).
    queue: VecDeque<Env>,
    queued: HashSet<Env>,
}

/// Publishes until `stop` turns true. Returns at once where NATS is not configured.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let Some(client) = state.nats().cloned() else {
        return;
    };
    let mut context = jetstream::new(client.clone());
    context.set_timeout(REQUEST_TIMEOUT);
    let mut publisher = Publisher {
        state: state.clone(),
        client,
        context,
        published: HashMap::new(),
        queue: VecDeque::new(),
        queued: HashSet::new(),
    };
    let mut changed = state.subscribe_changes();
    let linger = state.config().nats_linger;
    let mut next_sweep = tokio::time::Instant::now();
    let mut connected = true;
    loop {
        // While NATS is unreachable nothing is tried (one line in the log, not one per
        // environment per second); the sweep after it is back publishes what it missed.
        if publisher.client.connection_state() != async_nats::connection::State::Connected {
            if connected {
                tracing::warn!("NATS is unreachable; the change feed is published once it is back");
                connected = false;
            }
            publisher.published.clear();
            let told = tokio::select! {
                () = tokio::time::sleep(SWEEP) => false,
                () = state.nats_connected().notified() => true,
                _ = stop.changed() => return,
            };
            // The client tells of the connection a moment before its state shows it.
            for _ in 0..CONNECTED_CHECKS {
                if !told
                    || publisher.client.connection_state()
                        == async_nats::connection::State::Connected
                {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(CONNECTED_CHECK) => {}
                    _ = stop.changed() => return,
                }
            }
            continue;
        }
        if !connected {
            tracing::info!("NATS is reachable again; publishing the change feed");
            connected = true;
        }
        if !publisher.queue.is_empty() {
            // Busy (a backlog, a reload, other environments queued): other environments'
            // commits join the queue at once, as they wait their turn anyway.
            for env in state.take_feed_dirty() {
                publisher.enqueue(env);
            }
        }
        if tokio::time::Instant::now() >= next_sweep {
            next_sweep = tokio::time::Instant::now() + SWEEP;
            if let Err(error) = publisher.sweep().await {
                metrics::counter!("quotastack_nats_errors_total").increment(1);
                tracing::warn!(%error, "the NATS feed sweep failed");
            }
        }
        if let Some(env) = publisher.queue.pop_front() {
            publisher.queued.remove(&env);
            match publisher.publish(&env).await {
                Ok(true) => publisher.enqueue(env),
                Ok(false) => {}
                Err(error) => {
                    // The sweep tries again within a second.
                    metrics::counter!("quotastack_nats_errors_total").increment(1);
                    tracing::warn!(%error, tenant = %env.tenant_id, environment = env.environment.as_str(),
                        "publishing the change feed to NATS failed");
                    publisher.published.remove(&env);
                }
            }
            if *stop.borrow() {
                return;
            }
            continue;
        }
        // Caught up: commits gather for `linger` before the next publication, also when
        // they kept coming while this one was published (the change is marked already,
        // so the wait is the linger alone). Taking them at once instead published a
        // message per publication's round trip under a steady load whatever the linger
        // (51-68 a second at 1,000 changes a second, P10), and each message costs the
        // NATS server and every follower the same however few changes it carries.
        tokio::select! {
            _ = changed.changed() => {
                tokio::select! {
                    () = tokio::time::sleep(linger) => {}
                    _ = stop.changed() => return,
                }
            }
            () = tokio::time::sleep_until(next_sweep) => {}
            _ = stop.changed() => return,
        }
        for env in state.take_feed_dirty() {
            publisher.enqueue(env);
        }
    }
}

impl Publisher {
    fn enqueue(&mut self, env: Env) {
        if self.queued.insert(env.clone()) {
            self.queue.push_back(env);
        }
    }

    /// Looks at every environment's head: queues those whose stream is behind, and sends
    /// each its heartbeat.
    async fn sweep(&mut self) -> Result<(), Failure> {
        let now = self.state.real_now();
        let mut after: Option<Env> = None;
        loop {
            let page = self
                .state
                .store()
                .env_heads(after.as_ref(), HEADS_PAGE)
                .await
                .map_err(|error| Failure::Store(error.to_string()))?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = Some(last.env.clone());
            for head in page {
                self.beat(&head, now).await?;
                let behind = match self.published.get(&head.env) {
                    Some(published) => head.head > published.position,
                    None => head.head > 0,
                };
                if behind {
                    self.enqueue(head.env);
                }
            }
        }
    }

    async fn beat(&self, head: &EnvHead, now: ledger::Timestamp) -> Result<(), Failure> {
        let env_now = now
            .checked_add(ledger::Span::from_millis(head.clock_offset_ms))
            .unwrap_or(now);
        let beat = line(
            &SyncRecord::Heartbeat {
                cursor: head.head,
                now: env_now.into(),
            },
            Encoding::Json,
        )
        .map_err(nats_failure)?;
        self.client
            .publish(feed_names(&head.env).heartbeat_subject, beat)
            .await
            .map_err(nats_failure)
    }

    /// The newest position purged from `env`'s feed.
    async fn purged_through(&self, env: &Env) -> Result<i64, Failure> {
        let purged = self.state.store().purged_through(env).await;
        purged.map_err(|error| Failure::Store(error.to_string()))
    }

    /// Where `env`'s stream is (creating it if need be).
    async fn load(&self, env: &Env) -> Result<Published, Failure> {
        let mut stream = ensure_stream(&self.context, env, self.state.config().feed_retention)
            .await
            .map_err(nats_failure)?;
        let info = stream.info().await.map_err(nats_failure)?;
        let sequence = info.state.last_sequence;
        if info.state.messages == 0 {
            // Nothing kept: go on from the oldest change the feed still has.
            let position = self.purged_through(env).await?;
            return Ok(Published { sequence, position });
        }
        let last = stream
            .get_raw_message(sequence)
            .await
            .map_err(nats_failure)?;
        let header = |name: &str| -> Result<Option<i64>, Failure> {
            last.headers
                .get(name)
                .map(|value| {
                    value.as_str().parse::<i64>().map_err(|_| {
                        Failure::Nats(format!("message {sequence} has a bad `{name}` header"))
                    })
                })
                .transpose()
        };
        let position = header(NATS_POSITION)?
            .ok_or_else(|| Failure::Nats(format!("message {sequence} has no position")))?;
        // The last message is part of an unfinished position: publish that position again
        // (followers apply its records twice, which changes nothing).
        let position = if last.headers.get(NATS_MORE).is_some() {
            header(NATS_PREVIOUS)?.unwrap_or(0)
        } else {
            position
        };
        Ok(Published { sequence, position })
    }

    /// Publishes up to a few pages of `env`'s feed; true when more remains.
    async fn publish(&mut self, env: &Env) -> Result<bool, Failure> {
        let mut at = match self.published.get(env) {
            Some(published) => *published,
            None => self.load(env).await?,
        };
        let outcome = self.publish_pages(env, &mut at).await;
        match outcome {
            Err(Failure::Raced) => {
                let reloaded = self.load(env).await?;
                self.published.insert(env.clone(), reloaded);
                Ok(true)
            }
            other => {
                self.published.insert(env.clone(), at);
                other
            }
        }
    }

    async fn publish_pages(&self, env: &Env, at: &mut Published) -> Result<bool, Failure> {
        let names = feed_names(env);
        for _ in 0..PAGES_PER_TURN {
            let read = self
                .state
                .feed_lines(env, at.position, PAGE_LEN, Encoding::Frames)
                .await
                .map_err(|error| Failure::Store(error.to_string()))?;
            let Some(read) = read else {
                return Ok(false);
            };
            // Read after the page: a purge before the read shows here, and a follower
            // behind it must re-snapshot.
            let purged = self.purged_through(env).await?;
            let mut first = true;
            for (from, position, lines) in runs(&read.lines) {
                let previous = if first {
                    at.position.max(purged.min(from.saturating_sub(1)))
                } else {
                    at.position
                };
                first = false;
                self.publish_position(&names, at, position, previous, lines)
                    .await?;
            }
            if read.last > at.position {
                // The read's last positions had nothing to send (an end user no longer
                // stored): an empty message moves followers past them.
                let previous = at.position.max(purged.min(read.last.saturating_sub(1)));
                self.publish_position(&names, at, read.last, previous, &[])
                    .await?;
            }
            if !read.maybe_more {
                // Caught up with the feed as it was read: what was committed since waits
                // for the linger (see `run`), not for another read straight away.
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Publishes a run of positions' lines (`position` is its last), split over several
    /// messages when one position's lines are large (each but the last marked `Qs-More`).
    async fn publish_position(
        &self,
        names: &NatsFeed,
        at: &mut Published,
        position: i64,
        previous: i64,
        lines: &[FeedLine],
    ) -> Result<(), Failure> {
        let mut bodies = bodies(lines);
        let mut previous = previous;
        // Room for the headers under the server's limit on a message.
        let limit = self
            .client
            .server_info()
            .max_payload
            .saturating_sub(8 * 1024);
        if bodies.iter().any(|body| body.len() > limit) {
            // A line NATS cannot carry (an enormous state or catalog): an empty message
            // whose previous position is its own tells every follower behind it to take a
            // new snapshot over HTTP, which carries it.
            metrics::counter!("quotastack_nats_oversize_total").increment(1);
            tracing::warn!(
                position,
                limit,
                "a feed record is larger than NATS's max_payload; followers re-snapshot over HTTP"
            );
            bodies = vec![Bytes::new()];
            previous = position;
        }
        let parts = bodies.len();
        // Names this publication's parts apart from any other's (below).
        let attempt: u64 = if parts > 1 { rand::random() } else { 0 };
        for (part, body) in bodies.into_iter().enumerate() {
            let more = part.saturating_add(1) < parts;
            let id = if at.sequence == 0 && part == 0 {
                // The stream's first message: two processes publishing into a new stream
                // are told apart by this id (NATS 2.9 does not check an expected last
                // sequence of 0), the second answered `duplicate` and reloading.
                "first".to_owned()
            } else if parts == 1 {
                position.to_string()
            } else {
                // A part is named by this publication too. A position published again
                // after a failure part-way through (the stream's last message a part
                // with `Qs-More`), or by another replica racing this one, is read afresh
                // and may split at other boundaries: ids of its position and part
                // number alone would have the stream drop the new parts that share a
                // number with the old ones and keep the rest, and a follower would take
                // the old first parts with the new last ones and miss what lay between.
                // Named so, a part is never taken for another publication's: the
                // expected last sequence orders them (a racing replica's part is
                // refused, and it reloads), and after a failure the new parts all go
                // after the old ones. A follower takes a position's parts from one
                // publication (`NATS_PUBLICATION`) and starts again at a new one's
                // part 0 (applying a record twice changes nothing).
                format!("{position}.{part}.{attempt:016x}")
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(NATS_POSITION, position.to_string().as_str());
            headers.insert(NATS_PREVIOUS, previous.to_string().as_str());
            headers.insert(NATS_ENCODING, protocol::frames::FEED_FRAMES);
            if parts > 1 {
                headers.insert(NATS_PART, part.to_string().as_str());
                headers.insert(NATS_PUBLICATION, format!("{attempt:016x}").as_str());
            }
            if more {
                headers.insert(NATS_MORE, "1");
            }
            let message = PublishMessage::build()
                .payload(body)
                .headers(headers)
                .message_id(id)
                .expected_last_sequence(at.sequence);
            let acked = self
                .context
                .send_publish(names.subject.clone(), message)
                .await
                .map_err(nats_failure)?
                .await;
            let ack = match acked {
                Ok(ack) => ack,
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(Failure::Raced);
                }
                Err(error) => return Err(nats_failure(error)),
            };
            if ack.duplicate && at.sequence == 0 {
                // Another process published the stream's first message.
                return Err(Failure::Raced);
            }
            // A duplicate is this message stored before (a whole position published
            // again after a failure, or an answer that was lost): go on after it. Had the stream moved
            // on, the next publication's expected sequence fails and the stream reloads.
            at.sequence = ack.sequence;
        }
        at.position = position;
        metrics::counter!("quotastack_nats_published_total").increment(1);
        Ok(())
    }
}

/// The lines in runs of whole positions, in order: consecutive positions share a run while
/// its lines stay within `RUN_MAX` bytes (a position larger than that is a run of its
/// own). Each run: its first position, its last, and its lines.
fn runs(lines: &[FeedLine]) -> Vec<(i64, i64, &[FeedLine])> {
    let mut runs = Vec::new();
    let (mut start, mut len, mut bytes) = (0usize, 0usize, 0usize);
    for (_, group) in by_position(lines) {
        let size: usize = group.iter().map(|line| line.bytes.len()).sum();
        if len > 0 && bytes.saturating_add(size) > RUN_MAX {
            runs.push(run_of(lines, start, len));
            start = start.saturating_add(len);
            (len, bytes) = (0, 0);
        }
        len = len.saturating_add(group.len());
        bytes = bytes.saturating_add(size);
    }
    if len > 0 {
        runs.push(run_of(lines, start, len));
    }
    runs
}

fn run_of(lines: &[FeedLine], start: usize, len: usize) -> (i64, i64, &[FeedLine]) {
    let slice = lines
        .get(start..start.saturating_add(len))
        .unwrap_or_default();
    let first = slice.first().map_or(0, |line| line.position);
    let last = slice.last().map_or(0, |line| line.position);
    (first, last, slice)
}

/// The lines grouped by position, in order.
fn by_position(lines: &[FeedLine]) -> Vec<(i64, &[FeedLine])> {
    let mut groups = Vec::new();
    let mut start = 0;
    while let Some(first) = lines.get(start) {
        let len = lines
            .get(start..)
            .unwrap_or_default()
            .iter()
            .take_while(|line| line.position == first.position)
            .count();
        let end = start.saturating_add(len);
        groups.push((first.position, lines.get(start..end).unwrap_or_default()));
        start = end;
    }
    groups
}

/// One position's lines as message bodies of at most `BODY_MAX` bytes (a single line
/// larger than that is a body of its own); at least one body, empty when there are no
/// lines.
fn bodies(lines: &[FeedLine]) -> Vec<Bytes> {
    let mut bodies = Vec::new();
    let mut body: Vec<u8> = Vec::new();
    for line in lines {
        if !body.is_empty() && body.len().saturating_add(line.bytes.len()) > BODY_MAX {
            bodies.push(Bytes::from(std::mem::take(&mut body)));
        }
        body.extend_from_slice(&line.bytes);
    }
    bodies.push(Bytes::from(body));
    bodies
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Environment;

    fn feed_line(position: i64, len: usize) -> FeedLine {
        FeedLine {
            position,
            bytes: Bytes::from(vec![b'x'; len]),
        }
    }

    #[test]
    fn names_are_one_token_per_tenant_and_never_shared() {
        let env = Env::new("ten_01ABC", Environment::Live);
        let names = feed_names(&env);
        assert_eq!(names.stream, "QS_FEED_ten_01ABC_live");
        assert_eq!(names.subject, "qs.feed.ten_01ABC.live");
        assert_eq!(names.heartbeat_subject, "qs.beat.ten_01ABC.live");
        // Ids with characters a subject cannot hold are encoded, not trimmed.
        assert_eq!(token("a.b"), "x612e62");
        assert_ne!(token("a.b"), token("a*b"));
        assert_eq!(token(""), "x");
    }

    #[test]
    fn lines_group_by_position_and_split_only_past_the_body_limit() {
        let lines = [feed_line(3, 10), feed_line(3, 10), feed_line(5, 10)];
        let groups = by_position(&lines);
        assert_eq!(
            groups
                .iter()
                .map(|(position, lines)| (*position, lines.len()))
                .collect::<Vec<_>>(),
            [(3, 2), (5, 1)]
        );
        assert_eq!(bodies(&lines).len(), 1);
        let runs_of = |lines: &[FeedLine]| {
            runs(lines)
                .iter()
                .map(|(from, to, lines)| (*from, *to, lines.len()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            runs_of(&lines),
            [(3, 5, 3)],
            "small positions share a message"
        );
        let big = [
            feed_line(1, RUN_MAX / 2),
            feed_line(2, RUN_MAX / 2),
            feed_line(2, 1),
            feed_line(3, RUN_MAX + 5),
            feed_line(4, 1),
        ];
        assert_eq!(
            runs_of(&big),
            [(1, 1, 1), (2, 2, 2), (3, 3, 1), (4, 4, 1)],
            "a run never splits a position nor passes the limit unless one position does"
        );
        assert_eq!(
            bodies(&[]).len(),
            1,
            "an empty position is one empty message"
        );
        let large = [
            feed_line(7, BODY_MAX - 1),
            feed_line(7, 2),
            feed_line(7, BODY_MAX + 1),
        ];
        let split = bodies(&large);
        assert_eq!(
            split.iter().map(Bytes::len).collect::<Vec<_>>(),
            [BODY_MAX - 1, 2, BODY_MAX + 1]
        );
    }
}
