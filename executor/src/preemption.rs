//! Preemption records: a `ConfigMap` per (project, pipeline, job name) so the runner's retry of a
//! preempted job (a new job id) is placed on on-demand nodes.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::job::JobResponse;
use crate::kubeapi::Kube;
use crate::naming::{self, KIND_LABEL, MANAGED_BY_KEY, MANAGED_BY_VALUE};
use crate::settings::Settings;

pub const RECORD_KIND: &str = "preemption-record";

#[must_use]
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A record as stored in the `ConfigMap`'s data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub count: u32,
    pub last_node: String,
    pub expires_at: u64,
}

impl Record {
    #[must_use]
    pub fn from_configmap(cm: &ConfigMap) -> Option<Self> {
        let d = cm.data.as_ref()?;
        Some(Self {
            count: d.get("count")?.parse().ok()?,
            last_node: d.get("last_node").cloned().unwrap_or_default(),
            expires_at: d.get("expires_at")?.parse().ok()?,
        })
    }
}

/// Whether this attempt must avoid spot, given the record (pure).
#[must_use]
pub fn should_fall_back(settings: &Settings, record: Option<&Record>, now: u64) -> bool {
    settings.spot.fallback_on_preemption
        && record.is_some_and(|r| {
            r.expires_at > now && r.count >= settings.spot.spot_attempts_before_fallback.max(1)
        })
}

fn record_name(job: &JobResponse) -> String {
    naming::preemption_record_name(
        job.job_info.project_id,
        job.job_info.pipeline_id,
        &job.job_info.name,
    )
}

/// Reads the record of this job, if any. Lookup trouble only disables the fallback (logged).
pub async fn lookup(kube: &Kube, job: &JobResponse) -> Option<Record> {
    let api: Api<ConfigMap> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let name = record_name(job);
    match kube
        .call("get configmap (preemption record)", || api.get_opt(&name))
        .await
    {
        Ok(cm) => cm.as_ref().and_then(Record::from_configmap),
        Err(e) => {
            kube.events.warn(
                "preemption_lookup_failed",
                json!({ "record": name, "error": e.to_string() }),
            );
            None
        }
    }
}

/// Creates or increments the record of this job.
pub async fn record(kube: &Kube, settings: &Settings, job: &JobResponse, node: &str) {
    let api: Api<ConfigMap> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let name = record_name(job);
    let expires_at = now_secs() + settings.spot.record_ttl_seconds;
    let pp = PostParams::default();
    for _ in 0..5 {
        let existing = match kube
            .call("get configmap (preemption record)", || api.get_opt(&name))
            .await
        {
            Ok(cm) => cm,
            Err(e) => {
                kube.events.warn(
                    "preemption_record_failed",
                    json!({ "record": name, "error": e.to_string() }),
                );
                return;
            }
        };
        let count = existing
            .as_ref()
            .and_then(Record::from_configmap)
            .map_or(0, |r| r.count)
            + 1;
        let data = BTreeMap::from([
            ("count".to_string(), count.to_string()),
            ("last_node".to_string(), node.to_string()),
            ("expires_at".to_string(), expires_at.to_string()),
            (
                "project_id".to_string(),
                job.job_info.project_id.to_string(),
            ),
            (
                "pipeline_id".to_string(),
                job.job_info.pipeline_id.to_string(),
            ),
            ("job_name".to_string(), job.job_info.name.clone()),
            ("last_job_id".to_string(), job.id.to_string()),
        ]);
        let result = if let Some(mut cm) = existing {
            cm.data = Some(data);
            kube.call("replace configmap (preemption record)", || {
                api.replace(&name, &pp, &cm)
            })
            .await
            .map(|_| ())
        } else {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(BTreeMap::from([
                        (MANAGED_BY_KEY.to_string(), MANAGED_BY_VALUE.to_string()),
                        (KIND_LABEL.to_string(), RECORD_KIND.to_string()),
                    ])),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            kube.call("create configmap (preemption record)", || {
                api.create(&pp, &cm)
            })
            .await
            .map(|_| ())
        };
        match result {
            Ok(()) => {
                kube.events.info(
                    "preemption_recorded",
                    json!({ "record": name, "count": count, "node": node }),
                );
                return;
            }
            // Another attempt raced us: read again and increment on top.
            Err(e) if e.is_conflict() || e.is_already_exists() => {}
            Err(e) => {
                kube.events.warn(
                    "preemption_record_failed",
                    json!({ "record": name, "error": e.to_string() }),
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_rules() {
        let mut s = Settings::default();
        let r = Record {
            count: 1,
            last_node: "n".into(),
            expires_at: 100,
        };
        assert!(should_fall_back(&s, Some(&r), 50));
        assert!(!should_fall_back(&s, Some(&r), 100), "expired");
        assert!(!should_fall_back(&s, None, 50));
        s.spot.spot_attempts_before_fallback = 2;
        assert!(!should_fall_back(&s, Some(&r), 50));
        assert!(should_fall_back(
            &s,
            Some(&Record {
                count: 2,
                ..r.clone()
            }),
            50
        ));
        s.spot.fallback_on_preemption = false;
        assert!(!should_fall_back(&s, Some(&Record { count: 9, ..r }), 50));
    }
}
