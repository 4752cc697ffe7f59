//! spotrun-executor: a GitLab Runner custom executor running each job as a pod on GKE spot nodes.
//!
//! One short-lived process per runner call (`config`, `prepare`, `run`, `cleanup`) plus `gc`; no
//! state between calls except what Kubernetes holds. Exit codes are decided here, in one place.

// Reason: nested `if let` on IO fallbacks reads clearer than let-chains here.
#![allow(clippy::collapsible_if)]

mod events;
mod failure;
mod job;
mod kubeapi;
mod naming;
mod plan;
mod podstate;
mod preemption;
mod prepare;
mod quantity;
mod retry_after;
mod services;
mod settings;
mod smp;
mod stage;
mod sweep;
mod verdict;
mod volumes;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::events::Events;
use crate::failure::{ExitCodes, Failure, verdict, write_build_exit_code};
use crate::job::{CustomEnv, JobIdentity};
use crate::settings::{FlagOverrides, Settings, SpotPolicy};

/// `--version`: crate version, git revision and target triple (set by `build.rs`).
const VERSION: &str = env!("SPOTRUN_VERSION");

// Reason: doc comments here are clap help text, where backticks would show literally.
#[allow(clippy::doc_markdown)]
#[derive(Debug, Parser)]
#[command(
    name = "spotrun-executor",
    version = VERSION,
    about = "GitLab Runner custom executor for GKE spot pods"
)]
struct Cli {
    /// Operator settings file (TOML). Default: $SPOTRUN_EXECUTOR_CONFIG.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Namespace of job pods (overrides the file and $SPOTRUN_NAMESPACE).
    #[arg(long, global = true)]
    namespace: Option<String>,
    /// Spot policy: require, prefer or never (overrides the file and $SPOTRUN_SPOT_POLICY).
    #[arg(long, global = true, value_parser = parse_policy)]
    spot_policy: Option<SpotPolicy>,
    #[command(subcommand)]
    command: Command,
}

fn parse_policy(s: &str) -> Result<SpotPolicy, String> {
    SpotPolicy::parse(s).ok_or_else(|| format!("{s:?} is not one of require, prefer, never"))
}

#[allow(clippy::doc_markdown)] // Reason: clap help text (see `Cli`).
#[derive(Debug, Subcommand)]
enum Command {
    /// config_exec: print the runner's JSON (builds_dir, cache_dir, hostname, driver).
    Config,
    /// prepare_exec: create the job pod and wait until it runs.
    Prepare,
    /// run_exec: run one stage script in the pod.
    Run { script: PathBuf, stage: String },
    /// cleanup_exec: delete the job pod and its secret (idempotent).
    Cleanup,
    /// Delete pods, secrets and preemption records left behind (CronJob).
    Gc {
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
}

/// What every subcommand gets.
pub struct Ctx {
    pub settings: Settings,
    pub events: Events,
    pub env: CustomEnv,
}

fn main() -> ExitCode {
    // aws-lc-rs and ring can both be compiled into a workspace build; pick one explicitly so
    // rustls never has to guess (it panics when two providers are available).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let getenv = |k: &str| std::env::var(k).ok();
    let codes = ExitCodes::from_env(&getenv);
    let flags = FlagOverrides {
        namespace: cli.namespace.clone(),
        spot_policy: cli.spot_policy,
    };
    let command_name = match &cli.command {
        Command::Config => "config",
        Command::Prepare => "prepare",
        Command::Run { .. } => "run",
        Command::Cleanup => "cleanup",
        Command::Gc { .. } => "gc",
    };
    let result = match Settings::load(cli.config.as_deref(), &getenv, &flags) {
        // Bad operator settings are the runner's problem, not the job's.
        Err(e) => Err(Failure::System(e.to_string())),
        Ok(mut settings) => {
            let env = CustomEnv::from_vars(std::env::vars());
            // Every subcommand must find the pod where prepare put it; prepare prints the note.
            if let Some(ns) = job::namespace_overwrite(&settings, &env, &mut Vec::new()) {
                settings.namespace = ns;
            }
            let events = Events::open(&settings.events_log);
            events.set_context("command", command_name);
            if let Some(id) = env.get("CI_JOB_ID") {
                events.set_context("job_id", id.to_string());
            }
            let ctx = Ctx {
                settings,
                events,
                env,
            };
            run_command(&ctx, cli.command)
        }
    };
    let v = verdict(&result, codes);
    if let Some(code) = v.build_exit_code {
        if let Some(path) = getenv("BUILD_EXIT_CODE_FILE").filter(|p| !p.is_empty()) {
            if let Err(e) = write_build_exit_code(std::path::Path::new(&path), code) {
                eprintln!("ERROR: writing BUILD_EXIT_CODE_FILE {path}: {e}");
                return ExitCode::from(codes.system);
            }
        }
    }
    if let Some(line) = v.line {
        // prepare/run stdout is the job log; config's stdout must stay pure JSON and cleanup/gc
        // output belongs to the runner's log, so those use stderr.
        if matches!(command_name, "prepare" | "run") {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    }
    ExitCode::from(v.exit_code)
}

fn run_command(ctx: &Ctx, command: Command) -> Result<(), Failure> {
    if let Command::Config = command {
        return config(ctx);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::System(format!("starting the async runtime: {e}")))?;
    runtime.block_on(Box::pin(async {
        match command {
            Command::Config => unreachable!("handled above"),
            Command::Prepare => Box::pin(prepare::prepare(ctx)).await,
            Command::Run { script, stage } => stage::run(ctx, &script, &stage).await,
            Command::Cleanup => sweep::cleanup(ctx).await,
            Command::Gc { dry_run } => sweep::gc(ctx, dry_run).await,
        }
    }))
}

/// `config_exec`: JSON on stdout only.
#[allow(clippy::unnecessary_wraps)] // Reason: same signature as every subcommand.
fn config(ctx: &Ctx) -> Result<(), Failure> {
    let mut out = json!({
        "builds_dir": ctx.settings.dirs.builds_dir,
        "cache_dir": ctx.settings.dirs.cache_dir,
        "builds_dir_is_shared": false,
        "driver": { "name": "spotrun", "version": env!("CARGO_PKG_VERSION") },
    });
    if let Ok(id) = JobIdentity::from_env(&ctx.env) {
        out["hostname"] = id.pod_name().into();
    }
    println!("{out}");
    Ok(())
}
