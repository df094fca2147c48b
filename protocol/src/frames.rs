//! The change feed in binary frames: what a follower gets from `/v1/sync/snapshot` and
//! `/v1/sync/stream` where its `Accept` names [`FEED_FRAMES`], and what every message of
//! the NATS feed holds. The same records as the NDJSON lines of [`SyncRecord`], smaller
//! and cheaper to read where it matters: an end user's state.
//!
//! A feed in frames is a run of frames, each a 4-byte little-endian length `n`
//! (1..=[`FRAME_MAX`]) and `n` bytes of [postcard]: either an end user's change (its
//! cursor, id and version, then its `ledger::StateParts` as postcard bytes of their own)
//! or any other record as its JSON. A follower reads the head of an end user's frame
//! without the state, so a version it holds already costs it nothing more
//! ([`EndUserFrame::parts`] decodes the state only when asked).
//!
//! [postcard]: https://docs.rs/postcard

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::SyncRecord;

/// The media type of a feed in frames.
pub const FEED_FRAMES: &str = "application/vnd.quotastack.feed-frames";

/// The largest frame accepted (a corrupt or hostile length is refused, not buffered).
pub const FRAME_MAX: usize = 64 * 1024 * 1024;

const LENGTH_BYTES: usize = 4;

/// A frame that cannot be written or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("feed frame: {0}")]
pub struct FrameError(String);

impl FrameError {
    fn new(message: impl std::fmt::Display) -> FrameError {
        FrameError(message.to_string())
    }
}

/// A frame's body on the wire (variant order is the format: append, never reorder).
#[derive(Serialize, Deserialize)]
enum Wire<'a> {
    /// Any record but an end user's state, as its JSON.
    Json(&'a [u8]),
    EndUser {
        cursor: i64,
        end_user_id: &'a str,
        version: u64,
        /// `ledger::StateParts` in postcard.
        state: &'a [u8],
    },
}

// A frame is moved several times on its way from a message to its applier: it stays
// small (the rare non-end-user record is boxed).
const _: () = assert!(size_of::<Frame>() <= 72);

/// One record read from frames.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// An end user's change; its state decoded on demand.
    EndUser(EndUserFrame),
    /// Any other record (or an end user's change already decoded), boxed: the feed is
    /// mostly end users' frames, and a frame is moved several times on its way.
    Record(Box<SyncRecord>),
}

/// An end user's change as a frame carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndUserFrame {
    pub cursor: i64,
    pub end_user_id: String,
    pub version: u64,
    /// `ledger::StateParts` in postcard (see [`encode_state`]): a slice of the message
    /// it came in where that was one buffer (a NATS message), not a copy. A slice keeps
    /// its whole buffer alive: copy it before keeping it for long.
    pub state: Bytes,
}

impl EndUserFrame {
    /// The state.
    ///
    /// # Errors
    /// Bytes that are not a state.
    pub fn parts(&self) -> Result<ledger::StateParts, FrameError> {
        postcard::from_bytes(&self.state).map_err(|error| {
            FrameError::new(format!("the state of `{}`: {error}", self.end_user_id))
        })
    }
}

impl Frame {
    /// The feed position the record brings a follower to, if it carries one.
    #[must_use]
    pub fn cursor(&self) -> Option<i64> {
        match self {
            Frame::EndUser(frame) => Some(frame.cursor),
            Frame::Record(record) => record.cursor(),
        }
    }

    /// The record, its state decoded.
    ///
    /// # Errors
    /// A state that does not decode.
    pub fn into_record(self) -> Result<SyncRecord, FrameError> {
        match self {
            Frame::Record(record) => Ok(*record),
            Frame::EndUser(frame) => Ok(SyncRecord::EndUser {
                state: frame.parts()?,
                cursor: frame.cursor,
                end_user_id: frame.end_user_id,
                version: frame.version,
            }),
        }
    }
}

impl From<SyncRecord> for Frame {
    fn from(record: SyncRecord) -> Frame {
        Frame::Record(Box::new(record))
    }
}

/// An end user's state as frames carry it.
///
/// # Errors
/// A state serde cannot write (none the engine makes).
pub fn encode_state(parts: &ledger::StateParts) -> Result<Vec<u8>, FrameError> {
    postcard::to_allocvec(parts).map_err(FrameError::new)
}

