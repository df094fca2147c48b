-- The console's reads (docs/console.md): end users by recent activity (the list walks
-- this index newest first and stops at a page; a prefix search filters as it walks), an
-- end user's own events, an environment's webhook deliveries newest first, and each
-- delivery's last attempt. Each costs a write one more index cell: an end user's row is
-- written once a transaction, an event, a delivery and an attempt once each.
CREATE INDEX end_users_recent ON end_users(tenant_id, environment, updated_at, end_user_id);
CREATE INDEX events_end_user ON events(tenant_id, environment, end_user_id, seq) WHERE end_user_id IS NOT NULL;
CREATE INDEX webhook_deliveries_env ON webhook_deliveries(tenant_id, environment, id);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts(delivery_id, attempt);
