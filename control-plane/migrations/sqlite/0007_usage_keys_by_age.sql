-- Usage event keys are purged oldest first by rowid instead of through an index on
-- keep_until: the index cost each event of a usage batch a cell in one more B-tree (~5%
-- of the writer's time a batch, docs/BENCHMARKS.md, P4). Keys are appended in the order
-- they are recorded and keep_until is the real clock at recording plus the retention,
-- so the oldest rows expire first; the purge deletes expired rows up to the first one
-- still kept (see SqliteStore::purge_expired).
DROP INDEX IF EXISTS usage_keys_keep;