fn frame(wire: &Wire<'_>) -> Result<Vec<u8>, FrameError> {
    let out = postcard::to_extend(wire, vec![0; LENGTH_BYTES]).map_err(FrameError::new)?;
    let length = out.len().saturating_sub(LENGTH_BYTES);
    if length > FRAME_MAX {
        return Err(FrameError::new(format!(
            "{length} bytes, over the {FRAME_MAX} a frame may hold"
        )));
    }
    let prefix = u32::try_from(length)
        .map_err(FrameError::new)?
        .to_le_bytes();
    let mut out = out;
    out[..LENGTH_BYTES].copy_from_slice(&prefix);
    Ok(out)
}

/// An end user's change as one frame, its state already encoded ([`encode_state`]).
///
/// # Errors
/// A frame over [`FRAME_MAX`].
pub fn end_user_frame(
    cursor: i64,
    end_user_id: &str,
    version: u64,
    state: &[u8],
) -> Result<Vec<u8>, FrameError> {
    frame(&Wire::EndUser {
        cursor,
        end_user_id,
        version,
        state,
    })
}

/// Any record as one frame (an end user's state in postcard, anything else as JSON).
///
/// # Errors
/// A frame over [`FRAME_MAX`].
pub fn record_frame(record: &SyncRecord) -> Result<Vec<u8>, FrameError> {
    match record {
        SyncRecord::EndUser {
            cursor,
            end_user_id,
            version,
            state,
        } => end_user_frame(*cursor, end_user_id, *version, &encode_state(state)?),
        other => frame(&Wire::Json(
            &serde_json::to_vec(other).map_err(FrameError::new)?,
        )),
    }
}

/// Splits bytes as they arrive into frames.
#[derive(Debug, Default)]
pub struct FrameReader {
    buffer: Vec<u8>,
    /// Where the next frame starts in `buffer` (what came before is read).
    start: usize,
}

impl FrameReader {
    #[must_use]
    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    /// Adds bytes received.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buffer.len() / 2 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Whether no part of a frame is waiting for the rest.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.start >= self.buffer.len()
    }

    /// The next whole frame, or `None` until more bytes arrive.
    ///
    /// # Errors
    /// A length of 0 or over [`FRAME_MAX`], or a frame that does not decode: the bytes
    /// are not a feed in frames (or were corrupted), so nothing after can be trusted.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let rest = self.buffer.get(self.start..).unwrap_or_default();
        let Some((body, taken)) = split_frame(rest)? else {
            return Ok(None);
        };
        let frame = decode(body, Bytes::copy_from_slice)?;
        self.start = self.start.saturating_add(taken);
        Ok(Some(frame))
    }
}

/// The body of the whole frame `bytes` start with and how many bytes it takes, or `None`
/// while it is incomplete.
fn split_frame(bytes: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some((prefix, body)) = bytes.split_first_chunk::<LENGTH_BYTES>() else {
        return Ok(None);
    };
    let length = usize::try_from(u32::from_le_bytes(*prefix)).map_err(FrameError::new)?;
    if length == 0 || length > FRAME_MAX {
        return Err(FrameError::new(format!(
            "a length of {length} bytes (1..={FRAME_MAX} expected)"
        )));
    }
    Ok(body
        .get(..length)
        .map(|body| (body, LENGTH_BYTES.saturating_add(length))))
}

/// `state_of` turns an end user's state, a slice of `body`, into the bytes the frame
/// keeps.
fn decode(body: &[u8], state_of: impl FnOnce(&[u8]) -> Bytes) -> Result<Frame, FrameError> {
    let (wire, rest) = postcard::take_from_bytes::<Wire<'_>>(body).map_err(FrameError::new)?;
    if !rest.is_empty() {
        return Err(FrameError::new(format!(
            "{} bytes after the record",
            rest.len()
        )));
    }
    Ok(match wire {
        Wire::Json(json) => Frame::Record(Box::new(
            serde_json::from_slice(json)
                .map_err(|error| FrameError::new(format!("a record: {error}")))?,
        )),
        Wire::EndUser {
            cursor,
            end_user_id,
            version,
            state,
        } => Frame::EndUser(EndUserFrame {
            cursor,
            end_user_id: end_user_id.to_owned(),
            version,
            state: state_of(state),
        }),
    })
}

/// Every frame of `bytes` (a NATS message, a whole body), which must end with a whole one.
///
/// # Errors
/// As [`FrameReader::next_frame`], and a frame cut short.
pub fn frames(bytes: &Bytes) -> Result<Vec<Frame>, FrameError> {
    let mut out = Vec::new();
    each_frame(bytes, |frame| out.push(frame))?;
    Ok(out)
}

