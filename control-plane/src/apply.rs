//! Catalog as code: `quotastack-control-plane apply -f catalog.toml`.
//!
//! A catalog file lists features, plans with their variants, and settings (every field is
//! documented in `config/catalog.example.toml`). Applying it reads the environment's
//! catalog through the REST API (the key picks the tenant and environment), works out a
//! plan — what to create, what to replace, what can't be done — prints it, and carries it
//! out unless asked for a dry run. It is idempotent: applying the same file again changes
//! nothing. It never deletes: objects the file does not mention are left as they are.
//!
//! What may change in place: a feature's name, pricing and plan gating; a plan's name,
//! features and overage policy; the settings. What may not: keys, a feature's type, a
//! plan's kind, and variants (price points are immutable once created; give a new price
//! point a new key and archive the old one). A file asking for one of those is refused as
//! a whole, before anything is written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use protocol::{
    CreateFeature, CreatePlan, CreateVariant, Feature, OveragePolicyWire, Plan, PlanFeature,
    PlanKindWire, Settings, UpdateSettings, Variant,
};
use serde::Deserialize;

/// A catalog file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    #[serde(default)]
    pub features: Vec<CreateFeature>,
    #[serde(default)]
    pub plans: Vec<PlanFile>,
    /// Absent: the settings are left as they are.
    #[serde(default)]
    pub settings: Option<SettingsFile>,
}

/// A plan and its variants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    pub key: String,
    pub name: String,
    pub kind: PlanKindWire,
    #[serde(default)]
    pub features: BTreeMap<String, PlanFeature>,
    #[serde(default)]
    pub overage_policy: OveragePolicyWire,
    #[serde(default)]
    pub variants: Vec<CreateVariant>,
}

impl PlanFile {
    fn request(&self) -> CreatePlan {
        CreatePlan {
            key: self.key.clone(),
            name: self.name.clone(),
            kind: self.kind,
            features: self.features.clone(),
            overage_policy: self.overage_policy,
        }
    }
}

/// The environment's settings, with the free plan named `plan/variant`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsFile {
    /// `plan/variant` (a base plan's variant); absent or empty: no free plan.
    #[serde(default)]
    pub free_plan_variant: Option<String>,
    #[serde(default)]
    pub low_balance_threshold: Option<i64>,
}

/// What went wrong, naming the file and the object at fault.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("the catalog can't be applied as it stands:\n{}", .0.join("\n"))]
    Refused(Vec<String>),
    #[error("{what}: {error}")]
    Api { what: String, error: client::Error },
}

impl CatalogFile {
    /// Parses and checks a catalog file (`origin` names it in errors).
    ///
    /// # Errors
    /// The first syntax error, or every object that does not validate.
    pub fn parse(text: &str, origin: &str) -> Result<CatalogFile, ApplyError> {
        let file: CatalogFile = toml::from_str(text).map_err(|error| ApplyError::File {
            path: origin.to_owned(),
            message: error.to_string(),
        })?;
        let mut problems = Vec::new();
        let mut feature_keys = BTreeSet::new();
        for (index, feature) in file.features.iter().enumerate() {
            if let Err(error) = feature.to_ledger() {
                problems.push(format!("features[{index}] ({}): {error}", feature.key));
            }
            if !feature_keys.insert(feature.key.as_str()) {
                problems.push(format!(
                    "features[{index}]: key `{}` appears twice",
                    feature.key
                ));
            }
        }
        let mut plan_keys = BTreeSet::new();
        for (index, plan) in file.plans.iter().enumerate() {
            // The ids are the server's to assign; these only let the checks run.
            let placeholder = ledger::PlanId(ledger::Ulid::from_parts(0, 0));
            if let Err(error) = plan.request().to_ledger(placeholder) {
                problems.push(format!("plans[{index}] ({}): {error}", plan.key));
            }
            if !plan_keys.insert(plan.key.as_str()) {
                problems.push(format!("plans[{index}]: key `{}` appears twice", plan.key));
            }
            let mut variant_keys = BTreeSet::new();
            for (position, variant) in plan.variants.iter().enumerate() {
                let id = ledger::VariantId(ledger::Ulid::from_parts(0, 0));
                if let Err(error) = variant.to_ledger(id, placeholder) {
                    problems.push(format!(
                        "plans[{index}].variants[{position}] ({}/{}): {error}",
                        plan.key, variant.key
                    ));
                }
                if !variant_keys.insert(variant.key.as_str()) {
                    problems.push(format!(
                        "plans[{index}].variants[{position}]: key `{}` appears twice in plan `{}`",
                        variant.key, plan.key
                    ));
                }
            }
        }
        if let Some(threshold) = file
            .settings
            .as_ref()
            .and_then(|settings| settings.low_balance_threshold)
            && threshold < 0
        {
            problems.push("settings.low_balance_threshold: must not be negative".into());
        }
        if problems.is_empty() {
            Ok(file)
        } else {
            Err(ApplyError::File {
                path: origin.to_owned(),
                message: problems.join("\n"),
            })
        }
    }
}

