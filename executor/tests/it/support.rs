//! Shared setup: an emulator per test, an operator settings file, a runner driving our binary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use spotrun_testkit::emulator::{Emulator, EmulatorConfig};
use spotrun_testkit::harness::Runner;

pub struct Env {
    pub emu: Emulator,
    pub dir: tempfile::TempDir,
    pub settings: PathBuf,
    pub events: PathBuf,
}

/// Settings tuned for tests: namespace ci-jobs, fast timeouts, events to a file.
pub fn settings_toml(events: &Path, extra: &str) -> String {
    format!(
        r#"namespace = "ci-jobs"
events_log = "{events}"
{extra}
[timeouts]
unschedulable_seconds = 3
exec_silence_seconds = 5
api_call_seconds = 10
[api]
retry_limit = 8
retry_backoff_base_ms = 20
retry_backoff_max_ms = 200
"#,
        events = events.display()
    )
}

impl Env {
    pub async fn start(extra_settings: &str) -> Self {
        Self::start_with(EmulatorConfig::gke(), extra_settings).await
    }

    pub async fn start_with(mut cfg: EmulatorConfig, extra_settings: &str) -> Self {
        // The spotrun image, whose init container puts the launcher into every job pod.
        cfg.images
            .insert(0, spotrun_testkit::rootfs::launcher_image());
        let emu = Emulator::start(cfg).await.expect("emulator starts");
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("events.jsonl");
        let settings = dir.path().join("executor.toml");
        std::fs::write(&settings, settings_toml(&events, extra_settings)).unwrap();
        Self {
            emu,
            dir,
            settings,
            events,
        }
    }

    pub fn runner(&self) -> Runner {
        Runner::new(env!("CARGO_BIN_EXE_spotrun-executor"))
            .args(["--config", self.settings.to_str().unwrap()])
            .env("KUBECONFIG", self.emu.kubeconfig_path().to_string_lossy())
            .prepare_retry_delay(Duration::from_millis(50))
            .graceful_kill_timeout(Duration::from_secs(10))
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Runs the binary directly (for `gc`, `cleanup`).
    pub fn exec(&self, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_spotrun-executor"))
            .args(["--config", self.settings.to_str().unwrap()])
            .args(args)
            .env("KUBECONFIG", self.emu.kubeconfig_path())
            .envs(envs.iter().copied())
            .output()
            .unwrap()
    }

    pub async fn pods(&self) -> Vec<k8s_openapi::api::core::v1::Pod> {
        let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(self.emu.client().await, "ci-jobs");
        api.list(&kube::api::ListParams::default())
            .await
            .unwrap()
            .items
    }

    /// Waits (bounded) for graceful pod deletion to finish; true when no pod is left.
    pub async fn no_pods_within(&self, d: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + d;
        loop {
            if self.pods().await.is_empty() {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    pub async fn secrets(&self) -> Vec<String> {
        let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(self.emu.client().await, "ci-jobs");
        api.list(&kube::api::ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect()
    }
}

/// The node a job ran on, from the job log line `Pod ... is running on node N (...)`.
pub fn node_of(log: &str) -> String {
    log.lines()
        .find_map(|l| l.split(" is running on node ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("")
        .to_string()
}

/// The job log between two markers (stage output only, without timing-dependent lines).
pub fn between<'a>(log: &'a str, start: &str, end: &str) -> &'a str {
    let s = log.find(start).map_or(0, |i| i);
    let e = log[s..].find(end).map_or(log.len(), |i| s + i + end.len());
    &log[s..e]
}
