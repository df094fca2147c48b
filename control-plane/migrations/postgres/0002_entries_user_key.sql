-- An end user's entries are found through a narrow integer key instead of the
-- (tenant_id, environment, end_user_id, seq) text index: a usage batch inserts one index
-- entry per entry at a place set by its end user, so a wide index costs a page per entry
-- (docs/BENCHMARKS.md, P4). user_key is the first 31 bits of
-- SHA-256(tenant_id NUL environment NUL end_user_id), as store::user_key computes it; a
-- query by end user also compares the text columns, so two end users sharing a key cost
-- a few extra rows read, never a wrong answer.
ALTER TABLE entries ADD COLUMN user_key INTEGER;

UPDATE entries SET user_key = (
    (get_byte(digest, 0)::INTEGER << 23) | (get_byte(digest, 1) << 15)
    | (get_byte(digest, 2) << 7) | (get_byte(digest, 3) >> 1)
)
FROM (
    SELECT seq AS keyed_seq,
           sha256(convert_to(tenant_id, 'UTF8') || '\x00'::BYTEA || convert_to(environment, 'UTF8')
                  || '\x00'::BYTEA || convert_to(end_user_id, 'UTF8')) AS digest
    FROM entries
) AS keyed
WHERE entries.seq = keyed.keyed_seq;

ALTER TABLE entries ALTER COLUMN user_key SET NOT NULL;
DROP INDEX entries_user;
CREATE INDEX entries_user_key ON entries(user_key, seq);
