//! Watches the pod (and its node) while a stage runs, and reports the first sign of its end.

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event as WEvent};
use serde_json::json;

use super::TERMINATION_GRACE;
use crate::kubeapi::Kube;
use crate::podstate::{self, PodEnd};

/// How long a stage runs before its pod and node are watched. Short stages (most of the runner's
/// own) then cost the API server no list and watch pair each; a pod that ends earlier breaks
/// the exec stream, which checks the pod anyway, and the watch's initial list catches the rest.
const MONITOR_AFTER: Duration = Duration::from_millis(250);

/// Watches the pod (and its node) while a stage runs; reports the first sign of its end.
pub async fn monitor_pod(
    kube: Kube,
    name: String,
    node: String,
    container: String,
    tx: tokio::sync::mpsc::Sender<PodEnd>,
) {
    tokio::time::sleep(MONITOR_AFTER).await;
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut pod_stream = watcher::watcher(pods, cfg).default_backoff().boxed();
    let nodes: Api<Node> = Api::all(kube.client.clone());
    let ncfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut node_stream = watcher::watcher(nodes, ncfg).default_backoff().boxed();
    let mut node_ok = !node.is_empty();
    let mut node_errors = 0u32;
    let mut node_seen = false;
    let containers = [container.as_str()];
    // A stopped container is reported only if no stronger verdict follows within the grace.
    let mut pending: Option<(PodEnd, tokio::time::Instant)> = None;
    loop {
        let pending_at = pending.as_ref().map(|(_, t)| *t);
        let end = tokio::select! {
            () = async { if let Some(t) = pending_at { tokio::time::sleep_until(t).await } }, if pending_at.is_some() => pending.take().map(|(e, _)| e),
            item = pod_stream.next() => match item {
                Some(Ok(WEvent::Apply(p) | WEvent::InitApply(p))) => podstate::pod_end(&p, &containers),
                Some(Ok(WEvent::Delete(p))) => Some(podstate::deleted_pod_end(&p)),
                Some(Ok(_)) => None,
                Some(Err(e)) => {
                    kube.events.warn("watch_error", json!({ "resource": "pod", "error": e.to_string() }));
                    None
                }
                None => return,
            },
            item = node_stream.next(), if node_ok => match item {
                Some(Ok(WEvent::InitApply(_) | WEvent::Apply(_))) => { node_seen = true; node_errors = 0; None }
                Some(Ok(WEvent::Delete(_))) => Some(PodEnd::NodeLost { node: node.clone(), reason: "its node was deleted".into(), spot_hint: None }),
                // A relist without the node: it is gone.
                Some(Ok(WEvent::InitDone)) if !node_seen => Some(PodEnd::NodeLost { node: node.clone(), reason: "its node no longer exists".into(), spot_hint: None }),
                Some(Ok(WEvent::InitDone | WEvent::Init)) => { node_seen = false; None }
                Some(Err(e)) => {
                    node_errors += 1;
                    // Without RBAC on nodes the pod watch still catches preemption.
                    if node_errors > 3 { node_ok = false; }
                    kube.events.warn("watch_error", json!({ "resource": "node", "error": e.to_string() }));
                    None
                }
                None => { node_ok = false; None }
            },
        };
        match end {
            Some(end @ PodEnd::ContainerTerminated { .. })
                if pending.is_none() && pending_at.is_none() =>
            {
                pending = Some((end, tokio::time::Instant::now() + TERMINATION_GRACE));
            }
            Some(PodEnd::ContainerTerminated { .. }) | None => {}
            Some(end) => {
                let _ = tx.send(end).await;
                return;
            }
        }
    }
}