/// The environment's catalog as the API shows it.
#[derive(Debug, Clone, Default)]
pub struct Current {
    pub features: Vec<Feature>,
    pub plans: Vec<Plan>,
    pub settings: Settings,
}

/// One write the plan makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    CreateFeature(CreateFeature),
    ReplaceFeature {
        body: CreateFeature,
        changed: Vec<&'static str>,
    },
    CreatePlan(CreatePlan),
    ReplacePlan {
        body: CreatePlan,
        changed: Vec<&'static str>,
    },
    CreateVariant {
        plan: String,
        body: CreateVariant,
    },
    UpdateSettings {
        body: UpdateSettings,
        changed: Vec<&'static str>,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::CreateFeature(body) => write!(f, "+ feature {}", body.key),
            Step::ReplaceFeature { body, changed } => {
                write!(f, "~ feature {} ({})", body.key, changed.join(", "))
            }
            Step::CreatePlan(body) => write!(f, "+ plan {}", body.key),
            Step::ReplacePlan { body, changed } => {
                write!(f, "~ plan {} ({})", body.key, changed.join(", "))
            }
            Step::CreateVariant { plan, body } => write!(f, "+ variant {plan}/{}", body.key),
            Step::UpdateSettings { changed, .. } => {
                write!(f, "~ settings ({})", changed.join(", "))
            }
        }
    }
}

/// What applying a file would do.
#[derive(Debug, Clone, Default)]
pub struct ApplyPlan {
    pub steps: Vec<Step>,
    /// Objects already as the file says.
    pub unchanged: usize,
    /// What the file asks that can't be done; nothing is applied while there are any.
    pub refused: Vec<String>,
}

