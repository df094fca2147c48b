//! Each environment's catalog, settings and test clock ([`CatalogStore`]), on either
//! sqlx backend.

use async_trait::async_trait;

use super::{Arg, Side, Sql, scoped};
use crate::store::columns::{Columns, catalog_record, unique_violation};
use crate::store::{CatalogRecord, CatalogStore, Env, EnvRecord, StoreError, StoreResult};

/// Inserts a catalog object; a key the environment already has for `kind` is a conflict.
async fn insert<S: Sql, T: serde::Serialize + Sync>(
    store: &S,
    env: &Env,
    kind: &str,
    record: &CatalogRecord<T>,
) -> StoreResult<()> {
    let body = serde_json::to_string(&record.body)?;
    let inserted = store
        .execute(
            Side::Write,
            S::CATALOG_INSERT,
            &[
                Arg::Text(&record.id),
                Arg::Text(&env.tenant_id),
                Arg::Text(env.environment.as_str()),
                Arg::Text(kind),
                Arg::Text(&record.key),
                Arg::TextOpt(record.parent_id.as_deref()),
                Arg::Text(&body),
                Arg::Flag(record.archived),
                Arg::Int(record.created_at.as_millis()),
            ],
        )
        .await;
    match inserted {
        Ok(_) => Ok(()),
        Err(error) if unique_violation(&error) => Err(StoreError::Conflict(format!(
            "a {kind} with key `{}` already exists",
            record.key
        ))),
        Err(error) => Err(error.into()),
    }
}

/// Replaces a catalog object's body (its key and id stay); false when it is unknown.
async fn update<S: Sql, T: serde::Serialize + Sync>(
    store: &S,
    env: &Env,
    kind: &str,
    record: &CatalogRecord<T>,
) -> StoreResult<bool> {
    let body = serde_json::to_string(&record.body)?;
    let changed = store
        .execute(
            Side::Write,
            "UPDATE catalog SET body = $1
             WHERE id = $2 AND tenant_id = $3 AND environment = $4 AND kind = $5",
            &[
                Arg::Text(&body),
                Arg::Text(&record.id),
                Arg::Text(&env.tenant_id),
                Arg::Text(env.environment.as_str()),
                Arg::Text(kind),
            ],
        )
        .await?;
    Ok(changed > 0)
}

/// The environment's objects of `kind`, in the order they were created.
async fn list<S: Sql, T: serde::de::DeserializeOwned>(
    store: &S,
    env: &Env,
    kind: &str,
) -> StoreResult<Vec<CatalogRecord<T>>> {
    let rows = store
        .fetch_all(
            Side::Read,
            "SELECT id, key, parent_id, body, archived, created_at FROM catalog
             WHERE tenant_id = $1 AND environment = $2 AND kind = $3 ORDER BY seq",
            &scoped(env, &[Arg::Text(kind)]),
        )
        .await?;
    rows.iter().map(catalog_record).collect()
}

#[async_trait]
impl<S: Sql> CatalogStore for S {
    async fn env_record(&self, env: &Env) -> StoreResult<EnvRecord> {
        let sql = "SELECT settings, clock_offset_ms FROM environments WHERE tenant_id = $1 AND environment = $2";
        let args = scoped(env, &[]);
        let row = self.fetch_optional(Side::Read, sql, &args).await?;
        let Some(row) = row else {
            return Ok(EnvRecord::default());
        };
        Ok(EnvRecord {
            settings: row.json("settings")?,
            clock_offset_ms: row.int("clock_offset_ms")?,
        })
    }

    async fn put_env_record(&self, env: &Env, record: &EnvRecord) -> StoreResult<()> {
        let settings = serde_json::to_string(&record.settings)?;
        self.execute(
            Side::Write,
            "INSERT INTO environments (tenant_id, environment, settings, clock_offset_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, environment) DO UPDATE SET settings = excluded.settings, clock_offset_ms = excluded.clock_offset_ms",
            &scoped(env, &[Arg::Text(&settings), Arg::Int(record.clock_offset_ms)]),
        )
        .await?;
        Ok(())
    }

    async fn put_settings(&self, env: &Env, settings: &protocol::Settings) -> StoreResult<()> {
        let settings = serde_json::to_string(settings)?;
        self.execute(
            Side::Write,
            "INSERT INTO environments (tenant_id, environment, settings) VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id, environment) DO UPDATE SET settings = excluded.settings",
            &scoped(env, &[Arg::Text(&settings)]),
        )
        .await?;
        Ok(())
    }

    async fn advance_clock(&self, env: &Env, step_ms: i64) -> StoreResult<i64> {
        let settings = serde_json::to_string(&protocol::Settings::default())?;
        let sql = "INSERT INTO environments (tenant_id, environment, settings, clock_offset_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (tenant_id, environment) DO UPDATE SET clock_offset_ms = environments.clock_offset_ms + excluded.clock_offset_ms
                 RETURNING clock_offset_ms";
        let args = scoped(env, &[Arg::Text(&settings), Arg::Int(step_ms)]);
        let row = self.fetch_optional(Side::Write, sql, &args).await?;
        let row =
            row.ok_or_else(|| StoreError::Fatal("the clock's upsert returned no row".into()))?;
        row.int("clock_offset_ms")
    }

    async fn insert_feature(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateFeature>,
    ) -> StoreResult<()> {
        insert(self, env, "feature", record).await
    }

    async fn features(
        &self,
        env: &Env,
    ) -> StoreResult<Vec<CatalogRecord<protocol::CreateFeature>>> {
        list(self, env, "feature").await
    }

    async fn update_feature(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateFeature>,
    ) -> StoreResult<bool> {
        update(self, env, "feature", record).await
    }

    async fn insert_plan(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreatePlan>,
    ) -> StoreResult<()> {
        insert(self, env, "plan", record).await
    }

    async fn plans(&self, env: &Env) -> StoreResult<Vec<CatalogRecord<protocol::CreatePlan>>> {
        list(self, env, "plan").await
    }

    async fn update_plan(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreatePlan>,
    ) -> StoreResult<bool> {
        update(self, env, "plan", record).await
    }

    async fn insert_variant(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateVariant>,
    ) -> StoreResult<()> {
        insert(self, env, "variant", record).await
    }

    async fn variants(
        &self,
        env: &Env,
    ) -> StoreResult<Vec<CatalogRecord<protocol::CreateVariant>>> {
        list(self, env, "variant").await
    }

    async fn set_variant_archived(&self, env: &Env, id: &str, archived: bool) -> StoreResult<bool> {
        let sql = "UPDATE catalog SET archived = $1
                 WHERE id = $2 AND tenant_id = $3 AND environment = $4 AND kind = 'variant'";
        let args = [
            Arg::Flag(archived),
            Arg::Text(id),
            Arg::Text(&env.tenant_id),
            Arg::Text(env.environment.as_str()),
        ];
        let changed = self.execute(Side::Write, sql, &args).await?;
        Ok(changed > 0)
    }
}
