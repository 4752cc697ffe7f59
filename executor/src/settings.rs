//! Operator settings: the executor TOML file, its one loader and the env/flag overrides.
//!
//! Precedence is file < environment < flag, and only for the few keys that deployments commonly
//! override per runner (`namespace`, `spot.policy`). Unknown keys are rejected by serde
//! (`deny_unknown_fields`) and the error names the key and its line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::quantity::Quantity;

/// Environment variable naming the settings file when `--config` is absent.
pub const CONFIG_ENV: &str = "SPOTRUN_EXECUTOR_CONFIG";
/// Environment override of `namespace`.
pub const NAMESPACE_ENV: &str = "SPOTRUN_NAMESPACE";
/// Environment override of `spot.policy`.
pub const SPOT_POLICY_ENV: &str = "SPOTRUN_SPOT_POLICY";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("no executor settings file: pass --config PATH or set {CONFIG_ENV}")]
    NoPath,
    #[error("reading executor settings {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("executor settings {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("executor settings: {key}: {message}")]
    Invalid { key: String, message: String },
}

/// Where pods go on spot capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpotPolicy {
    /// Only spot nodes (required node selector + toleration).
    Require,
    /// Spot preferred, on-demand allowed (preferred affinity + toleration).
    Prefer,
    /// Never on spot (required anti-affinity on the spot label).
    Never,
}

impl SpotPolicy {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "require" => Some(Self::Require),
            "prefer" => Some(Self::Prefer),
            "never" => Some(Self::Never),
            _ => None,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Require => "require",
            Self::Prefer => "prefer",
            Self::Never => "never",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpotSettings {
    pub policy: SpotPolicy,
    /// Policies a job may pick with `SPOTRUN_SPOT`; empty = no job override.
    pub job_override_allowed: Vec<SpotPolicy>,
    /// After a preemption, the retry of the same job goes to on-demand nodes.
    pub fallback_on_preemption: bool,
    /// How many preemptions of the same job are tolerated on spot before falling back.
    pub spot_attempts_before_fallback: u32,
    /// Lifetime of a preemption record (seconds).
    pub record_ttl_seconds: u64,
}

impl Default for SpotSettings {
    fn default() -> Self {
        Self {
            policy: SpotPolicy::Prefer,
            job_override_allowed: vec![SpotPolicy::Require, SpotPolicy::Prefer, SpotPolicy::Never],
            fallback_on_preemption: true,
            spot_attempts_before_fallback: 1,
            record_ttl_seconds: 24 * 3600,
        }
    }
}

/// Requests and limits of one container class (Kubernetes quantity strings), and the maxima a
/// job may raise them to with the Kubernetes executor's variables (`KUBERNETES_CPU_LIMIT`, ...):
/// a value without a maximum cannot be overridden (as `*_overwrite_max_allowed` there).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceSettings {
    pub cpu_request: Option<Quantity>,
    pub cpu_limit: Option<Quantity>,
    pub memory_request: Option<Quantity>,
    pub memory_limit: Option<Quantity>,
    pub ephemeral_storage_request: Option<Quantity>,
    pub ephemeral_storage_limit: Option<Quantity>,
    pub cpu_request_overwrite_max_allowed: Option<Quantity>,
    pub cpu_limit_overwrite_max_allowed: Option<Quantity>,
    pub memory_request_overwrite_max_allowed: Option<Quantity>,
    pub memory_limit_overwrite_max_allowed: Option<Quantity>,
    pub ephemeral_storage_request_overwrite_max_allowed: Option<Quantity>,
    pub ephemeral_storage_limit_overwrite_max_allowed: Option<Quantity>,
}

/// What a job override above its maximum gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverMax {
    /// One warning line and the maximum is used (what users asked for in gitlab-runner#38958).
    #[default]
    Cap,
    /// The job fails naming the variable and the maximum (the Kubernetes executor's behaviour).
    Fail,
}

