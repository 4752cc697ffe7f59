//! Operator volumes in the Kubernetes executor's shapes (`[[volumes.host_path]]`, `pvc`,
//! `config_map`, `secret`, `empty_dir`, `csi`, as `[[runners.kubernetes.volumes.*]]`) and the pod
//! volumes and mounts they become, with the job-variable expansion the Kubernetes executor does.
//!
//! Expansion follows the Kubernetes executor (`ExpandValue` over all job variables, Go's
//! `os.Expand` rules): a PVC's `name` (its claim name, gitlab-runner!4256, e.g.
//! `build-pvc-$CI_CONCURRENT_ID`) and every kind's `mount_path` and `sub_path` (gitlab-runner!3111).
//! Other fields are literal. Like the Kubernetes executor, every volume is mounted in the build,
//! helper and service containers, and a volume mounted at the builds (or cache) directory replaces
//! the executor's own emptyDir there.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, ConfigMapVolumeSource, EmptyDirVolumeSource, HostPathVolumeSource, KeyToPath,
    PersistentVolumeClaimVolumeSource, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use serde::Deserialize;

use crate::quantity::Quantity;

/// Volume names the executor uses itself (`launcher`: reserved for the in-pod launcher's volume).
pub const RESERVED_NAMES: [&str; 6] = ["builds", "scripts", "logs", "cache", "tools", "launcher"];

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeSettings {
    pub host_path: Vec<HostPathVolume>,
    pub pvc: Vec<PvcVolume>,
    pub config_map: Vec<ConfigMapVolume>,
    pub secret: Vec<SecretVolume>,
    pub empty_dir: Vec<EmptyDirVolume>,
    pub csi: Vec<CsiVolume>,
}

/// A node directory; `host_path` defaults to `mount_path` (as in the Kubernetes executor).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostPathVolume {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub sub_path: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub host_path: Option<String>,
    #[serde(default)]
    pub mount_propagation: Option<String>,
}

/// An existing `PersistentVolumeClaim` named `name` (after expansion).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PvcVolume {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub sub_path: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub mount_propagation: Option<String>,
}

/// An existing `ConfigMap` named `name`; `items` maps keys to file paths (all keys when empty).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigMapVolume {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub sub_path: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub items: BTreeMap<String, String>,
    #[serde(default)]
    pub mount_propagation: Option<String>,
}

/// An existing Secret named `name`; `items` as for a `ConfigMap`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecretVolume {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub sub_path: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub items: BTreeMap<String, String>,
    #[serde(default)]
    pub mount_propagation: Option<String>,
}

/// A per-pod scratch directory; `medium = "Memory"` for tmpfs, `size_limit` a quantity.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmptyDirVolume {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub sub_path: Option<String>,
    #[serde(default)]
    pub medium: Option<String>,
    #[serde(default)]
    pub size_limit: Option<Quantity>,
    #[serde(default)]
    pub mount_propagation: Option<String>,
}

/// An inline CSI volume (for example GKE's Cloud Storage FUSE driver).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CsiVolume {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub sub_path: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    pub driver: String,
    #[serde(default)]
    pub fs_type: Option<String>,
    #[serde(default)]
    pub volume_attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub mount_propagation: Option<String>,
}

/// The fields every kind shares, for validation and mounting.
struct MountFields<'a> {
    kind: &'static str,
    index: usize,
    name: &'a str,
    mount_path: &'a str,
    sub_path: Option<&'a str>,
    read_only: bool,
    mount_propagation: Option<&'a str>,
}

impl MountFields<'_> {
    fn key(&self, field: &str) -> String {
        format!("volumes.{}[{}].{field}", self.kind, self.index)
    }
}

