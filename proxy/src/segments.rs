//! Numbered segment files of an append-only log (`{prefix}-{number:016}.log` in one
//! directory), shared by the lease spend log and the usage log: listing them, naming
//! them, creating the next one, syncing what was written.
//!
//! Nothing here syncs on an append's path: a log that moves on to a new segment keeps
//! the closed one's handle ([`Unsynced`]), and its next [`sync`] makes the closed
//! segments, the new names in the directory and the current segment durable, in that
//! order, before it returns.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::disk::DiskError;

/// The path of segment `number`.
pub fn path(dir: &Path, prefix: &str, number: u64) -> PathBuf {
    dir.join(format!("{prefix}-{number:016}.log"))
}

/// A failure to `what` (reading, creating, …) the file at `path`.
pub fn io_error(what: &str, path: &Path, error: &std::io::Error) -> DiskError {
    DiskError::new(format!("{what} {}: {error}", path.display()))
}

/// The numbers of the segments in `dir` (created if missing), ascending.
///
/// # Errors
/// The directory cannot be created or read.
pub fn list(dir: &Path, prefix: &str) -> Result<Vec<u64>, DiskError> {
    std::fs::create_dir_all(dir).map_err(|error| io_error("creating", dir, &error))?;
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|error| io_error("reading", dir, &error))? {
        let entry = entry.map_err(|error| io_error("reading", dir, &error))?;
        let name = entry.file_name();
        let number = name
            .to_str()
            .and_then(|name| name.strip_prefix(prefix))
            .and_then(|name| name.strip_prefix('-'))
            .and_then(|name| name.strip_suffix(".log"))
            .and_then(|digits| digits.parse::<u64>().ok());
        if let Some(number) = number {
            numbers.push(number);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Reads segment `number` whole.
///
/// # Errors
/// The file cannot be read.
pub fn read(dir: &Path, prefix: &str, number: u64) -> Result<Vec<u8>, DiskError> {
    let path = path(dir, prefix, number);
    std::fs::read(&path).map_err(|error| io_error("reading", &path, &error))
}

/// Creates segment `number` for appending (it must not exist: a run never appends to a
/// segment an earlier run wrote, so a torn tail is never followed by good records). Its
/// name is durable after the log's next [`sync`] (note it with [`Unsynced::created`]).
///
/// # Errors
/// The file cannot be created.
pub fn create(dir: &Path, prefix: &str, number: u64) -> Result<File, DiskError> {
    let path = path(dir, prefix, number);
    OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|error| io_error("creating", &path, &error))
}

/// What a log's next [`sync`] must make durable besides its current segment: the
/// segments it closed with appends not yet synced (their handles), and whether it
/// created segments whose names the directory has not made durable.
#[derive(Debug, Default)]
pub struct Unsynced {
    closed: Vec<(u64, File)>,
    names: bool,
}

impl Unsynced {
    /// Segment `number`, open as `file`, was closed with appends that must survive.
    pub fn closed(&mut self, number: u64, file: File) {
        self.closed.push((number, file));
    }

    /// A segment was created.
    pub fn created(&mut self) {
        self.names = true;
    }

    /// Segment `number` was deleted: nothing in it needs syncing any more.
    pub fn forget(&mut self, number: u64) {
        self.closed.retain(|(closed, _)| *closed != number);
    }

    /// Takes back what a failed sync did not make durable (before anything noted since).
    fn put_back(&mut self, mut failed: Unsynced) {
        failed.closed.append(&mut self.closed);
        self.closed = failed.closed;
        self.names |= failed.names;
    }
}

/// The state of a log that [`sync`] needs: what is unsynced, and the segment appends go
/// to.
pub trait Synced {
    fn unsynced(&mut self) -> &mut Unsynced;
    /// The current segment's number and file.
    fn current(&self) -> (u64, &File);
}

/// Makes every append to a log so far durable. `syncing` serializes the log's syncs (a
/// second must not return before the segments the first took are synced); `inner` is
/// the log's state, locked only to take what is unsynced (and a handle to the current
/// segment) and to put back what a failed sync left.
///
/// # Errors
/// The disk refused a sync (everything unsynced stays noted for the next one).
pub fn sync<I: Synced>(
    dir: &Path,
    prefix: &str,
    syncing: &std::sync::Mutex<()>,
    inner: &std::sync::Mutex<I>,
) -> Result<(), DiskError> {
    let _one_at_a_time = syncing
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let lock = || {
        inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let (pending, number, file) = {
        let mut inner = lock();
        let pending = std::mem::take(inner.unsynced());
        let (number, file) = inner.current();
        (pending, number, file.try_clone())
    };
    let synced = sync_taken(dir, prefix, &pending, number, file);
    if synced.is_err() {
        lock().unsynced().put_back(pending);
    }
    synced
}

fn sync_taken(
    dir: &Path,
    prefix: &str,
    pending: &Unsynced,
    number: u64,
    file: std::io::Result<File>,
) -> Result<(), DiskError> {
    for (closed, handle) in &pending.closed {
        handle
            .sync_data()
            .map_err(|error| io_error("syncing", &path(dir, prefix, *closed), &error))?;
    }
    if pending.names {
        // A file system that cannot sync a directory (some network ones) is not an
        // error here, as it never was; the segments' contents still are synced.
        if let Ok(directory) = File::open(dir) {
            let _ = directory.sync_all();
        }
    }
    file.and_then(|file| file.sync_data())
        .map_err(|error| io_error("syncing", &path(dir, prefix, number), &error))
}

/// Deletes segment `number`; one already gone counts as deleted.
///
/// # Errors
/// The file exists and cannot be deleted.
pub fn remove(dir: &Path, prefix: &str, number: u64) -> Result<(), DiskError> {
    let path = path(dir, prefix, number);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(io_error("deleting", &path, &error)),
    }
}

/// Appends `bytes` to segment `number` (open as `file`, `length` bytes long before).
/// A failed write is cut off (whatever part of it went in); when even that fails,
/// `broken` is set: the caller must not append to this segment again.
///
/// # Errors
/// The disk refused the write (the segment is as it was, or `broken`).
pub fn append(
    dir: &Path,
    prefix: &str,
    number: u64,
    file: &mut File,
    length: u64,
    bytes: &[u8],
    broken: &mut bool,
) -> Result<(), DiskError> {
    use std::io::Write;
    file.write_all(bytes).map_err(|error| {
        if file.set_len(length).is_err() {
            *broken = true;
        }
        io_error("appending to", &path(dir, prefix, number), &error)
    })
}

/// The segment files in `dir`, oldest first (for tests).
#[cfg(test)]
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    struct Log(Unsynced, File);

    impl Synced for Log {
        fn unsynced(&mut self) -> &mut Unsynced {
            &mut self.0
        }

        fn current(&self) -> (u64, &File) {
            (2, &self.1)
        }
    }

    fn numbers(unsynced: &Unsynced) -> Vec<u64> {
        unsynced.closed.iter().map(|(number, _)| *number).collect()
    }

    #[test]
    fn what_a_failed_sync_took_goes_back_before_what_came_since() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Unsynced::default();
        for number in 1..=3 {
            log.closed(number, create(dir.path(), "t", number).unwrap());
        }
        log.created();
        log.forget(2);
        assert_eq!(numbers(&log), [1, 3], "a deleted segment needs no sync");
        let taken = std::mem::take(&mut log);
        assert!(
            !log.names && log.closed.is_empty(),
            "taking leaves nothing behind"
        );
        log.closed(4, create(dir.path(), "t", 4).unwrap());
        log.put_back(taken);
        assert_eq!(numbers(&log), [1, 3, 4]);
        assert!(log.names);
    }

    #[test]
    fn a_sync_makes_closed_segments_and_the_current_one_durable_and_empties_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let current = create(dir.path(), "t", 2).unwrap();
        let inner = std::sync::Mutex::new(Log(Unsynced::default(), current));
        {
            let mut guard = inner.lock().unwrap();
            guard.0.closed(1, create(dir.path(), "t", 1).unwrap());
            guard.0.created();
        }
        let syncing = std::sync::Mutex::new(());
        sync(dir.path(), "t", &syncing, &inner).unwrap();
        let guard = inner.lock().unwrap();
        assert!(guard.0.closed.is_empty() && !guard.0.names);
    }
}