impl ApplyPlan {
    /// Plans an object the catalog holds already: refused with `refusal` when a field
    /// that cannot change differs (answers true then), unchanged when no field of
    /// `fields` (name, differs) differs, otherwise replaced by the step `replace` makes
    /// of the changed fields' names.
    fn stored(
        &mut self,
        refusal: Option<String>,
        fields: &[(&'static str, bool)],
        replace: impl FnOnce(Vec<&'static str>) -> Step,
    ) -> bool {
        if let Some(refusal) = refusal {
            self.refused.push(refusal);
            return true;
        }
        let changed: Vec<&'static str> = fields
            .iter()
            .filter(|(_, differs)| *differs)
            .map(|(name, _)| *name)
            .collect();
        if changed.is_empty() {
            self.unchanged += 1;
        } else {
            self.steps.push(replace(changed));
        }
        false
    }
}

impl fmt::Display for ApplyPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for step in &self.steps {
            writeln!(f, "{step}")?;
        }
        for refusal in &self.refused {
            writeln!(f, "! {refusal}")?;
        }
        write!(
            f,
            "{} to change, {} unchanged",
            self.steps.len(),
            self.unchanged
        )
    }
}

/// Works out what applying `file` to `current` takes. Pure: reads nothing, writes nothing.
pub fn plan(file: &CatalogFile, current: &Current) -> ApplyPlan {
    let mut plan = ApplyPlan::default();
    for feature in &file.features {
        plan_feature(feature, current, &mut plan);
    }
    let known_features: BTreeSet<&str> = current
        .features
        .iter()
        .map(|feature| feature.key.as_str())
        .chain(file.features.iter().map(|feature| feature.key.as_str()))
        .collect();
    for wanted in &file.plans {
        if let Some(unknown) = wanted
            .features
            .keys()
            .find(|key| !known_features.contains(key.as_str()))
        {
            plan.refused.push(format!(
                "plan {}: feature `{unknown}` is neither in the file nor in the catalog",
                wanted.key
            ));
        }
        let existing = current.plans.iter().find(|p| p.key == wanted.key);
        match existing {
            None => plan.steps.push(Step::CreatePlan(wanted.request())),
            Some(existing) => {
                let refusal = (existing.kind != wanted.kind).then(|| {
                    format!(
                        "plan {}: its kind can't change; create a plan with a new key instead",
                        wanted.key
                    )
                });
                let fields = [
                    ("name", existing.name != wanted.name),
                    ("features", existing.features != wanted.features),
                    (
                        "overage_policy",
                        existing.overage_policy != wanted.overage_policy,
                    ),
                ];
                let body = wanted.request();
                if plan.stored(refusal, &fields, |changed| Step::ReplacePlan {
                    body,
                    changed,
                }) {
                    continue;
                }
            }
        }
        variant_steps(wanted, existing, &mut plan);
    }
    if let Some(settings) = &file.settings {
        settings_step(settings, &file.plans, current, &mut plan);
    }
    plan
}

/// The step a feature of the file takes: created, replaced, unchanged or refused.
fn plan_feature(feature: &CreateFeature, current: &Current, plan: &mut ApplyPlan) {
    match current.features.iter().find(|f| f.key == feature.key) {
        None => plan.steps.push(Step::CreateFeature(feature.clone())),
        Some(existing) => {
            let refusal = (existing.feature_type != feature.feature_type).then(|| {
                format!(
                    "feature {}: its type can't change; create a feature with a new key instead",
                    feature.key
                )
            });
            let fields = [
                ("name", existing.name != feature.name),
                ("pricing", existing.pricing != feature.pricing),
                (
                    "requires_plan",
                    existing.requires_plan != feature.requires_plan,
                ),
            ];
            let body = feature.clone();
            plan.stored(refusal, &fields, |changed| Step::ReplaceFeature {
                body,
                changed,
            });
        }
    }
}

/// The steps a plan's variants take: each new one created; a stored one unchanged, or
/// refused when it differs (variants are immutable).
fn variant_steps(wanted: &PlanFile, existing: Option<&Plan>, plan: &mut ApplyPlan) {
    for variant in &wanted.variants {
        let stored = existing.and_then(|existing| {
            existing
                .variants
                .iter()
                .find(|stored| stored.key == variant.key)
        });
        match stored {
            None => plan.steps.push(Step::CreateVariant {
                plan: wanted.key.clone(),
                body: variant.clone(),
            }),
            Some(stored) => {
                let as_wanted =
                    Variant::from_request(&stored.id, &stored.plan_id, variant, stored.archived);
                if as_wanted == *stored {
                    plan.unchanged += 1;
                } else {
                    plan.refused.push(format!(
                        "variant {}/{}: differs from the stored one ({}); variants are immutable: give the new price point a new key and archive the old one",
                        wanted.key,
                        variant.key,
                        variant_differences(stored, &as_wanted).join(", ")
                    ));
                }
            }
        }
    }
}

fn variant_differences(stored: &Variant, wanted: &Variant) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if stored.interval != wanted.interval {
        fields.push("interval");
    }
    if stored.billing_mode != wanted.billing_mode {
        fields.push("billing_mode");
    }
    if stored.price != wanted.price {
        fields.push("price");
    }
    if stored.trial_days != wanted.trial_days {
        fields.push("trial_days");
    }
    if stored.grace_days != wanted.grace_days {
        fields.push("grace_days");
    }
    if stored.renewal_due_days != wanted.renewal_due_days {
        fields.push("renewal_due_days");
    }
    if stored.allow_usage_while_past_due != wanted.allow_usage_while_past_due {
        fields.push("allow_usage_while_past_due");
    }
    if stored.grants != wanted.grants {
        fields.push("grants");
    }
    fields
}

