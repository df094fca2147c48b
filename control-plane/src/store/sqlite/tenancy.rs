//! SQLite: tenants and their API keys ([`TenancyStore`](crate::store::TenancyStore)).

use async_trait::async_trait;
use ledger::Timestamp;

use super::SqliteStore;
use crate::store::{ApiKeyRecord, Env, Environment, StoreResult, TenancyStore, TenantRecord};

async fn insert_key(executor: &mut sqlx::SqliteConnection, key: &ApiKeyRecord) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, environment, name, scopes, prefix, key_hash, created_at, revoked_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    .execute(executor)
    .await?;
    Ok(())
}

#[async_trait]
impl TenancyStore for SqliteStore {
    async fn create_tenant(&self, tenant: &TenantRecord, keys: &[ApiKeyRecord]) -> StoreResult<()> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, ?)")
            .bind(&tenant.id)
            .bind(&tenant.name)
            .bind(tenant.created_at.as_millis())
            .execute(&mut *tx)
            .await?;
        for environment in [Environment::Live, Environment::Test] {
            sqlx::query(
                "INSERT INTO environments (tenant_id, environment, settings) VALUES (?, ?, ?)",
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
        let row = sqlx::query("SELECT * FROM api_keys WHERE key_hash = ?")
            .bind(hash.as_slice())
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(crate::store::columns::api_key).transpose()
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        let mut connection = self.writer.acquire().await?;
        insert_key(&mut connection, key).await
    }

    async fn list_api_keys(&self, env: &Env) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows = sqlx::query("SELECT * FROM api_keys WHERE tenant_id = ? AND environment = ? ORDER BY created_at, id")
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(crate::store::columns::api_key).collect()
    }

    async fn revoke_api_key(
        &self,
        env: &Env,
        id: &str,
        at: Timestamp,
    ) -> StoreResult<Option<ApiKeyRecord>> {
        sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? AND tenant_id = ? AND environment = ?")
            .bind(at.as_millis())
            .bind(id)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .execute(&self.writer)
            .await?;
        let row = sqlx::query(
            "SELECT * FROM api_keys WHERE id = ? AND tenant_id = ? AND environment = ?",
        )
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.writer)
        .await?;
        row.as_ref().map(crate::store::columns::api_key).transpose()
    }
}
