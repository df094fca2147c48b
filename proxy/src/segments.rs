//! Numbered segment files of an append-only log (`{prefix}-{number:016}.log` in one
//! directory), shared by the lease spend log and the usage log: listing them, naming
//! them, creating the next one durably.

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
/// segment an earlier run wrote, so a torn tail is never followed by good records), and
/// syncs the directory so the new name survives a crash as well as what is written
/// under it.
///
/// # Errors
/// The file cannot be created.
pub fn create(dir: &Path, prefix: &str, number: u64) -> Result<File, DiskError> {
    let path = path(dir, prefix, number);
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|error| io_error("creating", &path, &error))?;
    if let Ok(directory) = File::open(dir) {
        let _ = directory.sync_all();
    }
    Ok(file)
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

/// Syncs `file`, the handle of segment `number` (`fdatasync`), naming the segment when
/// that fails.
///
/// # Errors
/// The handle could not be had, or the disk refused the sync.
pub fn sync(
    dir: &Path,
    prefix: &str,
    number: u64,
    file: std::io::Result<File>,
) -> Result<(), DiskError> {
    file.and_then(|file| file.sync_data())
        .map_err(|error| io_error("syncing", &path(dir, prefix, number), &error))
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
