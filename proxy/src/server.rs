//! Starting and stopping a proxy: the sled store, the replica and its follower, the
//! outbox and its shipper, pingora's HTTP proxy on our own accept loop, and the admin
//! endpoints.
//!
//! pingora's `HttpProxy` is hosted on a tokio runtime and accept loop of our own rather
//! than pingora's `Server`: a sidecar needs neither daemonisation nor fd-passing upgrades,
//! and this way the proxy can listen on port 0 and report the bound address, start and
//! stop many times in one test process, and shut down within a bounded grace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use pingora::apps::ServerApp;
use pingora::server::configuration::ServerConf;
use protocol::clock::{Clock, SystemClock};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::disk::{Disk, Flush, Flusher};
use crate::gate::{Gate, InFlightCount, Live, OutageBudgets};
use crate::leases::Leases;
use crate::outbox::Outbox;
use crate::pending::Pending;
use crate::replica::{Freshness, Replica};
use crate::spend_log::SpendLog;

mod admin;

use admin::Admin;

/// A running proxy.
#[derive(Debug)]
pub struct Running {
    pub address: SocketAddr,
    pub admin_address: SocketAddr,
    pub replica: Arc<Replica>,
    pub outbox: Arc<Outbox>,
    pub spend_log: Arc<SpendLog>,
    live: Arc<ArcSwap<Live>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    stop_background: watch::Sender<bool>,
    background: Option<std::thread::JoinHandle<()>>,
}

/// Everything off the request path, run on its own thread and single-threaded runtime so
/// the request workers only serve requests: the outbox shipper, the replication follower
/// and persister, and housekeeping. The two flushers wait for their stop here and sync
/// on threads of their own (`Flusher::run`).
struct Background {
    leases: Arc<Leases>,
    flusher: Arc<Flusher>,
    spend_log: Arc<SpendLog>,
    spend_flusher: Arc<Flusher>,
    replica: Arc<Replica>,
    outbox: Arc<Outbox>,
    client: client::Client,
    live: Arc<ArcSwap<Live>>,
    outage: Arc<OutageBudgets>,
    flush_interval: Duration,
    ship_interval: Duration,
    batch_size: usize,
    /// Where to follow the feed on NATS (`sync.nats_url`), if anywhere.
    nats_url: Option<String>,
    stopped: watch::Receiver<bool>,
}

impl Background {
    fn run(self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::error!(%error, "cannot start the background runtime");
                return;
            }
        };
        runtime.block_on(async move {
            let tasks = [
                tokio::spawn(self.flusher.run(
                    Arc::clone(&self.outbox) as Arc<dyn Flush>,
                    self.flush_interval,
                    self.stopped.clone(),
                )),
                tokio::spawn(self.spend_flusher.run(
                    Arc::clone(&self.spend_log) as Arc<dyn Flush>,
                    self.flush_interval,
                    self.stopped.clone(),
                )),
                tokio::spawn(persist(self.replica.clone(), self.stopped.clone())),
                tokio::spawn(crate::sync::follow(
                    self.replica.clone(),
                    self.client.clone(),
                    self.nats_url,
                    self.stopped.clone(),
                )),
                tokio::spawn(self.leases.clone().run(
                    crate::leases::Context {
                        client: self.client.clone(),
                        replica: self.replica.clone(),
                        outbox: self.outbox.clone(),
                    },
                    self.stopped.clone(),
                )),
                tokio::spawn(
                    self.outbox
                        .clone()
                        .hand_on_loop(self.ship_interval, self.stopped.clone()),
                ),
                tokio::spawn(self.outbox.clone().ship(
                    self.client,
                    self.replica.clone(),
                    self.batch_size,
                    self.ship_interval,
                    self.stopped.clone(),
                )),
                tokio::spawn(housekeeping(
                    self.replica,
                    self.outage,
                    self.live,
                    self.outbox,
                    self.stopped,
                )),
            ];
            for task in tasks {
                if let Err(error) = task.await {
                    tracing::error!(%error, "a background task failed");
                }
            }
        });
    }
}