/// Hands each frame of `bytes` to `take` in order, as [`frames`] returns them, without
/// gathering them first. On an error, the frames before it have been handed over.
///
/// # Errors
/// As [`frames`].
pub fn each_frame(bytes: &Bytes, mut take: impl FnMut(Frame)) -> Result<(), FrameError> {
    let mut rest: &[u8] = bytes;
    while !rest.is_empty() {
        let (body, taken) =
            split_frame(rest)?.ok_or_else(|| FrameError::new("the last frame is cut short"))?;
        take(decode(body, |state| bytes.slice_ref(state))?);
        rest = rest.get(taken..).unwrap_or_default();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WireTime;

    fn state() -> ledger::StateParts {
        let catalog = ledger::Catalog::default();
        let now = ledger::Timestamp::from_millis(1_700_000_000_000);
        let end_user = ledger::EndUserId::new("user_1").expect("id");
        let mut user = ledger::EndUserState::new(end_user, now);
        let mut ids = ledger::SequentialIds::default();
        let mut cx = ledger::Cx {
            now,
            catalog: &catalog,
            ids: &mut ids,
        };
        user.grant(
            &mut cx,
            ledger::GrantRequest::new(ledger::Credits::new(500)),
        )
        .expect("grant");
        user.into_parts()
    }

    fn records() -> Vec<SyncRecord> {
        vec![
            SyncRecord::Header {
                cursor: 4,
                clock_offset_ms: -5,
                now: WireTime(ledger::Timestamp::from_millis(9)),
            },
            SyncRecord::EndUser {
                cursor: 4,
                end_user_id: "user_1".into(),
                version: 3,
                state: state(),
            },
            SyncRecord::Heartbeat {
                cursor: 5,
                now: WireTime(ledger::Timestamp::from_millis(10)),
            },
            SyncRecord::End { end_users: 1 },
        ]
    }

    #[test]
    fn every_record_reads_back_as_written() {
        let mut bytes = Vec::new();
        for record in records() {
            bytes.extend(record_frame(&record).expect("frame"));
        }
        let read: Vec<SyncRecord> = frames(&bytes.into())
            .expect("frames")
            .into_iter()
            .map(|frame| frame.into_record().expect("record"))
            .collect();
        assert_eq!(read, records());
    }

    #[test]
    fn an_end_user_s_head_reads_without_its_state() {
        let bytes = record_frame(&records()[1]).expect("frame");
        let read: [Frame; 1] = frames(&bytes.into())
            .expect("frames")
            .try_into()
            .expect("one");
        let [Frame::EndUser(frame)] = read else {
            panic!("not an end user's frame");
        };
        assert_eq!(
            (frame.cursor, frame.end_user_id.as_str(), frame.version),
            (4, "user_1", 3)
        );
        assert_eq!(frame.parts().expect("state"), state());
    }

    #[test]
    fn frames_arriving_a_byte_at_a_time_are_whole_once_their_last_byte_is_in() {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for record in records() {
            bytes.extend(record_frame(&record).expect("frame"));
            ends.push(bytes.len());
        }
        let mut reader = FrameReader::new();
        let mut read = Vec::new();
        for (index, byte) in bytes.iter().enumerate() {
            reader.push(std::slice::from_ref(byte));
            let frame = reader.next_frame().expect("frame");
            assert_eq!(
                frame.is_some(),
                ends.contains(&(index + 1)),
                "at byte {index}"
            );
            read.extend(frame);
        }
        assert!(reader.is_empty());
        assert_eq!(read.len(), records().len());
    }

    #[test]
    fn a_bad_length_or_body_is_an_error_not_a_wait() {
        let mut reader = FrameReader::new();
        reader.push(&0u32.to_le_bytes());
        assert!(reader.next_frame().is_err());

        let mut reader = FrameReader::new();
        reader.push(&u32::MAX.to_le_bytes());
        assert!(reader.next_frame().is_err());

        let mut reader = FrameReader::new();
        reader.push(&3u32.to_le_bytes());
        reader.push(&[9, 9, 9]);
        assert!(reader.next_frame().is_err());

        let cut = record_frame(&records()[1]).expect("frame");
        assert!(frames(&Bytes::copy_from_slice(&cut[..cut.len() - 1])).is_err());
    }

    #[test]
    fn a_frame_is_smaller_than_its_json_line() {
        let record = &records()[1];
        let json = serde_json::to_vec(record).expect("json").len();
        let frame = record_frame(record).expect("frame").len();
        assert!(frame * 2 < json, "{frame} bytes framed, {json} as JSON");
    }
}
