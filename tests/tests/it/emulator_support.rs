//! Shared helpers of the emulator tests: pod builders, raw requests, waits.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom"
)]

use std::time::Duration;

use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::{Value, json};
use spotrun_testkit::emulator::{Emulator, EmulatorConfig};

pub async fn gke() -> Emulator {
    Emulator::start(EmulatorConfig::gke())
        .await
        .expect("emulator starts")
}

/// A kube-rs pod watcher in its own task, forwarding every event to `events`.
///
/// A watcher without a backoff retries a failed request at once; when the request fails without
/// ever waiting (the runtime shutting down, a refused loopback connection) the task never yields,
/// so `abort()` never takes effect and the test hangs at 100 % CPU (issue 17). Hence the backoff,
/// and [`PodWatch::stop`], which aborts the task and waits until it has ended.
pub struct PodWatch {
    pub events: tokio::sync::mpsc::UnboundedReceiver<watcher::Event<Pod>>,
    task: tokio::task::JoinHandle<()>,
}

pub fn spawn_pod_watcher(pods: Api<Pod>, config: watcher::Config) -> PodWatch {
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        // Errors (a dropped watch, a failed re-list) are retried after the backoff's delay.
        let mut stream = watcher(pods, config).default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(ev) = ev
                && tx.send(ev).is_err()
            {
                break;
            }
        }
    });
    PodWatch { events, task }
}

impl PodWatch {
    /// Aborts the watcher and waits until its task has ended (a panic in it fails the test).
    pub async fn stop(self) {
        self.task.abort();
        let ended = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the pod watcher task ends within 10 s of abort()");
        if let Err(e) = ended
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// A pod whose containers idle (`sleep`) unless given a command.
pub fn pod(name: &str, containers: &Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "emu-test"}},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": containers}
    }))
    .expect("valid pod")
}

pub fn sleeper(name: &str) -> Value {
    json!({"name": name, "image": "busybox:1.36", "command": ["sh", "-c", "sleep 3600"]})
}

pub async fn wait_running(pods: &Api<Pod>, name: &str) -> Pod {
    tokio::time::timeout(
        Duration::from_secs(20),
        await_condition(pods.clone(), name, conditions::is_pod_running()),
    )
    .await
    .expect("pod running within 20 s")
    .expect("watch ok")
    .expect("pod exists")
}

/// Waits until `f` holds for the pod (polling; the watch-based waits are tested elsewhere).
pub async fn wait_pod(pods: &Api<Pod>, name: &str, what: &str, f: impl Fn(&Pod) -> bool) -> Pod {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(p) = pods.get(name).await
            && f(&p)
        {
            return p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for pod {name}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One raw request through the kube client's transport: (HTTP status, JSON body or Null).
pub async fn raw(
    client: &kube::Client,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let mut b = http::Request::builder().method(method).uri(path);
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    let req = b
        .body(kube::client::Body::from(body.to_vec()))
        .expect("request");
    let resp = client.send(req).await.expect("transport ok");
    let code = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

pub fn pod_phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}
