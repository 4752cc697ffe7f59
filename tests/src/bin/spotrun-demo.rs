//! The local demo: an emulated GKE cluster (spot and on-demand nodes, pods running as real
//! processes), then a multi-stage job with a service container run through the gitlab-runner
//! harness, which calls `spotrun-executor` exactly as gitlab-runner does. Prints the job log.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use spotrun_testkit::emulator::{Emulator, EmulatorConfig, ImageRule, PullOutcome};
use spotrun_testkit::harness::{CacheConfig, JobBuilder, JobResult, Runner, Service};

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

    let bin_dir = executor.parent().context("bin dir")?.to_path_buf();
    banner("starting the cache proxy on its embedded disk store");
    let store = work.path().join("cache-store");
    let proxy_port = free_port()?;
    let proxy_log = std::fs::File::create(work.path().join("cache-proxy.log"))?;
    let mut proxy = std::process::Command::new(sibling("spotrun-cache-proxy")?)
        .args(["--store", store.to_str().context("utf-8 path")?])
        .args(["--listen", &format!("127.0.0.1:{proxy_port}")])
        // Its ops listener (/metrics, /readyz) on loopback too, never the default 0.0.0.0:9090.
        .args(["--ops-listen", &format!("127.0.0.1:{}", free_port()?)])
        .args([
            "--access-key",
            "DEMOACCESSKEY",
            "--secret-key",
            "demo-secret-key",
        ])
        .args(["--bucket", "runner-cache"])
        .stderr(proxy_log)
        .spawn()
        .context("start spotrun-cache-proxy")?;
    let mut up = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", proxy_port)).is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !up {
        let _ = proxy.kill();
        let log = std::fs::read_to_string(work.path().join("cache-proxy.log")).unwrap_or_default();
        anyhow::bail!("cache proxy did not start; its log:\n{log}");
    }
    println!("spotrun-cache-proxy at http://127.0.0.1:{proxy_port} (bucket runner-cache)");

    banner("starting the Kubernetes API emulator");
    let mut cfg = EmulatorConfig::gke();
    // The helper image carries `gitlab-runner` (here: the test kit's cache stand-in).
    cfg.images.push(ImageRule {
        pattern: "*gitlab-runner-helper*".into(),
        outcome: PullOutcome::Ok,
        default_command: None,
        env: Vec::new(),
        bin_dirs: vec![bin_dir.clone()],
        rootfs: None,
        user: None,
    });
    // The spotrun image: its init container puts the in-pod launcher into the job pod.
    cfg.images.push(spotrun_testkit::rootfs::launcher_image());
    let emu = Emulator::start(cfg).await?;
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
        .cache(
            CacheConfig {
                server_address: format!("127.0.0.1:{proxy_port}"),
                bucket: "runner-cache".into(),
                access_key: "DEMOACCESSKEY".into(),
                secret_key: "demo-secret-key".into(),
                region: "us-east-1".into(),
                expires: Duration::from_secs(3600),
            }
            .presigner(),
        )
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
            "if [ -d vendor ]; then echo \"cache restored: $(ls vendor | wc -l) vendored files\"; else echo 'cold cache: vendoring'; fi",
            "mkdir -p vendor && for i in $(seq 1 400); do [ -f vendor/dep$i.txt ] || seq 1 $((i * 20)) > vendor/dep$i.txt; done",
            "for i in $(seq 1 20); do echo \"job $CI_JOB_ID\" >> vendor/dep$i.txt; done",
        ])
        .cache("deps-main-protected", &["vendor/"])
        .after_script(&["echo \"job finished with status $CI_JOB_STATUS\""])
        .build();

    let mut outcomes = Vec::new();
    for (id, note) in [
        (1001, "cold cache"),
        (1002, "warm cache, 5 % of the files changed"),
    ] {
        let mut job = job.clone();
        job.id = id;
        banner(&format!(
            "running job {id} ({note}) through the gitlab-runner harness — job log follows"
        ));
        outcomes.push(runner.run(&job).await);
    }
    let outcome = outcomes.pop().context("two jobs ran")?;
    let first = outcomes.pop().context("two jobs ran")?;

    banner("cache proxy: logical vs stored bytes");
    let stats = std::process::Command::new(sibling("spotrun-cache-proxy")?)
        .args(["--store", store.to_str().context("utf-8 path")?])
        .args([
            "--access-key",
            "DEMOACCESSKEY",
            "--secret-key",
            "demo-secret-key",
        ])
        .arg("stats")
        .output()?;
    println!("{}", String::from_utf8_lossy(&stats.stdout).trim());
    let stored_keys = serde_json::from_slice::<serde_json::Value>(&stats.stdout)
        .ok()
        .and_then(|v| v["keys"].as_u64())
        .unwrap_or(0);
    let _ = proxy.kill();
    let _ = proxy.wait();

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
    match (&first.result, &outcome.result) {
        (JobResult::Success, JobResult::Success) if stored_keys == 0 => {
            anyhow::bail!("the jobs succeeded but the cache proxy stored no cache")
        }
        (JobResult::Success, JobResult::Success) => {
            println!("\x1b[1;32mdemo jobs succeeded\x1b[0m");
            Ok(())
        }
        other => anyhow::bail!("demo jobs did not succeed: {other:?}"),
    }
}
