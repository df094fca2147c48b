//! The fixture every example test drives: one end user, a small catalog, a clock that
//! only moves when told, and a journal of everything the engine wrote. After every
//! operation it asserts the invariants and that replaying the entries reproduces the
//! live blocks and debt.

use std::collections::BTreeMap;
use std::sync::Arc;

use ledger::{
    Applied, BillingMode, Catalog, Credits, Cx, EndUserId, EndUserState, Entry, Event, ExpireAfter,
    Feature, FeatureKey, FeatureType, GrantAnchor, GrantEvery, GrantRequest, GrantTemplate,
    Interval, IntervalUnit, OveragePolicy, PRIORITY_DEFAULT, Plan, PlanId, PlanKind, Price,
    Pricing, Refusal, SequentialIds, Span, Timestamp, Ulid, Units, UsageOutcome, UsageRequest,
    Variant, VariantId,
};

/// 2026-01-01T00:00:00Z.
pub const T0: Timestamp = Timestamp::from_millis(1_767_225_600_000);

pub fn key(text: &str) -> FeatureKey {
    FeatureKey::new(text).expect("valid feature key")
}

pub fn credits(value: i64) -> Credits {
    Credits::new(value)
}

pub fn units(value: u64) -> Units {
    Units::new(value).expect("valid units")
}

pub fn hours(count: i64) -> Span {
    Span::from_hours(count).expect("span")
}

pub fn days(count: i64) -> Span {
    Span::from_days(count).expect("span")
}

pub fn secs(count: i64) -> Span {
    Span::from_secs(count).expect("span")
}

pub fn at(offset: Span) -> Timestamp {
    T0.checked_add(offset).expect("instant")
}

pub fn metered(name: &str, pricing: Option<Pricing>) -> Feature {
    Feature {
        key: key(name),
        feature_type: FeatureType::Metered,
        pricing,
        requires_plan: false,
    }
}

pub fn boolean(name: &str) -> Feature {
    Feature {
        key: key(name),
        feature_type: FeatureType::Boolean,
        pricing: None,
        requires_plan: false,
    }
}

/// A grant template with every default (`every: period`, expiring with the period).
pub fn template(amount: i64) -> GrantTemplate {
    GrantTemplate {
        amount: credits(amount),
        every: GrantEvery::Period,
        anchor: GrantAnchor::Period,
        expire_after: ExpireAfter::Every,
        priority: PRIORITY_DEFAULT,
        feature_keys: None,
        rollover: None,
        cap: None,
        settles_debt: true,
    }
}

/// A fixed-span window template (`every: "5h"`).
pub fn window(amount: i64, span: Span, anchor: GrantAnchor) -> GrantTemplate {
    GrantTemplate {
        every: GrantEvery::Span(span),
        anchor,
        ..template(amount)
    }
}

/// A monthly prepaid variant priced `price` (minor units), with `grants`.
pub fn monthly(price: i64, grants: Vec<GrantTemplate>) -> Variant {
    Variant {
        id: VariantId(Ulid(0)),
        plan_id: PlanId(Ulid(0)),
        key: Arc::from("monthly"),
        interval: Interval {
            every: 1,
            unit: IntervalUnit::Month,
        },
        billing_mode: BillingMode::Prepaid,
        price: (price > 0).then(|| Price {
            amount: price,
            currency: Arc::from("usd"),
        }),
        trial_days: 0,
        grace_days: 3,
        renewal_due_days: 3,
        allow_usage_while_past_due: true,
        grants,
    }
}

#[derive(Debug)]
pub struct World {
    pub catalog: Catalog,
    pub state: EndUserState,
    pub now: Timestamp,
    pub ids: SequentialIds,
    pub entries: Vec<Entry>,
    pub events: Vec<Event>,
    next_catalog_id: u128,
}

impl World {
    /// An end user `user_1` at [`T0`], with metered features `api_calls` (1 credit a
    /// unit), `tokens` (3 credits per 1000) and `images`, and boolean `sso`.
    pub fn new() -> World {
        let mut catalog = Catalog::default();
        for feature in [
            metered("api_calls", None),
            metered(
                "tokens",
                Some(Pricing::PerUnit {
                    unit_cost: credits(3),
                    per: 1000,
                }),
            ),
            metered("images", None),
            boolean("sso"),
        ] {
            catalog.features.insert(feature.key.clone(), feature);
        }
        World {
            catalog,
            state: EndUserState::new(EndUserId::new("user_1").expect("id"), T0),
            now: T0,
            ids: SequentialIds::default(),
            entries: Vec::new(),
            events: Vec::new(),
            next_catalog_id: 1_000_000,
        }
    }

    pub fn add_feature(&mut self, feature: Feature) {
        self.catalog.features.insert(feature.key.clone(), feature);
    }

    /// Adds a plan with `features` enabled and the given variants; returns the variants'
    /// ids in order.
    pub fn add_plan(
        &mut self,
        kind: PlanKind,
        features: &[&str],
        overage: OveragePolicy,
        variants: Vec<Variant>,
    ) -> Vec<VariantId> {
        self.next_catalog_id += 1;
        let plan_id = PlanId(Ulid(self.next_catalog_id));
        let plan = Plan {
            id: plan_id,
            key: Arc::from(format!("plan{}", self.next_catalog_id).as_str()),
            kind,
            features: features
                .iter()
                .map(|name| (key(name), true))
                .collect::<BTreeMap<_, _>>(),
            overage_policy: overage,
        };
        self.catalog.plans.insert(plan_id, plan);
        let mut ids = Vec::new();
        for mut variant in variants {
            variant.validate().expect("valid variant");
            self.next_catalog_id += 1;
            variant.id = VariantId(Ulid(self.next_catalog_id));
            variant.plan_id = plan_id;
            ids.push(variant.id);
            self.catalog.variants.insert(variant.id, variant);
        }
        ids
    }