impl VolumeSettings {
    fn mounts(&self) -> Vec<MountFields<'_>> {
        let mut out = Vec::new();
        macro_rules! add {
            ($list:expr, $kind:literal, $ro:expr) => {
                for (index, v) in $list.iter().enumerate() {
                    out.push(MountFields {
                        kind: $kind,
                        index,
                        name: &v.name,
                        mount_path: &v.mount_path,
                        sub_path: v.sub_path.as_deref(),
                        read_only: $ro(v),
                        mount_propagation: v.mount_propagation.as_deref(),
                    });
                }
            };
        }
        add!(self.host_path, "host_path", |v: &HostPathVolume| v
            .read_only);
        add!(self.pvc, "pvc", |v: &PvcVolume| v.read_only);
        add!(self.config_map, "config_map", |v: &ConfigMapVolume| v
            .read_only);
        add!(self.secret, "secret", |v: &SecretVolume| v.read_only);
        add!(self.empty_dir, "empty_dir", |_: &EmptyDirVolume| false);
        add!(self.csi, "csi", |v: &CsiVolume| v.read_only);
        out
    }

    /// Load-time checks; `(key, message)` of the first problem. Values holding a `$` are checked
    /// again after expansion, when the job's variables are known.
    pub fn validate(&self, own_paths: &[&str]) -> Result<(), (String, String)> {
        let mut names: BTreeMap<&str, &'static str> = BTreeMap::new();
        for m in self.mounts() {
            let expands = m.kind == "pvc" && m.name.contains('$');
            if !expands && !crate::naming::is_dns1123_label(m.name) {
                return Err((
                    m.key("name"),
                    format!("{:?} is not a DNS-1123 label", m.name),
                ));
            }
            if RESERVED_NAMES.contains(&m.name) {
                return Err((
                    m.key("name"),
                    format!(
                        "{:?} is one of the executor's own volumes ({})",
                        m.name,
                        RESERVED_NAMES.join(", ")
                    ),
                ));
            }
            // One PVC may be mounted several times (different sub_paths); other names are unique.
            if let Some(kind) = names.insert(m.name, m.kind) {
                if !(kind == "pvc" && m.kind == "pvc") {
                    return Err((
                        m.key("name"),
                        format!("{:?} is also the name of a {kind} volume", m.name),
                    ));
                }
            }
            if !m.mount_path.contains('$') {
                check_mount_path(m.mount_path, own_paths).map_err(|e| (m.key("mount_path"), e))?;
            }
            if let Some(sp) = m.sub_path.filter(|s| !s.contains('$')) {
                check_sub_path(sp).map_err(|e| (m.key("sub_path"), e))?;
            }
            if let Some(p) = m.mount_propagation {
                if !matches!(p, "None" | "HostToContainer" | "Bidirectional") {
                    return Err((
                        m.key("mount_propagation"),
                        format!("{p:?} is not None, HostToContainer or Bidirectional"),
                    ));
                }
            }
        }
        for (i, v) in self.host_path.iter().enumerate() {
            if let Some(h) = &v.host_path {
                if !h.starts_with('/') {
                    return Err((
                        format!("volumes.host_path[{i}].host_path"),
                        format!("{h:?} must be an absolute path"),
                    ));
                }
            }
        }
        for (i, v) in self.empty_dir.iter().enumerate() {
            if let Some(m) = &v.medium {
                if !(m.is_empty() || m == "Memory" || m.starts_with("HugePages")) {
                    return Err((
                        format!("volumes.empty_dir[{i}].medium"),
                        format!("{m:?} is not \"\", Memory or HugePages[-<size>]"),
                    ));
                }
            }
        }
        for (i, v) in self.csi.iter().enumerate() {
            if v.driver.is_empty() {
                return Err((
                    format!("volumes.csi[{i}].driver"),
                    "must name the CSI driver".into(),
                ));
            }
        }
        for (kind, list) in [
            (
                "config_map",
                self.config_map.iter().map(|v| &v.items).collect::<Vec<_>>(),
            ),
            ("secret", self.secret.iter().map(|v| &v.items).collect()),
        ] {
            for (i, items) in list.into_iter().enumerate() {
                for path in items.values() {
                    check_sub_path(path).map_err(|e| (format!("volumes.{kind}[{i}].items"), e))?;
                }
            }
        }
        Ok(())
    }

    /// The pod volumes and the mounts every container gets, with `$VAR` expanded from `vars`.
    /// `own_paths` are the executor's mount paths no volume may take; an error names the volume
    /// and the expanded value (the job's variables made it invalid: load-time checks passed).
    pub fn plan(
        &self,
        vars: &dyn Fn(&str) -> String,
        own_paths: &[&str],
    ) -> Result<(Vec<Volume>, Vec<VolumeMount>), String> {
        let mut volumes: Vec<Volume> = Vec::new();
        let mut mounts: Vec<VolumeMount> = Vec::new();
        for m in self.mounts() {
            let name = if m.kind == "pvc" {
                expand(m.name, vars)
            } else {
                m.name.to_string()
            };
            if m.kind == "pvc" && RESERVED_NAMES.contains(&name.as_str()) {
                return Err(format!(
                    "{}: {name:?} (from {:?}) is one of the executor's own volumes",
                    m.key("name"),
                    m.name
                ));
            }
            if m.kind == "pvc" && !crate::naming::is_dns1123_label(&name) {
                return Err(format!(
                    "{}: {name:?} (from {:?}) is not a valid claim name",
                    m.key("name"),
                    m.name
                ));
            }
            let mount_path = expand(m.mount_path, vars);
            check_mount_path(&mount_path, own_paths)
                .map_err(|e| format!("{}: {e} (from {:?})", m.key("mount_path"), m.mount_path))?;
            if mounts.iter().any(|x| x.mount_path == mount_path) {
                return Err(format!(
                    "{}: {mount_path:?} is mounted twice",
                    m.key("mount_path")
                ));
            }
            let sub_path = m
                .sub_path
                .map(|s| expand(s, vars))
                .filter(|s| !s.is_empty());
            if let Some(sp) = &sub_path {
                check_sub_path(sp)
                    .map_err(|e| format!("{}: {e} (from {:?})", m.key("sub_path"), m.sub_path))?;
            }
            mounts.push(VolumeMount {
                name: name.clone(),
                mount_path,
                sub_path,
                read_only: m.read_only.then_some(true),
                mount_propagation: m.mount_propagation.map(str::to_string),
                ..VolumeMount::default()
            });
            if let Some(v) = volumes.iter().find(|v| v.name == name) {
                // The same claim mounted again is fine (GitLab dedupes PVCs by name); an expanded
                // claim name that collides with another volume is not.
                if v.persistent_volume_claim.is_some() && m.kind == "pvc" {
                    continue;
                }
                return Err(format!(
                    "{}: {name:?} (from {:?}) is also the name of another volume",
                    m.key("name"),
                    m.name
                ));
            }
            volumes.push(self.volume(m.kind, m.index, name));
        }
        Ok((volumes, mounts))
    }

    fn volume(&self, kind: &str, i: usize, name: String) -> Volume {
        let items = |m: &BTreeMap<String, String>| {
            (!m.is_empty()).then(|| {
                m.iter()
                    .map(|(k, p)| KeyToPath {
                        key: k.clone(),
                        path: p.clone(),
                        mode: None,
                    })
                    .collect()
            })
        };
        let mut vol = Volume {
            name: name.clone(),
            ..Volume::default()
        };
        match kind {
            "host_path" => {
                let v = &self.host_path[i];
                vol.host_path = Some(HostPathVolumeSource {
                    path: v.host_path.clone().unwrap_or_else(|| v.mount_path.clone()),
                    type_: None,
                });
            }
            "pvc" => {
                vol.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
                    claim_name: name,
                    read_only: None,
                });
            }
            "config_map" => {
                let v = &self.config_map[i];
                vol.config_map = Some(ConfigMapVolumeSource {
                    name: v.name.clone(),
                    items: items(&v.items),
                    ..ConfigMapVolumeSource::default()
                });
            }
            "secret" => {
                let v = &self.secret[i];
                vol.secret = Some(SecretVolumeSource {
                    secret_name: Some(v.name.clone()),
                    items: items(&v.items),
                    ..SecretVolumeSource::default()
                });
            }
            "empty_dir" => {
                let v = &self.empty_dir[i];
                vol.empty_dir = Some(EmptyDirVolumeSource {
                    medium: v.medium.clone().filter(|m| !m.is_empty()),
                    size_limit: v
                        .size_limit
                        .as_ref()
                        .map(|q| K8sQuantity(q.as_str().to_string())),
                });
            }
            _ => {
                let v = &self.csi[i];
                vol.csi = Some(CSIVolumeSource {
                    driver: v.driver.clone(),
                    fs_type: v.fs_type.clone(),
                    read_only: v.read_only.then_some(true),
                    volume_attributes: (!v.volume_attributes.is_empty())
                        .then(|| v.volume_attributes.clone()),
                    node_publish_secret_ref: None,
                });
            }
        }
        vol
    }
}

