-- An end user's entries are found through a chain instead of an index: each entry names
-- the same end user's previous entry (prev_seq) and the end user's row names the newest
-- (last_entry_seq). Any index keyed by end user puts each of a usage batch's entries at
-- a place set by its end user, so a batch of 500 dirtied ~500 scattered index pages, every
-- one written whole to the WAL: a third of what a batch's rows cost SQLite, growing with
-- the table (docs/BENCHMARKS.md, P4, fifth look). The chain is written only at the
-- table's end. Listing an end user's entries walks it newest first; a filtered listing
-- reads the end user's entries one by one, as it did through the index (which held
-- neither type nor time).
--
-- The chains of existing entries are built here, with the help of a temporary index.
-- user_key (migration 0004) is no longer written or read by this store.
ALTER TABLE entries ADD COLUMN prev_seq INTEGER;
ALTER TABLE end_users ADD COLUMN last_entry_seq INTEGER;
CREATE INDEX entries_chain_fill ON entries(tenant_id, environment, end_user_id, seq);
UPDATE entries SET prev_seq = (
    SELECT MAX(p.seq) FROM entries AS p
    WHERE p.tenant_id = entries.tenant_id AND p.environment = entries.environment
      AND p.end_user_id = entries.end_user_id AND p.seq < entries.seq
);
UPDATE end_users SET last_entry_seq = (
    SELECT MAX(e.seq) FROM entries AS e
    WHERE e.tenant_id = end_users.tenant_id AND e.environment = end_users.environment
      AND e.end_user_id = end_users.end_user_id
);
DROP INDEX entries_chain_fill;
DROP INDEX entries_user_key;
