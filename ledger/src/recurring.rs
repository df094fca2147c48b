//! Recurring grants (SPEC 10.1): period grants, fixed-span windows anchored to the period
//! or to first use, expiry with rollover, and accumulation caps.

use crate::amount::Credits;
use crate::block::{Block, BlockSource, Part, TemplateRef};
use crate::catalog::{Catalog, ExpireAfter, GrantAnchor, GrantEvery, GrantTemplate, Variant};
use crate::entry::EntryType;
use crate::event::EventKind;
use crate::id::{BlockId, FeatureKey, SubscriptionId};
use crate::refusal::Refusal;
use crate::state::{Cx, EndUserState, EntryDraft, Journal};
use crate::subscription::{GrantSchedule, Subscription};
use crate::time::{Span, Timestamp};

/// The variant of a subscription, or the refusal saying the catalog lost it.
pub(crate) fn variant_of<'c>(
    catalog: &'c Catalog,
    subscription: &Subscription,
) -> Result<&'c Variant, Refusal> {
    catalog
        .variant(subscription.plan_variant_id)
        .ok_or(Refusal::VariantNotFound(subscription.plan_variant_id))
}

fn template_index(index: usize) -> Result<u16, Refusal> {
    u16::try_from(index).map_err(|_| Refusal::Invalid {
        field: "grants",
        message: "too many grant templates".into(),
    })
}

// === impl EndUserState ===

impl EndUserState {
    pub(crate) fn subscription_index(&self, id: SubscriptionId) -> Result<usize, Refusal> {
        self.subscriptions
            .iter()
            .position(|subscription| subscription.id == id)
            .ok_or(Refusal::SubscriptionNotFound(id))
    }

    /// Credits still live in blocks issued by one template (rollovers included).
    fn live_from_template(&self, template: TemplateRef) -> Result<Credits, Refusal> {
        Ok(Credits::sum(
            self.blocks
                .iter()
                .filter(|block| block.template == Some(template))
                .map(|block| block.remaining),
        )?)
    }

    /// `wanted`, reduced so that the template's live credits stay within its cap.
    fn capped(
        &self,
        template: &GrantTemplate,
        reference: TemplateRef,
        wanted: Credits,
    ) -> Result<Credits, Refusal> {
        let Some(cap) = template.cap else {
            return Ok(wanted);
        };
        let room = cap.saturating_sub_floor(self.live_from_template(reference)?);
        Ok(wanted.min(room))
    }

    /// Issues one block from template `index` of subscription `id` at `at`, capped.
    /// `period_end` is where `expire_after: every` ends for period templates.
    pub(crate) fn issue_template_grant(
        &mut self,
        cx: &mut Cx<'_>,
        subscription_id: SubscriptionId,
        index: usize,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let subscription = &self.subscriptions[self.subscription_index(subscription_id)?];
        let variant = variant_of(cx.catalog, subscription)?;
        let Some(template) = variant.grants.get(index) else {
            return Ok(());
        };
        let reference = TemplateRef {
            subscription_id,
            template_index: template_index(index)?,
        };
        let amount = self.capped(template, reference, template.amount)?;
        if !amount.is_positive() {
            return Ok(());
        }
        let window_end = match template.every {
            GrantEvery::Period => subscription.current_period_end,
            GrantEvery::Span(span) => at.checked_add(span)?,
        };
        let expires_at = match template.expire_after {
            ExpireAfter::Every => Some(window_end),
            ExpireAfter::Never => None,
            ExpireAfter::After(span) => Some(at.checked_add(span)?),
        };
        let block = template_block(
            cx,
            template,
            reference,
            amount,
            at,
            expires_at,
            BlockSource::Plan,
        );
        self.add_block(cx, block, EntryType::Grant, journal)?;
        Ok(())
    }

    /// Issues every `every: period` template of a subscription at the start of a period,
    /// and starts the clocks of its fixed-span templates.
    pub(crate) fn start_period_grants(
        &mut self,
        cx: &mut Cx<'_>,
        subscription_id: SubscriptionId,
        at: Timestamp,
        restart_windows: bool,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let position = self.subscription_index(subscription_id)?;
        let variant = variant_of(cx.catalog, &self.subscriptions[position])?;
        let templates: Vec<(usize, GrantEvery, GrantAnchor)> = variant
            .grants
            .iter()
            .enumerate()
            .map(|(index, template)| (index, template.every, template.anchor))
            .collect();
        if restart_windows {
            let mut schedules = Vec::new();
            for &(index, every, anchor) in &templates {
                if let GrantEvery::Span(_) = every {
                    schedules.push(GrantSchedule {
                        template_index: template_index(index)?,
                        next_at: (anchor == GrantAnchor::Period).then_some(at),
                        window_ends_at: None,
                    });
                }
            }
            self.subscriptions[position].schedules = schedules;
        }
        for (index, every, _) in templates {
            if every == GrantEvery::Period {
                self.issue_template_grant(cx, subscription_id, index, at, journal)?;
            }
        }
        Ok(())
    }

