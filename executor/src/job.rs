//! The job as the runner hands it over: `JOB_RESPONSE_FILE` (spec.Job JSON) plus the untrusted
//! `CUSTOM_ENV_*` knobs, each checked against an operator cap or allow-list.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::quantity::Quantity;
use crate::settings::{OverMax, Settings, SpotPolicy};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(
        "JOB_RESPONSE_FILE is not set (the executor must be run by gitlab-runner's custom executor)"
    )]
    NoResponseFile,
    #[error("reading JOB_RESPONSE_FILE {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("JOB_RESPONSE_FILE {path} is not a job payload: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// A job knob outside what the operator allows: a build failure (the job's own fault).
    #[error("{variable}={value:?} is not allowed: {reason}")]
    Refused {
        variable: String,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct JobVariable {
    pub key: String,
    pub value: String,
    pub public: bool,
    pub file: bool,
    pub masked: bool,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ImageSpec {
    pub name: String,
    pub alias: String,
    pub command: Vec<String>,
    pub entrypoint: Vec<String>,
    pub variables: Vec<JobVariable>,
    #[serde(deserialize_with = "null_as_default")]
    pub ports: Vec<ServicePort>,
    pub pull_policy: Vec<String>,
    /// `{docker: {user, platform}, kubernetes: {user}}`, kept as sent: a malformed value is a
    /// warning in the job log (`kubernetes_user`), never a payload the executor cannot read.
    pub executor_opts: serde_json::Value,
}

/// `image: kubernetes: user` (or a service's own): the uid and, from `uid:gid`, the gid the
/// container runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubernetesUser {
    pub uid: i64,
    pub gid: Option<i64>,
}

impl ImageSpec {
    /// `executor_opts.kubernetes.user` (GitLab MR 5469, 5552): `"uid"`, `"uid:gid"` or an integer.
    /// `Ok(None)` when unset or empty; `Err(value as sent)` for anything else: a user name is not
    /// resolved (the Kubernetes executor warns and ignores it too, gitlab-runner#38942).
    pub fn kubernetes_user(&self) -> Result<Option<KubernetesUser>, String> {
        use serde_json::Value;
        let raw = &self.executor_opts["kubernetes"]["user"];
        let text = match raw {
            Value::Null => return Ok(None),
            Value::String(s) if s.trim().is_empty() => return Ok(None),
            Value::String(s) => s.trim(),
            Value::Number(n) => {
                return n
                    .as_i64()
                    .and_then(|uid| crate::settings::parse_id(&uid.to_string()))
                    .map(|uid| Some(KubernetesUser { uid, gid: None }))
                    .ok_or_else(|| raw.to_string());
            }
            _ => return Err(raw.to_string()),
        };
        let (uid, gid) = match text.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (text, None),
        };
        let id = crate::settings::parse_id;
        match (id(uid), gid.map(id)) {
            (Some(uid), None) => Ok(Some(KubernetesUser { uid, gid: None })),
            (Some(uid), Some(Some(gid))) => Ok(Some(KubernetesUser {
                uid,
                gid: Some(gid),
            })),
            _ => Err(raw.to_string()),
        }
    }
}