/// Usage not yet acknowledged by the control plane, in all: the outbox's records and the
/// lease spend no report has covered yet.
pub fn unacknowledged(outbox: &Outbox, spend_log: &SpendLog) -> usize {
    outbox
        .depth()
        .saturating_add(usize::try_from(spend_log.len()).unwrap_or(usize::MAX))
}

/// The proxy's listener and its admin listener.
async fn listeners(config: &Config) -> anyhow::Result<(TcpListener, TcpListener)> {
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin_listener = TcpListener::bind(&config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.admin_listen))?;
    Ok((listener, admin_listener))
}

/// The usage outbox in sled, its usage log in `data_dir/usage`, as `usage` configures
/// them.
fn open_outbox(
    config: &Config,
    disk: &Disk,
    flusher: &Arc<Flusher>,
) -> anyhow::Result<Arc<Outbox>> {
    let outbox = Outbox::open(
        disk.clone(),
        &config.data_dir.join("usage"),
        config.usage.usage_log_max_kb.saturating_mul(1 << 10),
        flusher.clone(),
        config.usage.durability,
        config.usage.batch_size,
    )
    .context("opening the usage log")?;
    Ok(Arc::new(outbox.aggregating(Duration::from_millis(
        config.usage.aggregate_ms,
    ))))
}

/// The lease spend log in `data_dir/spend`, with what an older version left in sled.
fn open_spend_log(config: &Config, disk: &Disk) -> anyhow::Result<Arc<SpendLog>> {
    let spend_log = SpendLog::open(
        &config.data_dir.join("spend"),
        config.usage.spend_log_max_kb.saturating_mul(1 << 10),
    )
    .context("opening the lease spend log")?;
    migrate_sled_spend(disk, &spend_log).context("moving lease spend out of sled")?;
    Ok(Arc::new(spend_log))
}

/// Lease spend an older version kept in sled moves to the spend log once (appended,
/// then removed from sled), so an upgrade loses no unreported spend.
fn migrate_sled_spend(disk: &Disk, spend_log: &SpendLog) -> anyhow::Result<()> {
    let mut moved = 0usize;
    for (lease, sequences) in disk.lease_spend_index()? {
        for sequence in sequences {
            let (keys, spends) = disk.lease_spend_of(&lease, sequence)?;
            for spend in &spends {
                spend_log.append(
                    &lease,
                    sequence,
                    crate::spend_log::Spent {
                        units: spend.units,
                        cost: ledger::Credits::new(spend.cost),
                    },
                )?;
            }
            spend_log.sync()?;
            disk.lease_spend_remove(&keys)?;
            moved = moved.saturating_add(spends.len());
        }
    }
    if moved > 0 {
        tracing::info!(
            records = moved,
            "moved lease spend from sled to the spend log"
        );
    }
    Ok(())
}

/// Counts what the previous run left: usage still to ship, and acknowledged usage the
/// stored replica does not show yet (pending until it does).
fn restore(outbox: &Outbox, replica: &Replica) -> anyhow::Result<()> {
    let restored = outbox.restore_pending(replica)?;
    let acknowledged = outbox.restore_acked(replica)?;
    if acknowledged > 0 {
        tracing::info!(
            costs = acknowledged,
            "acknowledged usage the stored replica does not show yet counts as pending"
        );
    }
    if restored > 0 {
        tracing::info!(
            records = restored,
            "usage left by the previous run will be shipped"
        );
    }
    Ok(())
}

/// The control-plane clients: one for requests, one for the background thread (a
/// connection belongs to the runtime that opened it).
fn clients(config: &Config) -> anyhow::Result<(client::Client, client::Client)> {
    let api_key = config
        .control_plane
        .api_key
        .as_ref()
        .map(|key| key.expose().to_owned())
        .context("control_plane.api_key is required")?;
    let one_try = client::Retry {
        attempts: 1,
        ..client::Retry::default()
    };
    // One client per runtime (a connection belongs to the runtime that opened it), with
    // short timeouts: a request waiting on a reservation must fail over to the route's
    // policy quickly, and the shipper retries on its own schedule. Sync streams set their
    // own, open-ended timeout.
    let http = || {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .build()
    };
    let client =
        client::Client::with_http(http()?, &config.control_plane.url, &api_key)?.retry(one_try);
    // The background client follows the feed: in binary frames (an end user's change is
    // a small head the follower can skip by version, and its state in postcard: about a
    // seventh of the bytes of a JSON line), NDJSON from a control plane that has none.
    let background_client =
        client::Client::with_http(http()?, &config.control_plane.url, &api_key)?
            .retry(one_try)
            .sync_frames(true);
    Ok((client, background_client))
}