    /// A window of a period-anchored fixed-span template is due: issue it and schedule the
    /// next one.
    pub(crate) fn issue_window(
        &mut self,
        cx: &mut Cx<'_>,
        subscription_id: SubscriptionId,
        template_position: usize,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let position = self.subscription_index(subscription_id)?;
        let variant = variant_of(cx.catalog, &self.subscriptions[position])?;
        let schedule = self.subscriptions[position].schedules[template_position];
        let index = usize::from(schedule.template_index);
        let span = match variant.grants.get(index).map(|template| template.every) {
            Some(GrantEvery::Span(span)) => span,
            _ => {
                return Err(Refusal::Invariant(format!(
                    "schedule for template {index} has no span"
                )));
            }
        };
        self.subscriptions[position].schedules[template_position].next_at =
            Some(at.checked_add(span)?);
        self.issue_template_grant(cx, subscription_id, index, at, journal)
    }

    /// Opens a new window for every `anchor: first_use` template that applies to
    /// `feature` and has no open window: its block is granted now, and the window ends
    /// one span later.
    pub(crate) fn open_first_use_windows(
        &mut self,
        cx: &mut Cx<'_>,
        feature: &FeatureKey,
        now: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        for (subscription_id, template_position, index, span) in
            self.closed_first_use_windows(cx.catalog, feature, now)?
        {
            let position = self.subscription_index(subscription_id)?;
            self.subscriptions[position].schedules[template_position].window_ends_at =
                Some(now.checked_add(span)?);
            self.issue_template_grant(cx, subscription_id, index, now, journal)?;
        }
        Ok(())
    }

    /// What the next use of `feature` would grant by opening first-use windows (so that a
    /// check before the first use sees the quota).
    pub(crate) fn pending_first_use_credits(
        &self,
        catalog: &Catalog,
        feature: &FeatureKey,
        now: Timestamp,
    ) -> Result<Credits, Refusal> {
        let mut total = Credits::ZERO;
        for (subscription_id, _, index, _) in
            self.closed_first_use_windows(catalog, feature, now)?
        {
            let subscription = &self.subscriptions[self.subscription_index(subscription_id)?];
            let variant = variant_of(catalog, subscription)?;
            let Some(template) = variant.grants.get(index) else {
                continue;
            };
            let reference = TemplateRef {
                subscription_id,
                template_index: template_index(index)?,
            };
            total = total.checked_add(self.capped(template, reference, template.amount)?)?;
        }
        Ok(total)
    }

    /// When the next recurring grant for `feature` arrives: the next window of a
    /// period-anchored template, the end of an open first-use window, or the end of the
    /// period for period templates.
    pub(crate) fn next_refill(
        &self,
        catalog: &Catalog,
        feature: &FeatureKey,
        now: Timestamp,
    ) -> Result<Option<Timestamp>, Refusal> {
        let mut soonest: Option<Timestamp> = None;
        for subscription in self
            .subscriptions
            .iter()
            .filter(|subscription| subscription.status.issues_grants())
        {
            let variant = variant_of(catalog, subscription)?;
            for template in variant
                .grants
                .iter()
                .filter(|template| template.applies_to(feature))
            {
                if template.every == GrantEvery::Period {
                    let end = subscription.current_period_end;
                    soonest = Some(soonest.map_or(end, |current| current.min(end)));
                }
            }
            for schedule in &subscription.schedules {
                let Some(template) = variant.grants.get(usize::from(schedule.template_index))
                else {
                    continue;
                };
                if !template.applies_to(feature) {
                    continue;
                }
                let next = match template.anchor {
                    GrantAnchor::Period => schedule.next_at,
                    GrantAnchor::FirstUse => {
                        schedule.window_ends_at.filter(|ends_at| now < *ends_at)
                    }
                };
                if let Some(next) = next {
                    soonest = Some(soonest.map_or(next, |current| current.min(next)));
                }
            }
        }
        Ok(soonest)
    }

