//! An environment's catalog as decisions read it: the engine's `Catalog` built from the
//! stored features, plans, variants and settings, with the records beside it (answers
//! name objects by key and show them as created). The service caches one per
//! environment until this process changes it.

use ledger::{Catalog, PlanId, VariantId};

use crate::store::{CatalogRecord, EnvRecord, StoreError, StoreResult};

/// Everything one environment's decisions depend on, built from the store and cached
/// until this process changes it.
#[derive(Debug)]
pub struct CatalogView {
    pub catalog: Catalog,
    pub features: Vec<CatalogRecord<protocol::CreateFeature>>,
    pub plans: Vec<CatalogRecord<protocol::CreatePlan>>,
    pub variants: Vec<CatalogRecord<protocol::CreateVariant>>,
    pub env: EnvRecord,
}

impl CatalogView {
    /// Builds the engine's catalog from stored records.
    ///
    /// # Errors
    /// A stored record that no longer validates (corruption).
    pub fn build(
        features: Vec<CatalogRecord<protocol::CreateFeature>>,
        plans: Vec<CatalogRecord<protocol::CreatePlan>>,
        variants: Vec<CatalogRecord<protocol::CreateVariant>>,
        env: EnvRecord,
    ) -> StoreResult<CatalogView> {
        let corrupt = |what: &str, error: protocol::FieldError| {
            StoreError::Corrupt(format!("stored {what} no longer validates: {error}"))
        };
        let mut catalog = Catalog::default();
        for record in &features {
            let feature = record
                .body
                .to_ledger()
                .map_err(|error| corrupt("feature", error))?;
            catalog.features.insert(feature.key.clone(), feature);
        }
        for record in &plans {
            let id = parse_id::<PlanId>(&record.id)?;
            catalog.plans.insert(
                id,
                record
                    .body
                    .to_ledger(id)
                    .map_err(|error| corrupt("plan", error))?,
            );
        }
        for record in &variants {
            let id = parse_id::<VariantId>(&record.id)?;
            let plan_id = parse_id::<PlanId>(record.parent_id.as_deref().unwrap_or_default())?;
            catalog.variants.insert(
                id,
                record
                    .body
                    .to_ledger(id, plan_id)
                    .map_err(|error| corrupt("variant", error))?,
            );
        }
        catalog.settings = ledger::Settings {
            free_plan_variant_id: env
                .settings
                .free_plan_variant_id
                .as_deref()
                .map(parse_id::<VariantId>)
                .transpose()?,
            low_balance_threshold: env.settings.low_balance_threshold.map(ledger::Credits::new),
        };
        Ok(CatalogView {
            catalog,
            features,
            plans,
            variants,
            env,
        })
    }

    /// The plan's key, for answers that name plans by key.
    pub fn plan_key(&self, id: PlanId) -> Option<String> {
        self.catalog.plan(id).map(|plan| plan.key.to_string())
    }

    /// A plan by id or key.
    pub fn find_plan(&self, id_or_key: &str) -> Option<&CatalogRecord<protocol::CreatePlan>> {
        self.plans
            .iter()
            .find(|record| record.id == id_or_key || record.key == id_or_key)
    }

    /// A variant by id, by `<plan key>/<variant key>`, or by a variant key that only one
    /// plan uses.
    pub fn find_variant(&self, text: &str) -> Option<&CatalogRecord<protocol::CreateVariant>> {
        if let Some(record) = self.variants.iter().find(|record| record.id == text) {
            return Some(record);
        }
        if let Some((plan, key)) = text.split_once('/') {
            let plan = self.find_plan(plan)?;
            return self.variants.iter().find(|record| {
                record.parent_id.as_deref() == Some(plan.id.as_str()) && record.key == key
            });
        }
        let mut matching = self.variants.iter().filter(|record| record.key == text);
        let first = matching.next()?;
        matching.next().is_none().then_some(first)
    }
}

fn parse_id<T: std::str::FromStr<Err = String>>(text: &str) -> StoreResult<T> {
    text.parse()
        .map_err(|error: String| StoreError::Corrupt(format!("stored id: {error}")))
}
