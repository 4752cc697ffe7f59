//! What the end of a job's pod means for the job: `podstate` reads the pod, this asks the API
//! about its node and turns the reading into the failure the runner sees. The one place a spot
//! reclaim is told apart from every other loss (and recorded, so a retry may move to on-demand
//! nodes); prepare and every stage come here.

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use serde_json::json;

use crate::failure::Failure;
use crate::job::JobResponse;
use crate::kubeapi::Kube;
use crate::plan::SPOT_LABEL;
use crate::podstate::PodEnd;
use crate::{Ctx, preemption};

/// What the API says about a node now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeNow {
    Spot,
    OnDemand,
    Gone,
    /// No answer (API trouble, no RBAC on nodes) or no node name.
    Unknown,
}

pub async fn node_now(kube: &Kube, node: &str) -> NodeNow {
    if node.is_empty() {
        return NodeNow::Unknown;
    }
    let nodes: Api<Node> = Api::all(kube.client.clone());
    match kube.call("get node", || nodes.get_opt(node)).await {
        Ok(None) => NodeNow::Gone,
        Ok(Some(n)) => {
            let spot = n
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SPOT_LABEL))
                .is_some_and(|v| v == "true");
            if spot {
                NodeNow::Spot
            } else {
                NodeNow::OnDemand
            }
        }
        Err(_) => NodeNow::Unknown,
    }
}

/// Turns the end of a pod into the failure the runner sees. Only a spot node reclaimed counts as
/// a preemption (recorded, so the retry may go to on-demand nodes); an eviction of any other kind
/// is a plain system failure quoting the kubelet or controller, with no fallback.
pub async fn pod_lost(ctx: &Ctx, kube: &Kube, job: &JobResponse, end: PodEnd) -> Failure {
    match end {
        PodEnd::NodeLost {
            node,
            reason,
            spot_hint,
        } => {
            let spot = match node_now(kube, &node).await {
                NodeNow::Spot => true,
                NodeNow::OnDemand => false,
                // A node that vanished under a pod placed on spot (or placed anywhere: spot is the
                // capacity that vanishes) is read as a reclaim.
                NodeNow::Gone | NodeNow::Unknown => spot_hint.unwrap_or(true),
            };
            if spot {
                preempted(ctx, kube, job, &node, &reason).await
            } else {
                ctx.events
                    .warn("node_lost", json!({ "node": node, "reason": reason }));
                Failure::System(format!(
                    "Job pod lost with its on-demand node {node} ({reason}); not a spot reclaim, so a retry is placed as usual"
                ))
            }
        }
        PodEnd::Deleted { node, spot_hint } => {
            if node_now(kube, &node).await == NodeNow::Gone {
                let reason = "the pod was deleted and its node is gone".to_string();
                if spot_hint == Some(false) {
                    Failure::System(format!("Job pod lost: {reason} (node {node})"))
                } else {
                    preempted(ctx, kube, job, &node, &reason).await
                }
            } else {
                ctx.events.warn("pod_deleted", json!({ "node": node }));
                Failure::System(
                    "Job pod was deleted while the job ran (by a user or a controller, not by a spot reclaim)".into(),
                )
            }
        }
        PodEnd::Evicted { node, reason } => {
            ctx.events
                .warn("evicted", json!({ "node": node, "reason": reason }));
            Failure::System(format!(
                "Job pod was evicted from node {node}: {reason} (not a spot reclaim: a retry is not moved to on-demand nodes)"
            ))
        }
        PodEnd::Failed { reason } => Failure::System(format!("Job pod failed: {reason}")),
        PodEnd::ContainerTerminated { container, reason } => Failure::System(format!(
            "Job pod container {container} terminated: {reason}"
        )),
    }
}

/// A spot reclaim: recorded (so the retry of the same job may go to on-demand nodes) and named.
async fn preempted(ctx: &Ctx, kube: &Kube, job: &JobResponse, node: &str, reason: &str) -> Failure {
    let node_txt = if node.is_empty() {
        "(not yet scheduled)".to_string()
    } else {
        node.to_string()
    };
    ctx.events
        .warn("preemption", json!({ "node": node, "reason": reason }));
    preemption::record(kube, &ctx.settings, job, node).await;
    let retry = if ctx.settings.spot.fallback_on_preemption {
        "a retry of this job (retry: when: runner_system_failure) will run on on-demand nodes"
    } else {
        "a retry of this job (retry: when: runner_system_failure) will run on spot nodes again (fallback disabled)"
    };
    Failure::Preempted(format!(
        "Job pod was preempted on node {node_txt} ({reason}); {retry}"
    ))
}