    /// `(subscription, schedule position, template index, span)` of each first-use
    /// template for `feature` whose window is not open at `now`.
    fn closed_first_use_windows(
        &self,
        catalog: &Catalog,
        feature: &FeatureKey,
        now: Timestamp,
    ) -> Result<Vec<(SubscriptionId, usize, usize, Span)>, Refusal> {
        let mut closed = Vec::new();
        for subscription in self
            .subscriptions
            .iter()
            .filter(|subscription| subscription.status.issues_grants())
        {
            let variant = variant_of(catalog, subscription)?;
            for (position, schedule) in subscription.schedules.iter().enumerate() {
                let index = usize::from(schedule.template_index);
                let Some(template) = variant.grants.get(index) else {
                    continue;
                };
                let GrantEvery::Span(span) = template.every else {
                    continue;
                };
                let open = schedule.window_ends_at.is_some_and(|ends_at| now < ends_at);
                if template.anchor == GrantAnchor::FirstUse && !open && template.applies_to(feature)
                {
                    closed.push((subscription.id, position, index, span));
                }
            }
        }
        Ok(closed)
    }

    /// Expires a block's unheld remainder at its `expires_at` (due work), then rolls part
    /// of it over when its template says so.
    pub(crate) fn expire_block(
        &mut self,
        cx: &mut Cx<'_>,
        block_id: BlockId,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let block = self
            .block_mut(block_id)
            .ok_or(Refusal::BlockNotFound(block_id))?;
        let amount = block.unheld();
        if !amount.is_positive() {
            return Ok(());
        }
        block.expire(amount)?;
        let template = block
            .template
            .filter(|_| block.source != BlockSource::Rollover);
        self.totals.expired = self.totals.expired.checked_add(amount)?;
        let entry = self.entry(
            cx,
            EntryType::Expire,
            at,
            EntryDraft {
                amount,
                parts: vec![Part { block_id, amount }],
                ..EntryDraft::default()
            },
        )?;
        journal.entries.push(entry);
        journal
            .events
            .push(self.event(at, EventKind::CreditsExpired { block_id, amount }));
        if let Some(reference) = template {
            self.roll_over(cx, reference, amount, at, journal)?;
        }
        Ok(())
    }

    /// Moves `percent` of an expired template block's remainder (at most `max`, within the
    /// cap) into a new block expiring one interval later, if the subscription still lives.
    fn roll_over(
        &mut self,
        cx: &mut Cx<'_>,
        reference: TemplateRef,
        expired: Credits,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let Ok(position) = self.subscription_index(reference.subscription_id) else {
            return Ok(());
        };
        let variant = variant_of(cx.catalog, &self.subscriptions[position])?;
        let Some(template) = variant.grants.get(usize::from(reference.template_index)) else {
            return Ok(());
        };
        let Some(rollover) = template.rollover else {
            return Ok(());
        };
        let share = i128::from(expired.get())
            .checked_mul(i128::from(rollover.percent))
            .and_then(|product| product.checked_div(100))
            .ok_or(Refusal::Overflow)?;
        let mut amount = Credits::try_from_i128(share)?;
        if let Some(max) = rollover.max {
            amount = amount.min(max);
        }
        let amount = self.capped(template, reference, amount)?;
        if !amount.is_positive() {
            return Ok(());
        }
        let expires_at = match template.every {
            GrantEvery::Period => variant.interval.after(at)?,
            GrantEvery::Span(span) => at.checked_add(span)?,
        };
        let template = template.clone();
        let block = template_block(
            cx,
            &template,
            reference,
            amount,
            at,
            Some(expires_at),
            BlockSource::Rollover,
        );
        self.add_block(cx, block, EntryType::Grant, journal)?;
        Ok(())
    }

    /// Voids the unheld remainder of every live block a subscription granted.
    pub(crate) fn void_subscription_blocks(
        &mut self,
        cx: &mut Cx<'_>,
        subscription_id: SubscriptionId,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let ids: Vec<BlockId> = self
            .blocks
            .iter()
            .filter(|block| {
                block.subscription_id == Some(subscription_id)
                    && block.voided_at.is_none()
                    && !block.is_expired(at)
            })
            .map(|block| block.id)
            .collect();
        for id in ids {
            self.void_now(cx, id, at, journal)?;
        }
        Ok(())
    }
}

fn template_block(
    cx: &mut Cx<'_>,
    template: &GrantTemplate,
    reference: TemplateRef,
    amount: Credits,
    at: Timestamp,
    expires_at: Option<Timestamp>,
    source: BlockSource,
) -> Block {
    Block {
        id: BlockId::new(cx.ids),
        amount,
        remaining: amount,
        held: Credits::ZERO,
        priority: template.priority,
        effective_at: at,
        expires_at,
        source,
        feature_keys: template.feature_keys.clone(),
        price_paid: None,
        currency: None,
        settles_debt: template.settles_debt,
        subscription_id: Some(reference.subscription_id),
        template: Some(reference),
        created_at: at,
        voided_at: None,
        burned: Credits::ZERO,
        expired: Credits::ZERO,
        voided: Credits::ZERO,
    }
}
