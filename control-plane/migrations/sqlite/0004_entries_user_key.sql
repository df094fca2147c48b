-- An end user's entries are found through a narrow integer key instead of the
-- (tenant_id, environment, end_user_id, seq) text index: a usage batch inserts one index
-- cell per entry at a place set by its end user, so every entry dirtied its own page of a
-- wide index and a batch of 500 wrote ~700 WAL pages for it alone (docs/BENCHMARKS.md,
-- P4). user_key is the first 31 bits of SHA-256(tenant_id NUL environment NUL
-- end_user_id) (store::user_key); a query by end user also compares the text columns, so
-- two end users sharing a key only cost a few extra rows read. The index holds the rowid
-- (seq) after the key, so an end user's entries come out in seq order.
--
-- Rows written before this migration get their key when the store opens (it cannot be
-- computed in SQL).
ALTER TABLE entries ADD COLUMN user_key INTEGER;
DROP INDEX entries_user;
CREATE INDEX entries_user_key ON entries(user_key);
