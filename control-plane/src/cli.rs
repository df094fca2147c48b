//! `quotastack-control-plane`'s command line: flags, logging, then `serve`, `tenant
//! create`, `apply` or `openapi`. Here (not in `main.rs`) so that the end-to-end tests'
//! copy of the binary runs the same code.

// A command-line program: printing its answers to stdout is its job.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;

use crate::clock::SystemClock;
use crate::config::{Config, LogFormat, Overrides};
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "quotastack-control-plane",
    version,
    about = "QuotaStack's control plane: the billing API over SQLite."
)]
struct Cli {
    /// The configuration file.
    #[arg(
        long,
        env = "QS_CONFIG",
        default_value = "config/control-plane.toml",
        global = true
    )]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long, global = true)]
    check_config: bool,
    /// Address to listen on (overrides `server.listen`).
    #[arg(long, env = "QS_LISTEN", global = true)]
    listen: Option<String>,
    /// `sqlite://<file>`, `:memory:` or `postgres://…` (overrides `database.url`).
    #[arg(long, env = "QS_DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// Token for `POST /v1/operator/tenants` (overrides `auth.operator_token`).
    #[arg(long, env = "QS_OPERATOR_TOKEN", global = true, hide_env_values = true)]
    operator_token: Option<String>,
    /// `text` or `json` (overrides `log.format`).
    #[arg(long, env = "QS_LOG_FORMAT", global = true)]
    log_format: Option<String>,
    /// A tracing filter such as `info` or `control_plane=debug` (overrides `log.level`).
    #[arg(long, env = "QS_LOG_LEVEL", global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Manage tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Create or update features, plans, variants and settings from a catalog file
    /// (see config/catalog.example.toml), through the API of a running control plane.
    Apply {
        /// The catalog file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The control plane's URL (default: this configuration's listen address).
        #[arg(long, env = "QS_URL")]
        url: Option<String>,
        /// An API key with the `admin` scope: it picks the tenant and environment.
        #[arg(long, env = "QS_API_KEY", hide_env_values = true)]
        key: String,
        /// Print the plan without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PrintWhat {
    Json,
    LiveKey,
    TestKey,
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant and print one all-scope key per environment (shown once).
    Create {
        #[arg(long)]
        name: String,
        /// What to print on stdout: the whole answer as JSON, or only one key (the JSON
        /// still goes to stderr, so the other key is not lost).
        #[arg(long, value_enum, default_value = "json")]
        print: PrintWhat,
    },
}

/// Runs the command line's command.
///
/// # Errors
/// An invalid configuration, or a command that failed.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen.clone(),
        database_url: cli.database_url.clone(),
        operator_token: cli.operator_token.clone(),
        log_format: cli.log_format.clone(),
        log_level: cli.log_level.clone(),
    };
    let config = Config::load(&cli.config, &overrides)
        .with_context(|| format!("invalid configuration in {}", cli.config.display()))?;
    if cli.check_config {
        println!("{}: ok", cli.config.display());
        return Ok(());
    }
    init_tracing(&config);
    tracing::debug!(?config, "configuration");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(config).await,
            Command::Tenant {
                command: TenantCommand::Create { name, print },
            } => {
                let store = crate::serve::open_store(&config).await?;
                let state = crate::serve::state(config, store, Arc::new(SystemClock), None);
                let created = crate::http::tenancy::create_tenant(&state, &name)
                    .await
                    .map_err(|error| anyhow::anyhow!("{error}"))?;
                let json = serde_json::to_string_pretty(&created)?;
                match print {
                    PrintWhat::Json => println!("{json}"),
                    PrintWhat::LiveKey => {
                        eprintln!("{json}");
                        println!("{}", created.api_keys.live);
                    }
                    PrintWhat::TestKey => {
                        eprintln!("{json}");
                        println!("{}", created.api_keys.test);
                    }
                }
                Ok(())
            }
            Command::Apply {
                file,
                url,
                key,
                dry_run,
            } => {
                let url = url.unwrap_or_else(|| local_url(config.listen));
                apply(&file, &url, &key, dry_run).await
            }
            Command::Openapi => {
                println!("{}", serde_json::to_string_pretty(&crate::http::openapi())?);
                Ok(())
            }
        }
    })
}

/// The URL of a control plane listening on `listen` on this machine.
fn local_url(listen: std::net::SocketAddr) -> String {
    let host = match listen.ip() {
        ip if ip.is_unspecified() && ip.is_ipv6() => "[::1]".to_owned(),
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    format!("http://{host}:{}", listen.port())
}

/// `apply -f`: prints the plan, then carries it out (unless `dry_run`).
async fn apply(file: &std::path::Path, url: &str, key: &str, dry_run: bool) -> anyhow::Result<()> {
    use crate::apply;
    let origin = file.display().to_string();
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {origin}"))?;
    let catalog = apply::CatalogFile::parse(&text, &origin)?;
    let api = client::Client::new(url, key).map_err(|error| anyhow::anyhow!("{url}: {error}"))?;
    let current = apply::current(&api).await?;
    let plan = apply::plan(&catalog, &current);
    println!("{plan}");
    if !plan.refused.is_empty() {
        anyhow::bail!("nothing was applied: {} refused", plan.refused.len());
    }
    if dry_run || plan.steps.is_empty() {
        return Ok(());
    }
    apply::execute(&api, &plan, |step| println!("done: {step}")).await?;
    println!("applied {} changes", plan.steps.len());
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        // Histograms (not summaries), so latencies aggregate across replicas.
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 10.0,
        ])
        .context("metric buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    let store = crate::serve::open_store(&config).await?;
    let grace = config.shutdown_grace;
    let state = crate::serve::state(config, store, Arc::new(SystemClock), Some(metrics));
    println!("QuotaStack control plane listening on http://{address}");
    println!("  create a tenant and its keys:  quotastack-control-plane tenant create --name acme");
    println!(
        "  (or POST /v1/operator/tenants with the operator token; API described at http://{address}/openapi.json)"
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve::run(state, listener, async move {
        let _ = stopped.await;
    }));
    shutdown_signal().await;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: finishing requests in flight"
    );
    let _ = stop.send(());
    match tokio::time::timeout(grace, server).await {
        Ok(joined) => joined??,
        Err(_) => tracing::warn!("requests still running after the grace period; stopping anyway"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

fn init_tracing(config: &Config) {
    let mut filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // async-nats logs the server's address, credentials included, at debug: kept at info
    // unless the level names it.
    if !config.log_level.contains("async_nats")
        && let Ok(directive) = "async_nats=info".parse()
    {
        filter = filter.add_directive(directive);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
