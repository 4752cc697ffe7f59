//! `prepare`: plan the pod, create it (idempotently), then watch it until every container runs,
//! printing progress and Warning events to the job log and failing fast.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event as WEvent};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use crate::failure::Failure;
use crate::job::{JobError, JobIdentity, JobResponse, job_knobs};
use crate::kubeapi::Kube;
use crate::naming::{MANAGED_BY_KEY, MANAGED_BY_VALUE, PREPARED_ANNOTATION};
use crate::plan::{PlanError, PlanInput, effective_spot_policy, plan_pod};
use crate::podstate::{self, Progress};
use crate::settings::{HelperFileOwnership, SpotPolicy};
use crate::verdict::{self, NodeNow};
use crate::{Ctx, preemption};

/// A line in the job log (stdout of prepare/run), flushed at once.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Reads `JOB_RESPONSE_FILE`; its absence or corruption is the runner's problem: a system failure.
pub fn load_job() -> Result<JobResponse, Failure> {
    let path = std::env::var("JOB_RESPONSE_FILE")
        .ok()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| Failure::System(JobError::NoResponseFile.to_string()))?;
    JobResponse::from_file(std::path::Path::new(&path)).map_err(|e| Failure::System(e.to_string()))
}

/// The identity, from `CUSTOM_ENV_*` when present, else the payload's job id.
pub fn identity(ctx: &Ctx, job: Option<&JobResponse>) -> Result<JobIdentity, Failure> {
    match (JobIdentity::from_env(&ctx.env), job) {
        (Ok(id), _) => Ok(id),
        (Err(_), Some(job)) => Ok(JobIdentity {
            job_id: job.id,
            runner_short_token: ctx.env.get("CI_RUNNER_SHORT_TOKEN").unwrap_or("").into(),
            concurrent_id: ctx.env.get("CI_CONCURRENT_ID").unwrap_or("0").into(),
        }),
        (Err(e), None) => Err(Failure::System(e.to_string())),
    }
}

/// Whether the node carries the GKE spot label (None: unknown, e.g. no RBAC on nodes, or gone).
pub async fn node_is_spot(kube: &Kube, node: &str) -> Option<bool> {
    match verdict::node_now(kube, node).await {
        NodeNow::Spot => Some(true),
        NodeNow::OnDemand => Some(false),
        NodeNow::Gone | NodeNow::Unknown => None,
    }
}

fn capacity_word(spot: Option<bool>) -> &'static str {
    match spot {
        Some(true) => "spot",
        Some(false) => "on-demand",
        None => "capacity unknown",
    }
}

