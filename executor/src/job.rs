//! The job as the runner hands it over: `JOB_RESPONSE_FILE` (spec.Job JSON) plus the untrusted
//! `CUSTOM_ENV_*` knobs, each checked against an operator cap or allow-list.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::quantity::Quantity;
use crate::settings::{Settings, SpotPolicy};

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
    name: String,
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
    if let Some(entries) = expanded.filter(|e| e.len() == job.services.len()) {
        if let Some(e) = entries.get(index).filter(|e| e.name == svc.name) {
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

/// The job knobs after validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobKnobs {
    pub spot: Option<SpotPolicy>,
    pub resources: JobResources,
}

/// Job variable names for the knobs (read from `CUSTOM_ENV_<name>`).
pub const SPOT_VAR: &str = "SPOTRUN_SPOT";
const RESOURCE_VARS: [&str; 6] = [
    "SPOTRUN_CPU_REQUEST",
    "SPOTRUN_CPU_LIMIT",
    "SPOTRUN_MEMORY_REQUEST",
    "SPOTRUN_MEMORY_LIMIT",
    "SPOTRUN_EPHEMERAL_STORAGE_REQUEST",
    "SPOTRUN_EPHEMERAL_STORAGE_LIMIT",
];

/// Validates every knob against the operator's caps; the first violation is a build failure.
pub fn job_knobs(settings: &Settings, env: &CustomEnv) -> Result<JobKnobs, JobError> {
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
    let caps = &settings.resources.job_max;
    for var in RESOURCE_VARS {
        let Some(v) = env.get(var) else { continue };
        let (cap, cap_key) = if var.contains("_CPU_") {
            (&caps.cpu, "resources.job_max.cpu")
        } else if var.contains("_MEMORY_") {
            (&caps.memory, "resources.job_max.memory")
        } else {
            (
                &caps.ephemeral_storage,
                "resources.job_max.ephemeral_storage",
            )
        };
        let refused = |reason: String| JobError::Refused {
            variable: var.into(),
            value: v.into(),
            reason,
        };
        let q = Quantity::parse(v).map_err(|e| refused(e.to_string()))?;
        let Some(cap) = cap else {
            return Err(refused(format!(
                "the operator set no maximum ({cap_key}), so it cannot be overridden"
            )));
        };
        if q.exceeds(cap) {
            return Err(refused(format!("over the maximum {cap} ({cap_key})")));
        }
        let r = &mut knobs.resources;
        let slot = match var {
            "SPOTRUN_CPU_REQUEST" => &mut r.cpu_request,
            "SPOTRUN_CPU_LIMIT" => &mut r.cpu_limit,
            "SPOTRUN_MEMORY_REQUEST" => &mut r.memory_request,
            "SPOTRUN_MEMORY_LIMIT" => &mut r.memory_limit,
            "SPOTRUN_EPHEMERAL_STORAGE_REQUEST" => &mut r.ephemeral_storage_request,
            _ => &mut r.ephemeral_storage_limit,
        };
        *slot = Some(q);
    }
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
        let mut s = Settings::default();
        s.resources.job_max.cpu = Some(Quantity::parse("4").unwrap());
        let ok = job_knobs(
            &s,
            &env(&[("SPOTRUN_CPU_LIMIT", "3500m"), ("SPOTRUN_SPOT", "never")]),
        )
        .unwrap();
        assert_eq!(ok.resources.cpu_limit.unwrap().as_str(), "3500m");
        assert_eq!(ok.spot, Some(SpotPolicy::Never));
        let e = job_knobs(&s, &env(&[("SPOTRUN_CPU_LIMIT", "5")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SPOTRUN_CPU_LIMIT") && e.contains("maximum 4"),
            "{e}"
        );
        let e = job_knobs(&s, &env(&[("SPOTRUN_MEMORY_LIMIT", "1Gi")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SPOTRUN_MEMORY_LIMIT") && e.contains("resources.job_max.memory"),
            "{e}"
        );
        s.spot.job_override_allowed = vec![SpotPolicy::Never];
        let e = job_knobs(&s, &env(&[("SPOTRUN_SPOT", "require")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SPOTRUN_SPOT") && e.contains("never"), "{e}");
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
