//! The `quotastack-proxy` command line (shared by the binary and the end-to-end tests' copy).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// QuotaStack's sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "quotastack-proxy", version)]
struct Cli {
    /// The configuration file.
    #[arg(
        long,
        short,
        env = "QS_PROXY_CONFIG",
        default_value = "config/proxy.toml"
    )]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

/// Turns transparent huge pages off for this process (Linux; elsewhere nothing). Where
/// the kernel gives them to every aligned region (`always`, the default of Debian and
/// RHEL), the allocator's arenas came back as 2 MiB pages: an idle proxy took 61 MB
/// instead of 16 (docs/decisions.md). Called first thing, before the process has
/// touched much memory; a refusal (an old kernel, a sandbox) only costs memory.
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(error) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!(
            "quotastack-proxy: could not turn transparent huge pages off ({error}); memory use may be higher"
        );
    }
}

/// Runs the proxy as the binary does: parse arguments, load and validate the config,
/// serve until SIGTERM or Ctrl-C, reload on SIGHUP.
///
/// # Errors
/// An invalid configuration or a failure to start.
pub fn main() -> anyhow::Result<()> {
    no_huge_pages();
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("QS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // async-nats logs the server's address, credentials included, at debug: kept at info
    // unless QS_LOG names it.
    if !std::env::var("QS_LOG").is_ok_and(|level| level.contains("async_nats"))
        && let Ok(directive) = "async_nats=info".parse()
    {
        filter = filter.add_directive(directive);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .try_init()
        .ok();
    let config = crate::Config::load(&cli.config)
        .with_context(|| format!("invalid configuration {}", cli.config.display()))?;
    if cli.check_config {
        #[allow(clippy::print_stdout)]
        {
            println!(
                "{}: ok ({} routes)",
                cli.config.display(),
                config.routes.len()
            );
        }
        return Ok(());
    }
    // The proxy serves on one worker thread by default (a sidecar shares its pod);
    // QS_PROXY_THREADS raises it.
    let threads: usize = std::env::var("QS_PROXY_THREADS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(run(cli, config))
}

async fn run(cli: Cli, config: crate::Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let metrics = crate::install_metrics()?;
    let running = crate::start(config, Some(metrics)).await?;
    #[allow(clippy::print_stdout)]
    {
        println!("QuotaStack proxy listening on http://{}", running.address);
        println!(
            "  admin (healthz, readyz, metrics) on http://{}",
            running.admin_address
        );
    }
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                match crate::Config::load(&cli.config) {
                    Ok(config) => if let Err(error) = running.reload(&config) {
                        tracing::error!(%error, "reload refused; keeping the current configuration");
                    },
                    Err(error) => tracing::error!(%error, "reload refused; keeping the current configuration"),
                }
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