/// The stored free plan as `plan/variant`.
fn variant_ref(current: &Current, id: &str) -> Option<String> {
    current.plans.iter().find_map(|plan| {
        plan.variants
            .iter()
            .find(|variant| variant.id == id)
            .map(|variant| format!("{}/{}", plan.key, variant.key))
    })
}

fn settings_step(
    settings: &SettingsFile,
    file_plans: &[PlanFile],
    current: &Current,
    plan: &mut ApplyPlan,
) {
    let wanted_free = settings
        .free_plan_variant
        .clone()
        .filter(|text| !text.is_empty());
    if let Some(wanted) = &wanted_free {
        match free_plan_kind(wanted, file_plans, current, plan) {
            None => plan.refused.push(format!(
                "settings.free_plan_variant: `{wanted}` is not a `plan/variant` in the file or the catalog"
            )),
            Some((kind, archived)) => {
                if kind != PlanKindWire::Base {
                    plan.refused.push(format!(
                        "settings.free_plan_variant: `{wanted}` is a variant of an add-on; the free plan must be a base plan"
                    ));
                }
                if archived {
                    plan.refused.push(format!(
                        "settings.free_plan_variant: `{wanted}` is archived and takes no new subscriptions"
                    ));
                }
            }
        }
    }
    let stored_free = current
        .settings
        .free_plan_variant_id
        .as_deref()
        .map(|id| variant_ref(current, id).unwrap_or_else(|| id.to_owned()));
    let mut body = UpdateSettings::default();
    let mut changed = Vec::new();
    if stored_free != wanted_free {
        body.free_plan_variant_id = Some(wanted_free);
        changed.push("free_plan_variant");
    }
    if current.settings.low_balance_threshold != settings.low_balance_threshold {
        body.low_balance_threshold = Some(settings.low_balance_threshold);
        changed.push("low_balance_threshold");
    }
    if changed.is_empty() {
        plan.unchanged += 1;
    } else {
        plan.steps.push(Step::UpdateSettings { body, changed });
    }
}

/// The kind of the plan `plan_key/variant` belongs to and whether that variant is
/// archived, as it will be once the plan is applied: `None` when no such variant exists
/// or is created.
fn free_plan_kind(
    wanted: &str,
    file_plans: &[PlanFile],
    current: &Current,
    plan: &ApplyPlan,
) -> Option<(PlanKindWire, bool)> {
    let (plan_key, variant) = wanted.split_once('/')?;
    let stored = current.plans.iter().find(|stored| stored.key == plan_key);
    let kind = file_plans
        .iter()
        .find(|file_plan| file_plan.key == plan_key)
        .map(|file_plan| file_plan.kind)
        .or_else(|| stored.map(|stored| stored.kind))?;
    if let Some(stored_variant) =
        stored.and_then(|stored| stored.variants.iter().find(|stored| stored.key == variant))
    {
        return Some((kind, stored_variant.archived));
    }
    let created = plan.steps.iter().any(|step| {
        matches!(step, Step::CreateVariant { plan, body } if plan == plan_key && body.key == variant)
    });
    created.then_some((kind, false))
}

