//! Opening the store and serving: the API, the scheduler, the webhook worker and the
//! NATS feed publisher started and stopped together.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::clock::Clock;
use crate::config::{Config, DatabaseUrl};
use crate::service::AppState;
use crate::store::Store;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;

/// Opens the configured store (running migrations): PostgreSQL for a `postgres://` URL,
/// SQLite otherwise.
///
/// # Errors
/// When the database cannot be opened.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    if let DatabaseUrl::Postgres(url) = &config.database {
        let store = PostgresStore::open(url, config.max_connections).await?;
        return Ok(Arc::new(store));
    }
    let store = SqliteStore::open(
        &config.database,
        config.synchronous,
        config.read_connections,
    )
    .await?;
    Ok(Arc::new(store))
}

/// How long a shutdown waits for the NATS feed publisher to stop.
const PUBLISHER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the API on `listener` until `shutdown` resolves, then stops taking requests,
/// finishes the ones in flight (up to the configured grace) and stops the jobs.
///
/// # Errors
/// When serving fails.
pub async fn run(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_jobs, jobs_stopped) = tokio::sync::watch::channel(false);
    connect_nats(&state).await?;
    let mut publisher = tokio::spawn(crate::nats::run(state.clone(), jobs_stopped.clone()));
    let jobs = tokio::spawn(crate::jobs::run(state.clone(), jobs_stopped.clone()));
    let deliveries = tokio::spawn(crate::webhooks::run(
        Arc::clone(state.deliveries()),
        jobs_stopped,
    ));
    let app = crate::http::app_with(state.clone(), crate::console::router(&state));
    tracing::info!(address = %listener.local_addr()?, "control plane listening");
    let closing = state.clone();
    // The peer address reaches the handlers (failed authentications are limited per
    // client address).
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            closing.begin_shutdown();
        })
        .await;
    let _ = stop_jobs.send(true);
    if let Err(error) = jobs.await {
        tracing::error!(%error, "the job scheduler panicked");
    }
    if let Err(error) = deliveries.await {
        tracing::error!(%error, "the webhook worker panicked");
    }
    // A publisher waiting on a NATS server that is down does not hold the shutdown up:
    // whatever it had not published, the next process's sweep publishes.
    match tokio::time::timeout(PUBLISHER_GRACE, &mut publisher).await {
        Ok(Err(error)) => tracing::error!(%error, "the NATS feed publisher panicked"),
        Ok(Ok(())) => {}
        Err(_) => {
            tracing::warn!("the NATS feed publisher did not stop in time; stopping it");
            publisher.abort();
        }
    }
    served?;
    Ok(())
}

/// Connects to NATS where `sync.nats_url` is set. The connection is made in the
/// background (and remade whenever it drops), so a NATS server that is down does not stop
/// the control plane: the feed is published once it is up, and proxies follow the HTTP
/// stream meanwhile.
///
/// # Errors
/// A URL NATS cannot use.
pub async fn connect_nats(state: &AppState) -> anyhow::Result<()> {
    let Some(url) = state.config().nats_url.as_ref() else {
        return Ok(());
    };
    // Only the notifier: a state held by the client's callback would keep the state, and
    // the client it holds, alive for ever.
    let connected = Arc::clone(state.nats_connected());
    let client = async_nats::ConnectOptions::new()
        .name("quotastack-control-plane")
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let connected = Arc::clone(&connected);
            async move {
                if matches!(event, async_nats::Event::Connected) {
                    connected.notify_one();
                }
            }
        })
        .connect(url.expose())
        .await?;
    state.attach_nats(client);
    Ok(())
}

/// Builds the shared state with the real clock.
pub fn state(
    config: Config,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> AppState {
    AppState::new(config, store, clock, metrics)
}
