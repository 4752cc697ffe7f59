//! `spotrun-cache-proxy`: command line (serve | gc | stats), logging, and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use spotrun_cache_proxy::config::{self, FileConfig, Overrides};
use spotrun_cache_proxy::metrics::Metrics;
use spotrun_cache_proxy::{
    Listeners, RunError, gc_options, open_dedup, open_dedup_for_maintenance, serve,
};

/// `--version`: crate version, git revision and target triple (set by `build.rs`).
const VERSION: &str = env!("SPOTRUN_VERSION");

#[derive(Debug, Parser)]
#[command(
    name = "spotrun-cache-proxy",
    version = VERSION,
    about = "S3-compatible dedup cache proxy for gitlab-runner"
)]
struct Cli {
    /// TOML config file.
    #[arg(long, env = "SPOTRUN_CACHE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Listen address, e.g. 0.0.0.0:9000.
    #[arg(long, env = "SPOTRUN_CACHE_LISTEN", global = true)]
    listen: Option<String>,
    /// Address of /metrics, /healthz and /readyz (default 0.0.0.0:9090; never the S3 port).
    #[arg(long, env = "SPOTRUN_CACHE_OPS_LISTEN", global = true)]
    ops_listen: Option<String>,
    /// Use a local-disk store in DIR (overrides [store]).
    #[arg(long, env = "SPOTRUN_CACHE_STORE", global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// `SigV4` region the runner signs for (its `BucketLocation`).
    #[arg(long, env = "SPOTRUN_CACHE_REGION", global = true)]
    region: Option<String>,
    /// Accepted bucket names (comma separated).
    #[arg(
        long = "bucket",
        env = "SPOTRUN_CACHE_BUCKETS",
        global = true,
        value_delimiter = ','
    )]
    buckets: Vec<String>,
    /// Access key id the runner signs with (with --secret-key; added to [[`access_keys`]]).
    #[arg(long, env = "SPOTRUN_CACHE_ACCESS_KEY", global = true)]
    access_key: Option<String>,
    /// Secret key for --access-key.
    #[arg(
        long,
        env = "SPOTRUN_CACHE_SECRET_KEY",
        global = true,
        hide_env_values = true
    )]
    secret_key: Option<String>,
    /// Directory uploads are spooled to before chunking.
    #[arg(long, env = "SPOTRUN_CACHE_SPOOL_DIR", global = true)]
    spool_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the S3 endpoint (default).
    Serve,
    /// Expire old keys and sweep unreferenced packs once, then exit. Run it while no server writes to the
    /// same store, or rely on the server's own GC timer.
    Gc,
    /// Print logical vs stored bytes as JSON.
    Stats,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spotrun-cache-proxy: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spotrun-cache-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let file = match &cli.config {
        Some(p) => config::load_file(p)?,
        None => FileConfig::default(),
    };
    let over = Overrides {
        listen: cli.listen,
        ops_listen: cli.ops_listen,
        region: cli.region,
        buckets: (!cli.buckets.is_empty()).then_some(cli.buckets),
        store_dir: cli.store,
        spool_dir: cli.spool_dir,
        access_key: cli.access_key,
        secret_key: cli.secret_key,
    };
    let settings = config::resolve(file, over, &|k| std::env::var(k).ok())?;
    let metrics = Arc::new(Metrics::default());
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let dedup = open_dedup(&settings, metrics.clone()).await?;
            let bind = |addr| async move {
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| RunError::Listen { addr, source })
            };
            let listeners = Listeners {
                s3: bind(settings.listen).await?,
                ops: bind(settings.ops_listen).await?,
            };
            tracing::info!(addr = %settings.listen, ops_addr = %settings.ops_listen, store = ?settings.store, "serving");
            serve(settings, dedup, metrics, listeners, shutdown_signal()).await?;
        }
        Command::Gc => {
            let dedup = open_dedup_for_maintenance(&settings, metrics)?;
            let report = dedup.gc(&gc_options(&settings)).await?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Stats => {
            let dedup = open_dedup_for_maintenance(&settings, metrics)?;
            let stats = dedup.stats().await?;
            println!("{}", serde_json::to_string(&stats)?);
        }
    }
    Ok(())
}

/// SIGTERM (Kubernetes) or Ctrl-C: stop accepting, finish in-flight requests.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { () = ctrl_c => {}, () = term => {} }
    tracing::info!("shutting down; finishing in-flight requests");
}