/// A port a service declares (`services: [{name, ports: [...]}]`); waited for like
/// `HEALTHCHECK_TCP_PORT`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ServicePort {
    pub number: u32,
    pub protocol: String,
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct JobInfo {
    pub name: String,
    pub stage: String,
    pub pipeline_id: u64,
    pub project_id: u64,
    pub project_name: String,
    pub project_full_path: String,
    pub namespace_id: u64,
    pub root_namespace_id: u64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct GitInfo {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub sha: String,
    pub before_sha: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RunnerInfo {
    pub timeout: u64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Credential {
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
    pub username: String,
    pub password: String,
}

/// The fields of spec.Job the executor uses; unknown fields are ignored (the runner adds some).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct JobResponse {
    pub id: u64,
    pub job_info: JobInfo,
    pub git_info: GitInfo,
    pub runner_info: RunnerInfo,
    pub variables: Vec<JobVariable>,
    pub image: ImageSpec,
    #[serde(deserialize_with = "null_as_default")]
    pub services: Vec<ImageSpec>,
    #[serde(deserialize_with = "null_as_default")]
    pub credentials: Vec<Credential>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl JobResponse {
    pub fn parse(text: &str, path: &str) -> Result<Self, JobError> {
        let job: Self = serde_json::from_str(text).map_err(|source| JobError::Parse {
            path: path.into(),
            source,
        })?;
        if job.id == 0 {
            return Err(JobError::Parse {
                path: path.into(),
                source: serde::de::Error::custom("missing job id"),
            });
        }
        Ok(job)
    }

    pub fn from_file(path: &Path) -> Result<Self, JobError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text, &p)
    }

    #[must_use]
    pub fn variable(&self, key: &str) -> Option<&str> {
        self.variables
            .iter()
            .rev()
            .find(|v| v.key == key)
            .map(|v| v.value.as_str())
    }
}

/// `CUSTOM_ENV_*` values (prefix stripped). Untrusted: anything the job author controls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomEnv(pub BTreeMap<String, String>);

impl CustomEnv {
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(
            vars.into_iter()
                .filter_map(|(k, v)| k.strip_prefix("CUSTOM_ENV_").map(|k| (k.to_string(), v)))
                .collect(),
        )
    }

    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// Whether Kubernetes accepts `name` as an environment variable name (letters, digits, `_`, `-`,
/// `.`; not starting with a digit): others are left out of a container's env.
#[must_use]
pub fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The job variables services get, as the Kubernetes executor gives them
/// (`GetAllVariables().PublicOrInternal()`): every variable the runner passed (`CUSTOM_ENV_*`,
/// already expanded the runner's way) except those the payload marks non-public (project and
/// group secrets, `CI_JOB_TOKEN`) or masked: those never land in a pod spec.
#[must_use]
pub fn service_job_variables(job: &JobResponse, env: &CustomEnv) -> Vec<(String, String)> {
    let mut hidden: BTreeMap<&str, bool> = BTreeMap::new();
    for v in &job.variables {
        // The last definition of a key wins, as in the runner.
        hidden.insert(v.key.as_str(), !v.public || v.masked);
    }
    env.0
        .iter()
        .filter(|(k, _)| {
            k.as_str() != "CI_JOB_SERVICES"
                && is_env_name(k)
                && !hidden.get(k.as_str()).copied().unwrap_or(false)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// One entry of `CI_JOB_SERVICES` (the runner's `json.Marshal` of the job's services).
#[derive(Debug, Deserialize)]
struct JobServiceEntry {
    #[serde(default)]
    variables: Option<BTreeMap<String, String>>,
}

/// The own variables of service `index`: from `CI_JOB_SERVICES`, where the runner expanded them
/// against the job's variables, else (no or mismatching `CI_JOB_SERVICES`) the payload's as written.
#[must_use]
pub fn service_own_variables(
    job: &JobResponse,
    env: &CustomEnv,
    index: usize,
) -> Vec<(String, String)> {
    let Some(svc) = job.services.get(index) else {
        return Vec::new();
    };
    let expanded: Option<Vec<JobServiceEntry>> = env
        .0
        .get("CI_JOB_SERVICES")
        .and_then(|t| serde_json::from_str(t).ok());
    // Same list in the same order (the runner writes it from the job's services); its names are
    // expanded, so they are not compared with the payload's.
    if let Some(entries) = expanded.filter(|e| e.len() == job.services.len()) {
        if let Some(e) = entries.get(index) {
            return e
                .variables
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect();
        }
    }
    svc.variables
        .iter()
        .filter(|v| !v.key.is_empty())
        .map(|v| (v.key.clone(), v.value.clone()))
        .collect()
}

/// What the runner knows about the job and its slot: everything naming derives from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobIdentity {
    pub job_id: u64,
    pub runner_short_token: String,
    pub concurrent_id: String,
}

impl JobIdentity {
    /// From `CUSTOM_ENV_*` alone (what `config` and `cleanup` have for certain).
    pub fn from_env(env: &CustomEnv) -> Result<Self, JobError> {
        let job_id = env
            .get("CI_JOB_ID")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| JobError::Refused {
                variable: "CUSTOM_ENV_CI_JOB_ID".into(),
                value: env.get("CI_JOB_ID").unwrap_or("").into(),
                reason: "missing or not a number (the runner always sets it)".into(),
            })?;
        Ok(Self {
            job_id,
            runner_short_token: env.get("CI_RUNNER_SHORT_TOKEN").unwrap_or("").into(),
            concurrent_id: env.get("CI_CONCURRENT_ID").unwrap_or("0").into(),
        })
    }

    #[must_use]
    pub fn pod_name(&self) -> String {
        crate::naming::pod_name(&self.runner_short_token, &self.concurrent_id, self.job_id)
    }
}

/// Resource requests/limits a job asked for, already checked against the caps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobResources {
    pub cpu_request: Option<Quantity>,
    pub cpu_limit: Option<Quantity>,
    pub memory_request: Option<Quantity>,
    pub memory_limit: Option<Quantity>,
    pub ephemeral_storage_request: Option<Quantity>,
    pub ephemeral_storage_limit: Option<Quantity>,
}

impl JobResources {
    fn slot(&mut self, field: Field) -> &mut Option<Quantity> {
        match field {
            Field::CpuRequest => &mut self.cpu_request,
            Field::CpuLimit => &mut self.cpu_limit,
            Field::MemoryRequest => &mut self.memory_request,
            Field::MemoryLimit => &mut self.memory_limit,
            Field::EphemeralStorageRequest => &mut self.ephemeral_storage_request,
            Field::EphemeralStorageLimit => &mut self.ephemeral_storage_limit,
        }
    }
}

/// The job knobs after validation, and what the job log says about them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobKnobs {
    pub spot: Option<SpotPolicy>,
    /// The build container's (`KUBERNETES_CPU_LIMIT`, ..., and the older `SPOTRUN_*` names).
    pub resources: JobResources,
    /// `KUBERNETES_HELPER_*`.
    pub helper_resources: JobResources,
    /// `KUBERNETES_SERVICE_*` set on the job: every service.
    pub service_resources: JobResources,
    /// `KUBERNETES_SERVICE_*` in a service's own variables (index-aligned with the services).
    pub per_service: Vec<JobResources>,
    /// `KUBERNETES_NODE_SELECTOR_*`, `KUBERNETES_POD_LABELS_*`, `KUBERNETES_POD_ANNOTATIONS_*`.
    pub node_selector: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `KUBERNETES_SERVICE_ACCOUNT_OVERWRITE`.
    pub service_account: Option<String>,
    /// One job-log line per override: applied, or a warning when ignored, capped or refused.
    pub notes: Vec<String>,
}