/// Serves the admin endpoints until `stopped` turns true.
fn serve_admin(
    listener: TcpListener,
    router: axum::Router,
    mut stopped: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "admin server failed");
        }
    })
}

/// Starts a proxy from a validated configuration (call inside a tokio runtime).
///
/// # Errors
/// The data directory, a listener or the control-plane client cannot be set up.
pub async fn start(config: Config, metrics: Option<PrometheusHandle>) -> anyhow::Result<Running> {
    start_with_clock(config, metrics, Arc::new(SystemClock)).await
}

/// [`start`] on a given wall clock (tests move it; nothing in the proxy reads the system
/// clock but through it).
///
/// # Errors
/// As [`start`].
pub async fn start_with_clock(
    config: Config,
    metrics: Option<PrometheusHandle>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Running> {
    config.validate()?;
    let live = Arc::new(ArcSwap::from_pointee(Live::from_config(&config)?));
    let disk = Disk::open(&config.data_dir, config.cache_mb)
        .with_context(|| format!("data_dir {}", config.data_dir.display()))?;
    let pending = Arc::new(Pending::new(clock));
    let replica = Arc::new(Replica::open(disk.clone(), pending).context("loading the replica")?);
    let flusher = Flusher::new();
    let outbox = open_outbox(&config, &disk, &flusher)?;
    restore(&outbox, &replica)?;
    let (client, background_client) = clients(&config)?;
    // Two stops: the front (listeners) first, so requests in flight finish with the
    // flusher and shipper still running; then the background.
    let (stop, stopped) = watch::channel(false);
    let (stop_background, background_stopped) = watch::channel(false);
    let outage = Arc::new(OutageBudgets::default());
    let holder = crate::leases::holder_id(&config.data_dir).context("the proxy's holder id")?;
    let spend_log = open_spend_log(&config, &disk)?;
    let spend_flusher = Flusher::new();
    let leases = Arc::new(Leases::new(
        holder,
        config.leases.clone(),
        disk.clone(),
        spend_log.clone(),
        spend_flusher.clone(),
        config.usage.durability,
    ));
    let background = {
        let work = Background {
            leases: leases.clone(),
            flusher: flusher.clone(),
            spend_log: spend_log.clone(),
            spend_flusher,
            replica: replica.clone(),
            outbox: outbox.clone(),
            client: background_client,
            live: live.clone(),
            outage: outage.clone(),
            flush_interval: Duration::from_millis(config.usage.flush_interval_ms),
            ship_interval: Duration::from_millis(config.usage.ship_interval_ms),
            batch_size: config.usage.batch_size,
            nats_url: config.sync.nats_url(),
            stopped: background_stopped,
        };
        std::thread::Builder::new()
            .name("qs-proxy-background".into())
            .spawn(move || work.run())
            .context("cannot start the background thread")?
    };
    let mut tasks = Vec::new();
    let in_flight = Arc::new(InFlightCount::default());
    let gate = Gate {
        live: live.clone(),
        replica: replica.clone(),
        outbox: outbox.clone(),
        client,
        outage: outage.clone(),
        in_flight: in_flight.clone(),
        leases,
        meters: crate::gate::Meters::new(),
    };
    let (listener, admin_listener) = listeners(&config).await?;
    let (address, admin_address) = (listener.local_addr()?, admin_listener.local_addr()?);
    let server_conf = Arc::new(ServerConf::default());
    let app = Arc::new(pingora::proxy::http_proxy(&server_conf, gate));
    tasks.push(tokio::spawn(serve_pingora(
        listener,
        app,
        in_flight,
        stopped.clone(),
    )));
    let admin = Admin {
        replica: replica.clone(),
        outbox: outbox.clone(),
        spend_log: spend_log.clone(),
        metrics,
        max_staleness: config.max_staleness(),
    };
    let router = admin::router(admin);
    tasks.push(serve_admin(admin_listener, router, stopped.clone()));
    tracing::info!(%address, %admin_address, upstream = %config.upstream, "proxy listening");
    Ok(Running {
        address,
        admin_address,
        replica,
        outbox,
        spend_log,
        live,
        stop,
        tasks,
        stop_background,
        background: Some(background),
    })
}

/// How long a shutdown waits for requests in flight before closing connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves pingora's HTTP proxy `app` on `listener` until `stopped` turns true; then waits
/// for requests in flight (counted in `in_flight`, up to a grace) and closes the rest.
/// Public so the benchmarks' plain pass-through is hosted exactly like the gate.
pub async fn serve_pingora<SV>(
    listener: TcpListener,
    app: Arc<pingora::proxy::HttpProxy<SV>>,
    in_flight: Arc<InFlightCount>,
    mut stopped: watch::Receiver<bool>,
) where
    SV: pingora::proxy::ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|stop| *stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (tcp, _) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (app, shutdown) = (app.clone(), stopped.clone());
        connections.spawn(async move {
            let stream: pingora::protocols::l4::stream::Stream = tcp.into();
            let mut session: pingora::protocols::Stream = Box::new(stream);
            while let Some(reused) = app.process_new(session, &shutdown).await {
                if *shutdown.borrow() {
                    break;
                }
                session = reused;
            }
        });
    }
    // Stop taking connections; let requests in flight finish (bounded), then close the
    // idle keep-alive connections so the proxy's state (and sled's lock) is released.
    drop(listener);
    in_flight
        .idle(tokio::time::Instant::now() + SHUTDOWN_GRACE)
        .await;
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// How often the replica's changes are written to sled.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Writes the replica's changes to sled every second (off the request path, in one batch
/// each) and once more at shutdown.
async fn persist(replica: Arc<Replica>, mut stopped: watch::Receiver<bool>) {
    loop {
        let stop = tokio::select! {
            () = tokio::time::sleep(PERSIST_EVERY) => false,
            _ = stopped.wait_for(|stop| *stop) => true,
        };
        let replica = replica.clone();
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || replica.persist()).await {
            Ok(Ok(count)) => {
                metrics::histogram!("qs_proxy_replica_persist_seconds")
                    .record(started.elapsed().as_secs_f64());
                if count > 0 {
                    tracing::debug!(end_users = count, "replica persisted");
                }
            }
            Ok(Err(error)) => tracing::error!(%error, "persisting the replica failed; will retry"),
            Err(error) => tracing::error!(%error, "the replica persister failed"),
        }
        if stop {
            return;
        }
    }
}

