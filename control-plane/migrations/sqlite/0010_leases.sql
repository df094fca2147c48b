-- Leases (SPEC 12.1): credits held for one proxy. A live lease lives in its end user's
-- state; this table keeps every lease's latest form (written with each change, in the
-- same transaction) so that leases are listed by holder across end users and read by id
-- after they left the live state.
CREATE TABLE leases (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    end_user_id TEXT NOT NULL,
    holder TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX leases_holder ON leases(tenant_id, environment, holder, id);
CREATE INDEX leases_end_user ON leases(tenant_id, environment, end_user_id, id);
