//! The pingora `ProxyHttp` implementation: path normalised → route → identity → decision
//! from the replica in `request_filter` (no network call, no disk wait, no lock held
//! across an await), usage into the outbox when the upstream's response header arrives (flushed before the
//! response is released), reservations committed or released after the fact.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use ledger::{Credits, EndUserId, EndUserState, FeatureKey, Timestamp, Units};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use protocol::{CreateReservation, Problem};

use crate::config::{Config, OnUnavailable, Unmatched};
use crate::identity::{Identity, IdentityError};
use crate::leases::{Leases, Spend, Taken, Unrecorded};
use crate::outbox::{Op, Outbox, Record};
use crate::pending::PendingSpend;
use crate::replica::Replica;
use crate::routes::{Route, Routes, UnitsRule};

mod meters;
mod verdict;

pub use meters::Meters;
pub use verdict::{Inputs, Outcome, verdict};

/// What the hot path needs from the configuration (swapped whole on reload).
#[derive(Debug)]
pub struct Live {
    pub routes: Routes,
    pub identity: Identity,
    pub max_staleness: std::time::Duration,
    pub upstream: String,
}

impl Live {
    /// # Errors
    /// An invalid configuration (named).
    pub fn from_config(config: &Config) -> Result<Live, crate::config::ConfigError> {
        Ok(Live {
            routes: Routes::from_config(config)?,
            identity: Identity::from_config(&config.identity)?,
            max_staleness: config.max_staleness(),
            upstream: config.upstream.clone(),
        })
    }
}

/// Units used per (route, end user) while failing open; cleared when fresh again.
#[derive(Debug, Default)]
pub struct OutageBudgets {
    used: Mutex<HashMap<(usize, EndUserId), u64>>,
}

impl OutageBudgets {
    /// Takes `units` from the budget; false when it would go over.
    fn take(&self, route: usize, end_user: &EndUserId, units: u64, budget: u64) -> bool {
        let mut used = self
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = used.entry((route, end_user.clone())).or_insert(0);
        let after = entry.saturating_add(units);
        if after > budget {
            return false;
        }
        *entry = after;
        true
    }

