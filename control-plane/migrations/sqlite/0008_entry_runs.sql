-- An environment's entries are found through the runs of entries its transactions
-- wrote, not through an index of every entry: `entries_env` cost each entry of a usage
-- batch a cell in one more B-tree (~10% of the writer's time a batch, docs/BENCHMARKS.md,
-- P4), where a run costs one row a transaction. The writer numbers a transaction's
-- entries itself, consecutively, so they form one run of seq numbers holding only that
-- environment's entries. A listing of the environment walks its runs newest first.
CREATE TABLE entry_runs (
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, environment, first_seq)
) WITHOUT ROWID;

-- Entries written before: one run per longest stretch of entries (in seq order) of one
-- environment, with no other environment's entry between them.
INSERT INTO entry_runs (tenant_id, environment, first_seq, last_seq)
SELECT tenant_id, environment, MIN(seq), MAX(seq)
  FROM (SELECT seq, tenant_id, environment,
               ROW_NUMBER() OVER (ORDER BY seq)
                 - ROW_NUMBER() OVER (PARTITION BY tenant_id, environment ORDER BY seq) AS stretch
          FROM entries)
 GROUP BY tenant_id, environment, stretch;

DROP INDEX entries_env;
