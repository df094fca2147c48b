-- Entries lose the unique index on their id: nothing looks an entry up by id (the API
-- lists entries by end user and by environment, migrations 0005 and 0008), ids are
-- ULIDs with 80 random bits, and the index cost each entry of a usage batch a cell in
-- one more B-tree (docs/BENCHMARKS.md, P4). SQLite cannot drop a column's UNIQUE, so
-- the table is rebuilt: every entry is copied once (on a large database the first
-- start after upgrading takes a while) and AUTOINCREMENT's record is carried over.
CREATE TABLE entries_rebuilt (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT NOT NULL,
    type TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    body TEXT NOT NULL,
    user_key INTEGER,
    prev_seq INTEGER
);

INSERT INTO entries_rebuilt (seq, id, tenant_id, environment, end_user_id, type, created_at, body, user_key, prev_seq)
SELECT seq, id, tenant_id, environment, end_user_id, type, created_at, body, user_key, prev_seq
  FROM entries ORDER BY seq;

-- The highest number ever given, deleted or rolled-back entries' included.
INSERT INTO sqlite_sequence (name, seq)
SELECT 'entries_carried', MAX(seq) FROM sqlite_sequence WHERE name IN ('entries', 'entries_rebuilt');

DROP TABLE entries;
ALTER TABLE entries_rebuilt RENAME TO entries;

DELETE FROM sqlite_sequence WHERE name = 'entries';
UPDATE sqlite_sequence SET name = 'entries' WHERE name = 'entries_carried';