/// Maxima for the job's `SPOTRUN_*` resource variables; a variable without a maximum is refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobCaps {
    pub cpu: Option<Quantity>,
    pub memory: Option<Quantity>,
    pub ephemeral_storage: Option<Quantity>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesSettings {
    pub build: ResourceSettings,
    pub helper: ResourceSettings,
    pub services: ResourceSettings,
    /// Older maxima for the build container (request and limit alike), used where the
    /// `*_overwrite_max_allowed` key is not set.
    pub job_max: JobCaps,
    /// A job override above its maximum: `cap` (warn, use the maximum) or `fail`.
    pub overwrite_over_max: OverMax,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TolerationSetting {
    pub key: String,
    #[serde(default = "default_operator")]
    pub operator: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub effect: Option<String>,
}

fn default_operator() -> String {
    "Equal".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchType {
    /// RFC 7386 JSON merge patch.
    Merge,
    /// RFC 6902 JSON patch.
    Json,
    /// Kubernetes strategic merge patch: keyed lists (containers, env, volumes, ...) merge by key.
    Strategic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpecPatch {
    #[serde(rename = "type")]
    pub patch_type: PatchType,
    /// The patch document, as JSON text (applied to the whole Pod object).
    pub patch: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PodSettings {
    pub service_account: Option<String>,
    pub automount_service_account_token: bool,
    pub image_pull_secrets: Vec<String>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<TolerationSetting>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `PodSecurityContext` in Kubernetes JSON field names (camelCase), as a TOML table.
    pub security_context: Option<toml::Table>,
    pub build_security_context: Option<toml::Table>,
    pub helper_security_context: Option<toml::Table>,
    pub service_security_context: Option<toml::Table>,
    pub priority_class_name: Option<String>,
    pub termination_grace_period_seconds: i64,
    pub patch: Option<PodSpecPatch>,
    /// Regular expressions (Go/RE2 syntax, unanchored as in the Kubernetes executor) a job's
    /// `KUBERNETES_NODE_SELECTOR_*`, `KUBERNETES_POD_LABELS_*`, `KUBERNETES_POD_ANNOTATIONS_*`
    /// (`key=value`) and `KUBERNETES_SERVICE_ACCOUNT_OVERWRITE` values must match; unset = no
    /// override.
    pub node_selector_overwrite_allowed: Option<String>,
    pub pod_labels_overwrite_allowed: Option<String>,
    pub pod_annotations_overwrite_allowed: Option<String>,
    pub service_account_overwrite_allowed: Option<String>,
    /// Leave `imagePullSecrets` off the pod so the service account's apply (the Kubernetes
    /// executor's `use_service_account_image_pull_secrets`): neither `image_pull_secrets` nor the
    /// job's registry credentials are used then.
    pub use_service_account_image_pull_secrets: bool,
    /// User IDs a job's `image: kubernetes: user` may run as (the Kubernetes executor's
    /// `allowed_users`); empty = any. Numeric IDs only, as strings or integers.
    #[serde(deserialize_with = "numeric_ids")]
    pub allowed_users: Vec<String>,
    /// Group IDs a job's `image: kubernetes: user` (`uid:gid`) may run as; empty = any.
    #[serde(deserialize_with = "numeric_ids")]
    pub allowed_groups: Vec<String>,
    /// How files the helper writes for the build (checkout, file variables, caches, artifacts)
    /// become writable to a build container running as another user.
    pub helper_file_ownership: HelperFileOwnership,
}

/// How a build container running as another user than the helper can change what the helper
/// wrote for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HelperFileOwnership {
    /// After each helper stage that prepares the build (`get_sources`, `restore_cache`,
    /// `download_artifacts`, ...), the project directory and its file variables are given to the
    /// build container's user, learned once per job (what users asked the Kubernetes executor for:
    /// `FF_DISABLE_UMASK_FOR_KUBERNETES_EXECUTOR`).
    #[default]
    BuildUser,
    /// Helper stages run with `umask 0000`: everything they write is world-writable (the
    /// Kubernetes executor's default), readable and writable by every container of the pod.
    Umask,
}

/// A TOML list of IDs, each a string or an integer (checked to be numeric by `validate`).
fn numeric_ids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Number(i64),
        Text(String),
    }
    Ok(Vec::<Id>::deserialize(d)?
        .into_iter()
        .map(|id| match id {
            Id::Number(n) => n.to_string(),
            Id::Text(t) => t,
        })
        .collect())
}

/// A user or group ID as Kubernetes accepts it in `runAsUser` / `runAsGroup` (0 to 2147483647).
#[must_use]
pub fn parse_id(s: &str) -> Option<i64> {
    let ok = !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    s.parse::<i64>()
        .ok()
        .filter(|n| ok && *n <= i64::from(i32::MAX))
}

impl Default for PodSettings {
    fn default() -> Self {
        Self {
            service_account: None,
            automount_service_account_token: false,
            image_pull_secrets: Vec::new(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            security_context: None,
            build_security_context: None,
            helper_security_context: None,
            service_security_context: None,
            priority_class_name: None,
            termination_grace_period_seconds: 10,
            patch: None,
            node_selector_overwrite_allowed: None,
            pod_labels_overwrite_allowed: None,
            pod_annotations_overwrite_allowed: None,
            service_account_overwrite_allowed: None,
            use_service_account_image_pull_secrets: false,
            allowed_users: Vec::new(),
            allowed_groups: Vec::new(),
            helper_file_ownership: HelperFileOwnership::BuildUser,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// A TOML string or list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PullPolicy>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PullPolicy),
        Many(Vec<PullPolicy>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

impl PullPolicy {
    /// The job's spelling (`.gitlab-ci.yml` `pull_policy`).
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "always" => Some(Self::Always),
            "if-not-present" => Some(Self::IfNotPresent),
            "never" => Some(Self::Never),
            _ => None,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::IfNotPresent => "if-not-present",
            Self::Never => "never",
        }
    }

    #[must_use]
    pub fn k8s(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// The published spotrun image of this version (the chart's default image too).
pub const LAUNCHER_IMAGE: &str = concat!(
    "registry.gitlab.com/spotrun/spotrun:",
    env!("CARGO_PKG_VERSION")
);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageSettings {
    pub default_image: String,
    /// May hold `${ARCH}` (the helper's name for the pod's `kubernetes.io/arch`: `x86_64`,
    /// `arm64`, ...) and `${FLAVOR}` (`helper_image_flavor` and a dash, or nothing), as GitLab tags
    /// its helper images (`x86_64-v19.4.0`, `ubuntu-arm64-v19.4.0`).
    pub helper_image: String,
    /// GitLab's helper image flavor (`alpine3.21`, `ubuntu`, `ubi-fips`, ...) for `${FLAVOR}`;
    /// unset: the default (Alpine) tag.
    pub helper_image_flavor: Option<String>,
    /// The spotrun image: its init container copies `spotrun-launch` (the in-pod launcher) into
    /// the pod, so stages need nothing from the job image but `sh`.
    pub launcher_image: String,
    /// One policy or a list: the default for images whose job sets none, and (first entry) the
    /// helper's; a later entry is tried when a pull fails with the one before (as the Kubernetes
    /// executor does).
    #[serde(deserialize_with = "one_or_many")]
    pub pull_policy: Vec<PullPolicy>,
    /// What a job's `pull_policy` may use; empty = the `pull_policy` list (and if that is empty too,
    /// any).
    pub allowed_pull_policies: Vec<PullPolicy>,
    /// Globs; empty = any image.
    pub allowed_images: Vec<String>,
    /// Globs; empty = any service image.
    pub allowed_services: Vec<String>,
}

impl Default for ImageSettings {
    fn default() -> Self {
        Self {
            default_image: "alpine:3.22".into(),
            helper_image:
                "registry.gitlab.com/gitlab-org/gitlab-runner/gitlab-runner-helper:${FLAVOR}${ARCH}-v19.4.0"
                    .into(),
            helper_image_flavor: None,
            launcher_image: LAUNCHER_IMAGE.into(),
            pull_policy: Vec::new(),
            allowed_pull_policies: Vec::new(),
            allowed_images: Vec::new(),
            allowed_services: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirSettings {
    pub builds_dir: String,
    pub cache_dir: String,
    /// Mount an emptyDir at `cache_dir` (local cache for the job's lifetime).
    pub cache_volume: bool,
    pub scripts_dir: String,
    pub logs_dir: String,
}

impl Default for DirSettings {
    fn default() -> Self {
        Self {
            builds_dir: "/builds".into(),
            cache_dir: "/cache".into(),
            cache_volume: true,
            scripts_dir: "/spotrun/scripts".into(),
            logs_dir: "/spotrun/logs".into(),
        }
    }
}

// Reason: field names are the TOML keys operators write; the unit suffix is deliberate.
#[allow(clippy::struct_field_names)]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutSettings {
    /// Pod unschedulable longer than this → system failure with the scheduler's message.
    pub unschedulable_seconds: u64,
    /// Upper bound of the whole `prepare` wait (scheduling, pulls, start).
    pub prepare_seconds: u64,
    /// `activeDeadlineSeconds` = job timeout + this margin.
    pub deadline_margin_seconds: u64,
    /// Job timeout when the runner gives none.
    pub default_job_timeout_seconds: u64,
    /// Per API call.
    pub api_call_seconds: u64,
    /// An exec stream with no frame for this long is treated as dead and reconnected.
    pub exec_silence_seconds: u64,
    /// `gc`: pods that never finished `prepare` and are older than this are orphans.
    pub stale_prepare_seconds: u64,
    /// Seconds between the job log's "Waiting for pod ... to be running" lines while `prepare`
    /// waits (the Kubernetes executor's `poll_interval`).
    pub poll_interval_seconds: u64,
}

impl Default for TimeoutSettings {
    fn default() -> Self {
        Self {
            unschedulable_seconds: 300,
            prepare_seconds: 1800,
            deadline_margin_seconds: 300,
            default_job_timeout_seconds: 3600,
            api_call_seconds: 30,
            exec_silence_seconds: 20,
            stale_prepare_seconds: 3600,
            poll_interval_seconds: 3,
        }
    }
}

// Reason: field names are the TOML keys operators write.
#[allow(clippy::struct_field_names)]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Attempts per call after the first (429/5xx/connection errors only).
    pub retry_limit: u32,
    pub retry_backoff_base_ms: u64,
    pub retry_backoff_max_ms: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            retry_limit: 6,
            retry_backoff_base_ms: 100,
            retry_backoff_max_ms: 3000,
        }
    }
}

/// How `prepare` treats the job's services.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSettings {
    /// Seconds to wait for the TCP ports services declare (`HEALTHCHECK_TCP_PORT`, `ports:`),
    /// as the Kubernetes executor's `wait_for_services_timeout`; 0 disables the wait.
    pub wait_for_services_timeout: u64,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            wait_for_services_timeout: 30,
        }
    }
}

/// The whole operator file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub namespace: String,
    /// Regular expression `KUBERNETES_NAMESPACE_OVERWRITE` must match; unset = no override.
    /// The executor's service account needs the same rights in every namespace it allows.
    pub namespace_overwrite_allowed: Option<String>,
    /// Where the JSON event lines go: `runner` (gitlab-runner's own stderr, the default),
    /// `stderr` (copied into job logs by the runner), `off`, or a file path (appended).
    pub events_log: String,
    pub spot: SpotSettings,
    pub images: ImageSettings,
    pub resources: ResourcesSettings,
    pub pod: PodSettings,
    pub services: ServiceSettings,
    /// `[[volumes.host_path]]`, `pvc`, `config_map`, `secret`, `empty_dir`, `csi`.
    pub volumes: crate::volumes::VolumeSettings,
    pub dirs: DirSettings,
    pub timeouts: TimeoutSettings,
    pub api: ApiSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: "default".into(),
            namespace_overwrite_allowed: None,
            events_log: "runner".into(),
            spot: SpotSettings::default(),
            images: ImageSettings::default(),
            resources: ResourcesSettings::default(),
            pod: PodSettings::default(),
            services: ServiceSettings::default(),
            volumes: crate::volumes::VolumeSettings::default(),
            dirs: DirSettings::default(),
            timeouts: TimeoutSettings::default(),
            api: ApiSettings::default(),
        }
    }
}