/// Reads the environment's catalog through the API.
///
/// # Errors
/// The API's answer when a read fails.
pub async fn current(api: &client::Client) -> Result<Current, ApplyError> {
    let read = |what: &str| {
        let what = what.to_owned();
        move |error| ApplyError::Api { what, error }
    };
    let options = client::ListOptions::default();
    Ok(Current {
        features: api
            .list_features(&options)
            .await
            .map_err(read("listing features"))?
            .data,
        plans: api
            .list_plans(&options)
            .await
            .map_err(read("listing plans"))?
            .data,
        settings: api.get_settings().await.map_err(read("reading settings"))?,
    })
}

/// Carries out `plan`'s steps in order, calling `done` after each.
///
/// # Errors
/// `Refused` when the plan has refusals (nothing is written then), or the API's answer to
/// the first step that fails (the steps before it stay applied; applying again resumes).
pub async fn execute(
    api: &client::Client,
    plan: &ApplyPlan,
    mut done: impl FnMut(&Step),
) -> Result<(), ApplyError> {
    if !plan.refused.is_empty() {
        return Err(ApplyError::Refused(plan.refused.clone()));
    }
    for step in &plan.steps {
        let failed = |error| ApplyError::Api {
            what: step.to_string(),
            error,
        };
        match step {
            Step::CreateFeature(body) => drop(api.create_feature(body).await.map_err(failed)?),
            Step::ReplaceFeature { body, .. } => {
                drop(api.replace_feature(&body.key, body).await.map_err(failed)?);
            }
            Step::CreatePlan(body) => drop(api.create_plan(body).await.map_err(failed)?),
            Step::ReplacePlan { body, .. } => {
                drop(api.replace_plan(&body.key, body).await.map_err(failed)?);
            }
            Step::CreateVariant { plan, body } => {
                drop(api.create_variant(plan, body).await.map_err(failed)?);
            }
            Step::UpdateSettings { body, .. } => {
                drop(api.update_settings(body).await.map_err(failed)?);
            }
        }
        done(step);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[features]]
key = "messages"
name = "Messages"
type = "metered"

[[plans]]
key = "pro"
name = "Pro"
kind = "base"
features = { messages = { enabled = true } }

[[plans.variants]]
key = "monthly"
interval = { every = 1, unit = "month" }
billing_mode = "prepaid"
grants = [{ amount = 100 }]

[settings]
free_plan_variant = "pro/monthly"
"#;

    #[test]
    fn an_empty_catalog_gets_everything_in_order() {
        let file = CatalogFile::parse(FILE, "t.toml").expect("valid");
        let plan = plan(&file, &Current::default());
        let lines: Vec<String> = plan.steps.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "+ feature messages",
                "+ plan pro",
                "+ variant pro/monthly",
                "~ settings (free_plan_variant)"
            ]
        );
        assert!(plan.refused.is_empty());
    }

    #[test]
    fn the_free_plan_must_be_a_base_plan() {
        let addon = FILE.replace("kind = \"base\"", "kind = \"addon\"");
        let file = CatalogFile::parse(&addon, "t.toml").expect("valid");
        let plan = plan(&file, &Current::default());
        assert!(
            plan.refused
                .iter()
                .any(|line| line.contains("must be a base plan")),
            "{plan}"
        );
    }

    #[test]
    fn bad_files_name_what_is_wrong() {
        let typo = CatalogFile::parse(
            "[[features]]\nkey = \"a\"\nname = \"A\"\ntype = \"metered\"\nprcing = 1\n",
            "t.toml",
        )
        .expect_err("unknown field");
        assert!(typo.to_string().contains("prcing"), "{typo}");
        let twice = format!(
            "{FILE}\n[[features]]\nkey = \"messages\"\nname = \"Again\"\ntype = \"metered\"\n"
        );
        let error = CatalogFile::parse(&twice, "t.toml").expect_err("duplicate");
        assert!(
            error.to_string().contains("`messages` appears twice"),
            "{error}"
        );
        let bad = FILE.replace("amount = 100", "amount = 0");
        let error = CatalogFile::parse(&bad, "t.toml").expect_err("zero grant");
        assert!(error.to_string().contains("pro/monthly"), "{error}");
    }
}