/// How often the replica forgets the decoded states of end users not seen since the
/// last time (they stay in the compact form).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Periodic work: expire confirmed pending, clear outage budgets once fresh, forget
/// decoded states not in use, gauges.
async fn housekeeping(
    replica: Arc<Replica>,
    outage: Arc<OutageBudgets>,
    live: Arc<ArcSwap<Live>>,
    outbox: Arc<Outbox>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut was = Freshness::Loading;
    let mut swept = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        replica.pending.expire(replica.last_heard_ms());
        if swept.elapsed() >= SWEEP_EVERY {
            swept = tokio::time::Instant::now();
            let sweeper = replica.clone();
            // Off the runtime: a sweep walks every decoded state.
            match tokio::task::spawn_blocking(move || sweeper.sweep()).await {
                Ok(forgotten) => {
                    metrics::counter!("qs_proxy_replica_states_forgotten_total")
                        .increment(u64::try_from(forgotten).unwrap_or(u64::MAX));
                }
                Err(error) => tracing::error!(%error, "the replica sweep failed"),
            }
        }
        let now = replica.freshness(live.load().max_staleness);
        if now != was {
            if now == Freshness::Fresh {
                tracing::info!(from = ?was, "replica is fresh");
            } else {
                tracing::warn!(from = ?was, to = ?now, "replica is not fresh: routes follow on_unavailable");
            }
            if now == Freshness::Fresh {
                outage.clear();
            }
            was = now;
        }
        let stale = if now == Freshness::Fresh { 0.0 } else { 1.0 };
        metrics::gauge!("qs_proxy_stale").set(stale);
        if let Some(silence) = replica.silence() {
            metrics::gauge!("qs_proxy_staleness_seconds").set(silence.as_secs_f64());
        }
        metrics::gauge!("qs_proxy_outbox_depth")
            .set(f64::from(u32::try_from(outbox.depth()).unwrap_or(u32::MAX)));
        metrics::gauge!("qs_proxy_quarantine_depth").set(f64::from(
            u32::try_from(outbox.quarantine_depth()).unwrap_or(u32::MAX),
        ));
        metrics::gauge!("qs_proxy_replica_end_users").set(f64::from(
            u32::try_from(replica.user_count()).unwrap_or(u32::MAX),
        ));
        metrics::gauge!("qs_proxy_replica_decoded_end_users").set(f64::from(
            u32::try_from(replica.decoded_count()).unwrap_or(u32::MAX),
        ));
    }
}

