//! Pure reading of a pod's status: is it ready, still coming, failed by the job's fault, or lost?

use k8s_openapi::api::core::v1::Pod;

/// Why a pod can no longer run the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEnd {
    /// Its node went away: graceful node shutdown, node deleted, `PodGC` after the node was
    /// removed. A spot reclaim when the node was a spot node, which `verdict::pod_lost` decides (it can
    /// ask the API); `spot_hint` is what the pod's own placement says.
    NodeLost {
        node: String,
        reason: String,
        spot_hint: Option<bool>,
    },
    /// Evicted for another reason: kubelet memory / ephemeral-storage pressure, a drain through the
    /// Eviction API, scheduler preemption, taint eviction. Never a spot reclaim.
    Evicted { node: String, reason: String },
    /// Deleted without a disruption mark; a reclaim only if its node is gone too.
    Deleted {
        node: String,
        spot_hint: Option<bool>,
    },
    /// Failed or finished for another reason (deadline exceeded, ...).
    Failed { reason: String },
    /// A container we exec into stopped.
    ContainerTerminated { container: String, reason: String },
}

/// Where a pod stands on its way to running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Running with every container started.
    Running {
        node: String,
    },
    /// Not scheduled; the scheduler's message.
    Unschedulable {
        message: String,
    },
    /// Waiting for scheduling with no verdict yet.
    Pending,
    /// Scheduled; containers still waiting (name, reason) pairs.
    Starting {
        node: String,
        waiting: Vec<(String, String)>,
    },
    /// A container can never start because of the job's image or spec: a build failure.
    JobError {
        container: String,
        image: String,
        reason: String,
        message: String,
    },
    Ended(PodEnd),
}

/// Reasons of a waiting container that will not resolve by waiting.
const IMAGE_REASONS: [&str; 4] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
];
const CONFIG_REASONS: [&str; 3] = [
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
];

/// The containers stages exec into; the others are services.
pub const EXEC_CONTAINERS: [&str; 2] = ["build", "helper"];

/// A service container that stopped: what the job log says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceExit {
    pub container: String,
    pub image: String,
    pub exit_code: i32,
    pub reason: String,
    /// The termination message: with `FallbackToLogsOnError`, the last log lines of a failure.
    pub message: String,
}

/// Service containers that have terminated (in container order).
#[must_use]
pub fn exited_services(pod: &Pod) -> Vec<ServiceExit> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter(|cs| !EXEC_CONTAINERS.contains(&cs.name.as_str()))
        .filter_map(|cs| {
            let t = cs.state.as_ref()?.terminated.as_ref()?;
            Some(ServiceExit {
                container: cs.name.clone(),
                image: cs.image.clone(),
                exit_code: t.exit_code,
                reason: t.reason.clone().unwrap_or_default(),
                message: t.message.clone().unwrap_or_default(),
            })
        })
        .collect()
}

#[must_use]
pub fn node_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
}

/// What the pod's placement says about its node: spot required, or spot excluded.
#[must_use]
pub fn spot_hint(pod: &Pod) -> Option<bool> {
    let spec = pod.spec.as_ref()?;
    if spec
        .node_selector
        .as_ref()
        .and_then(|s| s.get(crate::plan::SPOT_LABEL))
        .is_some_and(|v| v == "true")
    {
        return Some(true);
    }
    let policy = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crate::plan::SPOT_POLICY_LABEL));
    (policy.map(String::as_str) == Some("never")).then_some(false)
}