pub async fn prepare(ctx: &Ctx) -> Result<(), Failure> {
    let started = Instant::now();
    let settings = &ctx.settings;
    let job = load_job()?;
    let identity = identity(ctx, Some(&job))?;
    let name = identity.pod_name();
    ctx.events.set_context("pod", name.clone());
    let knobs = job_knobs(settings, &ctx.env, &job).map_err(|e| Failure::Job(e.to_string()))?;
    for note in &knobs.notes {
        say(note);
    }
    let kube = Kube::connect(settings, ctx.events.clone()).await?;

    let wanted = effective_spot_policy(settings, &knobs, false);
    let mut fallback = false;
    if wanted != SpotPolicy::Never {
        let record = preemption::lookup(&kube, &job).await;
        fallback = preemption::should_fall_back(settings, record.as_ref(), preemption::now_secs());
        ctx.events.info(
            "fallback_decision",
            json!({ "wanted": wanted.as_str(), "fallback": fallback, "previous_preemptions": record.as_ref().map_or(0, |r| r.count) }),
        );
        if let Some(r) = record.filter(|_| fallback) {
            say(&format!(
                "A previous attempt of this job was preempted on spot node {}; this attempt runs on on-demand nodes.",
                r.last_node
            ));
        }
    }
    let spot = effective_spot_policy(settings, &knobs, fallback);
    let make_plan = |pull_attempt: usize| {
        plan_pod(
            settings,
            &PlanInput {
                job: &job,
                identity: &identity,
                env: &ctx.env,
                knobs: &knobs,
                spot,
                pull_attempt,
            },
        )
        .map_err(|e| match e {
            PlanError::ImageNotAllowed { .. }
            | PlanError::PullPolicyNotAllowed { .. }
            | PlanError::UnknownPullPolicy { .. }
            | PlanError::Volume(_)
            | PlanError::UnsupportedArch { .. } => Failure::Job(e.to_string()),
            PlanError::Patch(_) => Failure::System(e.to_string()),
        })
    };
    let plan = make_plan(0)?;
    for note in &plan.notes {
        say(note);
    }
    let secret_name = plan.secret.as_ref().and_then(|s| s.metadata.name.clone());

    say(&format!(
        "Creating pod {}/{name} (spot policy: {})",
        kube.namespace,
        spot.as_str()
    ));
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let secrets: Api<Secret> = Api::namespaced(kube.client.clone(), &kube.namespace);

    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Failure::System(format!("installing SIGTERM handler: {e}")))?;
    let pp = PostParams::default();
    let patch_params = PatchParams::default();
    let work = async {
        if let Some(secret) = &plan.secret {
            match kube
                .call("create secret", || secrets.create(&pp, secret))
                .await
            {
                Ok(_) => {}
                // Ours from an earlier attempt of the same job (deterministic name): same content.
                Err(e) if e.is_already_exists() => {}
                Err(e) => return Err(Failure::from(e)),
            }
        }
        let mut plan = plan.clone();
        let mut attempt = 0;
        loop {
            let pod = create_or_reuse(&kube, &pods, &plan.pod, job.id).await?;
            if let (Some(secret), Some(uid)) = (&plan.secret, pod.metadata.uid.clone()) {
                // The secret goes when the pod goes, even if cleanup never runs (kubernetes GC).
                let owner = OwnerReference {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                    name: name.clone(),
                    uid,
                    ..OwnerReference::default()
                };
                let patch = Patch::Merge(json!({ "metadata": { "ownerReferences": [owner] } }));
                let sname = secret.metadata.name.clone().unwrap_or_default();
                if let Err(e) = kube
                    .call("patch secret owner", || {
                        secrets.patch(&sname, &patch_params, &patch)
                    })
                    .await
                {
                    ctx.events
                        .warn("secret_owner_failed", json!({ "error": e.to_string() }));
                }
            }
            let mut reported_exits = BTreeSet::new();
            match wait_running(
                ctx,
                &kube,
                &pods,
                &name,
                &job,
                pod.metadata.uid.clone(),
                &mut reported_exits,
            )
            .await
            {
                // A pull policy list: the next entry gets a new pod, as the Kubernetes executor's
                // pull retry does (e.g. `[always, if-not-present]` while the registry is down).
                Err(Failure::Job(msg))
                    if msg.starts_with(PULL_FAILURE) && attempt + 1 < plan.pull_attempts =>
                {
                    attempt += 1;
                    say(&format!(
                        "WARNING: {msg}; retrying with the next pull policy (attempt {} of {})",
                        attempt + 1,
                        plan.pull_attempts
                    ));
                    delete_and_wait_gone(&kube, &pods, &name, pod.metadata.uid.as_deref()).await?;
                    plan = make_plan(attempt)?;
                }
                Err(e) => return Err(e),
                Ok(node) => {
                    crate::services::wait_for_services(
                        ctx,
                        &kube,
                        &pods,
                        &name,
                        &plan.pod,
                        &mut reported_exits,
                    )
                    .await;
                    return Ok(node);
                }
            }
        }
    };
    let result = tokio::select! {
        r = work => r,
        _ = term.recv() => {
            // Cancelled while preparing: roll back so nothing is left behind, within seconds.
            ctx.events.info("cancelled", json!({ "during": "prepare" }));
            let dp = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                let _ = pods.delete(&name, &dp).await;
                if let Some(s) = &secret_name {
                    let _ = secrets.delete(s, &DeleteParams::default()).await;
                }
            }).await;
            Err(Failure::Cancelled("prepare cancelled; the job pod was deleted".into()))
        }
    };
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match &result {
        Ok(node) => ctx.events.info(
            "pod_running",
            json!({ "node": node, "duration_ms": ms, "spot_policy": spot.as_str() }),
        ),
        Err(e) => ctx.events.warn(
            "prepare_failed",
            json!({ "error": e.to_string(), "duration_ms": ms }),
        ),
    }
    result.map(|_| ())
}

/// How every pull failure's job-log line starts (the pull-policy fallback looks for it).
const PULL_FAILURE: &str = "cannot pull image";