impl Running {
    /// Applies a new configuration (SIGHUP): routes, identity and staleness change for the
    /// next request; connections stay open. Listeners, data dir and control plane need a
    /// restart.
    ///
    /// # Errors
    /// An invalid configuration (the old one stays).
    pub fn reload(&self, config: &Config) -> anyhow::Result<()> {
        config.validate()?;
        let live = Live::from_config(config)?;
        self.live.store(Arc::new(live));
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Stops taking connections, ships what it can (bounded) and flushes.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, task).await;
        }
        let _ = self.stop_background.send(true);
        if let Some(background) = self.background {
            // Its tasks end on the stop signal (the shipper tries one last round, bounded).
            let joined = tokio::task::spawn_blocking(move || background.join());
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, joined).await;
        }
    }
}

/// The Prometheus recorder for the process (installed once).
///
/// # Errors
/// Another recorder is installed already.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.000_001, 0.000_005, 0.000_01, 0.000_05, 0.0001, 0.0005, 0.001, 0.002, 0.003, 0.005,
            0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
        ])
        .context("metric buckets")?
        // A flush is what a `sync` request waits for beside its decision: flushes and
        // the waits for them are read in quarter milliseconds (the general buckets jump
        // from 1 to 2 ms).
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Prefix("qs_proxy_flush_".into()),
            &[
                0.000_1, 0.000_25, 0.000_5, 0.000_75, 0.001, 0.001_25, 0.001_5, 0.001_75, 0.002,
                0.002_5, 0.003, 0.004, 0.005, 0.007_5, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ],
        )
        .context("flush buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{LeaseSpend, LeaseSpendKey};

    /// An upgrade from a version that kept lease spend in sled loses none of it: it moves
    /// to the spend log, once.
    #[test]
    fn lease_spend_left_in_sled_moves_to_the_spend_log_once() {
        let dir = tempfile::tempdir().expect("dir");
        let lease = ledger::LeaseId(ledger::Ulid(42)).to_string();
        let disk = Disk::open(dir.path(), 8).expect("disk");
        for (sequence, id, cost) in [(1u64, 1u8, 2i64), (1, 2, 3), (2, 3, 5)] {
            let key = LeaseSpendKey {
                lease: lease.clone(),
                sequence,
                id: [id; 16],
            };
            disk.lease_spend_put(&key, LeaseSpend { units: 1, cost })
                .expect("put");
        }
        let log = SpendLog::open(&dir.path().join("spend"), 1 << 20).expect("log");
        migrate_sled_spend(&disk, &log).expect("migrate");
        migrate_sled_spend(&disk, &log).expect("a second start moves nothing");
        assert_eq!(log.totals(&lease, 1).expect("totals").cost.get(), 5);
        assert_eq!(log.totals(&lease, 2).expect("totals").cost.get(), 5);
        assert_eq!(log.len(), 3);
        assert_eq!(disk.lease_spend_len(), 0);
    }
}