    /// Runs one operation at `self.now`, records what it wrote, and checks invariants and
    /// replay. On a refusal, checks that the state did not change.
    pub fn apply<T>(
        &mut self,
        operation: impl FnOnce(&mut EndUserState, &mut Cx<'_>) -> Result<Applied<T>, Refusal>,
    ) -> Result<T, Refusal> {
        let before = self.state.clone();
        let mut cx = Cx {
            now: self.now,
            catalog: &self.catalog,
            ids: &mut self.ids,
        };
        match operation(&mut self.state, &mut cx) {
            Ok(applied) => {
                self.entries.extend(applied.entries);
                self.events.extend(applied.events);
                self.verify();
                Ok(applied.value)
            }
            Err(refusal) => {
                assert_eq!(self.state, before, "a refusal changed the state");
                Err(refusal)
            }
        }
    }

    /// Invariants, and replay of every entry so far against the live state.
    pub fn verify(&self) {
        self.state.check_invariants().expect("invariants hold");
        let replayed = ledger::replay(&self.entries).expect("entries replay");
        for block in self.state.blocks() {
            assert_eq!(
                replayed.blocks.get(&block.id),
                Some(block),
                "replayed block differs"
            );
        }
        for (id, block) in &replayed.blocks {
            if !self.state.blocks().iter().any(|live| live.id == *id) {
                assert!(
                    block.remaining.is_zero(),
                    "block {id} left the live state with {} remaining",
                    block.remaining
                );
            }
        }
        assert_eq!(&replayed.debt, self.state.debts(), "replayed debt differs");
        let stored =
            serde_json::to_string(&self.state.clone().into_parts()).expect("state serializes");
        let parts: ledger::StateParts = serde_json::from_str(&stored).expect("state deserializes");
        let loaded = EndUserState::from_parts(parts).expect("stored state passes the invariants");
        assert_eq!(loaded, self.state, "state survives a serde round trip");
        // The binary form the change feed's frames carry (ids as bytes, every field).
        let binary = postcard::to_allocvec(&self.state.clone().into_parts()).expect("postcard");
        let parts: ledger::StateParts = postcard::from_bytes(&binary).expect("postcard reads");
        let loaded = EndUserState::from_parts(parts).expect("binary state passes the invariants");
        assert_eq!(loaded, self.state, "state survives a binary round trip");
    }

    /// Moves the clock to `to` and runs due work.
    pub fn advance_to(&mut self, to: Timestamp) {
        assert!(to >= self.now, "the clock only moves forward");
        self.now = to;
        self.apply(|state, cx| state.advance(cx)).expect("advance");
    }

    pub fn advance_by(&mut self, span: Span) {
        let to = self.now.checked_add(span).expect("instant");
        self.advance_to(to);
    }

    pub fn grant(&mut self, request: GrantRequest) -> ledger::BlockId {
        self.apply(|state, cx| state.grant(cx, request))
            .expect("grant")
    }

    pub fn grant_amount(&mut self, amount: i64) -> ledger::BlockId {
        self.grant(GrantRequest::new(credits(amount)))
    }

    pub fn usage(&mut self, feature: &str, count: u64) -> UsageOutcome {
        self.try_usage(feature, count, false).expect("usage")
    }

    pub fn try_usage(
        &mut self,
        feature: &str,
        count: u64,
        strict: bool,
    ) -> Result<UsageOutcome, Refusal> {
        let request = UsageRequest {
            feature_key: key(feature),
            units: units(count),
            strict,
        };
        self.apply(|state, cx| state.record_usage(cx, request))
    }

    /// A copy of the state with the work due by now done (the state itself only moves
    /// when an operation goes through).
    pub fn settled(&self) -> EndUserState {
        let mut copy = self.state.clone();
        let mut ids = SequentialIds::default();
        let mut cx = Cx {
            now: self.now,
            catalog: &self.catalog,
            ids: &mut ids,
        };
        copy.advance(&mut cx).expect("due work");
        copy
    }

    pub fn available(&self, feature: &str) -> i64 {
        self.state
            .available(Some(&key(feature)), self.now)
            .expect("available")
            .get()
    }

    pub fn available_all(&self) -> i64 {
        self.state
            .available(None, self.now)
            .expect("available")
            .get()
    }

    pub fn debt(&self, feature: &str) -> i64 {
        self.state.debt(&key(feature)).get()
    }

    /// `(block id, remaining)` of live blocks in burn order.
    pub fn remaining(&self) -> Vec<(ledger::BlockId, i64)> {
        self.state
            .blocks_in_burn_order(None)
            .into_iter()
            .map(|block| (block.id, block.remaining.get()))
            .collect()
    }

    pub fn remaining_of(&self, id: ledger::BlockId) -> i64 {
        self.state
            .blocks()
            .iter()
            .find(|block| block.id == id)
            .map_or(0, |block| block.remaining.get())
    }

    pub fn event_types(&self) -> Vec<&'static str> {
        self.events
            .iter()
            .map(|event| event.kind.type_name())
            .collect()
    }

    pub fn entry_types(&self) -> Vec<&'static str> {
        self.entries
            .iter()
            .map(|entry| entry.entry_type.as_str())
            .collect()
    }
}