fn check_mount_path(p: &str, own_paths: &[&str]) -> Result<(), String> {
    let trimmed = p.trim_end_matches('/');
    if !p.starts_with('/') || p.contains(':') || p.split('/').any(|c| c == "..") {
        return Err(format!(
            "{p:?} must be an absolute path without ':' or '..'"
        ));
    }
    if let Some(own) = own_paths
        .iter()
        .find(|o| o.trim_end_matches('/') == trimmed)
    {
        return Err(format!("{p:?} is the executor's own {own}"));
    }
    Ok(())
}

fn check_sub_path(p: &str) -> Result<(), String> {
    if p.starts_with('/') || p.split('/').any(|c| c == "..") {
        return Err(format!("{p:?} must be a relative path without '..'"));
    }
    Ok(())
}

/// Go's `os.Expand` as gitlab-runner's `ExpandValue` uses it: `$NAME` and `${NAME}` become the
/// variable's value (empty when unset); `$` before a special character (`*#$@!?-` or a digit)
/// names that one-character variable; a `$` followed by nothing usable stays; `${}` and an
/// unterminated `${` are dropped.
#[must_use]
pub fn expand(s: &str, vars: &dyn Fn(&str) -> String) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut last = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            out.push_str(&s[last..i]);
            let rest = &s[i + 1..];
            let (name, width) = shell_name(rest);
            if name.is_empty() && width == 0 {
                out.push('$');
            } else if !name.is_empty() {
                out.push_str(&vars(name));
            }
            i += 1 + width;
            last = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&s[last..]);
    out
}

