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
CREATE TABLE end_user_activity (
    tenant_id TEXT COLLATE "C" NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT COLLATE "C" NOT NULL,
    active_minute BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, environment, end_user_id)
);
CREATE INDEX end_user_activity_recent ON end_user_activity(tenant_id, environment, active_minute, end_user_id);

CREATE FUNCTION qs_end_user_activity() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO end_user_activity (tenant_id, environment, end_user_id, active_minute)
    VALUES (NEW.tenant_id, NEW.environment, NEW.end_user_id, NEW.updated_at / 60000)
    ON CONFLICT (tenant_id, environment, end_user_id)
    DO UPDATE SET active_minute = EXCLUDED.active_minute;
    RETURN NULL;
END;
$$;
CREATE TRIGGER end_users_activity_insert AFTER INSERT ON end_users
    FOR EACH ROW EXECUTE FUNCTION qs_end_user_activity();
CREATE TRIGGER end_users_activity_update AFTER UPDATE OF updated_at ON end_users
    FOR EACH ROW WHEN (NEW.updated_at / 60000 <> OLD.updated_at / 60000)
    EXECUTE FUNCTION qs_end_user_activity();
INSERT INTO end_user_activity (tenant_id, environment, end_user_id, active_minute)
SELECT tenant_id, environment, end_user_id, updated_at / 60000 FROM end_users;

CREATE INDEX events_end_user ON events(tenant_id, environment, end_user_id, seq) WHERE end_user_id IS NOT NULL;
CREATE INDEX webhook_deliveries_env ON webhook_deliveries(tenant_id, environment, id);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts(delivery_id, attempt);
