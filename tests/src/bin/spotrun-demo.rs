//! The local demo: an emulated GKE cluster (spot and on-demand nodes, pods running as real
//! processes), then a multi-stage job with a service container run through the gitlab-runner
//! harness, which calls `spotrun-executor` exactly as gitlab-runner does. Prints the job log.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use spotrun_testkit::emulator::{Emulator, EmulatorConfig};
use spotrun_testkit::harness::{JobBuilder, JobResult, Runner, Service};

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("executable has no directory")?
        .join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build the workspace first (`cargo build --bins`)",
        path.display()
    );
    Ok(path)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn banner(text: &str) {
    println!("\n\x1b[1;36m== {text}\x1b[0m");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let executor = sibling("spotrun-executor")?;
    let work = tempfile::tempdir()?;

    banner("starting the Kubernetes API emulator");
    let emu = Emulator::start(EmulatorConfig::gke()).await?;
    println!(
        "kube-apiserver emulator at {} — nodes gke-spot-1, gke-spot-2 (spot, tainted), gke-ondemand-1",
        emu.url()
    );

    let events = work.path().join("executor-events.jsonl");
    let settings = work.path().join("executor.toml");
    std::fs::write(
        &settings,
        format!(
            r#"# Operator settings for the demo (see config/executor.example.toml for every key).
namespace = "ci-jobs"
events_log = "{events}"
[spot]
policy = "require"
fallback_on_preemption = true
[images]
default_image = "alpine:3.22"
"#,
            events = events.display()
        ),
    )?;

    let runner = Runner::new(&executor)
        .args(["--config", settings.to_str().context("utf-8 path")?])
        .env("KUBECONFIG", emu.kubeconfig_path().to_string_lossy())
        .graceful_kill_timeout(Duration::from_secs(10))
        .echo(true);

    let port = free_port()?.to_string();
    let job = JobBuilder::new(1001)
        .name("test:integration")
        .image("alpine:3.22")
        .service(
            Service::new("python:3.12-alpine", "web")
                .entrypoint(&["sh", "-c"])
                .command(&["exec python3 -m http.server \"$WEB_PORT\" --bind 127.0.0.1"])
                .variable("WEB_PORT", &port),
        )
        .variable("WEB_PORT", &port)
        .script(&[
            "echo \"building $CI_PROJECT_PATH (job $CI_JOB_ID) in $CI_PROJECT_DIR\"",
            "for i in $(seq 1 100); do curl -sf \"http://web:$WEB_PORT/\" -o /dev/null && break; sleep 0.1; done",
            "curl -sf \"http://web:$WEB_PORT/\" -o /dev/null && echo \"service 'web' answered on port $WEB_PORT\"",
            "mkdir -p target && date -u > target/built-at.txt && ls target",
        ])
        .after_script(&["echo \"job finished with status $CI_JOB_STATUS\""])
        .build();

    banner("running job 1001 through the gitlab-runner harness (job log follows)");
    let outcome = runner.run(&job).await;

    banner("summary");
    for s in &outcome.stages {
        println!(
            "{:<24} exit {:>3}  {:>6} ms",
            s.stage,
            s.exit_code
                .map_or_else(|| "sig".to_owned(), |c| c.to_string()),
            s.duration.as_millis()
        );
    }
    let pods = emu.audit().len();
    println!("kube API requests made: {pods}");
    emu.shutdown().await;
    match outcome.result {
        JobResult::Success => {
            println!("\x1b[1;32mdemo job succeeded\x1b[0m");
            Ok(())
        }
        other => anyhow::bail!("demo job did not succeed: {other:?}"),
    }
}
