-- QuotaStack's PostgreSQL schema: the tables of migrations/sqlite/0001-0003 in one file,
-- in PostgreSQL types. Every object is scoped by (tenant_id, environment).
--
-- Conventions:
-- - times are UTC milliseconds (BIGINT), as in SQLite;
-- - every number is BIGINT, so the store binds and reads i64 everywhere (sqlx refuses to
--   read an INTEGER column as i64);
-- - engine objects and requests are JSON bodies in TEXT (the ledger's own serde form,
--   kept byte for byte); the columns beside them are what queries filter and order by;
-- - ids and keys that queries order or page by are COLLATE "C": byte order, as SQLite
--   compares text, whatever the database's default collation.

CREATE TABLE tenants (
    id TEXT COLLATE "C" PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant_id TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
    environment TEXT NOT NULL,
    name TEXT,
    scopes TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX api_keys_env ON api_keys(tenant_id, environment, created_at);

CREATE TABLE environments (
    tenant_id TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
    environment TEXT NOT NULL,
    settings TEXT NOT NULL,
    clock_offset_ms BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, environment)
);

-- seq: insertion order, which is the order catalog lists answer in.
CREATE TABLE catalog (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    kind TEXT NOT NULL,           -- feature | plan | variant
    key TEXT COLLATE "C" NOT NULL,
    parent_id TEXT COLLATE "C",   -- a variant's plan
    body TEXT NOT NULL,
    archived BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    seq BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE UNIQUE INDEX catalog_key ON catalog(tenant_id, environment, kind, COALESCE(parent_id, ''), key);
CREATE INDEX catalog_env ON catalog(tenant_id, environment, kind, seq);

-- state is NULL only in the placeholder row a mutation inserts to have a row to lock for
-- an end user it has never seen; the same transaction writes the state before it commits
-- (or rolls the placeholder back), so no committed row has a NULL state.
CREATE TABLE end_users (
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT COLLATE "C" NOT NULL,
    state TEXT,
    version BIGINT NOT NULL,
    next_due_at BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, environment, end_user_id)
);
CREATE INDEX end_users_due ON end_users(tenant_id, environment, next_due_at) WHERE next_due_at IS NOT NULL;

CREATE TABLE blocks (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT COLLATE "C" NOT NULL,
    body TEXT NOT NULL,
    metadata TEXT,
    external_payment_id TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX blocks_user ON blocks(tenant_id, environment, end_user_id);

-- Entries are read newest first by seq. One end user's entries are written under that end
-- user's row lock, so their seq order is their commit order; across end users the ledger
-- listing is a history, not a feed, and needs no more.
CREATE TABLE entries (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT COLLATE "C" NOT NULL UNIQUE,
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT COLLATE "C" NOT NULL,
    type TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX entries_user ON entries(tenant_id, environment, end_user_id, seq);
CREATE INDEX entries_env ON entries(tenant_id, environment, seq);

CREATE TABLE reservations (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT COLLATE "C" NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE subscriptions (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT COLLATE "C" NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX subscriptions_user ON subscriptions(tenant_id, environment, end_user_id, id);
CREATE INDEX subscriptions_env ON subscriptions(tenant_id, environment, id);

-- The positions of each environment's event log and change feed. A transaction appending
-- to either takes its environment's row (an upsert that adds to the counters) as its
-- last step before commit and numbers its rows from it, so within an environment seq
-- order is commit order and a reader by cursor never skips (see store/postgres.rs).
CREATE TABLE feed_heads (
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    last_event_seq BIGINT NOT NULL DEFAULT 0,
    last_change_seq BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, environment)
);

-- seq: the position in the environment's log, from feed_heads.
CREATE TABLE events (
    seq BIGINT NOT NULL,
    id TEXT COLLATE "C" NOT NULL UNIQUE,
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT COLLATE "C",
    type TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (tenant_id, environment, seq)
);

CREATE TABLE idempotency (
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    fingerprint BYTEA NOT NULL,
    status BIGINT,                -- NULL while the first request runs
    body BYTEA,
    locked_until BIGINT NOT NULL,
    keep_until BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, environment, key)
);
CREATE INDEX idempotency_keep ON idempotency(keep_until);

CREATE TABLE usage_keys (
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    fingerprint BYTEA NOT NULL,
    entry_id TEXT NOT NULL,
    result TEXT NOT NULL,
    keep_until BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, environment, key)
);
CREATE INDEX usage_keys_keep ON usage_keys(keep_until);

-- Webhook endpoints and deliveries (SPEC 11). A delivery row is made for every matching
-- endpoint in the same transaction as its event, so no event is ever missed.

CREATE TABLE webhook_endpoints (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    url TEXT NOT NULL,
    event_types TEXT,             -- JSON array; NULL delivers every type
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX webhook_endpoints_env ON webhook_endpoints(tenant_id, environment) WHERE deleted_at IS NULL;

CREATE TABLE webhook_deliveries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    endpoint_id TEXT COLLATE "C" NOT NULL,
    event_id TEXT COLLATE "C" NOT NULL,
    event_seq BIGINT NOT NULL,
    end_user_id TEXT COLLATE "C",
    status TEXT NOT NULL,         -- pending | succeeded | failed
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    locked_until BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(tenant_id, environment, next_attempt_at) WHERE status = 'pending';
-- The ordering rule's lookup (an earlier pending delivery of the same endpoint and end
-- user). End user ids are never empty, so COALESCE(end_user_id, '') equals another
-- exactly when the ids are NOT DISTINCT, and unlike IS NOT DISTINCT FROM it can use this
-- index.
CREATE INDEX webhook_deliveries_order ON webhook_deliveries(endpoint_id, (COALESCE(end_user_id, '')), event_seq, id) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_event ON webhook_deliveries(event_id);

CREATE TABLE webhook_attempts (
    delivery_id BIGINT NOT NULL,
    endpoint_id TEXT COLLATE "C" NOT NULL,
    event_id TEXT COLLATE "C" NOT NULL,
    attempt BIGINT NOT NULL,
    status TEXT NOT NULL,         -- succeeded | failed (this attempt)
    response_status BIGINT,
    error TEXT,
    at BIGINT NOT NULL
);
CREATE INDEX webhook_attempts_event ON webhook_attempts(event_id, at);

-- The change feed proxies replicate from: one row per committed change of an end user's
-- state or of the environment's catalog and settings. seq is the position in the
-- environment's feed, from feed_heads, in commit order.
CREATE TABLE changes (
    seq BIGINT NOT NULL,
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    kind TEXT NOT NULL,           -- end_user | catalog
    end_user_id TEXT COLLATE "C",
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, environment, seq)
);
CREATE INDEX changes_age ON changes(created_at);

-- Changes up to purged_through were deleted: a follower behind it must re-snapshot.
CREATE TABLE change_watermarks (
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    purged_through BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, environment)
);