/// Deletes the pod now and waits (bounded, with backoff) until it is gone or replaced.
async fn delete_and_wait_gone(
    kube: &Kube,
    pods: &Api<Pod>,
    name: &str,
    uid: Option<&str>,
) -> Result<(), Failure> {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match kube.call("delete pod", || pods.delete(name, &dp)).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let deadline = Instant::now() + Duration::from_mins(1);
    let mut pause = Duration::from_millis(100);
    loop {
        let current = kube.call("get pod", || pods.get_opt(name)).await?;
        if current.is_none_or(|p| p.metadata.uid.as_deref() != uid) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Failure::System(format!(
                "pod {name} was not deleted within 60 s"
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Creates the pod; an existing pod of the same job is reused (the runner retries prepare), a
/// dying one is waited out and replaced.
async fn create_or_reuse(
    kube: &Kube,
    pods: &Api<Pod>,
    pod: &Pod,
    job_id: u64,
) -> Result<Pod, Failure> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let pp = PostParams::default();
    for _ in 0..3 {
        match kube.call("create pod", || pods.create(&pp, pod)).await {
            Ok(p) => {
                kube.events.info("pod_created", json!({ "pod": name }));
                return Ok(p);
            }
            Err(e) if e.is_already_exists() => {}
            Err(e) => return Err(e.into()),
        }
        let Some(existing) = kube.call("get pod", || pods.get_opt(&name)).await? else {
            continue;
        };
        let labels = existing.metadata.labels.clone().unwrap_or_default();
        let ours = labels.get(MANAGED_BY_KEY).map(String::as_str) == Some(MANAGED_BY_VALUE)
            && labels.get("job.runner.gitlab.com/id") == Some(&job_id.to_string());
        if !ours {
            return Err(Failure::System(format!(
                "pod {name} already exists and belongs to another job or owner"
            )));
        }
        if podstate::pod_end(&existing, &["build", "helper"]).is_none() {
            kube.events.info("pod_reused", json!({ "pod": name }));
            say(&format!(
                "Reusing pod {}/{name} created by an earlier attempt",
                kube.namespace
            ));
            return Ok(existing);
        }
        // A leftover from a failed attempt: delete it and wait until it is gone.
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        match kube.call("delete pod", || pods.delete(&name, &dp)).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let deadline = Instant::now() + Duration::from_mins(1);
        let uid = existing.metadata.uid.clone();
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut stream = watcher::watcher(pods.clone(), cfg)
            .default_backoff()
            .boxed();
        loop {
            let next = tokio::time::timeout_at(deadline.into(), stream.next()).await;
            match next {
                Err(_) => {
                    return Err(Failure::System(format!(
                        "old pod {name} was not deleted within 60 s"
                    )));
                }
                Ok(None) => break,
                Ok(Some(Ok(WEvent::Delete(_) | WEvent::InitDone))) => {
                    if kube
                        .call("get pod", || pods.get_opt(&name))
                        .await?
                        .is_none_or(|p| p.metadata.uid != uid)
                    {
                        break;
                    }
                }
                Ok(Some(_)) => {}
            }
        }
    }
    Err(Failure::System(format!(
        "could not create pod {name}: it keeps existing"
    )))
}

/// Watches pod and events until Running; returns the node name.
async fn wait_running(
    ctx: &Ctx,
    kube: &Kube,
    pods: &Api<Pod>,
    name: &str,
    job: &JobResponse,
    uid: Option<String>,
    reported_exits: &mut BTreeSet<String>,
) -> Result<String, Failure> {
    let settings = &ctx.settings;
    let ns = kube.namespace.clone();
    let pod_cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut pod_stream = watcher::watcher(pods.clone(), pod_cfg)
        .default_backoff()
        .boxed();
    let events_api: Api<Event> = Api::namespaced(kube.client.clone(), &ns);
    let ev_cfg = watcher::Config::default().fields(&format!("involvedObject.name={name}"));
    let mut ev_stream = watcher::watcher(events_api, ev_cfg)
        .default_backoff()
        .boxed();
    let mut events_ok = true;
    let mut event_errors = 0u32;
    let mut pod_errors = 0u32;

    let prepare_deadline =
        tokio::time::Instant::now() + Duration::from_secs(settings.timeouts.prepare_seconds);
    let mut unschedulable_since: Option<tokio::time::Instant> = None;
    let mut last_unsched_msg = String::new();
    // Known from the create: events of an earlier pod of the same name are told apart at once.
    let mut pod_uid: Option<String> = uid;
    let mut seen_events: BTreeSet<String> = BTreeSet::new();
    let mut announced_node = String::new();
    let mut last_waiting: Vec<(String, String)> = Vec::new();
    let mut said_waiting = false;
    let far = prepare_deadline + Duration::from_hours(1);
    // The latest pod seen, for the Kubernetes executor's periodic "Waiting for pod" lines.
    let mut last_pod: Option<Box<Pod>> = None;
    let period = Duration::from_secs(settings.timeouts.poll_interval_seconds);
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        let unsched_deadline = unschedulable_since.map_or(far, |t| {
            t + Duration::from_secs(settings.timeouts.unschedulable_seconds)
        });
        tokio::select! {
            item = pod_stream.next() => {
                let Some(item) = item else { return Err(Failure::System("pod watch ended unexpectedly".into())) };
                let pod = match item {
                    Ok(WEvent::Apply(p) | WEvent::InitApply(p)) => p,
                    Ok(WEvent::Delete(p)) => {
                        let end = podstate::deleted_pod_end(&p);
                        return Err(verdict::pod_lost(ctx, kube, job, end).await);
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        pod_errors += 1;
                        ctx.events.warn("watch_error", json!({ "resource": "pod", "error": e.to_string(), "count": pod_errors }));
                        if pod_errors > 20 {
                            return Err(Failure::System(format!("watching pod {ns}/{name}: {e}")));
                        }
                        continue;
                    }
                };
                pod_errors = 0;
                pod_uid.clone_from(&pod.metadata.uid);
                if !said_waiting {
                    said_waiting = true;
                    say(&format!("Waiting for pod {ns}/{name} to be scheduled..."));
                }
                crate::services::report_exits(ctx, &podstate::exited_services(&pod), reported_exits);
                let progress = podstate::progress(&pod);
                last_pod = Some(Box::new(pod));
                match progress {
                    Progress::Running { node } => {
                        let spot = node_is_spot(kube, &node).await;
                        if announced_node != node {
                            say(&format!("Scheduled on node {node} ({})", capacity_word(spot)));
                        }
                        say(&format!("Pod {ns}/{name} is running on node {node} ({})", capacity_word(spot)));
                        // Before the annotation: a pod marked prepared has everything its stages need.
                        if settings.pod.helper_file_ownership == HelperFileOwnership::BuildUser {
                            crate::stage::record_build_owner(ctx, kube, pods, name).await;
                        }
                        let patch = Patch::Merge(json!({ "metadata": { "annotations": { PREPARED_ANNOTATION: "true" } } }));
                        let patch_params = PatchParams::default();
                        if let Err(e) = kube.call("patch pod (prepared)", || pods.patch(name, &patch_params, &patch)).await {
                            ctx.events.warn("annotate_failed", json!({ "error": e.to_string() }));
                        }
                        return Ok(node);
                    }
                    Progress::Unschedulable { message } => {
                        if unschedulable_since.is_none() {
                            unschedulable_since = Some(tokio::time::Instant::now());
                        }
                        if message != last_unsched_msg {
                            say(&format!("Pod is unschedulable: {message}"));
                            last_unsched_msg = message;
                        }
                    }
                    Progress::Pending => {}
                    Progress::Starting { node, waiting } => {
                        unschedulable_since = None;
                        if announced_node != node {
                            let spot = node_is_spot(kube, &node).await;
                            say(&format!("Scheduled on node {node} ({})", capacity_word(spot)));
                            announced_node = node;
                        }
                        if waiting != last_waiting && !waiting.is_empty() {
                            let list: Vec<String> = waiting.iter().map(|(c, r)| format!("{c} ({r})")).collect();
                            say(&format!("Waiting for containers to start: {}", list.join(", ")));
                            last_waiting = waiting;
                        }
                    }
                    Progress::JobError { container, image, reason, message } => {
                        let what = if reason.contains("Pull") || reason.contains("Image") { PULL_FAILURE } else { "cannot start container" };
                        return Err(Failure::Job(format!("{what} {image:?} (container {container}): {reason}: {message}")));
                    }
                    Progress::Ended(end) => return Err(verdict::pod_lost(ctx, kube, job, end).await),
                }
            }
            item = ev_stream.next(), if events_ok => {
                match item {
                    Some(Ok(WEvent::Apply(ev) | WEvent::InitApply(ev))) => {
                        event_errors = 0;
                        if let Some(f) = on_event(&ev, name, pod_uid.as_deref(), &mut seen_events) {
                            return Err(f);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        event_errors += 1;
                        ctx.events.warn("watch_error", json!({ "resource": "events", "error": e.to_string(), "count": event_errors }));
                        // Events are a courtesy (RBAC may deny them): the pod watch decides.
                        if event_errors > 5 { events_ok = false; }
                    }
                    None => events_ok = false,
                }
            }
            _ = poll.tick() => {
                if let Some(pod) = &last_pod {
                    for line in waiting_lines(&ns, name, pod) {
                        say(&line);
                    }
                }
            }
            () = tokio::time::sleep_until(unsched_deadline) => {
                return Err(Failure::System(format!(
                    "pod {ns}/{name} unschedulable for {} s: {last_unsched_msg}", settings.timeouts.unschedulable_seconds
                )));
            }
            () = tokio::time::sleep_until(prepare_deadline) => {
                return Err(Failure::System(format!("pod {ns}/{name} not running after {} s", settings.timeouts.prepare_seconds)));
            }
        }
    }
}

/// The Kubernetes executor's lines while a pod is not running yet: `Waiting for pod <ns>/<name> to
/// be running, status is <phase>`, then a tab-indented `<reason>: "<message>"` per pod condition
/// that has a reason (`Unschedulable`, `ContainersNotReady`, ...), as it prints them every
/// `poll_interval`; and, which it leaves out, each waiting container's reason (`ContainerCreating`,
/// `PodInitializing`, ...).
fn waiting_lines(ns: &str, name: &str, pod: &Pod) -> Vec<String> {
    let status = pod.status.as_ref();
    let phase = status
        .and_then(|s| s.phase.as_deref())
        .filter(|p| !p.is_empty())
        .unwrap_or("Pending");
    let mut lines = vec![format!(
        "Waiting for pod {ns}/{name} to be running, status is {phase}"
    )];
    for c in status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
    {
        if let Some(reason) = c.reason.as_deref().filter(|r| !r.is_empty()) {
            lines.push(format!(
                "\t{reason}: {:?}",
                c.message.as_deref().unwrap_or("")
            ));
        }
    }
    let containers = status.into_iter().flat_map(|s| {
        s.init_container_statuses
            .iter()
            .flatten()
            .chain(s.container_statuses.iter().flatten())
    });
    for cs in containers {
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.as_deref().unwrap_or("Waiting");
            match w.message.as_deref().filter(|m| !m.is_empty()) {
                Some(m) => lines.push(format!("\tcontainer {}: {reason}: {m:?}", cs.name)),
                None => lines.push(format!("\tcontainer {}: {reason}", cs.name)),
            }
        }
    }
    lines
}

/// Prints a new Warning event; an image pull failure ends prepare at once (a build failure).
fn on_event(
    ev: &Event,
    pod: &str,
    pod_uid: Option<&str>,
    seen: &mut BTreeSet<String>,
) -> Option<Failure> {
    if ev.involved_object.name.as_deref() != Some(pod) {
        return None;
    }
    // Events of an earlier pod with the same name (a previous prepare attempt) are not ours.
    if let (Some(uid), Some(evuid)) = (pod_uid, ev.involved_object.uid.as_deref()) {
        if uid != evuid {
            return None;
        }
    }
    if ev.type_.as_deref() != Some("Warning") {
        return None;
    }
    let key = format!(
        "{}/{}",
        ev.metadata.name.clone().unwrap_or_default(),
        ev.count.unwrap_or(1)
    );
    if !seen.insert(key) {
        return None;
    }
    let reason = ev.reason.clone().unwrap_or_default();
    let message = ev.message.clone().unwrap_or_default();
    say(&format!("WARNING: Event {reason}: {message}"));
    if reason == "Failed" && message.starts_with("Failed to pull image") {
        let image = message.split('"').nth(1).unwrap_or("").to_string();
        return Some(Failure::Job(format!("{PULL_FAILURE} {image:?}: {message}")));
    }
    if reason == "InspectFailed" || message.contains("InvalidImageName") {
        return Some(Failure::Job(format!("invalid image: {message}")));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_lines_name_the_phase_and_every_reason() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady",
                     "message": "containers with unready status: [build helper]"}
                ],
                "containerStatuses": [
                    {"name": "build", "image": "a", "imageID": "", "ready": false, "restartCount": 0,
                     "state": {"waiting": {"reason": "ContainerCreating"}}},
                    {"name": "helper", "image": "h", "imageID": "", "ready": false, "restartCount": 0,
                     "state": {"running": {}}}
                ]
            }
        }))
        .unwrap();
        assert_eq!(
            waiting_lines("ci", "p", &pod),
            [
                "Waiting for pod ci/p to be running, status is Pending",
                "\tContainersNotReady: \"containers with unready status: [build helper]\"",
                "\tcontainer build: ContainerCreating",
            ]
        );
        let unscheduled: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient cpu."}]}
        }))
        .unwrap();
        assert_eq!(
            waiting_lines("ci", "p", &unscheduled),
            [
                "Waiting for pod ci/p to be running, status is Pending",
                "\tUnschedulable: \"0/3 nodes are available: 3 Insufficient cpu.\"",
            ]
        );
    }
}
