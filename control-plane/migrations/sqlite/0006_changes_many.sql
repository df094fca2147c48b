-- A transaction that changes several end users appends one row to the change feed naming
-- them all (kind 'end_users', end_user_ids a JSON array of their ids) instead of a row
-- each: a usage batch of 500 events over 500 end users wrote 500 feed rows and their
-- index cells, a sixth of what its rows cost SQLite (docs/BENCHMARKS.md, P4). A
-- transaction changing one end user still writes a row of kind 'end_user'. Readers take
-- both forms, and rows written before this migration.
ALTER TABLE changes ADD COLUMN end_user_ids TEXT;
