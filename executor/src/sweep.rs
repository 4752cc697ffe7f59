//! `cleanup` (this job's pod and secret) and `gc` (everything of ours that outlived its purpose).

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;

use crate::Ctx;
use crate::failure::Failure;
use crate::kubeapi::Kube;
use crate::naming::{
    self, KIND_LABEL, MANAGED_BY_KEY, MANAGED_BY_VALUE, POD_LABEL, PREPARED_ANNOTATION,
};
use crate::preemption::{self, RECORD_KIND, Record};
use crate::prepare::identity;
use crate::settings::Settings;

/// Deletes by name; `NotFound` is success (idempotent, and safe when another cleanup won the race).
async fn delete_ignoring_missing<K>(
    kube: &Kube,
    api: &Api<K>,
    what: &str,
    name: &str,
    dp: &DeleteParams,
) -> Result<bool, Failure>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match kube
        .call(&format!("delete {what}"), || api.delete(name, dp))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `cleanup`: the pod and its secret; prints nothing on stdout.
pub async fn cleanup(ctx: &Ctx) -> Result<(), Failure> {
    let id = identity(ctx, crate::prepare::load_job().ok().as_ref())?;
    let name = id.pod_name();
    ctx.events.set_context("pod", name.clone());
    let kube = Kube::connect(&ctx.settings, ctx.events.clone()).await?;
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let secrets: Api<Secret> = Api::namespaced(kube.client.clone(), &kube.namespace);
    // Background propagation: the pod's dependants go with it; a dying `run` sees the pod vanish.
    let dp = DeleteParams {
        grace_period_seconds: Some(
            ctx.settings
                .pod
                .termination_grace_period_seconds
                .max(0)
                .unsigned_abs()
                .min(30) as u32,
        ),
        ..DeleteParams::background()
    };
    let pod_deleted = delete_ignoring_missing(&kube, &pods, "pod", &name, &dp).await?;
    // By label too: catches secrets of this pod whatever their name.
    let lp = ListParams::default().labels(&format!(
        "{MANAGED_BY_KEY}={MANAGED_BY_VALUE},{POD_LABEL}={name}"
    ));
    let mut secret_names = vec![naming::secret_name(&name)];
    match kube
        .call("list secrets", || secrets.list_metadata(&lp))
        .await
    {
        Ok(list) => secret_names.extend(list.items.into_iter().filter_map(|s| s.metadata.name)),
        Err(e) => ctx
            .events
            .warn("cleanup_list_failed", json!({ "error": e.to_string() })),
    }
    secret_names.sort();
    secret_names.dedup();
    let mut secrets_deleted = 0;
    for s in &secret_names {
        if delete_ignoring_missing(&kube, &secrets, "secret", s, &DeleteParams::default()).await? {
            secrets_deleted += 1;
        }
    }
    ctx.events.info(
        "cleanup",
        json!({ "pod_deleted": pod_deleted, "secrets_deleted": secrets_deleted }),
    );
    Ok(())
}

/// Why `gc` removes an object (pure, for tests).
#[must_use]
pub fn pod_garbage_reason(settings: &Settings, pod: &Pod, now: u64) -> Option<String> {
    let created = created_secs(&pod.metadata)?;
    let age = now.saturating_sub(created);
    let deadline = pod
        .spec
        .as_ref()
        .and_then(|s| s.active_deadline_seconds)
        .and_then(|d| u64::try_from(d).ok());
    if let Some(d) = deadline {
        if age > d {
            return Some(format!(
                "past its deadline ({age} s > activeDeadlineSeconds {d})"
            ));
        }
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("");
    let prepared = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(PREPARED_ANNOTATION));
    if !prepared && age > settings.timeouts.stale_prepare_seconds {
        return Some(format!(
            "prepare never finished ({age} s old, phase {phase:?})"
        ));
    }
    None
}