    pub fn clear(&self) {
        self.used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

/// The gate: shared by every request.
#[derive(Debug)]
pub struct Gate {
    pub live: Arc<ArcSwap<Live>>,
    pub replica: Arc<Replica>,
    pub outbox: Arc<Outbox>,
    pub client: client::Client,
    pub outage: Arc<OutageBudgets>,
    /// Requests being handled (a shutdown waits for them before closing connections).
    pub in_flight: Arc<InFlightCount>,
    /// The leases this proxy spends from on features gated by balance (SPEC 12.1).
    pub leases: Arc<Leases>,
    /// Per-request metrics, registered once.
    pub meters: Meters,
}

/// Requests being handled, and a wake-up for whoever waits for none.
#[derive(Debug, Default)]
pub struct InFlightCount {
    count: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl InFlightCount {
    /// Waits until no request is in flight, or until `deadline`.
    pub async fn idle(&self, deadline: tokio::time::Instant) {
        loop {
            let idle = self.idle.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return;
            }
        }
    }
}

/// Counts a request as in flight until its context is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<InFlightCount>);

impl InFlight {
    fn new(counter: &Arc<InFlightCount>) -> InFlight {
        counter.count.fetch_add(1, Ordering::AcqRel);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Only the last request out wakes a waiting shutdown.
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A reservation held for a request.
#[derive(Debug)]
struct Hold {
    /// The control plane's reservation, when it could be made.
    reservation_id: Option<String>,
    actual_header: http::HeaderName,
    /// The admission's state and balance (before the estimate), to price the actual
    /// with; none when the estimate was not decided on a fresh replica.
    priced_on: Option<PricedOn>,
}

/// What a reservation's estimate was decided on: `x-quota-balance` of its answer is the
/// balance less the actual's cost priced on the same state (so the same tier position
/// and pending spend), or, when the actual is not known, less the estimate's.
#[derive(Debug)]
struct PricedOn {
    state: Arc<EndUserState>,
    balance: Credits,
    pending: Credits,
    now: Timestamp,
}

/// An admitted request.
#[derive(Debug)]
struct Admitted {
    end_user: EndUserId,
    feature: FeatureKey,
    units: Units,
    /// Credits added to local pending at admission (given back unless recorded).
    pending: PendingSpend,
    source: &'static str,
    balance_after: Option<i64>,
    resets_at: Option<Timestamp>,
    hold: Option<Hold>,
    /// The cost taken from the end user's lease; recorded when the request is charged,
    /// given back when it is dropped unrecorded.
    spend: Option<Spend>,
    /// The newest state the answer reflects (`x-quota-as-of`), when a lease answer is
    /// newer than the replica.
    as_of: Option<Timestamp>,
    charge_upstream_errors: bool,
    /// The route fails open: usage that cannot be recorded (the usage log full or the
    /// disk refusing it) does not hold back the answer, it is logged and counted.
    fails_open: bool,
    /// The usage (or reservation step) is in the outbox.
    recorded: bool,
    /// Set on reserve routes' admissions decided on a fresh replica.
    priced_on: Option<PricedOn>,
}

impl Admitted {
    /// An admission of `units` of `feature` for `end_user` on `route`, decided by
    /// `source`; the answer's balance and reset are set by the caller.
    fn new(
        route: &Route,
        end_user: &EndUserId,
        feature: FeatureKey,
        units: Units,
        pending: PendingSpend,
        source: &'static str,
    ) -> Admitted {
        Admitted {
            end_user: end_user.clone(),
            feature,
            units,
            pending,
            source,
            balance_after: None,
            resets_at: None,
            hold: None,
            spend: None,
            as_of: None,
            charge_upstream_errors: route.charge_upstream_errors,
            fails_open: route.on_unavailable == OnUnavailable::Open,
            recorded: false,
            priced_on: None,
        }
    }
}

/// Per request.
#[derive(Debug)]
pub struct Ctx {
    _in_flight: InFlight,
    started: Instant,
    admitted: Option<Admitted>,
    /// The header the upstream reads the charged end user from (taken with the
    /// configuration the request was decided by), and that end user on gated routes.
    forward: Option<(http::HeaderName, Option<EndUserId>)>,
}

fn problem_body(problem: &Problem) -> Bytes {
    Bytes::from(serde_json::to_vec(problem).unwrap_or_default())
}

async fn answer(session: &mut Session, problem: &Problem) -> pingora::Result<bool> {
    let body = problem_body(problem);
    let mut header = ResponseHeader::build(problem.status, Some(4))?;
    header.insert_header("content-type", protocol::PROBLEM_CONTENT_TYPE)?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("cache-control", "no-store")?;
    if problem.status == 503 {
        // Failing closed, an outage budget, a lease still pending: a moment later may do.
        header.insert_header("retry-after", "1")?;
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(true)
}

/// What the decision step concluded.
enum Verdict {
    Admit(Admitted),
    Refuse(Problem),
    /// Gated by balance: spend `cost` from the end user's lease (SPEC 12.1).
    Lease(LeaseAsk),
}

/// A request to be admitted from its lease.
struct LeaseAsk {
    admitted: Admitted,
    cost: Credits,
    /// Free credits the replica shows for the feature (beyond any lease).
    available: Credits,
    version: Option<u64>,
    /// The replica's state the decision used (what it shows of the lease, for the
    /// balance header).
    state: Arc<EndUserState>,
    /// Why the replica alone could not decide (stale or loading), when it could not:
    /// without a lease, the failure policy decides.
    stale: Option<&'static str>,
}

impl Gate {
    fn units<'r>(
        route: &'r Route,
        headers: &http::HeaderMap,
    ) -> Result<(Units, Option<&'r crate::routes::Reserve>), Box<Problem>> {
        let parse = |name: &http::HeaderName| -> Result<Option<Units>, Box<Problem>> {
            let Some(value) = headers.get(name) else {
                return Ok(None);
            };
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .and_then(Units::new)
                .map(Some)
                .ok_or_else(|| {
                    let mut problem = Problem::new(
                        400,
                        "validation_error",
                        "Invalid units",
                        format!(
                            "the {name} header must be a whole number from 1 to {}",
                            ledger::UNITS_MAX
                        ),
                    );
                    problem.field = Some(name.to_string());
                    Box::new(problem)
                })
        };
        match &route.units {
            UnitsRule::Fixed(units) => Ok((*units, None)),
            UnitsRule::Header(name) => parse(name)?.map(|units| (units, None)).ok_or_else(|| {
                let mut problem = Problem::new(
                    400,
                    "validation_error",
                    "Missing units",
                    format!("this route takes its units from the {name} header"),
                );
                problem.field = Some(name.to_string());
                Box::new(problem)
            }),
            UnitsRule::Reserve(reserve) => {
                let estimate = match &reserve.estimate_header {
                    Some(name) => parse(name)?.unwrap_or(reserve.estimate),
                    None => reserve.estimate,
                };
                Ok((estimate, Some(reserve)))
            }
        }
    }

    /// Takes the hold a reservation route needs before its upstream starts. Returns the
    /// reservation's id (`None` when the control plane could not be reached and the
    /// route fails open), or the answer to give instead, with the local spend given back.
    async fn reserve_hold(
        &self,
        route: &Route,
        end_user: &EndUserId,
        units: Units,
        reserve: &crate::routes::Reserve,
        admitted: &mut Admitted,
    ) -> Result<Option<String>, Problem> {
        // The one network call on the request path, and only for reservation routes:
        // the hold must exist at the control plane before a long upstream job starts.
        // A known key: if the answer is lost, the outbox can find the hold again.
        let reserve_key = format!("qsp_{}", ulid::Ulid::new());
        let reservation = self
            .client
            .with_key(&reserve_key)
            .reserve(&CreateReservation {
                end_user_id: end_user.to_string(),
                feature_key: admitted.feature.to_string(),
                units: Some(units.get()),
                amount: None,
                ttl_seconds: Some(reserve.ttl_secs),
            })
            .await;
        match reservation {
            Ok(reservation) => {
                // The hold is in the control plane's state now, from the version
                // the answer names: the local estimate stops counting once the
                // replica shows it.
                admitted
                    .pending
                    .confirm(reservation.version, || self.replica.version(end_user));
                Ok(Some(reservation.id))
            }
            Err(error) if !answers_the_client(&error) => {
                // The hold may exist even though no answer came back: queue its
                // release (found again by the key), so credits are not held for the
                // whole TTL.
                let undo = Record {
                    key: format!("{reserve_key}-undo"),
                    end_user_id: end_user.to_string(),
                    pending: 0,
                    op: Op::Unreserve {
                        reserve_key: reserve_key.clone(),
                        feature_key: admitted.feature.to_string(),
                        units: units.get(),
                        ttl_seconds: reserve.ttl_secs,
                    },
                };
                if let Err(error) = self.outbox.push(&undo).await {
                    tracing::error!(%error, "could not queue the release of a reservation without answer (it will expire)");
                }
                if route.on_unavailable == OnUnavailable::Closed {
                    let problem = Problem::new(
                        503,
                        "quota_unavailable",
                        "Quota state unavailable",
                        "the control plane could not take the reservation",
                    );
                    return Err(problem);
                }
                tracing::warn!(%error, "reservation failed; failing open, the actual will be recorded as usage");
                Ok(None)
            }
            // Refused: the admission (and its pending spend) is dropped.
            Err(client::Error::Api { problem, .. }) => Err(*problem),
            Err(error) => {
                let problem = Problem::new(
                    502,
                    "control_plane_error",
                    "Reservation failed",
                    error.to_string(),
                );
                Err(problem)
            }
        }
    }

    /// What a reservation route's answer records: the hold released (failed, or nothing
    /// used), committed with the actual units (the estimate when the upstream gave none),
    /// or recorded as usage when no hold could be made; and the balance basis header.
    fn settle_hold(
        &self,
        admitted: &Admitted,
        hold: &Hold,
        failed: bool,
        upstream_response: &ResponseHeader,
    ) -> (Option<Op>, (&'static str, Option<i64>)) {
        let actual = upstream_response
            .headers
            .get(&hold.actual_header)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.trim().parse::<u64>().ok());
        let basis =
            self.balance_after_actual(admitted, hold, if failed { Some(0) } else { actual });
        let units = match actual {
            Some(units) => units,
            None => {
                if !failed {
                    tracing::warn!(header = %hold.actual_header, "upstream gave no actual units; charging the estimate");
                }
                admitted.units.get()
            }
        };
        let op = match (&hold.reservation_id, failed || units == 0) {
            (Some(id), true) => Some(Op::Release {
                reservation_id: id.clone(),
            }),
            (None, true) => None,
            (Some(id), false) => Some(Op::Commit {
                reservation_id: id.clone(),
                feature_key: admitted.feature.to_string(),
                units,
            }),
            (None, false) => Some(Op::request_usage(
                admitted.feature.to_string(),
                units,
                self.replica.now().as_millis(),
                admitted.resets_at.map(Timestamp::as_millis),
            )),
        };
        (op, basis)
    }

    /// The decision from the replica (or the failure policy), with local spend reserved.
    /// `use_leases: false` decides from the replica and local spend alone (the control
    /// plane cannot be reached for a lease, but the replica is still fresh).
    ///
    /// The state is read under the end user's pending lock, which the replica also holds
    /// while it installs a new state and clears the pending spend that state includes: a
    /// decision sees the state and the pending spend of one moment, so never a state
    /// without a cost that pending no longer holds (a cost the stream shows before its
    /// acknowledgement arrives counts twice for that moment: the error is towards
    /// refusing).
    fn decide(
        &self,
        live: &Live,
        route: &Route,
        end_user: &EndUserId,
        units: Units,
        use_leases: bool,
    ) -> Verdict {
        let Some(feature) = route.feature.clone() else {
            return Verdict::Refuse(verdict::no_feature());
        };
        let freshness = self.replica.freshness(live.max_staleness);
        let catalog = self.replica.catalog();
        let now = self.replica.now();
        let leases = use_leases && self.leases.enabled();
        let ((outcome, state, pending_before), pending) =
            self.replica.pending.admit_spend(end_user, |pending| {
                let state = self
                    .replica
                    .user(end_user)
                    .unwrap_or_else(|| Arc::new(EndUserState::new(end_user.clone(), now)));
                let inputs = Inputs {
                    freshness,
                    catalog: catalog.as_deref().map(|view| &view.catalog),
                    state: &state,
                    pending,
                    now,
                    leases,
                };
                let outcome = verdict(&inputs, route, units);
                let cost = outcome.pending_cost();
                ((outcome, state, pending), cost)
            });
        let admitted = |pending, source| {
            Admitted::new(route, end_user, feature.clone(), units, pending, source)
        };
        match outcome {
            Outcome::Admit {
                cost,
                balance,
                resets_at,
            } => {
                if let Some(problem) = self.unrecordable(route, end_user) {
                    return Verdict::Refuse(problem);
                }
                self.meters.decision("allowed", "replica");
                let mut admitted = admitted(pending, "replica");
                admitted.balance_after =
                    balance.map(|balance| balance.saturating_sub_floor(cost).get());
                admitted.resets_at = resets_at;
                if matches!(route.units, UnitsRule::Reserve(_))
                    && let Some(balance) = balance
                {
                    admitted.priced_on = Some(PricedOn {
                        state,
                        balance,
                        pending: pending_before,
                        now,
                    });
                }
                Verdict::Admit(admitted)
            }
            Outcome::Refuse { problem, outcome } => {
                self.meters.decision(outcome, "replica");
                Verdict::Refuse(*problem)
            }
            Outcome::Lease {
                cost,
                available,
                resets_at,
                stale,
            } => {
                let mut admitted = admitted(pending, "replica");
                admitted.resets_at = resets_at;
                Verdict::Lease(LeaseAsk {
                    admitted,
                    cost,
                    available,
                    version: Some(state.version()),
                    state,
                    stale,
                })
            }
            Outcome::Fallback { why, cost } => self.fallback(route, end_user, units, why, cost),
        }
    }

    /// `Some`: the usage log is at its bound (the local store has not taken what it
    /// holds), so a request admitted here could not record its usage, and the route
    /// fails closed: refused before the upstream. A route failing open goes on (its
    /// usage recorded if the log still takes it, else logged and counted as lost).
    fn unrecordable(&self, route: &Route, end_user: &EndUserId) -> Option<Problem> {
        if self.outbox.can_record() {
            return None;
        }
        metrics::counter!("qs_proxy_usage_log_full_total").increment(1);
        tracing::warn!(%end_user, "the usage log is full (usage.usage_log_max_kb)");
        if route.on_unavailable == OnUnavailable::Open {
            return None;
        }
        self.meters.decision("usage_log_full", "replica");
        Some(verdict::usage_log_full())
    }

    /// The route's failure policy (`why`: the replica cannot decide): closed answers 503;
    /// open admits (within the outage budget), counting `cost` (what the request would
    /// cost by the last known catalog) as pending.
    fn fallback(
        &self,
        route: &Route,
        end_user: &EndUserId,
        units: Units,
        why: &'static str,
        cost: Credits,
    ) -> Verdict {
        let Some(feature) = route.feature.clone() else {
            return Verdict::Refuse(verdict::no_feature());
        };
        if route.on_unavailable == OnUnavailable::Closed {
            self.meters.decision("unavailable", "fallback");
            tracing::debug!(route = route.index, %end_user, why, "failing closed");
            return Verdict::Refuse(Problem::new(
                503,
                "quota_unavailable",
                "Quota state unavailable",
                why,
            ));
        }
        if let Some(budget) = route.outage_budget
            && !self.outage.take(route.index, end_user, units.get(), budget)
        {
            self.meters.decision("outage_budget_spent", "fallback");
            return Verdict::Refuse(Problem::new(
                503,
                "outage_budget_exhausted",
                "Outage budget spent",
                format!(
                    "{why}; this end user has used the route's outage budget of {budget} units"
                ),
            ));
        }
        let pending = self.replica.pending.hold(end_user, cost);
        self.meters.decision("allowed", "fallback");
        tracing::debug!(route = route.index, %end_user, why, "failing open");
        Verdict::Admit(Admitted::new(
            route, end_user, feature, units, pending, "fallback",
        ))
    }
}

/// Puts the request's path in normal form ([`crate::path`]), query kept, so that the
/// route matched on `uri.path()` is the path the upstream is sent. A target in
/// absolute-form (`http://host/path`) is forwarded in origin-form.
///
/// # Errors
/// Why the path cannot be normalised (answered 400 `invalid_path`).
fn normalise_request(header: &mut RequestHeader) -> Result<(), String> {
    let raw = header.raw_path();
    let origin_form = raw.first() == Some(&b'/');
    let source = if origin_form {
        raw
    } else {
        header
            .uri
            .path_and_query()
            .map_or(&b""[..], |target| target.as_str().as_bytes())
    };
    let target = crate::path::normalise_target(source).map_err(|error| error.to_string())?;
    let path = target.path.as_bytes();
    let unchanged = origin_form
        && source.get(..path.len()) == Some(path)
        && matches!(source.get(path.len()), None | Some(b'?'));
    if unchanged {
        return Ok(());
    }
    let rewritten = target.to_bytes();
    header
        .set_raw_path(&rewritten)
        .map_err(|error| format!("the normalised target could not be used: {error}"))
}

impl Gate {
    /// A reservation's answer: `("actual", balance)` when the upstream named the actual
    /// and it could be priced on the state the estimate was decided on, else
    /// `("estimate", None)` (the header keeps the balance after the estimate). A
    /// released hold (an actual of 0, or an upstream error not charged) costs nothing.
    fn balance_after_actual(
        &self,
        admitted: &Admitted,
        hold: &Hold,
        actual: Option<u64>,
    ) -> (&'static str, Option<i64>) {
        let (Some(actual), Some(priced_on), Some(view)) =
            (actual, hold.priced_on.as_ref(), self.replica.catalog())
        else {
            return ("estimate", None);
        };
        let cost = match Units::new(actual) {
            _ if actual == 0 => Some(Credits::ZERO),
            Some(units) => priced_on
                .state
                .decide(
                    &view.catalog,
                    &admitted.feature,
                    units,
                    priced_on.pending,
                    priced_on.now,
                )
                .ok()
                .and_then(|decision| decision.cost),
            None => None,
        };
        match cost {
            Some(cost) => (
                "actual",
                Some(priced_on.balance.saturating_sub_floor(cost).get()),
            ),
            None => ("estimate", None),
        }
    }

    /// `x-quota-balance`, `x-quota-resets-at`, `x-quota-source` and `x-quota-as-of` (never
    /// earlier than the newest state the answer reflects: the replica's, or the lease's
    /// last answer when that is newer).
    fn quota_headers(
        &self,
        admitted: &Admitted,
        upstream_response: &mut ResponseHeader,
    ) -> pingora::Result<()> {
        if let Some(balance) = admitted.balance_after {
            upstream_response.insert_header("x-quota-balance", http::HeaderValue::from(balance))?;
        }
        if let Some(resets_at) = admitted.resets_at {
            upstream_response.insert_header("x-quota-resets-at", resets_at.to_string())?;
        }
        upstream_response.insert_header("x-quota-source", admitted.source)?;
        let as_of = admitted.as_of.map_or(self.replica.as_of(), |as_of| {
            as_of.max(self.replica.as_of())
        });
        upstream_response.insert_header("x-quota-as-of", self.meters.as_of(as_of))?;
        Ok(())
    }

    /// A request spent from a lease, answered by the upstream: its spend on disk under
    /// the lease's open report (flushed before the response in `sync` durability), or
    /// given back when not charged (`failed`).
    async fn record_lease_spend(
        &self,
        admitted: &mut Admitted,
        spend: Spend,
        failed: bool,
        upstream_response: &mut ResponseHeader,
    ) -> pingora::Result<()> {
        let recorded = if failed {
            drop(spend);
            Ok(())
        } else {
            spend.record(admitted.units.get()).await
        };
        match recorded {
            Ok(()) => {}
            // In the spend log (it will be charged), but the `sync` flush failed: as
            // for the outbox, a route failing open releases the response.
            Err(Unrecorded::NotDurable(error)) if admitted.fails_open => {
                tracing::warn!(%error, end_user = %admitted.end_user, "recorded lease spend could not be synced; the route fails open, so the response is released");
            }
            Err(error) => {
                tracing::error!(%error, "could not record lease spend; refusing to release the response");
                return Err(pingora::Error::explain(
                    pingora::ErrorType::InternalError,
                    "usage could not be recorded",
                ));
            }
        }
        admitted.recorded = true;
        self.quota_headers(admitted, upstream_response)
    }

    /// Takes the request's cost from the end user's lease (waiting briefly for a refill):
    /// admitted, refused when the control plane says nothing is left, or the failure
    /// policy when no lease could be had in time.
    async fn spend_from_lease(
        &self,
        live: &Live,
        route: &Route,
        end_user: &EndUserId,
        units: Units,
        ask: LeaseAsk,
    ) -> Verdict {
        let LeaseAsk {
            mut admitted,
            cost,
            available,
            version,
            state,
            stale,
        } = ask;
        if !self.leases.can_record() {
            // The spend log is at its bound (the control plane has not acknowledged
            // older spend): a lease spend could not be recorded. The route's policy:
            // closed refuses before the upstream; open lets the replica decide without
            // a lease, its usage going through the outbox.
            self.meters.decision("spend_log_full", "lease");
            tracing::warn!(%end_user, "the lease spend log is full (usage.spend_log_max_kb)");
            if route.on_unavailable == OnUnavailable::Closed {
                return Verdict::Refuse(Problem::new(
                    503,
                    "usage_log_full",
                    "Usage log full",
                    "the proxy cannot record more lease spend until the control plane acknowledges what it holds (usage.spend_log_max_kb)",
                ));
            }
            return self.decide(live, route, end_user, units, false);
        }
        match self
            .leases
            .take(end_user, &admitted.feature, cost, available, version)
            .await
        {
            Taken::Spent(spend) => {
                self.meters.decision("allowed", "lease");
                // What the end user can still spend: the replica's free credits, plus
                // what it shows this lease holding, less what this proxy spent from the
                // lease and has not had acknowledged (whether or not the replica shows
                // the lease yet, this counts each credit once).
                let held = state
                    .lease(spend.lease_id())
                    .map_or(Credits::ZERO, |lease| lease.held);
                let balance = spend.balance_by_answer.unwrap_or_else(|| {
                    available
                        .checked_add(held)
                        .unwrap_or(Credits::MAX)
                        .saturating_sub_floor(spend.outstanding_after)
                });
                admitted.balance_after = Some(balance.get());
                admitted.as_of = Some(spend.answered_at);
                admitted.spend = Some(spend);
                Verdict::Admit(admitted)
            }
            Taken::Exhausted => {
                self.meters.decision("denied", "lease");
                let mut problem = Problem::new(
                    402,
                    "insufficient_balance",
                    "Insufficient balance",
                    format!("not enough credits for {}", admitted.feature),
                );
                problem.needed = Some(cost.get());
                problem.available = Some(available.get());
                Verdict::Refuse(problem)
            }
            Taken::Late if stale.is_none() => {
                self.meters.decision("lease_late", "lease");
                Verdict::Refuse(Problem::new(
                    503,
                    "lease_pending",
                    "Quota lease pending",
                    "the control plane did not grant this proxy's lease in time; retry shortly",
                ))
            }
            // The control plane cannot be reached, but the replica is fresh (the outage
            // is younger than max_staleness): the replica and local spend decide, as
            // they would without leases.
            Taken::Unavailable if stale.is_none() => {
                self.decide(live, route, end_user, units, false)
            }
            Taken::Unavailable | Taken::Late => {
                let why = stale.unwrap_or("the control plane could not be reached for a lease");
                self.fallback(route, end_user, units, why, cost)
            }
        }
    }
}

/// Whether a control-plane refusal of a reservation is the client's answer (402, 403, a
/// bad feature or units); anything else (unreachable, 5xx, 429, a key problem) is the
/// control plane being unavailable, and the route's policy decides.
fn answers_the_client(error: &client::Error) -> bool {
    matches!(
        error.status().map(|status| status.as_u16()),
        Some(400 | 402 | 403 | 404 | 422)
    )
}

#[async_trait]
impl ProxyHttp for Gate {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            _in_flight: InFlight::new(&self.in_flight),
            started: Instant::now(),
            admitted: None,
            forward: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        let live = self.live.load_full();
        // Routes see, and the upstream is sent, the path in normal form.
        if let Err(detail) = normalise_request(session.req_header_mut()) {
            self.meters.decision("invalid_path", "none");
            let problem = Problem::new(400, "invalid_path", "Invalid path", detail);
            return answer(session, &problem).await;
        }
        // Whatever the client sent under the forward header never reaches the upstream.
        ctx.forward = Some((live.identity.forward_header.clone(), None));
        let header = session.req_header();
        let route = match live.routes.find(&header.method, header.uri.path()) {
            Some(route) => route,
            None if live.routes.unmatched == Unmatched::Pass => return Ok(false),
            None => {
                let problem = Problem::new(
                    404,
                    "no_route",
                    "No route",
                    "no configured route matches this request",
                );
                return answer(session, &problem).await;
            }
        };
        if route.public {
            return Ok(false);
        }
        let end_user = match live.identity.end_user(&header.headers) {
            Ok(end_user) => end_user,
            Err(error @ IdentityError::Repeated(_)) => {
                self.meters.decision("no_identity", "none");
                let problem = Problem::new(
                    400,
                    "ambiguous_identity",
                    "Ambiguous end user",
                    error.to_string(),
                );
                return answer(session, &problem).await;
            }
            Err(error) => {
                self.meters.decision("no_identity", "none");
                let problem =
                    Problem::new(401, "unauthenticated", "No end user", error.to_string());
                return answer(session, &problem).await;
            }
        };
        ctx.forward = Some((live.identity.forward_header.clone(), Some(end_user.clone())));
        let (units, reserve) = match Gate::units(route, &header.headers) {
            Ok(units) => units,
            Err(problem) => return answer(session, &problem).await,
        };
        let started = Instant::now();
        let verdict = self.decide(&live, route, &end_user, units, true);
        self.meters
            .decision_seconds
            .record(started.elapsed().as_secs_f64());
        let verdict = match verdict {
            Verdict::Lease(ask) => {
                self.spend_from_lease(&live, route, &end_user, units, ask)
                    .await
            }
            other => other,
        };
        let mut admitted = match verdict {
            Verdict::Admit(admitted) => admitted,
            Verdict::Refuse(problem) => return answer(session, &problem).await,
            Verdict::Lease(_) => {
                let problem = Problem::new(
                    500,
                    "internal",
                    "Decision failed",
                    "a lease decision was left open",
                );
                return answer(session, &problem).await;
            }
        };
        if let Some(reserve) = reserve {
            let reservation_id = match self
                .reserve_hold(route, &end_user, units, reserve, &mut admitted)
                .await
            {
                Ok(id) => id,
                Err(problem) => return answer(session, &problem).await,
            };
            admitted.hold = Some(Hold {
                reservation_id,
                actual_header: reserve.actual_header.clone(),
                priced_on: admitted.priced_on.take(),
            });
        }
        ctx.admitted = Some(admitted);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let live = self.live.load();
        Ok(Box::new(HttpPeer::new(
            live.upstream.as_str(),
            false,
            String::new(),
        )))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        // The upstream learns who was charged from the proxy alone: every copy the client
        // sent goes, and a gated request carries exactly the end user it was charged to.
        if let Some((name, end_user)) = &ctx.forward {
            upstream_request.remove_header(name);
            if let Some(end_user) = end_user {
                upstream_request.insert_header(name.clone(), end_user.as_str())?;
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        let Some(admitted) = ctx.admitted.as_mut() else {
            return Ok(());
        };
        // pingora calls this for every upstream header, 1xx included (`100 Continue`):
        // record once, on the final answer.
        if admitted.recorded || upstream_response.status.is_informational() {
            return Ok(());
        }
        let failed = upstream_response.status.is_server_error() && !admitted.charge_upstream_errors;
        if let Some(spend) = admitted.spend.take() {
            return self
                .record_lease_spend(admitted, spend, failed, upstream_response)
                .await;
        }
        let key = format!("qsp_{}", ulid::Ulid::new());
        let mut basis = None;
        let record = match (&admitted.hold, failed) {
            (None, true) => None,
            (None, false) => Some(Op::request_usage(
                admitted.feature.to_string(),
                admitted.units.get(),
                self.replica.now().as_millis(),
                admitted.resets_at.map(Timestamp::as_millis),
            )),
            (Some(hold), _) => {
                let (op, hold_basis) = self.settle_hold(admitted, hold, failed, upstream_response);
                basis = Some(hold_basis);
                op
            }
        };
        match record {
            Some(op) => {
                let charged = !matches!(op, Op::Release { .. });
                if !charged {
                    // A release frees the hold: nothing stays pending for it.
                    admitted.pending.give_back();
                }
                let record = Record {
                    key,
                    end_user_id: admitted.end_user.to_string(),
                    pending: admitted.pending.cost().get(),
                    op,
                };
                match self.outbox.append(&record) {
                    Ok(ticket) => {
                        // In the log (a killed process keeps it): it will be charged.
                        admitted.pending.hand_on();
                        admitted.recorded = true;
                        if let Err(error) = self.outbox.durable(ticket).await {
                            if !admitted.fails_open {
                                tracing::error!(%error, key = %record.key, "could not sync recorded usage; refusing to release the response");
                                return Err(pingora::Error::explain(
                                    pingora::ErrorType::InternalError,
                                    "usage could not be made durable",
                                ));
                            }
                            // Failing open: released; a power loss (not a killed
                            // process) could lose this record.
                            tracing::warn!(%error, key = %record.key, "recorded usage could not be synced; the route fails open, so the response is released");
                        }
                    }
                    Err(error) if admitted.fails_open => {
                        // Failing open: the answer goes out, the usage is lost, and
                        // said so where an operator looks.
                        metrics::counter!("qs_proxy_usage_unrecorded_total").increment(1);
                        tracing::error!(
                            %error,
                            end_user = %admitted.end_user,
                            feature = %admitted.feature,
                            units = admitted.units.get(),
                            key = %record.key,
                            "could not record usage; the route fails open, so the response is released and this usage is lost"
                        );
                        admitted.pending.give_back();
                    }
                    Err(error) => {
                        tracing::error!(%error, "could not record usage; refusing to release the response");
                        return Err(pingora::Error::explain(
                            pingora::ErrorType::InternalError,
                            "usage could not be recorded",
                        ));
                    }
                }
                admitted.recorded = true;
            }
            None => {
                admitted.pending.give_back();
                admitted.recorded = true;
            }
        }
        if let Some((basis, balance)) = basis {
            if let Some(balance) = balance {
                admitted.balance_after = Some(balance);
            }
            upstream_response.insert_header("x-quota-balance-basis", basis)?;
        }
        self.quota_headers(admitted, upstream_response)
    }

    async fn logging(&self, session: &mut Session, error: Option<&pingora::Error>, ctx: &mut Ctx) {
        let status = session
            .response_written()
            .map_or(0, |response| response.status.as_u16());
        self.meters
            .request_seconds
            .record(ctx.started.elapsed().as_secs_f64());
        let Some(admitted) = ctx.admitted.as_mut() else {
            return;
        };
        if admitted.recorded {
            return;
        }
        // Admitted but no upstream answer reached us (upstream down, client gone): no
        // charge (the pending spend goes back with the admission); a control-plane hold
        // is released.
        if let Some(Hold {
            reservation_id: Some(id),
            ..
        }) = &admitted.hold
        {
            let record = Record {
                key: format!("qsp_{}", ulid::Ulid::new()),
                end_user_id: admitted.end_user.to_string(),
                pending: 0,
                op: Op::Release {
                    reservation_id: id.clone(),
                },
            };
            if let Err(error) = self.outbox.push(&record).await {
                tracing::error!(%error, "could not queue a reservation release (the hold will expire)");
            }
        }
        tracing::debug!(status, error = ?error.map(ToString::to_string), "admitted request ended without an upstream answer; not charged");
    }
}
