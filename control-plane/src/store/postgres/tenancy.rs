//! PostgreSQL: tenants and their API keys ([`TenancyStore`](crate::store::TenancyStore)).

use async_trait::async_trait;
use ledger::Timestamp;
use sqlx::PgConnection;

use super::PostgresStore;
use crate::store::{ApiKeyRecord, Env, Environment, StoreResult, TenancyStore, TenantRecord};

async fn insert_key(connection: &mut PgConnection, key: &ApiKeyRecord) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, environment, name, scopes, prefix, key_hash, created_at, revoked_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&key.id)
    .bind(&key.tenant_id)
    .bind(key.environment.as_str())
    .bind(&key.name)
    .bind(serde_json::to_string(&key.scopes)?)
    .bind(&key.prefix)
    .bind(key.key_hash.as_slice())
    .bind(key.created_at.as_millis())
    .bind(key.revoked_at.map(Timestamp::as_millis))
    .execute(connection)
    .await?;
    Ok(())
}

#[async_trait]
impl TenancyStore for PostgresStore {
    async fn create_tenant(&self, tenant: &TenantRecord, keys: &[ApiKeyRecord]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&tenant.id)
            .bind(&tenant.name)
            .bind(tenant.created_at.as_millis())
            .execute(&mut *tx)
            .await?;
        for environment in [Environment::Live, Environment::Test] {
            sqlx::query(
                "INSERT INTO environments (tenant_id, environment, settings) VALUES ($1, $2, $3)",
            )
            .bind(&tenant.id)
            .bind(environment.as_str())
            .bind(serde_json::to_string(&protocol::Settings::default())?)
            .execute(&mut *tx)
            .await?;
        }
        for key in keys {
            insert_key(&mut tx, key).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn api_key_by_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE key_hash = $1")
            .bind(hash.as_slice())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(crate::store::columns::api_key).transpose()
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        let mut connection = self.pool.acquire().await?;
        insert_key(&mut connection, key).await
    }

    async fn list_api_keys(&self, env: &Env) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM api_keys WHERE tenant_id = $1 AND environment = $2 ORDER BY created_at, id",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(crate::store::columns::api_key).collect()
    }

    async fn revoke_api_key(
        &self,
        env: &Env,
        id: &str,
        at: Timestamp,
    ) -> StoreResult<Option<ApiKeyRecord>> {
        // One statement: the row as revoked (the first revocation's time is kept).
        let row = sqlx::query(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1)
             WHERE id = $2 AND tenant_id = $3 AND environment = $4 RETURNING *",
        )
        .bind(at.as_millis())
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(crate::store::columns::api_key).transpose()
    }
}
