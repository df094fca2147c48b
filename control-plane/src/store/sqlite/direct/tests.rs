//! The writer's checkpoints, on a real file.

use super::*;

/// The direct writer's commits leave the WAL to the checkpointing thread: the data
/// reaches the database file without another commit or connection asking.
#[test]
fn commits_past_the_threshold_are_checkpointed_by_the_thread() {
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("checkpoint.db");
    let path = path.to_str().expect("utf-8 path");
    {
        let setup = Connection::open(path).expect("open");
        let mode: String = setup
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .expect("WAL");
        assert_eq!(mode, "wal");
    }
    let main_file = |path: &str| std::fs::metadata(path).expect("database file").len();
    let before = main_file(path);
    let direct = Direct::open(path, Some(Synchronous::Full), 1).expect("direct");
    direct
        .transaction(|tx| {
            tx.execute_batch(
                "CREATE TABLE t (value BLOB); INSERT INTO t VALUES (zeroblob(100000));",
            )
            .map_err(StoreError::from)?;
            Ok(())
        })
        .expect("commit");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while main_file(path) <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL was not checkpointed into the database file"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(main_file(path) > 100_000);
}

/// The workspace builds SQLite without the options that make every connection
/// take one process-wide lock (`.cargo/config.toml`): usage batches read on one
/// connection while the writer writes on another.
#[test]
fn sqlite_is_built_without_process_wide_locks() {
    let connection = Connection::open_in_memory().expect("open");
    assert_eq!(
        shared_locks(&connection).expect("compile options"),
        Vec::<&str>::new()
    );
}

/// Past twice the mark a commit checkpoints itself (the WAL's bound when the thread
/// cannot leave it copied whole); below it, it only wakes the thread.
#[test]
fn commits_past_twice_the_mark_checkpoint_themselves() {
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("bound.db");
    let path = path.to_str().expect("utf-8 path");
    let connection = connect(path, Some(Synchronous::Full)).expect("open");
    let mode: String = connection
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .expect("WAL");
    assert_eq!(mode, "wal");
    connection.wal_hook(Some(note_wal_pages));
    // A thread that never checkpoints: wakings are taken but nothing is done.
    let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
    let direct = Direct {
        connection: Mutex::new(connection),
        checkpoints: wake,
        checkpoint_pages: 20,
    };
    let main_file = |path: &str| std::fs::metadata(path).expect("database file").len();
    let write = |bytes: u32| {
        direct
            .transaction(|tx| {
                tx.execute_batch(&format!(
                    "CREATE TABLE IF NOT EXISTS t (value BLOB); INSERT INTO t VALUES (zeroblob({bytes}));"
                ))
                .map_err(StoreError::from)?;
                Ok(())
            })
            .expect("commit");
    };
    let before = main_file(path);
    // ~27 pages: past the mark, not twice it. The thread is woken, nothing copied.
    write(100_000);
    assert!(woken.try_recv().is_ok(), "the thread was woken");
    assert_eq!(main_file(path), before, "no checkpoint in the commit");
    // ~52 pages: past twice the mark. Copied before the commit returns.
    write(100_000);
    assert!(main_file(path) > 200_000, "the commit checkpointed");
}
