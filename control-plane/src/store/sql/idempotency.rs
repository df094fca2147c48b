//! Idempotency keys answered or given back ([`IdempotencyAnswerStore`]), on either sqlx
//! backend.

use async_trait::async_trait;

use super::{Arg, Side, Sql, scoped};
use crate::store::{Env, IdempotencyAnswer, IdempotencyAnswerStore, StoreResult};

#[async_trait]
impl<S: Sql> IdempotencyAnswerStore for S {
    async fn idempotency_finish(&self, env: &Env, answer: &IdempotencyAnswer) -> StoreResult<()> {
        let sql = "UPDATE idempotency SET status = $4, body = $5
                   WHERE tenant_id = $1 AND environment = $2 AND key = $3";
        let status = i64::from(answer.status);
        let args = [
            Arg::Text(&answer.key),
            Arg::Int(status),
            Arg::Bytes(&answer.body),
        ];
        self.execute(Side::Write, sql, &scoped(env, &args)).await?;
        Ok(())
    }

    async fn idempotency_abandon(&self, env: &Env, key: &str) -> StoreResult<()> {
        let sql = "DELETE FROM idempotency
                   WHERE tenant_id = $1 AND environment = $2 AND key = $3 AND status IS NULL";
        self.execute(Side::Write, sql, &scoped(env, &[Arg::Text(key)]))
            .await?;
        Ok(())
    }
}
