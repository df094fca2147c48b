-- Webhook endpoints and deliveries (SPEC 11). A delivery row is made for every matching
-- endpoint in the same transaction as its event, so no event is ever missed.

CREATE TABLE webhook_endpoints (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    url TEXT NOT NULL,
    event_types TEXT,             -- JSON array; NULL delivers every type
    secret TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    deleted_at INTEGER
);
CREATE INDEX webhook_endpoints_env ON webhook_endpoints(tenant_id, environment) WHERE deleted_at IS NULL;

CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_seq INTEGER NOT NULL,
    end_user_id TEXT,
    status TEXT NOT NULL,         -- pending | succeeded | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    locked_until INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(tenant_id, environment, status, next_attempt_at);
CREATE INDEX webhook_deliveries_order ON webhook_deliveries(endpoint_id, end_user_id, status, event_seq);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries(event_id);

CREATE TABLE webhook_attempts (
    delivery_id INTEGER NOT NULL,
    endpoint_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,         -- succeeded | failed (this attempt)
    response_status INTEGER,
    error TEXT,
    at INTEGER NOT NULL
);
CREATE INDEX webhook_attempts_event ON webhook_attempts(event_id, at);