/// The variable name at the start of `s` and how many bytes it takes (Go's `getShellName`).
fn shell_name(s: &str) -> (&str, usize) {
    let b = s.as_bytes();
    if b[0] == b'{' {
        if b.len() > 2 && is_special(b[1]) && b[2] == b'}' {
            return (&s[1..2], 3);
        }
        for i in 1..b.len() {
            if b[i] == b'}' {
                if i == 1 {
                    return ("", 2); // `${}`: bad syntax, eaten
                }
                return (&s[1..i], i + 1);
            }
        }
        return ("", 1); // no closing brace: bad syntax, only the `{` is eaten
    }
    if is_special(b[0]) {
        return (&s[0..1], 1);
    }
    let n = b
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
        .count();
    (&s[..n], n)
}

fn is_special(c: u8) -> bool {
    matches!(c, b'*' | b'#' | b'$' | b'@' | b'!' | b'?' | b'-') || c.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(k: &str) -> String {
        match k {
            "CI_CONCURRENT_ID" => "3".into(),
            "CI_PROJECT_PATH" => "group/app".into(),
            "1" => "one".into(),
            _ => String::new(),
        }
    }

    #[test]
    fn expansion_follows_go_os_expand() {
        for (input, want) in [
            ("build-pvc-$CI_CONCURRENT_ID", "build-pvc-3"),
            ("/b/${CI_PROJECT_PATH}/x", "/b/group/app/x"),
            ("$UNSET-x", "-x"),
            ("cost$", "cost$"),
            ("a$/b", "a$/b"),
            ("${}x", "x"),
            ("${CI_CONCURRENT_ID", "CI_CONCURRENT_ID"),
            ("$1$", "one$"),
            ("${1}", "one"),
            ("no vars", "no vars"),
            ("ünï$CI_CONCURRENT_IDé", "ünï3é"),
        ] {
            assert_eq!(expand(input, &vars), want, "{input}");
        }
    }

    fn parse(text: &str) -> Result<VolumeSettings, String> {
        let v: VolumeSettings = toml::from_str(text).map_err(|e| e.to_string())?;
        v.validate(&["/builds-own"])
            .map_err(|(k, m)| format!("{k}: {m}"))?;
        Ok(v)
    }

    #[test]
    fn load_time_errors_name_the_field() {
        for (text, want) in [
            (
                "[[pvc]]\nname = \"p\"\nmount_path = \"/p\"\nreadonly = true\n",
                "unknown field `readonly`",
            ),
            (
                "[[host_path]]\nname = \"Bad_Name\"\nmount_path = \"/x\"\n",
                "volumes.host_path[0].name",
            ),
            (
                "[[secret]]\nname = \"s\"\nmount_path = \"relative\"\n",
                "volumes.secret[0].mount_path",
            ),
            (
                "[[empty_dir]]\nname = \"e\"\nmount_path = \"/e\"\nmedium = \"Disk\"\n",
                "volumes.empty_dir[0].medium",
            ),
            (
                "[[empty_dir]]\nname = \"e\"\nmount_path = \"/e\"\nsize_limit = \"huge\"\n",
                "huge",
            ),
            (
                "[[csi]]\nname = \"c\"\nmount_path = \"/c\"\ndriver = \"\"\n",
                "volumes.csi[0].driver",
            ),
            (
                "[[config_map]]\nname = \"c\"\nmount_path = \"/c\"\nsub_path = \"../etc\"\n",
                "volumes.config_map[0].sub_path",
            ),
            (
                "[[pvc]]\nname = \"logs\"\nmount_path = \"/l\"\n",
                "volumes.pvc[0].name",
            ),
            (
                "[[pvc]]\nname = \"p\"\nmount_path = \"/builds-own/\"\n",
                "executor's own",
            ),
            (
                "[[pvc]]\nname = \"x\"\nmount_path = \"/a\"\n[[secret]]\nname = \"x\"\nmount_path = \"/b\"\n",
                "volumes.secret[0].name: \"x\" is also the name of a pvc volume",
            ),
            (
                "[[host_path]]\nname = \"h\"\nmount_path = \"/h\"\nmount_propagation = \"Shared\"\n",
                "volumes.host_path[0].mount_propagation",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}\n→ {err}");
        }
        // A claim name with a variable is checked after expansion, not before.
        parse("[[pvc]]\nname = \"build-$CI_CONCURRENT_ID\"\nmount_path = \"/b/$X\"\n").unwrap();
    }

    #[test]
    fn plan_expands_where_the_kubernetes_executor_does() {
        let v = parse(
            r#"
[[pvc]]
name = "cache-$CI_CONCURRENT_ID"
mount_path = "/builds/${CI_PROJECT_PATH}"
sub_path = "p/$CI_PROJECT_PATH"
[[pvc]]
name = "cache-$CI_CONCURRENT_ID"
mount_path = "/second"
[[secret]]
name = "creds"
mount_path = "/creds-$CI_CONCURRENT_ID"
read_only = true
items = { "token" = "t/token" }
"#,
        )
        .unwrap();
        let (volumes, mounts) = v.plan(&vars, &[]).unwrap();
        assert_eq!(
            serde_json::to_value(&volumes).unwrap(),
            serde_json::json!([
                {"name": "cache-3", "persistentVolumeClaim": {"claimName": "cache-3"}},
                {"name": "creds", "secret": {"secretName": "creds", "items": [{"key": "token", "path": "t/token"}]}}
            ])
        );
        assert_eq!(
            serde_json::to_value(&mounts).unwrap(),
            serde_json::json!([
                {"name": "cache-3", "mountPath": "/builds/group/app", "subPath": "p/group/app"},
                {"name": "cache-3", "mountPath": "/second"},
                {"name": "creds", "mountPath": "/creds-3", "readOnly": true}
            ])
        );
        // A job variable that makes a value invalid fails naming the volume and the value.
        let bad = |k: &str| {
            if k == "CI_CONCURRENT_ID" {
                "Not_A_Name".to_string()
            } else {
                "../up".to_string()
            }
        };
        let err = v.plan(&bad, &[]).unwrap_err();
        assert!(
            err.contains("volumes.pvc[0].name") && err.contains("cache-Not_A_Name"),
            "{err}"
        );
        let ok_name = |k: &str| {
            if k == "CI_CONCURRENT_ID" {
                "1".to_string()
            } else {
                "../up".to_string()
            }
        };
        let err = v.plan(&ok_name, &[]).unwrap_err();
        assert!(err.contains("volumes.pvc[0].mount_path"), "{err}");
        // An expanded claim name may not take another volume's name, nor one of ours.
        let collide = |k: &str| match k {
            "CI_CONCURRENT_ID" => "x".to_string(),
            _ => String::new(),
        };
        let v2 = parse(
            "[[pvc]]\nname = \"$CI_CONCURRENT_ID\"\nmount_path = \"/p\"\n[[secret]]\nname = \"x\"\nmount_path = \"/s\"\n",
        )
        .unwrap();
        let err = v2.plan(&collide, &[]).unwrap_err();
        assert!(err.contains("also the name of another volume"), "{err}");
        let ours = |_: &str| "logs".to_string();
        let err = v2.plan(&ours, &[]).unwrap_err();
        assert!(err.contains("executor's own"), "{err}");
    }
}