/// Job variable names for the knobs (read from `CUSTOM_ENV_<name>`).
pub const SPOT_VAR: &str = "SPOTRUN_SPOT";
pub const NAMESPACE_VAR: &str = "KUBERNETES_NAMESPACE_OVERWRITE";
pub const SERVICE_ACCOUNT_VAR: &str = "KUBERNETES_SERVICE_ACCOUNT_OVERWRITE";
const NODE_SELECTOR_PREFIX: &str = "KUBERNETES_NODE_SELECTOR_";
const LABELS_PREFIX: &str = "KUBERNETES_POD_LABELS_";
const ANNOTATIONS_PREFIX: &str = "KUBERNETES_POD_ANNOTATIONS_";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    CpuRequest,
    CpuLimit,
    MemoryRequest,
    MemoryLimit,
    EphemeralStorageRequest,
    EphemeralStorageLimit,
}

const FIELDS: [(Field, &str); 6] = [
    (Field::CpuRequest, "CPU_REQUEST"),
    (Field::CpuLimit, "CPU_LIMIT"),
    (Field::MemoryRequest, "MEMORY_REQUEST"),
    (Field::MemoryLimit, "MEMORY_LIMIT"),
    (Field::EphemeralStorageRequest, "EPHEMERAL_STORAGE_REQUEST"),
    (Field::EphemeralStorageLimit, "EPHEMERAL_STORAGE_LIMIT"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Build,
    Helper,
    Services,
}

impl Class {
    fn key(self) -> &'static str {
        match self {
            Self::Build => "build",
            Self::Helper => "helper",
            Self::Services => "services",
        }
    }
}

/// The maximum for one (class, field) and the settings key that holds it.
fn cap_of(settings: &Settings, class: Class, field: Field) -> (Option<Quantity>, String) {
    let r = match class {
        Class::Build => &settings.resources.build,
        Class::Helper => &settings.resources.helper,
        Class::Services => &settings.resources.services,
    };
    let (cap, name) = match field {
        Field::CpuRequest => (&r.cpu_request_overwrite_max_allowed, "cpu_request"),
        Field::CpuLimit => (&r.cpu_limit_overwrite_max_allowed, "cpu_limit"),
        Field::MemoryRequest => (&r.memory_request_overwrite_max_allowed, "memory_request"),
        Field::MemoryLimit => (&r.memory_limit_overwrite_max_allowed, "memory_limit"),
        Field::EphemeralStorageRequest => (
            &r.ephemeral_storage_request_overwrite_max_allowed,
            "ephemeral_storage_request",
        ),
        Field::EphemeralStorageLimit => (
            &r.ephemeral_storage_limit_overwrite_max_allowed,
            "ephemeral_storage_limit",
        ),
    };
    let key = format!("resources.{}.{name}_overwrite_max_allowed", class.key());
    if cap.is_some() || class != Class::Build {
        return (cap.clone(), key);
    }
    // The older per-resource maxima still bound the build container.
    let caps = &settings.resources.job_max;
    match field {
        Field::CpuRequest | Field::CpuLimit => (caps.cpu.clone(), "resources.job_max.cpu".into()),
        Field::MemoryRequest | Field::MemoryLimit => {
            (caps.memory.clone(), "resources.job_max.memory".into())
        }
        _ => (
            caps.ephemeral_storage.clone(),
            "resources.job_max.ephemeral_storage".into(),
        ),
    }
}

/// One resource override checked against its maximum: the value to use, if any.
fn resource_override(
    settings: &Settings,
    class: Class,
    field: Field,
    var: &str,
    value: &str,
    notes: &mut Vec<String>,
) -> Result<Option<Quantity>, JobError> {
    let refused = |reason: String| JobError::Refused {
        variable: var.into(),
        value: value.into(),
        reason,
    };
    // A malformed value is a mistake in the job, never silently dropped (the Kubernetes
    // executor fails the job as well).
    let q = Quantity::parse(value).map_err(|e| refused(e.to_string()))?;
    let (cap, key) = cap_of(settings, class, field);
    let Some(cap) = cap else {
        notes.push(format!(
            "WARNING: {var}={value} ignored: the operator allows no override ({key} is not set)"
        ));
        return Ok(None);
    };
    if q.exceeds(&cap) {
        return match settings.resources.overwrite_over_max {
            OverMax::Fail => Err(refused(format!("over the maximum {cap} ({key})"))),
            OverMax::Cap => {
                notes.push(format!(
                    "WARNING: {var}={value} is over the maximum {cap} ({key}); using {cap}"
                ));
                Ok(Some(cap))
            }
        };
    }
    notes.push(format!("Using {var}={value} (maximum {cap})"));
    Ok(Some(q))
}

