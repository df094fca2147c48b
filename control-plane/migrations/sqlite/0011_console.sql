-- The console's reads (docs/console.md).
--
-- End users by recent activity, to the minute, in a table of their own kept by triggers:
-- a row changes only when an end user's `updated_at` enters a new minute, and the
-- trigger's condition is all that runs otherwise. An index on `end_users` itself
-- (`updated_at`, or a column derived from it) cost PostgreSQL's usage ingestion a third
-- to a half of its throughput (P4, docs/BENCHMARKS.md, "Console"): every write of an end
-- user then wrote that index too.
--
-- Then an end user's own events, an environment's webhook deliveries newest first, and
-- each delivery's last attempt: each costs a write one more index cell (an event, a
-- delivery and an attempt are written once each).
--
-- The triggers upsert rather than `INSERT OR REPLACE`: an outer statement's conflict
-- policy (the writers' own upsert of `end_users`) would override a trigger's `OR`.
CREATE TABLE end_user_activity (
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT NOT NULL,
    active_minute INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, environment, end_user_id)
) WITHOUT ROWID;
CREATE INDEX end_user_activity_recent ON end_user_activity(tenant_id, environment, active_minute, end_user_id);

CREATE TRIGGER end_users_activity_insert AFTER INSERT ON end_users
BEGIN
    INSERT INTO end_user_activity (tenant_id, environment, end_user_id, active_minute)
    VALUES (NEW.tenant_id, NEW.environment, NEW.end_user_id, NEW.updated_at / 60000)
    ON CONFLICT (tenant_id, environment, end_user_id) DO UPDATE SET active_minute = excluded.active_minute;
END;
CREATE TRIGGER end_users_activity_update AFTER UPDATE OF updated_at ON end_users
    WHEN NEW.updated_at / 60000 <> OLD.updated_at / 60000
BEGIN
    INSERT INTO end_user_activity (tenant_id, environment, end_user_id, active_minute)
    VALUES (NEW.tenant_id, NEW.environment, NEW.end_user_id, NEW.updated_at / 60000)
    ON CONFLICT (tenant_id, environment, end_user_id) DO UPDATE SET active_minute = excluded.active_minute;
END;
INSERT INTO end_user_activity (tenant_id, environment, end_user_id, active_minute)
SELECT tenant_id, environment, end_user_id, updated_at / 60000 FROM end_users;

CREATE INDEX events_end_user ON events(tenant_id, environment, end_user_id, seq) WHERE end_user_id IS NOT NULL;
CREATE INDEX webhook_deliveries_env ON webhook_deliveries(tenant_id, environment, id);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts(delivery_id, attempt);
