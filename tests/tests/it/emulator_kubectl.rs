//! The real kubectl (/usr/bin/kubectl) against the emulator's kubeconfig.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom"
)]

use std::process::Output;
use std::time::Duration;

use spotrun_testkit::emulator::Emulator;
use tokio::io::{AsyncBufReadExt as _, BufReader};

use super::emulator_support::gke;

const KUBECTL: &str = "/usr/bin/kubectl";

async fn kubectl(emu: &Emulator, args: &[&str]) -> Output {
    let fut = tokio::process::Command::new(KUBECTL)
        .args(args)
        .env("KUBECONFIG", emu.kubeconfig_path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("kubectl finished within 30 s")
        .expect("kubectl runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const POD_YAML: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox:1.36
    command: [sh, -c, 'echo booted; sleep 3600']
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_get_exec_logs_delete_watch() {
    let emu = gke().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, POD_YAML).unwrap();
    let file = file.to_str().unwrap();

    let o = kubectl(&emu, &["get", "pods"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("No resources found in ci-jobs namespace."),
        "{}",
        text(&o)
    );

    let o = kubectl(&emu, &["apply", "-f", file, "--validate=false"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "pod/web created\n");

    let o = kubectl(
        &emu,
        &["wait", "--for=condition=Ready", "pod/web", "--timeout=20s"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));

    let o = kubectl(&emu, &["get", "pods", "-o", "wide"]).await;
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let row: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(row[..3], ["web", "1/1", "Running"], "{out}");
    assert_eq!(row[5..], ["127.0.0.1", "gke-ondemand-1"], "{out}");

    let o = kubectl(
        &emu,
        &[
            "get",
            "pod",
            "web",
            "-o",
            "jsonpath={.status.phase} {.spec.nodeName}",
        ],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Running gke-ondemand-1",
        "{}",
        text(&o)
    );

    let o = kubectl(
        &emu,
        &[
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 4",
        ],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "to-out\n",
        "{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("to-err"),
        "{}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));

    let o = kubectl(&emu, &["logs", "web"]).await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "booted\n",
        "{}",
        text(&o)
    );

    // Re-applying an unchanged manifest is a no-op.
    let o = kubectl(&emu, &["apply", "-f", file, "--validate=false"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "pod/web unchanged\n");

    let mut watch = tokio::process::Command::new(KUBECTL)
        .args(["get", "pods", "-w", "--output-watch-events"])
        .env("KUBECONFIG", emu.kubeconfig_path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Read the watch's lines as they come: the delete starts once kubectl has listed the pod,
    // and the watch ends once it has printed the deletion (no sleeps guessing kubectl's pace).
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let mut read_until = async |what: &str| {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(what) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "no {what:?} line from kubectl -w:\n{seen}");
        seen.clone()
    };
    read_until("ADDED      web").await;
    let o = kubectl(&emu, &["delete", "pod", "web"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "pod \"web\" deleted\n");
    let seen = read_until("DELETED    web").await;
    watch.kill().await.unwrap();
    assert!(seen.contains("MODIFIED   web"), "{seen}");

    let o = kubectl(&emu, &["get", "pod", "web"]).await;
    assert!(!o.status.success());
    assert!(text(&o).contains("pods \"web\" not found"), "{}", text(&o));
    assert_eq!(emu.panics(), 0);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_until_sigterm() {
    use tokio::io::AsyncBufReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kube-emulator"))
        .args(["--gke", "--port", "0", "--kubeconfig-out"])
        .arg(&kc)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let o = tokio::process::Command::new(KUBECTL)
        .args([
            "get",
            "nodes",
            "-l",
            "cloud.google.com/gke-spot=true",
            "-o",
            "name",
        ])
        .env("KUBECONFIG", &kc)
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "node/gke-spot-1\nnode/gke-spot-2\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-s", "TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