/// A status message on one line, cut to a readable length (termination messages hold log tails).
fn one_line(message: &str) -> String {
    let joined: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let text = joined.join(" | ");
    if text.chars().count() > 600 {
        let cut: String = text.chars().take(600).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// The end of a pod, if it has ended (or is being deleted) — checked before anything else.
#[must_use]
pub fn pod_end(pod: &Pod, exec_containers: &[&str]) -> Option<PodEnd> {
    let node = node_name(pod);
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    let reason = status.and_then(|s| s.reason.clone()).unwrap_or_default();
    let message = status.and_then(|s| s.message.clone()).unwrap_or_default();
    // The kubelet's graceful node shutdown (GKE's spot reclaim path): reason Terminated (Shutdown
    // before 1.22, NodeShutdown for admission rejections).
    let shutdown =
        matches!(reason.as_str(), "Terminated" | "NodeShutdown" | "Shutdown") && phase == "Failed";
    let node_lost = |why: String| PodEnd::NodeLost {
        node: node.clone(),
        reason: why,
        spot_hint: spot_hint(pod),
    };
    if let Some(c) = condition(pod, "DisruptionTarget").filter(|c| c.status == "True") {
        let creason = c.reason.clone().unwrap_or_default();
        let cmessage = c.message.clone().unwrap_or_default();
        let why = format!("{creason}: {cmessage}");
        return Some(match creason.as_str() {
            // PodGC: "node no longer exists".
            "DeletionByPodGC" => node_lost(why),
            // The kubelet ends pods for a node shutdown and for resource pressure alike; the
            // pod's own status tells them apart (Terminated vs Evicted).
            "TerminationByKubelet" if shutdown || cmessage.contains("node shutdown") => {
                node_lost(why)
            }
            // Kubelet eviction, EvictionByEvictionAPI (drain), PreemptionByScheduler,
            // DeletionByTaintManager: the node is fine, the pod was pushed off it.
            _ => PodEnd::Evicted {
                node,
                reason: if reason == "Evicted" && !message.is_empty() {
                    format!("{creason}: {message}")
                } else {
                    why
                },
            },
        });
    }
    if shutdown {
        return Some(node_lost(format!("{reason}: {message}")));
    }
    if reason == "Evicted" && phase == "Failed" {
        return Some(PodEnd::Evicted {
            node,
            reason: format!("{reason}: {message}"),
        });
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Some(PodEnd::Deleted {
            node,
            spot_hint: spot_hint(pod),
        });
    }
    if matches!(phase, "Failed" | "Succeeded") {
        let what = if reason.is_empty() {
            format!("phase {phase}")
        } else {
            format!("phase {phase}, {reason}: {message}")
        };
        return Some(PodEnd::Failed { reason: what });
    }
    for cs in status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
    {
        if !exec_containers.contains(&cs.name.as_str()) {
            continue;
        }
        if let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            // The reason and message say why ("StartError" + "exec: \"sh\": executable file
            // not found" for an image without a shell); the exit code alone does not.
            let mut reason = format!("exit code {}", t.exit_code);
            if let Some(r) = t.reason.as_ref().filter(|r| !r.is_empty()) {
                reason.push_str(&format!(", {r}"));
            }
            if let Some(m) = t
                .message
                .as_ref()
                .map(|m| one_line(m))
                .filter(|m| !m.is_empty())
            {
                reason.push_str(&format!(": {m}"));
            }
            return Some(PodEnd::ContainerTerminated {
                container: cs.name.clone(),
                reason,
            });
        }
    }
    None
}

/// The verdict for a pod whose watch said DELETED: the last state it carried if that tells why
/// (a reclaim or eviction marks the pod before the delete), else a plain deletion.
#[must_use]
pub fn deleted_pod_end(pod: &Pod) -> PodEnd {
    match pod_end(pod, &[]) {
        Some(end @ (PodEnd::NodeLost { .. } | PodEnd::Evicted { .. })) => end,
        _ => PodEnd::Deleted {
            node: node_name(pod),
            spot_hint: spot_hint(pod),
        },
    }
}

/// Classifies a pod on its way to running.
#[must_use]
pub fn progress(pod: &Pod) -> Progress {
    if let Some(end) = pod_end(pod, &["build", "helper"]) {
        return Progress::Ended(end);
    }
    let status = pod.status.as_ref();
    let statuses: Vec<_> = status
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    // The launcher's init container can fail to pull or start like any other.
    let inits = status
        .and_then(|s| s.init_container_statuses.clone())
        .unwrap_or_default();
    for cs in inits.iter().chain(&statuses) {
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.clone().unwrap_or_default();
            if IMAGE_REASONS.contains(&reason.as_str()) || CONFIG_REASONS.contains(&reason.as_str())
            {
                return Progress::JobError {
                    container: cs.name.clone(),
                    image: cs.image.clone(),
                    reason,
                    message: w.message.clone().unwrap_or_default(),
                };
            }
        }
    }
    let node = node_name(pod);
    if node.is_empty() {
        if let Some(c) = condition(pod, "PodScheduled")
            .filter(|c| c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
        {
            return Progress::Unschedulable {
                message: c.message.clone().unwrap_or_default(),
            };
        }
        return Progress::Pending;
    }
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    let want = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    let is_running = |cs: &&k8s_openapi::api::core::v1::ContainerStatus| {
        cs.state.as_ref().is_some_and(|s| s.running.is_some())
    };
    let is_terminated = |cs: &&k8s_openapi::api::core::v1::ContainerStatus| {
        cs.state.as_ref().is_some_and(|s| s.terminated.is_some())
    };
    // Build and helper must run; a service that already stopped does not hold the job (it is
    // reported by `exited_services`, and the Kubernetes executor does not wait for it either).
    let settled = statuses
        .iter()
        .filter(|cs| {
            is_running(cs) || (is_terminated(cs) && !EXEC_CONTAINERS.contains(&cs.name.as_str()))
        })
        .count();
    let core_running = EXEC_CONTAINERS
        .iter()
        .all(|c| statuses.iter().any(|cs| cs.name == *c && is_running(&cs)));
    if phase == "Running" && settled >= want && want > 0 && core_running {
        return Progress::Running { node };
    }
    let waiting = statuses
        .iter()
        .filter_map(|cs| {
            let w = cs.state.as_ref()?.waiting.as_ref()?;
            Some((cs.name.clone(), w.reason.clone().unwrap_or_default()))
        })
        .collect();
    Progress::Starting { node, waiting }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Pod {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn preempted_fixture_is_preemption_naming_the_node() {
        let pod = fixture("preempted-pod.json");
        match pod_end(&pod, &["build"]) {
            Some(PodEnd::NodeLost { node, reason, .. }) => {
                assert!(!node.is_empty());
                assert!(reason.contains("TerminationByKubelet"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            pod_end(&fixture("preempted-pod-before.json"), &["build", "helper"]),
            None
        );
    }

    #[test]
    fn image_pull_backoff_is_a_job_error_naming_the_image() {
        match progress(&fixture("imagepull-backoff-pod.json")) {
            Progress::JobError {
                container,
                image,
                reason,
                ..
            } => {
                assert_eq!(container, "build");
                assert!(image.contains("rust:1.98-bookworm"), "{image}");
                assert!(reason.contains("ImagePull"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unschedulable_carries_the_scheduler_message() {
        match progress(&fixture("unschedulable-pod.json")) {
            Progress::Unschedulable { message } => {
                assert!(message.contains("Insufficient cpu"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn running_needs_every_container_started() {
        let pod = fixture("preempted-pod-before.json");
        assert!(
            matches!(progress(&pod), Progress::Running { .. }),
            "{:?}",
            progress(&pod)
        );
        let mut starting = pod.clone();
        starting
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .state = Some(k8s_openapi::api::core::v1::ContainerState {
            waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
                reason: Some("ContainerCreating".into()),
                message: None,
            }),
            ..Default::default()
        });
        assert!(matches!(progress(&starting), Progress::Starting { .. }));
        let mut deleting = pod;
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::default(),
            ));
        assert!(matches!(
            pod_end(&deleting, &[]),
            Some(PodEnd::Deleted { .. })
        ));
    }

    fn with_disruption(mut pod: Pod, phase_reason: &str, message: &str, creason: &str) -> Pod {
        let st = pod.status.as_mut().unwrap();
        st.reason = Some(phase_reason.into());
        st.message = Some(message.into());
        for c in st.conditions.iter_mut().flatten() {
            if c.type_ == "DisruptionTarget" {
                c.reason = Some(creason.into());
                c.message = Some(message.into());
            }
        }
        pod
    }

    #[test]
    fn only_a_node_going_away_is_a_node_loss() {
        let pod = fixture("preempted-pod.json");
        let memory =
            "The node was low on resource: memory. Threshold quantity: 100Mi, available: 50Mi.";
        match pod_end(
            &with_disruption(pod.clone(), "Evicted", memory, "TerminationByKubelet"),
            &["build"],
        ) {
            Some(PodEnd::Evicted { reason, .. }) => {
                assert_eq!(reason, format!("TerminationByKubelet: {memory}"));
            }
            other => panic!("{other:?}"),
        }
        let drain = "Eviction API: evicting";
        assert!(matches!(
            pod_end(
                &with_disruption(pod.clone(), "", drain, "EvictionByEvictionAPI"),
                &["build"]
            ),
            Some(PodEnd::Evicted { .. })
        ));
        assert!(matches!(
            pod_end(
                &with_disruption(
                    pod.clone(),
                    "",
                    "preempted by a higher priority pod",
                    "PreemptionByScheduler"
                ),
                &["build"]
            ),
            Some(PodEnd::Evicted { .. })
        ));
        assert!(matches!(
            pod_end(
                &with_disruption(
                    pod.clone(),
                    "",
                    "PodGC: node no longer exists",
                    "DeletionByPodGC"
                ),
                &["build"]
            ),
            Some(PodEnd::NodeLost { .. })
        ));
        // The fixture runs with a spot node selector: its placement says spot.
        match pod_end(&pod, &["build"]) {
            Some(PodEnd::NodeLost { spot_hint, .. }) => assert_eq!(spot_hint, Some(true)),
            other => panic!("{other:?}"),
        }
        // Deleted while Failed by a reclaim: the reclaim is the verdict, not the deletion.
        assert!(matches!(deleted_pod_end(&pod), PodEnd::NodeLost { .. }));
        assert!(matches!(
            deleted_pod_end(&fixture("preempted-pod-before.json")),
            PodEnd::Deleted { .. }
        ));
    }

    #[test]
    fn a_terminated_container_says_why() {
        let mut pod = fixture("preempted-pod-before.json");
        let cs = &mut pod
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0];
        cs.state = Some(k8s_openapi::api::core::v1::ContainerState {
            terminated: Some(k8s_openapi::api::core::v1::ContainerStateTerminated {
                exit_code: 128,
                reason: Some("StartError".into()),
                message: Some("failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: exec: \"sh\": executable file not found in $PATH: unknown".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let name = cs.name.clone();
        match pod_end(&pod, &[name.as_str()]) {
            Some(PodEnd::ContainerTerminated { reason, .. }) => {
                assert!(
                    reason.starts_with("exit code 128, StartError: failed to create"),
                    "{reason}"
                );
                assert!(
                    reason.contains("exec: \"sh\": executable file not found"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