/// Overrides of one class from `vars` (name → value): `prefixes` in increasing precedence.
fn class_overrides(
    settings: &Settings,
    class: Class,
    prefixes: &[&str],
    vars: &BTreeMap<String, String>,
    notes: &mut Vec<String>,
) -> Result<JobResources, JobError> {
    let mut out = JobResources::default();
    for prefix in prefixes {
        for (field, suffix) in FIELDS {
            let var = format!("{prefix}{suffix}");
            let Some(value) = vars.get(&var).filter(|v| !v.is_empty()) else {
                continue;
            };
            if let Some(q) = resource_override(settings, class, field, &var, value, notes)? {
                *out.slot(field) = Some(q);
            }
        }
    }
    Ok(out)
}

/// A request above its limit would make the API refuse the pod: the request is lowered to the
/// limit, with one warning (only when a job override is involved).
fn clamp_requests(
    base: &crate::settings::ResourceSettings,
    job: &mut JobResources,
    what: &str,
    notes: &mut Vec<String>,
) {
    for (req_field, lim_field, name) in [
        (Field::CpuRequest, Field::CpuLimit, "cpu"),
        (Field::MemoryRequest, Field::MemoryLimit, "memory"),
        (
            Field::EphemeralStorageRequest,
            Field::EphemeralStorageLimit,
            "ephemeral-storage",
        ),
    ] {
        let base_of = |f: Field| match f {
            Field::CpuRequest => base.cpu_request.clone(),
            Field::CpuLimit => base.cpu_limit.clone(),
            Field::MemoryRequest => base.memory_request.clone(),
            Field::MemoryLimit => base.memory_limit.clone(),
            Field::EphemeralStorageRequest => base.ephemeral_storage_request.clone(),
            Field::EphemeralStorageLimit => base.ephemeral_storage_limit.clone(),
        };
        let from_job = job.slot(req_field).is_some() || job.slot(lim_field).is_some();
        let req = job.slot(req_field).clone().or_else(|| base_of(req_field));
        let lim = job.slot(lim_field).clone().or_else(|| base_of(lim_field));
        if let (true, Some(req), Some(lim)) = (from_job, req, lim) {
            if req.exceeds(&lim) {
                notes.push(format!(
                    "WARNING: the {what} {name} request {req} is above its limit {lim}; using {lim} as the request"
                ));
                *job.slot(req_field) = Some(lim);
            }
        }
    }
}

/// Whether `s` is a qualified name (`[prefix/]name`) as label and annotation keys must be.
fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty() && p.len() <= 253 && p.split('.').all(crate::naming::is_dns1123_label)
    });
    prefix_ok
        && !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Keys the executor and the runner own: a job may not set them.
fn is_protected_key(key: &str) -> bool {
    key.starts_with("spotrun.dev/")
        || key == crate::naming::MANAGED_BY_KEY
        || key
            .split_once('/')
            .is_some_and(|(p, _)| p == "runner.gitlab.com" || p.ends_with(".runner.gitlab.com"))
}

/// `KEY=VALUE` overrides under `prefix`, each matched against the operator's regular expression.
fn map_overrides(
    env: &CustomEnv,
    prefix: &str,
    allowed: Option<&str>,
    allowed_key: &str,
    check: &dyn Fn(&str, &str) -> Result<(), String>,
    notes: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (var, value) in env.0.iter().filter(|(k, _)| k.starts_with(prefix)) {
        let Some(re) = allowed else {
            notes.push(format!(
                "WARNING: {var} ignored: the operator allows no override ({allowed_key} is not set)"
            ));
            continue;
        };
        // Validated at load time.
        let Ok(re) = regex::Regex::new(re) else {
            continue;
        };
        if !re.is_match(value) {
            notes.push(format!(
                "WARNING: {var}={value:?} refused: it does not match {allowed_key} ({re})"
            ));
            continue;
        }
        let Some((k, v)) = value.split_once('=') else {
            notes.push(format!(
                "WARNING: {var}={value:?} refused: expected KEY=VALUE"
            ));
            continue;
        };
        if let Err(why) = check(k, v) {
            notes.push(format!("WARNING: {var}={value:?} refused: {why}"));
            continue;
        }
        notes.push(format!("Using {var}={value}"));
        out.insert(k.to_string(), v.to_string());
    }
    out
}

/// A single-value override matched against the operator's regular expression.
fn value_override(
    env: &CustomEnv,
    var: &str,
    allowed: Option<&str>,
    allowed_key: &str,
    valid: &dyn Fn(&str) -> bool,
    notes: &mut Vec<String>,
) -> Option<String> {
    let value = env.get(var)?;
    let Some(re) = allowed else {
        notes.push(format!(
            "WARNING: {var} ignored: the operator allows no override ({allowed_key} is not set)"
        ));
        return None;
    };
    let re = regex::Regex::new(re).ok()?;
    if !re.is_match(value) {
        notes.push(format!(
            "WARNING: {var}={value:?} refused: it does not match {allowed_key} ({re})"
        ));
        return None;
    }
    if !valid(value) {
        notes.push(format!(
            "WARNING: {var}={value:?} refused: not a valid Kubernetes name"
        ));
        return None;
    }
    notes.push(format!("Using {var}={value}"));
    Some(value.to_string())
}

