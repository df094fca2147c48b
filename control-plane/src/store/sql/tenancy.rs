//! Tenants and their API keys ([`TenancyStore`]), on either sqlx backend.

use async_trait::async_trait;
use ledger::Timestamp;

use super::{Arg, Side, Sql, scoped};
use crate::store::columns::Columns;
use crate::store::columns::api_key;
use crate::store::{
    ApiKeyRecord, Env, EnvHead, Environment, StoreResult, TenancyStore, TenantRecord,
};

const INSERT_KEY: &str = "INSERT INTO api_keys (id, tenant_id, environment, name, scopes, prefix, key_hash, created_at, revoked_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// An API key's row as `INSERT_KEY` binds it (`scopes` is its JSON text).
fn key_args<'a>(key: &'a ApiKeyRecord, scopes: &'a str) -> Vec<Arg<'a>> {
    vec![
        Arg::Text(&key.id),
        Arg::Text(&key.tenant_id),
        Arg::Text(key.environment.as_str()),
        Arg::TextOpt(key.name.as_deref()),
        Arg::Text(scopes),
        Arg::Text(&key.prefix),
        Arg::Bytes(key.key_hash.as_slice()),
        Arg::Int(key.created_at.as_millis()),
        Arg::IntOpt(key.revoked_at.map(Timestamp::as_millis)),
    ]
}

#[async_trait]
impl<S: Sql> TenancyStore for S {
    async fn create_tenant(&self, tenant: &TenantRecord, keys: &[ApiKeyRecord]) -> StoreResult<()> {
        let settings = serde_json::to_string(&protocol::Settings::default())?;
        let scopes = keys
            .iter()
            .map(|key| serde_json::to_string(&key.scopes))
            .collect::<Result<Vec<_>, _>>()?;
        let mut statements = vec![(
            "INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)",
            vec![
                Arg::Text(&tenant.id),
                Arg::Text(&tenant.name),
                Arg::Int(tenant.created_at.as_millis()),
            ],
        )];
        for environment in [Environment::Live, Environment::Test] {
            statements.push((
                "INSERT INTO environments (tenant_id, environment, settings) VALUES ($1, $2, $3)",
                vec![
                    Arg::Text(&tenant.id),
                    Arg::Text(environment.as_str()),
                    Arg::Text(&settings),
                ],
            ));
        }
        for (key, scopes) in keys.iter().zip(&scopes) {
            statements.push((INSERT_KEY, key_args(key, scopes)));
        }
        self.transaction(&statements).await?;
        Ok(())
    }

    async fn api_key_by_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
        let sql = "SELECT * FROM api_keys WHERE key_hash = $1";
        let args = [Arg::Bytes(hash.as_slice())];
        let row = self.fetch_optional(Side::Read, sql, &args).await?;
        row.as_ref().map(api_key).transpose()
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        let scopes = serde_json::to_string(&key.scopes)?;
        self.execute(Side::Write, INSERT_KEY, &key_args(key, &scopes))
            .await?;
        Ok(())
    }

    async fn list_api_keys(&self, env: &Env) -> StoreResult<Vec<ApiKeyRecord>> {
        let sql = "SELECT * FROM api_keys WHERE tenant_id = $1 AND environment = $2 ORDER BY created_at, id";
        let args = scoped(env, &[]);
        let rows = self.fetch_all(Side::Read, sql, &args).await?;
        rows.iter().map(api_key).collect()
    }

    async fn revoke_api_key(
        &self,
        env: &Env,
        id: &str,
        at: Timestamp,
    ) -> StoreResult<Option<ApiKeyRecord>> {
        // One statement: the row as revoked (the first revocation's time is kept).
        let sql = "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1)
                 WHERE id = $2 AND tenant_id = $3 AND environment = $4 RETURNING *";
        let args = [
            Arg::Int(at.as_millis()),
            Arg::Text(id),
            Arg::Text(&env.tenant_id),
            Arg::Text(env.environment.as_str()),
        ];
        let row = self.fetch_optional(Side::Write, sql, &args).await?;
        row.as_ref().map(api_key).transpose()
    }

    async fn env_heads(&self, after: Option<&Env>, limit: u32) -> StoreResult<Vec<EnvHead>> {
        // One index probe per environment for its newest change; the purge watermark
        // counts as the head where everything since was purged (an idle environment).
        let sql = "SELECT e.tenant_id, e.environment, e.clock_offset_ms,
                   COALESCE((SELECT MAX(c.seq) FROM changes c
                     WHERE c.tenant_id = e.tenant_id AND c.environment = e.environment), 0) AS head,
                   COALESCE((SELECT w.purged_through FROM change_watermarks w
                     WHERE w.tenant_id = e.tenant_id AND w.environment = e.environment), 0) AS purged
                 FROM environments e
                 WHERE e.tenant_id > $1 OR (e.tenant_id = $1 AND e.environment > $2)
                 ORDER BY e.tenant_id, e.environment LIMIT $3";
        let args = [
            Arg::Text(after.map_or("", |env| env.tenant_id.as_str())),
            Arg::Text(after.map_or("", |env| env.environment.as_str())),
            Arg::Int(i64::from(limit)),
        ];
        let rows = self.fetch_all(Side::Read, sql, &args).await?;
        rows.iter()
            .map(|row| {
                Ok(EnvHead {
                    env: Env::new(row.text("tenant_id")?, row.environment()?),
                    head: row.int("head")?.max(row.int("purged")?),
                    clock_offset_ms: row.int("clock_offset_ms")?,
                })
            })
            .collect()
    }
}
