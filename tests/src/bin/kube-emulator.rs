//! `kube-emulator`: serves the Kubernetes API emulator on loopback until SIGTERM or ctrl-c.

use std::path::PathBuf;

use clap::Parser;
use spotrun_testkit::emulator::{Emulator, EmulatorConfig};

/// A Kubernetes API emulator that runs pods as local bwrap sandboxes.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Copy the kubeconfig (server, dummy token, namespace ci-jobs) to this path.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Start with the GKE node set (two tainted spot nodes, one on-demand) and namespaces default + ci-jobs.
    #[arg(long)]
    gke: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = if args.gke {
        EmulatorConfig::gke()
    } else {
        EmulatorConfig {
            namespaces: vec!["default".into(), "ci-jobs".into()],
            ..EmulatorConfig::default()
        }
    };
    let emu = Emulator::start_on(cfg, args.port).await?;
    if let Some(out) = &args.kubeconfig_out {
        std::fs::copy(emu.kubeconfig_path(), out)
            .map_err(|e| anyhow::anyhow!("writing the kubeconfig to {}: {e}", out.display()))?;
    }
    println!("{}", emu.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    emu.shutdown().await;
    Ok(())
}
