-- QuotaStack's SQLite schema. Every object is scoped by (tenant_id, environment).
-- Engine objects are stored as JSON bodies (the ledger's own serde form); the columns
-- beside them are what queries filter and order by.

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    environment TEXT NOT NULL,
    name TEXT,
    scopes TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX api_keys_env ON api_keys(tenant_id, environment, created_at);

CREATE TABLE environments (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    environment TEXT NOT NULL,
    settings TEXT NOT NULL,
    clock_offset_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, environment)
);

CREATE TABLE catalog (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    kind TEXT NOT NULL,           -- feature | plan | variant
    key TEXT NOT NULL,
    parent_id TEXT,               -- a variant's plan
    body TEXT NOT NULL,
    archived INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    seq INTEGER NOT NULL
);
CREATE UNIQUE INDEX catalog_key ON catalog(tenant_id, environment, kind, COALESCE(parent_id, ''), key);
CREATE INDEX catalog_env ON catalog(tenant_id, environment, kind, seq);

CREATE TABLE end_users (
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT NOT NULL,
    state TEXT NOT NULL,
    version INTEGER NOT NULL,
    next_due_at INTEGER,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, environment, end_user_id)
);
CREATE INDEX end_users_due ON end_users(tenant_id, environment, next_due_at) WHERE next_due_at IS NOT NULL;

CREATE TABLE blocks (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT NOT NULL,
    body TEXT NOT NULL,
    metadata TEXT,
    external_payment_id TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX blocks_user ON blocks(tenant_id, environment, end_user_id);

CREATE TABLE entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT NOT NULL,
    type TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX entries_user ON entries(tenant_id, environment, end_user_id, seq);
CREATE INDEX entries_env ON entries(tenant_id, environment, seq);

CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX subscriptions_user ON subscriptions(tenant_id, environment, end_user_id, id);
CREATE INDEX subscriptions_env ON subscriptions(tenant_id, environment, id);

CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT,
    type TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX events_env ON events(tenant_id, environment, seq);

CREATE TABLE idempotency (
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    status INTEGER,               -- NULL while the first request runs
    body BLOB,
    locked_until INTEGER NOT NULL,
    keep_until INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, environment, key)
);
CREATE INDEX idempotency_keep ON idempotency(keep_until);

CREATE TABLE usage_keys (
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    entry_id TEXT NOT NULL,
    result TEXT NOT NULL,
    keep_until INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, environment, key)
);
CREATE INDEX usage_keys_keep ON usage_keys(keep_until);
