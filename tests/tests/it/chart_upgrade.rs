//! `helm upgrade` to the next version keeps what must survive it: the cache PVC (same name, same
//! immutable spec, `resource-policy: keep`), the workloads' immutable selectors, and everything the
//! preemption records depend on (the executor's settings and its access to `ConfigMaps`). Rendered from
//! the chart as it is and from a copy whose only change is the next patch version, as a release
//! bumps it; the two renders are diffed object by object.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_yaml::Value;

use super::helm::{documents, repo_root};
use super::image::workspace_version;

/// `helm template` of the chart in `chart` with default values.
fn render_chart(chart: &Path) -> Vec<Value> {
    let home = tempfile::tempdir().expect("helm home");
    let out = Command::new("helm")
        .args(["template", "spotrun"])
        .arg(chart)
        .args(["--namespace", "ci"])
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm (on PATH after `eval \"$(bash .ci/install)\"`)");
    assert!(
        out.status.success(),
        "helm template {}: {}",
        chart.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8_lossy(&out.stdout))
}

/// The objects by `Kind/name`.
fn by_key(docs: Vec<Value>) -> BTreeMap<String, Value> {
    docs.into_iter()
        .map(|d| {
            let key = format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or(""),
                d["metadata"]["name"].as_str().unwrap_or("")
            );
            (key, d)
        })
        .collect()
}

/// The next patch version: what a release after this one carries.
fn next_patch(version: &str) -> String {
    let mut parts: Vec<u64> = version
        .split('.')
        .map(|p| p.parse().expect("numeric version part"))
        .collect();
    *parts.last_mut().expect("a version has parts") += 1;
    parts
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// A copy of the chart with `version` and `appVersion` set to `version`.
fn chart_at_version(dir: &Path, version: &str) -> std::path::PathBuf {
    let copy = dir.join("spotrun");
    let status = Command::new("cp")
        .arg("-r")
        .arg(repo_root().join("helm/spotrun"))
        .arg(&copy)
        .status()
        .expect("cp -r the chart");
    assert!(status.success());
    let chart_yaml = copy.join("Chart.yaml");
    let text = std::fs::read_to_string(&chart_yaml).expect("Chart.yaml");
    let current = workspace_version();
    let bumped = text
        .replace(
            &format!("\nversion: {current}\n"),
            &format!("\nversion: {version}\n"),
        )
        .replace(
            &format!("\nappVersion: \"{current}\"\n"),
            &format!("\nappVersion: \"{version}\"\n"),
        );
    assert_eq!(
        bumped.matches(version).count(),
        2,
        "Chart.yaml spells version and appVersion as expected:\n{text}"
    );
    std::fs::write(&chart_yaml, bumped).expect("write Chart.yaml");
    copy
}

#[test]
fn upgrade_to_the_next_version_keeps_the_cache_pvc_selectors_and_preemption_record_access() {
    let version = workspace_version();
    let next = next_patch(&version);
    let dir = tempfile::tempdir().expect("tempdir");
    let before = by_key(render_chart(&repo_root().join("helm/spotrun")));
    let after = by_key(render_chart(&chart_at_version(dir.path(), &next)));

    // The same objects exist after the upgrade: nothing renamed, nothing dropped.
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the upgrade renames or drops objects"
    );

    // The cache PVC: same name (above), same spec (immutable), and kept even by an uninstall.
    let pvcs: Vec<&String> = before
        .keys()
        .filter(|k| k.starts_with("PersistentVolumeClaim/"))
        .collect();
    assert_eq!(pvcs.len(), 1, "the default chart has the cache PVC");
    for key in pvcs {
        assert_eq!(
            before[key]["spec"], after[key]["spec"],
            "{key} spec changes"
        );
        for doc in [&before[key], &after[key]] {
            assert_eq!(
                doc["metadata"]["annotations"]["helm.sh/resource-policy"].as_str(),
                Some("keep"),
                "{key}"
            );
        }
    }

    // Immutable selectors: a Deployment whose selector changes cannot be upgraded in place, and
    // a Service whose selector changes loses its pods. The version must not be part of them.
    for (key, doc) in &before {
        // Workloads, Services and PDBs all keep theirs at spec.selector.
        if !matches!(
            doc["kind"].as_str().unwrap_or(""),
            "Deployment" | "StatefulSet" | "DaemonSet" | "Service" | "PodDisruptionBudget"
        ) {
            continue;
        }
        let get = |d: &Value| d["spec"]["selector"].clone();
        assert!(!get(doc).is_null(), "{key} has a selector");
        assert_eq!(
            get(doc),
            get(&after[key]),
            "{key} selector changes with the version"
        );
    }

    // Preemption records are ConfigMaps the executor writes and reads in the job namespace: its
    // settings (namespace, record TTL, fallback) and its Role stay the same across the upgrade.
    // Only the launcher image moves with the version (job pods run the launcher of the executor
    // that plans them).
    let settings = |docs: &BTreeMap<String, Value>| {
        let toml = docs
            .values()
            .find(|d| d["kind"] == "ConfigMap" && d["data"]["executor.toml"].is_string())
            .and_then(|d| d["data"]["executor.toml"].as_str())
            .expect("the chart renders executor.toml")
            .to_string();
        let (launcher, rest): (Vec<&str>, Vec<&str>) = toml
            .lines()
            .partition(|l| l.starts_with("launcher_image = "));
        (launcher.concat(), rest.join("\n"))
    };
    let (launcher_before, settings_before) = settings(&before);
    let (launcher_after, settings_after) = settings(&after);
    assert_eq!(settings_before, settings_after, "executor.toml changes");
    assert!(
        launcher_before.ends_with(&format!(":{version}\""))
            && launcher_after.ends_with(&format!(":{next}\"")),
        "the launcher image follows the chart version: {launcher_before} -> {launcher_after}"
    );
    let roles: Vec<&String> = before.keys().filter(|k| k.starts_with("Role/")).collect();
    assert!(!roles.is_empty());
    for key in roles {
        assert_eq!(
            before[key]["rules"], after[key]["rules"],
            "{key} rules change"
        );
        let configmap_verbs: Vec<&str> = before[key]["rules"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter(|r| {
                r["resources"]
                    .as_sequence()
                    .is_some_and(|rs| rs.iter().any(|x| x == "configmaps"))
            })
            .flat_map(|r| r["verbs"].as_sequence().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        for verb in ["get", "create"] {
            assert!(
                configmap_verbs.contains(&verb),
                "{key} lacks {verb} on configmaps (preemption records): {configmap_verbs:?}"
            );
        }
    }

    // And the upgrade moves every spotrun image to the new version.
    let image_tags = |docs: &BTreeMap<String, Value>| -> Vec<String> {
        let text = serde_yaml::to_string(&docs.values().collect::<Vec<_>>()).expect("yaml");
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("image: "))
            .filter(|i| i.starts_with("registry.gitlab.com/spotrun/spotrun:"))
            .map(str::to_owned)
            .collect()
    };
    let tags_after = image_tags(&after);
    assert!(!tags_after.is_empty());
    assert!(
        tags_after.iter().all(|i| i.ends_with(&format!(":{next}"))),
        "{tags_after:?}"
    );
    assert!(
        image_tags(&before)
            .iter()
            .all(|i| i.ends_with(&format!(":{version}")))
    );
}