/// The namespace of the job's pod: the operator's, or an allowed `KUBERNETES_NAMESPACE_OVERWRITE`
/// (every subcommand computes it the same way; only `prepare` prints `notes`).
#[must_use]
pub fn namespace_overwrite(
    settings: &Settings,
    env: &CustomEnv,
    notes: &mut Vec<String>,
) -> Option<String> {
    value_override(
        env,
        NAMESPACE_VAR,
        settings.namespace_overwrite_allowed.as_deref(),
        "namespace_overwrite_allowed",
        &crate::naming::is_dns1123_label,
        notes,
    )
}

/// Validates every knob against the operator's caps. A malformed value or a refused `SPOTRUN_SPOT`
/// is a build failure; an override the operator does not allow is ignored with one warning, one
/// above its maximum is capped with one warning (or fails, with `overwrite_over_max = "fail"`).
pub fn job_knobs(
    settings: &Settings,
    env: &CustomEnv,
    job: &JobResponse,
) -> Result<JobKnobs, JobError> {
    let mut knobs = JobKnobs::default();
    if let Some(v) = env.get(SPOT_VAR) {
        let refused = |reason: String| JobError::Refused {
            variable: SPOT_VAR.into(),
            value: v.into(),
            reason,
        };
        let policy = SpotPolicy::parse(v)
            .ok_or_else(|| refused("expected require, prefer or never".into()))?;
        if !settings.spot.job_override_allowed.contains(&policy) {
            let allowed: Vec<&str> = settings
                .spot
                .job_override_allowed
                .iter()
                .map(|p| p.as_str())
                .collect();
            return Err(refused(format!(
                "the operator allows {} (spot.job_override_allowed)",
                if allowed.is_empty() {
                    "no override".to_string()
                } else {
                    allowed.join(", ")
                }
            )));
        }
        knobs.spot = Some(policy);
    }
    let notes = &mut knobs.notes;
    let vars = &env.0;
    // The older SPOTRUN_* names first: KUBERNETES_* (the Kubernetes executor's) win.
    knobs.resources = class_overrides(
        settings,
        Class::Build,
        &["SPOTRUN_", "KUBERNETES_"],
        vars,
        notes,
    )?;
    knobs.helper_resources = class_overrides(
        settings,
        Class::Helper,
        &["KUBERNETES_HELPER_"],
        vars,
        notes,
    )?;
    knobs.service_resources = class_overrides(
        settings,
        Class::Services,
        &["KUBERNETES_SERVICE_"],
        vars,
        notes,
    )?;
    clamp_requests(
        &settings.resources.build,
        &mut knobs.resources,
        "build container's",
        notes,
    );
    clamp_requests(
        &settings.resources.helper,
        &mut knobs.helper_resources,
        "helper container's",
        notes,
    );
    for (i, svc) in job.services.iter().enumerate() {
        let own: BTreeMap<String, String> =
            service_own_variables(job, env, i).into_iter().collect();
        let mut before = Vec::new();
        let mut r = class_overrides(
            settings,
            Class::Services,
            &["KUBERNETES_SERVICE_"],
            &own,
            &mut before,
        )?;
        // The job-wide values apply where the service sets none of its own.
        let mut job_wide = knobs.service_resources.clone();
        for (field, _) in FIELDS {
            if r.slot(field).is_none() {
                r.slot(field).clone_from(job_wide.slot(field));
            }
        }
        let label = if svc.alias.is_empty() {
            svc.name.clone()
        } else {
            svc.alias.clone()
        };
        clamp_requests(
            &settings.resources.services,
            &mut r,
            &format!("service {label}'s"),
            &mut before,
        );
        notes.extend(
            before
                .into_iter()
                .map(|n| match n.strip_prefix("WARNING: ") {
                    Some(rest) => format!("WARNING: service {label}: {rest}"),
                    None => format!("service {label}: {n}"),
                }),
        );
        knobs.per_service.push(r);
    }
    let pod = &settings.pod;
    knobs.node_selector = map_overrides(
        env,
        NODE_SELECTOR_PREFIX,
        pod.node_selector_overwrite_allowed.as_deref(),
        "pod.node_selector_overwrite_allowed",
        &|k, v| {
            if k == crate::plan::SPOT_LABEL {
                return Err(format!("{k} follows the spot policy (use {SPOT_VAR})"));
            }
            if !is_qualified_name(k) || !crate::naming::is_label_value(v) {
                return Err("not a valid label key and value".into());
            }
            Ok(())
        },
        notes,
    );
    knobs.labels = map_overrides(
        env,
        LABELS_PREFIX,
        pod.pod_labels_overwrite_allowed.as_deref(),
        "pod.pod_labels_overwrite_allowed",
        &|k, v| {
            if is_protected_key(k) {
                return Err(format!("{k} is set by the executor"));
            }
            if !is_qualified_name(k) || !crate::naming::is_label_value(v) {
                return Err("not a valid label key and value".into());
            }
            Ok(())
        },
        notes,
    );
    knobs.annotations = map_overrides(
        env,
        ANNOTATIONS_PREFIX,
        pod.pod_annotations_overwrite_allowed.as_deref(),
        "pod.pod_annotations_overwrite_allowed",
        &|k, _| {
            if is_protected_key(k) {
                return Err(format!("{k} is set by the executor"));
            }
            if !is_qualified_name(k) {
                return Err("not a valid annotation key".into());
            }
            Ok(())
        },
        notes,
    );
    knobs.service_account = value_override(
        env,
        SERVICE_ACCOUNT_VAR,
        pod.service_account_overwrite_allowed.as_deref(),
        "pod.service_account_overwrite_allowed",
        &|v| !v.is_empty() && v.len() <= 253 && v.split('.').all(crate::naming::is_dns1123_label),
        notes,
    );
    // The namespace was applied at start-up (every subcommand needs it); its note is printed here.
    let _ = namespace_overwrite(settings, env, notes);
    Ok(knobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../tests/fixtures/job-response.json");

    #[test]
    fn parses_the_runner_fixture() {
        let job = JobResponse::parse(FIXTURE, "fixture").unwrap();
        assert_eq!(job.id, 987_654);
        assert_eq!(job.job_info.name, "test:integration");
        assert_eq!(job.job_info.project_id, 4242);
        assert_eq!(job.job_info.pipeline_id, 55_555);
        assert_eq!(job.runner_info.timeout, 3600);
        assert_eq!(job.image.entrypoint, vec![String::new()]);
        assert_eq!(job.image.pull_policy, vec!["if-not-present".to_string()]);
        assert_eq!(job.services.len(), 2);
        assert_eq!(job.services[0].alias, "db");
        assert_eq!(job.services[0].variables.len(), 4);
        assert_eq!(job.credentials.len(), 2);
        assert_eq!(job.git_info.git_ref, "feature/spot-retry");
        assert_eq!(job.variable("CI_JOB_NAME"), Some("test:integration"));
    }

    /// `image: kubernetes: user` as GitLab sends it: a string or an integer; anything else
    /// (a name, a negative or fractional ID, another type) comes back as the value for a warning,
    /// and a payload with a malformed `executor_opts` still parses.
    #[test]
    fn kubernetes_user_from_the_payload() {
        let job = JobResponse::parse(FIXTURE, "fixture").unwrap();
        assert_eq!(
            job.image.kubernetes_user(),
            Ok(Some(KubernetesUser {
                uid: 1000,
                gid: Some(1000)
            }))
        );
        assert_eq!(job.services[0].kubernetes_user(), Ok(None));
        let user = |v: serde_json::Value| {
            let text = serde_json::json!({"id": 1, "image": {"name": "a", "executor_opts": v}});
            JobResponse::parse(&text.to_string(), "t")
                .unwrap()
                .image
                .kubernetes_user()
        };
        let some = |uid, gid| Ok(Some(KubernetesUser { uid, gid }));
        assert_eq!(
            user(serde_json::json!({"kubernetes": {"user": "1001"}})),
            some(1001, None)
        );
        assert_eq!(
            user(serde_json::json!({"kubernetes": {"user": 65534}})),
            some(65534, None)
        );
        assert_eq!(
            user(serde_json::json!({"kubernetes": {"user": " 0:0 "}})),
            some(0, Some(0))
        );
        assert_eq!(
            user(serde_json::json!({"kubernetes": {"user": ""}})),
            Ok(None)
        );
        assert_eq!(user(serde_json::json!({"kubernetes": {}})), Ok(None));
        assert_eq!(user(serde_json::json!(null)), Ok(None));
        assert_eq!(user(serde_json::json!("garbage")), Ok(None));
        for (bad, shown) in [
            (serde_json::json!("root"), "\"root\""),
            (serde_json::json!("node:node"), "\"node:node\""),
            (serde_json::json!("1000:"), "\"1000:\""),
            (serde_json::json!(":1000"), "\":1000\""),
            (serde_json::json!("-1"), "\"-1\""),
            (serde_json::json!("4294967295"), "\"4294967295\""),
            (serde_json::json!(-5), "-5"),
            (serde_json::json!(1.5), "1.5"),
            (serde_json::json!(true), "true"),
            (serde_json::json!({"uid": 1}), "{\"uid\":1}"),
        ] {
            assert_eq!(
                user(serde_json::json!({"kubernetes": {"user": bad}})),
                Err(shown.to_string())
            );
        }
    }

    #[test]
    fn malformed_payloads_are_named() {
        let e = JobResponse::parse("{not json", "/tmp/r.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/tmp/r.json"), "{e}");
        let e = JobResponse::parse("{}", "/tmp/r.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing job id"), "{e}");
        let e = JobResponse::from_file(Path::new("/nonexistent/r.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/r.json"), "{e}");
    }

    fn env(pairs: &[(&str, &str)]) -> CustomEnv {
        CustomEnv::from_vars(
            pairs
                .iter()
                .map(|(k, v)| (format!("CUSTOM_ENV_{k}"), (*v).to_string())),
        )
    }

    #[test]
    fn knobs_are_capped_and_named() {
        let job = JobResponse::default();
        let mut s = Settings::default();
        s.resources.job_max.cpu = Some(Quantity::parse("4").unwrap());
        let ok = job_knobs(
            &s,
            &env(&[("SPOTRUN_CPU_LIMIT", "3500m"), ("SPOTRUN_SPOT", "never")]),
            &job,
        )
        .unwrap();
        assert_eq!(ok.resources.cpu_limit.unwrap().as_str(), "3500m");
        assert_eq!(ok.spot, Some(SpotPolicy::Never));
        // Over the maximum: capped with one warning by default...
        let capped = job_knobs(&s, &env(&[("SPOTRUN_CPU_LIMIT", "5")]), &job).unwrap();
        assert_eq!(capped.resources.cpu_limit.unwrap().as_str(), "4");
        assert_eq!(
            capped.notes,
            ["WARNING: SPOTRUN_CPU_LIMIT=5 is over the maximum 4 (resources.job_max.cpu); using 4"]
        );
        // ... or a failure naming the variable and the maximum, if the operator says so.
        s.resources.overwrite_over_max = OverMax::Fail;
        let e = job_knobs(&s, &env(&[("SPOTRUN_CPU_LIMIT", "5")]), &job)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SPOTRUN_CPU_LIMIT") && e.contains("maximum 4"),
            "{e}"
        );
        // No maximum: ignored with one warning naming the setting.
        let ignored = job_knobs(&s, &env(&[("KUBERNETES_MEMORY_LIMIT", "1Gi")]), &job).unwrap();
        assert_eq!(ignored.resources.memory_limit, None);
        assert_eq!(
            ignored.notes,
            [
                "WARNING: KUBERNETES_MEMORY_LIMIT=1Gi ignored: the operator allows no override (resources.job_max.memory is not set)"
            ]
        );
        s.spot.job_override_allowed = vec![SpotPolicy::Never];
        let e = job_knobs(&s, &env(&[("SPOTRUN_SPOT", "require")]), &job)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SPOTRUN_SPOT") && e.contains("never"), "{e}");
    }

    #[test]
    fn kubernetes_executor_variables_per_container_class() {
        let mut s = Settings::default();
        let q = |t: &str| Some(Quantity::parse(t).unwrap());
        s.resources.build.memory_limit_overwrite_max_allowed = q("4Gi");
        s.resources.build.memory_request = q("2Gi");
        s.resources.helper.cpu_limit_overwrite_max_allowed = q("1");
        s.resources.services.memory_limit_overwrite_max_allowed = q("2Gi");
        let mut job = JobResponse::default();
        job.services.push(ImageSpec {
            name: "postgres:16".into(),
            alias: "db".into(),
            variables: vec![JobVariable {
                key: "KUBERNETES_SERVICE_MEMORY_LIMIT".into(),
                value: "1Gi".into(),
                ..JobVariable::default()
            }],
            ..ImageSpec::default()
        });
        job.services.push(ImageSpec {
            name: "redis:7".into(),
            ..ImageSpec::default()
        });
        let k = job_knobs(
            &s,
            &env(&[
                ("KUBERNETES_MEMORY_LIMIT", "1Gi"),
                ("KUBERNETES_HELPER_CPU_LIMIT", "500m"),
                ("KUBERNETES_SERVICE_MEMORY_LIMIT", "3Gi"),
            ]),
            &job,
        )
        .unwrap();
        assert_eq!(k.resources.memory_limit, q("1Gi"));
        // The operator's 2Gi request is above the job's 1Gi limit: lowered, with a warning.
        assert_eq!(k.resources.memory_request, q("1Gi"));
        assert_eq!(k.helper_resources.cpu_limit, q("500m"));
        assert_eq!(k.service_resources.memory_limit, q("2Gi"));
        assert_eq!(
            k.per_service[0].memory_limit,
            q("1Gi"),
            "its own value wins"
        );
        assert_eq!(
            k.per_service[1].memory_limit,
            q("2Gi"),
            "the job-wide value"
        );
        assert_eq!(
            k.notes,
            [
                "Using KUBERNETES_MEMORY_LIMIT=1Gi (maximum 4Gi)",
                "Using KUBERNETES_HELPER_CPU_LIMIT=500m (maximum 1)",
                "WARNING: KUBERNETES_SERVICE_MEMORY_LIMIT=3Gi is over the maximum 2Gi (resources.services.memory_limit_overwrite_max_allowed); using 2Gi",
                "WARNING: the build container's memory request 2Gi is above its limit 1Gi; using 1Gi as the request",
                "service db: Using KUBERNETES_SERVICE_MEMORY_LIMIT=1Gi (maximum 2Gi)",
            ]
        );
        // Malformed: a build failure naming the variable and what a quantity looks like.
        let e = job_knobs(&s, &env(&[("KUBERNETES_CPU_LIMIT", "abc")]), &job)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("KUBERNETES_CPU_LIMIT=\"abc\"") && e.contains("not a Kubernetes quantity"),
            "{e}"
        );
    }

    #[test]
    fn map_and_name_overrides_follow_the_operator_regexps() {
        let mut s = Settings::default();
        let job = JobResponse::default();
        let vars = [
            ("KUBERNETES_NODE_SELECTOR_ARCH", "kubernetes.io/arch=arm64"),
            ("KUBERNETES_NODE_SELECTOR_POOL", "pool=gpu"),
            (
                "KUBERNETES_NODE_SELECTOR_SPOT",
                "cloud.google.com/gke-spot=false",
            ),
            ("KUBERNETES_POD_LABELS_TEAM", "team=payments"),
            ("KUBERNETES_POD_LABELS_OURS", "spotrun.dev/pod=x"),
            ("KUBERNETES_POD_LABELS_BAD", "team"),
            (
                "KUBERNETES_POD_ANNOTATIONS_A",
                "example.com/owner=pay ments",
            ),
            ("KUBERNETES_SERVICE_ACCOUNT_OVERWRITE", "ci-deployer"),
            ("KUBERNETES_NAMESPACE_OVERWRITE", "ci-team-a"),
        ];
        // Nothing allowed: each ignored with one warning.
        let k = job_knobs(&s, &env(&vars), &job).unwrap();
        assert!(k.node_selector.is_empty() && k.labels.is_empty() && k.annotations.is_empty());
        assert_eq!(k.service_account, None);
        assert_eq!(k.notes.len(), vars.len(), "{:?}", k.notes);
        assert!(
            k.notes
                .iter()
                .all(|n| n.starts_with("WARNING: ") && n.contains("is not set"))
        );
        s.pod.node_selector_overwrite_allowed =
            Some("^(kubernetes.io/arch|cloud.google.com/gke-spot)=".into());
        s.pod.pod_labels_overwrite_allowed = Some(".*".into());
        s.pod.pod_annotations_overwrite_allowed = Some("^example.com/".into());
        s.pod.service_account_overwrite_allowed = Some("^ci-".into());
        s.namespace_overwrite_allowed = Some("^ci-team-".into());
        let k = job_knobs(&s, &env(&vars), &job).unwrap();
        assert_eq!(
            k.node_selector,
            BTreeMap::from([("kubernetes.io/arch".to_string(), "arm64".to_string())])
        );
        assert_eq!(
            k.labels,
            BTreeMap::from([("team".to_string(), "payments".to_string())])
        );
        assert_eq!(
            k.annotations.get("example.com/owner").map(String::as_str),
            Some("pay ments")
        );
        assert_eq!(k.service_account.as_deref(), Some("ci-deployer"));
        let warnings: Vec<&String> = k
            .notes
            .iter()
            .filter(|n| n.starts_with("WARNING"))
            .collect();
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        for (needle, why) in [
            (
                "KUBERNETES_NODE_SELECTOR_POOL",
                "does not match pod.node_selector_overwrite_allowed",
            ),
            ("KUBERNETES_NODE_SELECTOR_SPOT", "follows the spot policy"),
            ("KUBERNETES_POD_LABELS_OURS", "set by the executor"),
            ("KUBERNETES_POD_LABELS_BAD", "expected KEY=VALUE"),
        ] {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains(needle) && w.contains(why)),
                "{needle}: {warnings:?}"
            );
        }
        let mut notes = Vec::new();
        assert_eq!(
            namespace_overwrite(&s, &env(&vars), &mut notes).as_deref(),
            Some("ci-team-a")
        );
        assert_eq!(
            namespace_overwrite(
                &s,
                &env(&[("KUBERNETES_NAMESPACE_OVERWRITE", "kube-system")]),
                &mut notes
            ),
            None
        );
    }

    #[test]
    fn service_variables_come_expanded_from_ci_job_services_by_position() {
        let mut job = JobResponse::default();
        job.services.push(ImageSpec {
            name: "$CI_REGISTRY_IMAGE/db:1".into(),
            variables: vec![JobVariable {
                key: "DB".into(),
                value: "app-$CI_JOB_ID".into(),
                ..JobVariable::default()
            }],
            ..ImageSpec::default()
        });
        let services = r#"[{"name":"registry.example.com/g/p/db:1","alias":"","entrypoint":null,"command":null,"variables":{"DB":"app-7"}}]"#;
        let e = env(&[("CI_JOB_SERVICES", services)]);
        assert_eq!(
            service_own_variables(&job, &e, 0),
            [("DB".to_string(), "app-7".to_string())]
        );
        // No (or a different) list from the runner: the payload's values as written.
        assert_eq!(
            service_own_variables(&job, &env(&[]), 0),
            [("DB".to_string(), "app-$CI_JOB_ID".to_string())]
        );
        let two = format!("[{0},{0}]", &services[1..services.len() - 1]);
        assert_eq!(
            service_own_variables(&job, &env(&[("CI_JOB_SERVICES", &two)]), 0),
            [("DB".to_string(), "app-$CI_JOB_ID".to_string())]
        );
        assert!(service_own_variables(&job, &e, 1).is_empty());
    }

    #[test]
    fn identity_from_env() {
        let id = JobIdentity::from_env(&env(&[
            ("CI_JOB_ID", "12"),
            ("CI_RUNNER_SHORT_TOKEN", "AbC"),
            ("CI_CONCURRENT_ID", "1"),
        ]))
        .unwrap();
        assert_eq!(id.pod_name(), "spotrun-abc-c1-12");
        assert!(JobIdentity::from_env(&env(&[])).is_err());
    }
}
