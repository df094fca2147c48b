//! PostgreSQL: each environment's catalog, settings and test clock
//! ([`CatalogStore`](crate::store::CatalogStore)).

use async_trait::async_trait;
use sqlx::Row;

use super::{PostgresStore, unique_violation};
use crate::store::{CatalogRecord, CatalogStore, Env, EnvRecord, StoreError, StoreResult};

impl PostgresStore {
    async fn catalog_insert<T: serde::Serialize + Sync>(
        &self,
        env: &Env,
        kind: &str,
        record: &CatalogRecord<T>,
    ) -> StoreResult<()> {
        let body = serde_json::to_string(&record.body)?;
        let result = sqlx::query(
            "INSERT INTO catalog (id, tenant_id, environment, kind, key, parent_id, body, archived, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&record.id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(kind)
        .bind(&record.key)
        .bind(&record.parent_id)
        .bind(body)
        .bind(record.archived)
        .bind(record.created_at.as_millis())
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(error) if unique_violation(&error) => Err(StoreError::Conflict(format!(
                "a {kind} with key `{}` already exists",
                record.key
            ))),
            Err(error) => Err(error.into()),
        }
    }

    /// Replaces a catalog object's body (its key and id stay); false when it is unknown.
    async fn catalog_update<T: serde::Serialize + Sync>(
        &self,
        env: &Env,
        kind: &str,
        record: &CatalogRecord<T>,
    ) -> StoreResult<bool> {
        let result = sqlx::query("UPDATE catalog SET body = $1 WHERE id = $2 AND tenant_id = $3 AND environment = $4 AND kind = $5")
            .bind(serde_json::to_string(&record.body)?)
            .bind(&record.id)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(kind)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn catalog_list<T: serde::de::DeserializeOwned>(
        &self,
        env: &Env,
        kind: &str,
    ) -> StoreResult<Vec<CatalogRecord<T>>> {
        let rows = sqlx::query(
            "SELECT id, key, parent_id, body, archived, created_at FROM catalog
             WHERE tenant_id = $1 AND environment = $2 AND kind = $3 ORDER BY seq",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(crate::store::columns::catalog_record)
            .collect()
    }
}

#[async_trait]
impl CatalogStore for PostgresStore {
    async fn env_record(&self, env: &Env) -> StoreResult<EnvRecord> {
        let row = sqlx::query(
            "SELECT settings, clock_offset_ms FROM environments WHERE tenant_id = $1 AND environment = $2",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(EnvRecord::default());
        };
        Ok(EnvRecord {
            settings: serde_json::from_str(&row.try_get::<String, _>("settings")?)?,
            clock_offset_ms: row.try_get("clock_offset_ms")?,
        })
    }

    async fn put_settings(&self, env: &Env, settings: &protocol::Settings) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO environments (tenant_id, environment, settings) VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id, environment) DO UPDATE SET settings = excluded.settings",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(serde_json::to_string(settings)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn advance_clock(&self, env: &Env, step_ms: i64) -> StoreResult<i64> {
        let row = sqlx::query(
            "INSERT INTO environments (tenant_id, environment, settings, clock_offset_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, environment) DO UPDATE SET clock_offset_ms = environments.clock_offset_ms + excluded.clock_offset_ms
             RETURNING clock_offset_ms",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(serde_json::to_string(&protocol::Settings::default())?)
        .bind(step_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("clock_offset_ms")?)
    }

    async fn put_env_record(&self, env: &Env, record: &EnvRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO environments (tenant_id, environment, settings, clock_offset_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, environment) DO UPDATE SET settings = excluded.settings, clock_offset_ms = excluded.clock_offset_ms",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(serde_json::to_string(&record.settings)?)
        .bind(record.clock_offset_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn insert_feature(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateFeature>,
    ) -> StoreResult<()> {
        self.catalog_insert(env, "feature", record).await
    }

    async fn update_feature(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateFeature>,
    ) -> StoreResult<bool> {
        self.catalog_update(env, "feature", record).await
    }

    async fn features(
        &self,
        env: &Env,
    ) -> StoreResult<Vec<CatalogRecord<protocol::CreateFeature>>> {
        self.catalog_list(env, "feature").await
    }

    async fn insert_plan(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreatePlan>,
    ) -> StoreResult<()> {
        self.catalog_insert(env, "plan", record).await
    }

    async fn update_plan(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreatePlan>,
    ) -> StoreResult<bool> {
        self.catalog_update(env, "plan", record).await
    }

    async fn plans(&self, env: &Env) -> StoreResult<Vec<CatalogRecord<protocol::CreatePlan>>> {
        self.catalog_list(env, "plan").await
    }

    async fn insert_variant(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateVariant>,
    ) -> StoreResult<()> {
        self.catalog_insert(env, "variant", record).await
    }

    async fn variants(
        &self,
        env: &Env,
    ) -> StoreResult<Vec<CatalogRecord<protocol::CreateVariant>>> {
        self.catalog_list(env, "variant").await
    }

    async fn set_variant_archived(&self, env: &Env, id: &str, archived: bool) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE catalog SET archived = $1 WHERE id = $2 AND tenant_id = $3 AND environment = $4 AND kind = 'variant'",
        )
        .bind(archived)
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }
}