/// Values given on the command line (the highest precedence).
#[derive(Debug, Clone, Default)]
pub struct FlagOverrides {
    pub namespace: Option<String>,
    pub spot_policy: Option<SpotPolicy>,
}

impl Settings {
    /// Parses TOML text and validates it; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, SettingsError> {
        let settings: Settings = toml::from_str(text).map_err(|e| SettingsError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// The one loader: file (from the flag or `SPOTRUN_EXECUTOR_CONFIG`), then env, then flags.
    pub fn load(
        path_flag: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &FlagOverrides,
    ) -> Result<Self, SettingsError> {
        let path = match path_flag {
            Some(p) => p.to_path_buf(),
            None => env(CONFIG_ENV)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .ok_or(SettingsError::NoPath)?,
        };
        let text = std::fs::read_to_string(&path).map_err(|source| SettingsError::Read {
            path: path.clone(),
            source,
        })?;
        let mut settings = Self::from_toml(&text, &path)?;
        if let Some(ns) = env(NAMESPACE_ENV).filter(|s| !s.is_empty()) {
            settings.namespace = ns;
        }
        if let Some(p) = env(SPOT_POLICY_ENV).filter(|s| !s.is_empty()) {
            settings.spot.policy = SpotPolicy::parse(&p).ok_or_else(|| SettingsError::Invalid {
                key: SPOT_POLICY_ENV.into(),
                message: format!("{p:?} is not one of require, prefer, never"),
            })?;
        }
        if let Some(ns) = &flags.namespace {
            settings.namespace.clone_from(ns);
        }
        if let Some(p) = flags.spot_policy {
            settings.spot.policy = p;
        }
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key: &str, message: String| SettingsError::Invalid {
            key: key.into(),
            message,
        };
        if !crate::naming::is_dns1123_label(&self.namespace) {
            return Err(invalid(
                "namespace",
                format!("{:?} is not a DNS-1123 label", self.namespace),
            ));
        }
        for (key, globs) in [
            ("images.allowed_images", &self.images.allowed_images),
            ("images.allowed_services", &self.images.allowed_services),
        ] {
            for g in globs {
                globset::Glob::new(g).map_err(|e| invalid(key, format!("bad glob {g:?}: {e}")))?;
            }
        }
        for (key, re) in [
            (
                "namespace_overwrite_allowed",
                &self.namespace_overwrite_allowed,
            ),
            (
                "pod.node_selector_overwrite_allowed",
                &self.pod.node_selector_overwrite_allowed,
            ),
            (
                "pod.pod_labels_overwrite_allowed",
                &self.pod.pod_labels_overwrite_allowed,
            ),
            (
                "pod.pod_annotations_overwrite_allowed",
                &self.pod.pod_annotations_overwrite_allowed,
            ),
            (
                "pod.service_account_overwrite_allowed",
                &self.pod.service_account_overwrite_allowed,
            ),
        ] {
            if let Some(re) = re {
                regex::Regex::new(re)
                    .map_err(|e| invalid(key, format!("bad regular expression {re:?}: {e}")))?;
            }
        }
        for (key, dir) in [
            ("dirs.builds_dir", &self.dirs.builds_dir),
            ("dirs.cache_dir", &self.dirs.cache_dir),
            ("dirs.scripts_dir", &self.dirs.scripts_dir),
            ("dirs.logs_dir", &self.dirs.logs_dir),
        ] {
            if !dir.starts_with('/') || dir.contains("..") || dir.contains('\'') {
                return Err(invalid(
                    key,
                    format!("{dir:?} must be an absolute path without '..' or quotes"),
                ));
            }
        }
        for (key, ids) in [
            ("pod.allowed_users", &self.pod.allowed_users),
            ("pod.allowed_groups", &self.pod.allowed_groups),
        ] {
            for id in ids {
                if parse_id(id).is_none() {
                    return Err(invalid(
                        key,
                        format!(
                            "{id:?} is not a numeric ID (0 to 2147483647); names are not resolved"
                        ),
                    ));
                }
            }
        }
        for (k, v) in &self.pod.labels {
            if !crate::naming::is_label_value(v) {
                return Err(invalid(
                    &format!("pod.labels.{k}"),
                    format!("{v:?} is not a valid label value"),
                ));
            }
        }
        for (key, table) in [("pod.security_context", &self.pod.security_context)] {
            if let Some(t) = table {
                serde_json::from_value::<k8s_openapi::api::core::v1::PodSecurityContext>(
                    serde_json::to_value(t).unwrap_or_default(),
                )
                .map_err(|e| invalid(key, e.to_string()))?;
            }
        }
        for (key, table) in [
            (
                "pod.build_security_context",
                &self.pod.build_security_context,
            ),
            (
                "pod.helper_security_context",
                &self.pod.helper_security_context,
            ),
            (
                "pod.service_security_context",
                &self.pod.service_security_context,
            ),
        ] {
            if let Some(t) = table {
                serde_json::from_value::<k8s_openapi::api::core::v1::SecurityContext>(
                    serde_json::to_value(t).unwrap_or_default(),
                )
                .map_err(|e| invalid(key, e.to_string()))?;
            }
        }
        if let Some(p) = &self.pod.patch {
            let doc: serde_json::Value = serde_json::from_str(&p.patch)
                .map_err(|e| invalid("pod.patch.patch", format!("not JSON: {e}")))?;
            if p.patch_type == PatchType::Json {
                serde_json::from_value::<json_patch::Patch>(doc).map_err(|e| {
                    invalid("pod.patch.patch", format!("not an RFC 6902 patch: {e}"))
                })?;
            } else if !doc.is_object() {
                return Err(invalid(
                    "pod.patch.patch",
                    "a merge or strategic patch must be a JSON object".into(),
                ));
            }
        }
        for t in &self.pod.tolerations {
            if !matches!(t.operator.as_str(), "Equal" | "Exists") {
                return Err(invalid(
                    "pod.tolerations.operator",
                    format!("{:?} is not Equal or Exists", t.operator),
                ));
            }
        }
        if self.timeouts.api_call_seconds == 0
            || self.timeouts.exec_silence_seconds < 2
            || self.timeouts.poll_interval_seconds == 0
        {
            return Err(invalid(
                "timeouts",
                "api_call_seconds and poll_interval_seconds must be > 0 and exec_silence_seconds >= 2"
                    .into(),
            ));
        }
        self.validate_helper_image()?;
        self.volumes
            .validate(&[
                self.dirs.scripts_dir.as_str(),
                self.dirs.logs_dir.as_str(),
                crate::plan::TOOLS_DIR,
            ])
            .map_err(|(key, message)| invalid(&key, message))?;
        Ok(())
    }
}

impl Settings {
    fn validate_helper_image(&self) -> Result<(), SettingsError> {
        let invalid = |key: &str, message: String| SettingsError::Invalid {
            key: key.into(),
            message,
        };
        let mut rest = self.images.helper_image.as_str();
        while let Some(i) = rest.find("${") {
            let end = rest[i..].find('}').map_or(rest.len(), |e| i + e + 1);
            let placeholder = &rest[i..end];
            if !matches!(placeholder, "${ARCH}" | "${FLAVOR}") {
                return Err(invalid(
                    "images.helper_image",
                    format!("unknown placeholder {placeholder:?} (known: ${{ARCH}}, ${{FLAVOR}})"),
                ));
            }
            rest = &rest[end..];
        }
        if let Some(f) = &self.images.helper_image_flavor {
            let ok = !f.is_empty()
                && f.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                });
            if !ok {
                return Err(invalid(
                    "images.helper_image_flavor",
                    format!("{f:?} is not a flavor name (alpine3.21, ubuntu, ubi-fips, ...)"),
                ));
            }
        }
        if let Some(arch) = self.pod.node_selector.get(crate::plan::ARCH_LABEL) {
            if crate::plan::helper_arch(arch).is_none() {
                return Err(invalid(
                    &format!("pod.node_selector.{}", crate::plan::ARCH_LABEL),
                    format!(
                        "{arch:?} is not an architecture GitLab builds helper images for ({})",
                        crate::plan::KNOWN_ARCHES.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, SettingsError> {
        Settings::from_toml(text, Path::new("t.toml"))
    }

    #[test]
    fn example_file_parses_with_the_real_loader() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/executor.example.toml");
        let s = Settings::load(Some(&path), &|_| None, &FlagOverrides::default())
            .expect("example parses");
        assert_eq!(s.namespace, "ci-jobs");
        assert_eq!(s.spot.policy, SpotPolicy::Require);
        assert!(s.pod.patch.is_some());
        assert!(s.resources.job_max.cpu.is_some());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("namespace = \"a\"\n[spot]\npolcy = \"never\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("polcy"), "{err}");
        let err = parse("namepsace = \"a\"\n").unwrap_err().to_string();
        assert!(err.contains("namepsace"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse("namespace = \"Not_DNS\"").unwrap_err().to_string();
        assert!(err.contains("namespace"), "{err}");
        let err = parse("[resources.build]\ncpu_limit = \"lots\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lots"), "{err}");
        let err = parse("[pod.patch]\ntype = \"json\"\npatch = '{\"a\":1}'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pod.patch.patch"), "{err}");
        let err = parse("[pod.security_context]\nrunAsUser = \"root\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pod.security_context"), "{err}");
    }

    #[test]
    fn kubernetes_executor_keys_parse_and_bad_ones_are_named() {
        let s = parse(
            r#"namespace_overwrite_allowed = "^ci-team-"
[services]
wait_for_services_timeout = 10
[images]
pull_policy = ["always", "if-not-present"]
allowed_pull_policies = ["always", "if-not-present"]
[resources]
overwrite_over_max = "fail"
[resources.build]
cpu_limit_overwrite_max_allowed = "4"
memory_request_overwrite_max_allowed = "8Gi"
[resources.helper]
ephemeral_storage_limit_overwrite_max_allowed = "1Gi"
[resources.services]
cpu_request_overwrite_max_allowed = "2"
[pod]
node_selector_overwrite_allowed = "^kubernetes\\.io/arch="
pod_labels_overwrite_allowed = "^team="
pod_annotations_overwrite_allowed = ".*"
service_account_overwrite_allowed = "^ci-"
"#,
        )
        .unwrap();
        assert_eq!(s.services.wait_for_services_timeout, 10);
        assert_eq!(
            s.images.pull_policy,
            [PullPolicy::Always, PullPolicy::IfNotPresent]
        );
        assert_eq!(s.resources.overwrite_over_max, OverMax::Fail);
        assert!(s.resources.build.cpu_limit_overwrite_max_allowed.is_some());
        let single = parse("[images]\npull_policy = \"never\"\n").unwrap();
        assert_eq!(single.images.pull_policy, [PullPolicy::Never]);
        let err = parse("[pod]\npod_labels_overwrite_allowed = \"(\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pod.pod_labels_overwrite_allowed"), "{err}");
        let err = parse("[images]\npull_policy = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pull_policy"), "{err}");
    }

    #[test]
    fn non_root_keys_parse_and_bad_ids_are_named() {
        let s = parse(
            "[pod]\nallowed_users = [\"1000\", 65534]\nallowed_groups = [\"1000\"]\nhelper_file_ownership = \"umask\"\n",
        )
        .unwrap();
        assert_eq!(s.pod.allowed_users, ["1000", "65534"]);
        assert_eq!(s.pod.allowed_groups, ["1000"]);
        assert_eq!(s.pod.helper_file_ownership, HelperFileOwnership::Umask);
        assert_eq!(
            Settings::default().pod.helper_file_ownership,
            HelperFileOwnership::BuildUser
        );
        for (text, key) in [
            ("[pod]\nallowed_users = [\"root\"]\n", "pod.allowed_users"),
            ("[pod]\nallowed_groups = [\"-1\"]\n", "pod.allowed_groups"),
            ("[pod]\nallowed_users = [2147483648]\n", "pod.allowed_users"),
            (
                "[pod]\nhelper_file_ownership = \"chmod\"\n",
                "helper_file_ownership",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}→ {err}");
        }
        assert_eq!(parse_id("1000"), Some(1000));
        for bad in ["", "+1", "1e3", " 1", "4294967296"] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    /// An `executor.toml` setting `key` (dotted) to `value` (TOML text).
    fn toml_for(key: &str, value: &str) -> String {
        match key.rsplit_once('.') {
            Some((table, leaf)) => format!("[{table}]\n{leaf} = {value}\n"),
            None => format!("{key} = {value}\n"),
        }
    }

    #[test]
    fn migration_table_keys_exist() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config/kubernetes-executor-migration.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let strip = |c: &str| c.trim().trim_matches('`').to_string();
        let mut checked = 0;
        // Data rows: the header row names the columns.
        for line in text
            .lines()
            .filter(|l| l.starts_with("| `") && !l.contains("example value (TOML)"))
        {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
            assert_eq!(cells.len(), 4, "{line}");
            let (key, value) = (strip(cells[1]), strip(cells[2]));
            if key == "—" {
                assert!(
                    !cells[3].trim().is_empty(),
                    "a key without equivalent says why: {line}"
                );
                continue;
            }
            let doc = toml_for(&key, &value);
            if let Err(e) = parse(&doc) {
                panic!("{line}\n{doc}→ {e}");
            }
            checked += 1;
        }
        assert!(checked > 60, "only {checked} rows checked");
        // The check can fail: a key the settings do not have is refused by name.
        let err = parse(&toml_for("pod.node_selectors", "{}")).unwrap_err();
        assert!(err.to_string().contains("node_selectors"), "{err}");
    }

    #[test]
    fn volumes_helper_flavor_and_pull_secret_keys_parse_and_bad_ones_are_named() {
        let s = parse(
            r#"[images]
helper_image = "registry.example.com/helper:${FLAVOR}${ARCH}-v19.4.0"
helper_image_flavor = "ubuntu"
[pod]
use_service_account_image_pull_secrets = true
[timeouts]
poll_interval_seconds = 1
[[volumes.pvc]]
name = "build-$CI_CONCURRENT_ID"
mount_path = "/builds"
[[volumes.empty_dir]]
name = "scratch"
mount_path = "/scratch"
medium = "Memory"
size_limit = "1Gi"
"#,
        )
        .unwrap();
        assert!(s.pod.use_service_account_image_pull_secrets);
        assert_eq!(s.volumes.pvc.len(), 1);
        for (text, want) in [
            (
                "[images]\nhelper_image = \"h:${VERSION}\"\n",
                "images.helper_image: unknown placeholder \"${VERSION}\"",
            ),
            (
                "[images]\nhelper_image_flavor = \"Ubuntu 24\"\n",
                "images.helper_image_flavor",
            ),
            (
                "[pod]\nnode_selector = { \"kubernetes.io/arch\" = \"sparc\" }\n",
                "pod.node_selector.kubernetes.io/arch",
            ),
            (
                "[[volumes.secret]]\nname = \"s\"\nmount_path = \"/spotrun/logs\"\n",
                "volumes.secret[0].mount_path",
            ),
            (
                "[[volumes.csi]]\nname = \"c\"\nmount_path = \"/c\"\ndriver = \"d\"\nattributes = {}\n",
                "unknown field `attributes`",
            ),
            ("[timeouts]\npoll_interval_seconds = 0\n", "timeouts"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}→ {err}");
        }
    }

    #[test]
    fn precedence_file_then_env_then_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.toml");
        std::fs::write(
            &path,
            "namespace = \"from-file\"\n[spot]\npolicy = \"require\"\n",
        )
        .unwrap();
        let none = FlagOverrides::default();
        let s = Settings::load(Some(&path), &|_| None, &none).unwrap();
        assert_eq!(
            (s.namespace.as_str(), s.spot.policy),
            ("from-file", SpotPolicy::Require)
        );
        let env = |k: &str| match k {
            NAMESPACE_ENV => Some("from-env".to_string()),
            SPOT_POLICY_ENV => Some("never".to_string()),
            _ => None,
        };
        let s = Settings::load(Some(&path), &env, &none).unwrap();
        assert_eq!(
            (s.namespace.as_str(), s.spot.policy),
            ("from-env", SpotPolicy::Never)
        );
        let flags = FlagOverrides {
            namespace: Some("from-flag".into()),
            spot_policy: Some(SpotPolicy::Prefer),
        };
        let s = Settings::load(Some(&path), &env, &flags).unwrap();
        assert_eq!(
            (s.namespace.as_str(), s.spot.policy),
            ("from-flag", SpotPolicy::Prefer)
        );
        // The env var names the file when no flag is given.
        let p = path.display().to_string();
        let env_path = move |k: &str| (k == CONFIG_ENV).then(|| p.clone());
        assert_eq!(
            Settings::load(None, &env_path, &none).unwrap().namespace,
            "from-file"
        );
        assert!(matches!(
            Settings::load(None, &|_| None, &none),
            Err(SettingsError::NoPath)
        ));
    }
}
