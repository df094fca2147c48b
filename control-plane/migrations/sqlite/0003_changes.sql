-- The change feed proxies replicate from: one row per committed change of an end user's
-- state or of the environment's catalog and settings, in commit order (the single writer
-- assigns seq as it commits).

CREATE TABLE changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    kind TEXT NOT NULL,           -- end_user | catalog
    end_user_id TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX changes_env ON changes(tenant_id, environment, seq);
CREATE INDEX changes_age ON changes(created_at);

-- Changes up to purged_through were deleted: a follower behind it must re-snapshot.
CREATE TABLE change_watermarks (
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    purged_through INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, environment)
);