fn created_secs(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<u64> {
    let t = meta.creation_timestamp.as_ref()?;
    let secs = t.0.as_second();
    u64::try_from(secs).ok()
}

/// `gc [--dry-run]`: pods past their deadline or never prepared, secrets without their pod,
/// expired preemption records. One line per object on stdout.
pub async fn gc(ctx: &Ctx, dry_run: bool) -> Result<(), Failure> {
    let settings = &ctx.settings;
    let kube = Kube::connect(settings, ctx.events.clone()).await?;
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let secrets: Api<Secret> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let cms: Api<ConfigMap> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let ours = ListParams::default().labels(&format!("{MANAGED_BY_KEY}={MANAGED_BY_VALUE}"));
    let now = preemption::now_secs();
    let verb = if dry_run { "would delete" } else { "deleted" };

    let pod_list = kube.call("list pods", || pods.list(&ours)).await?;
    let mut live_pods = Vec::new();
    let mut doomed_pods = Vec::new();
    for p in &pod_list.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        match pod_garbage_reason(settings, p, now) {
            Some(reason) => doomed_pods.push((name, reason)),
            None => live_pods.push(name),
        }
    }
    doomed_pods.sort();
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::background()
    };
    for (name, reason) in &doomed_pods {
        if !dry_run {
            delete_ignoring_missing(&kube, &pods, "pod", name, &dp).await?;
        }
        println!("{verb} pod/{name}: {reason}");
        ctx.events.info(
            "gc_delete",
            json!({ "kind": "pod", "name": name, "reason": reason, "dry_run": dry_run }),
        );
    }

    let secret_list = kube
        .call("list secrets", || secrets.list_metadata(&ours))
        .await?;
    let mut doomed_secrets = Vec::new();
    for s in &secret_list.items {
        let name = s.metadata.name.clone().unwrap_or_default();
        let owner = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(POD_LABEL))
            .cloned()
            .unwrap_or_default();
        let age = created_secs(&s.metadata).map_or(u64::MAX, |c| now.saturating_sub(c));
        // prepare creates the secret just before its pod: give it a minute to appear.
        if doomed_pods.iter().any(|(p, _)| *p == owner) {
            doomed_secrets.push((name, format!("its pod {owner} is garbage")));
        } else if !live_pods.contains(&owner) && age > 60 {
            doomed_secrets.push((name, format!("its pod {owner} no longer exists")));
        }
    }
    doomed_secrets.sort();
    for (name, reason) in &doomed_secrets {
        if !dry_run {
            delete_ignoring_missing(&kube, &secrets, "secret", name, &DeleteParams::default())
                .await?;
        }
        println!("{verb} secret/{name}: {reason}");
        ctx.events.info(
            "gc_delete",
            json!({ "kind": "secret", "name": name, "reason": reason, "dry_run": dry_run }),
        );
    }

    let records = ListParams::default().labels(&format!(
        "{MANAGED_BY_KEY}={MANAGED_BY_VALUE},{KIND_LABEL}={RECORD_KIND}"
    ));
    let cm_list = kube.call("list configmaps", || cms.list(&records)).await?;
    let mut doomed_records: Vec<String> = cm_list
        .items
        .iter()
        .filter(|cm| Record::from_configmap(cm).is_none_or(|r| r.expires_at <= now))
        .filter_map(|cm| cm.metadata.name.clone())
        .collect();
    doomed_records.sort();
    for name in &doomed_records {
        if !dry_run {
            delete_ignoring_missing(&kube, &cms, "configmap", name, &DeleteParams::default())
                .await?;
        }
        println!("{verb} configmap/{name}: preemption record expired");
        ctx.events.info(
            "gc_delete",
            json!({ "kind": "configmap", "name": name, "dry_run": dry_run }),
        );
    }
    let _ = Duration::ZERO;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_wrap)] // Reason: small literal test times.
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pod(created: i64, deadline: Option<i64>, prepared: bool) -> Pod {
        let mut p = Pod::default();
        p.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        if prepared {
            p.metadata.annotations =
                Some([(PREPARED_ANNOTATION.to_string(), "true".to_string())].into());
        }
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            active_deadline_seconds: deadline,
            ..Default::default()
        });
        p
    }

    #[test]
    fn garbage_rules() {
        let mut s = Settings::default();
        s.timeouts.stale_prepare_seconds = 600;
        let now = 1_000_000;
        assert_eq!(
            pod_garbage_reason(&s, &pod(now as i64 - 100, Some(3900), true), now),
            None
        );
        assert!(
            pod_garbage_reason(&s, &pod(now as i64 - 4000, Some(3900), true), now)
                .unwrap()
                .contains("deadline")
        );
        assert!(
            pod_garbage_reason(&s, &pod(now as i64 - 700, Some(3900), false), now)
                .unwrap()
                .contains("prepare never finished")
        );
        assert_eq!(
            pod_garbage_reason(&s, &pod(now as i64 - 500, Some(3900), false), now),
            None
        );
    }
}
