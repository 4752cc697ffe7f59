//! Job payloads as GitLab sends them: a small builder that produces the runner's `spec.Job` JSON
//! (`response.json`) and the job variables the runner derives from it.

use serde_json::{Value, json};

/// One job variable, with the flags the runner keeps (`common/spec` `Variable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    pub key: String,
    pub value: String,
    pub public: bool,
    pub masked: bool,
    pub file: bool,
}

impl Variable {
    fn new(key: &str, value: &str) -> Self {
        Self {
            key: key.to_owned(),
            value: value.to_owned(),
            public: true,
            masked: false,
            file: false,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "key": self.key, "value": self.value, "public": self.public,
            "file": self.file, "masked": self.masked, "raw": false,
        })
    }
}

/// A `services:` entry of `.gitlab-ci.yml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub alias: String,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub variables: Vec<(String, String)>,
    /// `kubernetes: user` of the service's image (a string or an integer, as written).
    pub kubernetes_user: Option<Value>,
}

impl Service {
    #[must_use]
    pub fn new(image: &str, alias: &str) -> Self {
        Self {
            name: image.to_owned(),
            alias: alias.to_owned(),
            ..Self::default()
        }
    }

    #[must_use]
    pub fn entrypoint(mut self, argv: &[&str]) -> Self {
        self.entrypoint = Some(argv.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    #[must_use]
    pub fn command(mut self, argv: &[&str]) -> Self {
        self.command = Some(argv.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    #[must_use]
    pub fn variable(mut self, key: &str, value: &str) -> Self {
        self.variables.push((key.to_owned(), value.to_owned()));
        self
    }

    #[must_use]
    pub fn kubernetes_user(mut self, user: Value) -> Self {
        self.kubernetes_user = Some(user);
        self
    }

    fn to_payload(&self) -> Value {
        let mut v = json!({ "name": self.name });
        if !self.alias.is_empty() {
            v["alias"] = json!(self.alias);
        }
        if let Some(c) = &self.command {
            v["command"] = json!(c);
        }
        if let Some(e) = &self.entrypoint {
            v["entrypoint"] = json!(e);
        }
        if !self.variables.is_empty() {
            v["variables"] = Value::Array(
                self.variables
                    .iter()
                    .map(|(k, val)| {
                        json!({"key": k, "value": val, "public": false, "file": false, "masked": false, "raw": false})
                    })
                    .collect(),
            );
        }
        v["executor_opts"] = executor_opts(self.kubernetes_user.as_ref());
        v
    }

    /// The element of `CI_JOB_SERVICES`: Go's `json.Marshal` of name/alias/entrypoint/command/
    /// variables, in that field order; `variables` (a Go map, so sorted) omitted when empty.
    fn to_ci_job_services(&self, vars: &[Variable]) -> String {
        let mut out = format!(
            "{{\"name\":{},\"alias\":{},\"entrypoint\":{},\"command\":{}",
            json!(self.name),
            json!(self.alias),
            json!(self.entrypoint),
            json!(self.command)
        );
        if !self.variables.is_empty() {
            let map: serde_json::Map<String, Value> = self
                .variables
                .iter()
                .map(|(k, val)| (k.clone(), json!(expand(val, vars))))
                .collect();
            out.push_str(&format!(",\"variables\":{}", Value::Object(map)));
        }
        out.push('}');
        out
    }
}

/// An image's `executor_opts` as GitLab sends them: `kubernetes: user` when the job sets one,
/// else empty strings.
fn executor_opts(kubernetes_user: Option<&Value>) -> Value {
    json!({
        "docker": {"platform": "", "user": ""},
        "kubernetes": {"user": kubernetes_user.cloned().unwrap_or_else(|| json!(""))},
    })
}

/// `$NAME` and `${NAME}` expanded from `vars` (the last definition wins; unknown names expand to
/// nothing), as the runner's `ExpandValue` (Go's `os.Expand`) does for `CI_JOB_SERVICES` values.
#[must_use]
pub fn expand(value: &str, vars: &[Variable]) -> String {
    let lookup = |name: &str| {
        vars.iter()
            .rev()
            .find(|v| v.key == name)
            .map(|v| v.value.clone())
            .unwrap_or_default()
    };
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut rest = value;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(inner) = after.strip_prefix('{')
            && let Some(end) = inner.find('}')
        {
            out.push_str(&lookup(&inner[..end]));
            rest = &inner[end + 1..];
        } else {
            let len = after.find(|c: char| !is_name(c)).unwrap_or(after.len());
            if len == 0 {
                out.push('$');
            } else {
                out.push_str(&lookup(&after[..len]));
            }
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    out
}

/// A `cache:` entry: what the runner turns into `restore_cache` / `archive_cache` stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    pub key: String,
    pub paths: Vec<String>,
    pub policy: String,
}

/// A complete job, ready to be handed to [`crate::harness::Runner`].
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub id: u64,
    pub token: String,
    pub name: String,
    pub stage: String,
    pub project_id: u64,
    pub project_path: String,
    pub pipeline_id: u64,
    pub image: String,
    pub image_entrypoint: Option<Vec<String>>,
    /// `image: pull_policy:` (empty: not sent).
    pub image_pull_policy: Vec<String>,
    /// `image: kubernetes: user:` (a string or an integer, as written; `None`: not set).
    pub image_user: Option<Value>,
    pub services: Vec<Service>,
    pub variables: Vec<Variable>,
    pub script: Vec<String>,
    pub after_script: Vec<String>,
    /// Extra `step_<name>` steps, run after `build_script` in order.
    pub extra_steps: Vec<(String, Vec<String>)>,
    pub timeout_secs: u64,
    pub cache: Vec<CacheSpec>,
    pub runner_token: String,
    pub concurrent_id: u32,
    /// A `file://` git repository the job's `get_sources` fetches, if any.
    pub repo_url: Option<String>,
    pub git_sha: String,
    pub git_ref: String,
    /// Stage scripts handed over verbatim instead of the ones the runner would write: for job
    /// images whose shell cannot run the runner's bash scripts (dash has no `$'...'`), where a
    /// test drives a stage with a POSIX script of its own.
    pub raw_scripts: Vec<(String, String)>,
}

/// Builds [`JobSpec`]s with the shape of a real job (project 4242, pipeline 55555 by default).
#[derive(Debug, Clone)]
pub struct JobBuilder {
    spec: JobSpec,
}

impl JobBuilder {
    #[must_use]
    pub fn new(job_id: u64) -> Self {
        Self {
            spec: JobSpec {
                id: job_id,
                token: format!("glcbt-64_harness{job_id}secret"),
                name: "test".to_owned(),
                stage: "test".to_owned(),
                project_id: 4242,
                project_path: "acme/platform/inventory-service".to_owned(),
                pipeline_id: 55555,
                image: "alpine:3.20".to_owned(),
                image_entrypoint: None,
                image_pull_policy: Vec::new(),
                image_user: None,
                services: Vec::new(),
                variables: Vec::new(),
                script: vec!["echo hello".to_owned()],
                after_script: Vec::new(),
                extra_steps: Vec::new(),
                timeout_secs: 3600,
                cache: Vec::new(),
                runner_token: "glrt-t1_AbCdEf123456789xyz".to_owned(),
                concurrent_id: 0,
                repo_url: None,
                git_sha: "9f1c2e7b4a6d8c0e3f5a7b9d1c3e5f7a9b2d4c6e".to_owned(),
                git_ref: "main".to_owned(),
                raw_scripts: Vec::new(),
            },
        }
    }

    #[must_use]
    pub fn name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.spec.name);
        self
    }

    #[must_use]
    pub fn project(mut self, id: u64, path: &str) -> Self {
        self.spec.project_id = id;
        path.clone_into(&mut self.spec.project_path);
        self
    }

    #[must_use]
    pub fn pipeline(mut self, id: u64) -> Self {
        self.spec.pipeline_id = id;
        self
    }

    #[must_use]
    pub fn image(mut self, image: &str) -> Self {
        image.clone_into(&mut self.spec.image);
        self
    }

    #[must_use]
    pub fn image_pull_policy(mut self, policies: &[&str]) -> Self {
        self.spec.image_pull_policy = policies.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// `image: kubernetes: user:` (`json!("1000:1000")`, `json!(1000)`, ...).
    #[must_use]
    pub fn image_user(mut self, user: Value) -> Self {
        self.spec.image_user = Some(user);
        self
    }

    #[must_use]
    pub fn image_entrypoint(mut self, argv: &[&str]) -> Self {
        self.spec.image_entrypoint = Some(argv.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    #[must_use]
    pub fn service(mut self, service: Service) -> Self {
        self.spec.services.push(service);
        self
    }

    #[must_use]
    pub fn variable(mut self, key: &str, value: &str) -> Self {
        self.spec.variables.push(Variable::new(key, value));
        self
    }

    /// A masked, non-public variable (its value must never show up in executor logs).
    #[must_use]
    pub fn masked_variable(mut self, key: &str, value: &str) -> Self {
        let mut v = Variable::new(key, value);
        v.masked = true;
        v.public = false;
        self.spec.variables.push(v);
        self
    }

    /// A file-type variable: the scripts write its content to a file and export the path.
    #[must_use]
    pub fn file_variable(mut self, key: &str, value: &str) -> Self {
        let mut v = Variable::new(key, value);
        v.file = true;
        self.spec.variables.push(v);
        self
    }

    #[must_use]
    pub fn script(mut self, lines: &[&str]) -> Self {
        self.spec.script = lines.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    #[must_use]
    pub fn after_script(mut self, lines: &[&str]) -> Self {
        self.spec.after_script = lines.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    #[must_use]
    pub fn step(mut self, name: &str, lines: &[&str]) -> Self {
        self.spec.extra_steps.push((
            name.to_owned(),
            lines.iter().map(|s| (*s).to_owned()).collect(),
        ));
        self
    }

    #[must_use]
    pub fn timeout(mut self, secs: u64) -> Self {
        self.spec.timeout_secs = secs;
        self
    }

    #[must_use]
    pub fn cache(mut self, key: &str, paths: &[&str]) -> Self {
        self.spec.cache.push(CacheSpec {
            key: key.to_owned(),
            paths: paths.iter().map(|s| (*s).to_owned()).collect(),
            policy: "pull-push".to_owned(),
        });
        self
    }

    #[must_use]
    pub fn concurrent_id(mut self, id: u32) -> Self {
        self.spec.concurrent_id = id;
        self
    }

    /// Fetch sources from this git URL (e.g. `file:///tmp/x/repo.git`) at `sha` on `git_ref`.
    #[must_use]
    pub fn repo(mut self, url: &str, git_ref: &str, sha: &str) -> Self {
        self.spec.repo_url = Some(url.to_owned());
        git_ref.clone_into(&mut self.spec.git_ref);
        sha.clone_into(&mut self.spec.git_sha);
        self
    }

    /// Hands `script` verbatim to `run_exec` for `stage` (see [`JobSpec::raw_scripts`]).
    #[must_use]
    pub fn raw_stage_script(mut self, stage: &str, script: &str) -> Self {
        self.spec
            .raw_scripts
            .push((stage.to_owned(), script.to_owned()));
        self
    }

    #[must_use]
    pub fn build(self) -> JobSpec {
        self.spec
    }
}

impl JobSpec {
    /// `CI_RUNNER_SHORT_TOKEN`: the first 9 characters after the `glrt-` and `t1_` prefixes.
    #[must_use]
    pub fn runner_short_token(&self) -> String {
        let t = self.runner_token.trim_start_matches("glrt-");
        let t = t.strip_prefix("t1_").unwrap_or(t);
        t.chars().take(9).collect()
    }

    #[must_use]
    pub fn project_dir(&self, builds_dir: &str) -> String {
        format!("{}/{}", builds_dir.trim_end_matches('/'), self.project_path)
    }

    /// The `response.json` content: the runner's `spec.Job`, top-level keys in Go struct order.
    #[must_use]
    pub fn response_json(&self) -> String {
        let mut steps = vec![json!({
            "name": "script", "script": self.script, "timeout": self.timeout_secs,
            "when": "on_success", "allow_failure": false,
        })];
        for (name, lines) in &self.extra_steps {
            steps.push(
                json!({"name": name, "script": lines, "timeout": self.timeout_secs,
                "when": "on_success", "allow_failure": false}),
            );
        }
        if !self.after_script.is_empty() {
            steps.push(json!({"name": "after_script", "script": self.after_script,
                "timeout": self.timeout_secs, "when": "always", "allow_failure": true}));
        }
        let mut image = json!({ "name": self.image });
        if let Some(e) = &self.image_entrypoint {
            image["entrypoint"] = json!(e);
        }
        if !self.image_pull_policy.is_empty() {
            image["pull_policy"] = json!(self.image_pull_policy);
        }
        image["executor_opts"] = executor_opts(self.image_user.as_ref());
        let project_name = self.project_path.rsplit('/').next().unwrap_or("project");
        // serde_json keeps insertion order only with `preserve_order`; build the text by hand so the
        // top-level key order matches Go's encoder like the real file.
        let parts: Vec<(&str, Value)> = vec![
            ("id", json!(self.id)),
            ("token", json!(self.token)),
            ("allow_git_fetch", json!(true)),
            (
                "job_info",
                json!({"name": self.name, "stage": self.stage, "pipeline_id": self.pipeline_id,
                "project_id": self.project_id, "project_name": project_name,
                "project_full_path": self.project_path}),
            ),
            (
                "git_info",
                json!({"repo_url": self.repo_url.clone().unwrap_or_default(),
                "repo_object_format": "sha1", "ref": self.git_ref, "sha": self.git_sha,
                "before_sha": "0000000000000000000000000000000000000000", "ref_type": "branch",
                "refspecs": [], "depth": 20, "protected": false}),
            ),
            (
                "runner_info",
                json!({"uuid": "494e8bf8-efe1-4573-9a83-97cb573560dc", "timeout": self.timeout_secs}),
            ),
            ("inputs", json!({})),
            (
                "variables",
                Value::Array(
                    self.payload_variables()
                        .iter()
                        .map(Variable::to_json)
                        .collect(),
                ),
            ),
            ("steps", Value::Array(steps)),
            ("image", image),
            (
                "services",
                Value::Array(self.services.iter().map(Service::to_payload).collect()),
            ),
            ("artifacts", json!(null)),
            (
                "cache",
                Value::Array(
                    self.cache
                        .iter()
                        .map(|c| {
                            json!({"key": c.key, "untracked": false, "policy": c.policy,
                            "paths": c.paths, "when": "on_success", "fallback_keys": []})
                        })
                        .collect(),
                ),
            ),
            (
                "credentials",
                json!([{"type": "registry", "url": "registry.example.com",
                "username": "gitlab-ci-token", "password": self.token}]),
            ),
            ("dependencies", json!([])),
            (
                "features",
                json!({"trace_sections": true, "token_mask_prefixes": null, "failure_reasons": null, "tracing": null}),
            ),
            (
                "policy_options",
                json!({"execution_policy_job": false, "policy_name": ""}),
            ),
            ("suspend_options", json!({})),
        ];
        let body: Vec<String> = parts
            .into_iter()
            .map(|(k, v)| format!("{}:{}", json!(k), v))
            .collect();
        format!("{{{}}}\n", body.join(","))
    }

    /// Variables as GitLab sends them in the payload (predefined first, then the job's own).
    #[must_use]
    pub fn payload_variables(&self) -> Vec<Variable> {
        let project_name = self.project_path.rsplit('/').next().unwrap_or("project");
        let namespace = self.project_path.rsplit_once('/').map_or("", |(ns, _)| ns);
        let mut token = Variable::new("CI_JOB_TOKEN", &self.token);
        token.masked = true;
        token.public = false;
        let mut registry_password = Variable::new("CI_REGISTRY_PASSWORD", &self.token);
        registry_password.masked = true;
        registry_password.public = false;
        let mut vars = vec![
            Variable::new("CI_JOB_ID", &self.id.to_string()),
            Variable::new("CI_JOB_NAME", &self.name),
            Variable::new("CI_JOB_STAGE", &self.stage),
            token,
            Variable::new("CI_SERVER_URL", "https://gitlab.example.com"),
            Variable::new("CI_PROJECT_ID", &self.project_id.to_string()),
            Variable::new("CI_PROJECT_NAME", project_name),
            Variable::new("CI_PROJECT_NAMESPACE", namespace),
            Variable::new("CI_PROJECT_PATH", &self.project_path),
            Variable::new("CI_REGISTRY", "registry.example.com"),
            Variable::new("CI_REGISTRY_USER", "gitlab-ci-token"),
            registry_password,
            Variable::new("CI_PIPELINE_ID", &self.pipeline_id.to_string()),
            Variable::new("CI_COMMIT_SHA", &self.git_sha),
            Variable::new(
                "CI_COMMIT_SHORT_SHA",
                &self.git_sha[..8.min(self.git_sha.len())],
            ),
            Variable::new("CI_COMMIT_REF_NAME", &self.git_ref),
            Variable::new("CI_RUNNER_ID", "77"),
        ];
        vars.extend(self.variables.iter().cloned());
        vars
    }

    /// All job variables the runner exposes (payload + runner-added), in the runner's order,
    /// for `CUSTOM_ENV_*` and for the exports in the generated scripts.
    #[must_use]
    pub fn all_variables(&self, builds_dir: &str, status: &str) -> Vec<Variable> {
        let mut vars = vec![
            Variable::new("CI_JOB_IMAGE", &self.image),
            Variable::new("CI_RUNNER_SHORT_TOKEN", &self.runner_short_token()),
            Variable::new("CI_BUILDS_DIR", builds_dir),
            Variable::new("CI_PROJECT_DIR", &self.project_dir(builds_dir)),
            Variable::new("CI_CONCURRENT_ID", &self.concurrent_id.to_string()),
            Variable::new("CI_CONCURRENT_PROJECT_ID", &self.concurrent_id.to_string()),
            Variable::new("CI_SERVER", "yes"),
            Variable::new("CI_JOB_STATUS", status),
            Variable::new("CI_JOB_TIMEOUT", &self.timeout_secs.to_string()),
        ];
        vars.extend(self.payload_variables());
        vars.push(Variable::new("CI_SHARED_ENVIRONMENT", "true"));
        vars.push(Variable::new("CI_RUNNER_VERSION", "19.4.0"));
        vars.push(Variable::new("CI_RUNNER_REVISION", "d79f3e7b"));
        vars.push(Variable::new("CI_RUNNER_EXECUTABLE_ARCH", "linux/amd64"));
        vars.push(Variable::new(
            "RUNNER_TEMP_PROJECT_DIR",
            &format!("{}.tmp", self.project_dir(builds_dir)),
        ));
        vars
    }

    /// `CI_JOB_SERVICES`: empty with no services, else the runner's JSON array.
    #[must_use]
    pub fn ci_job_services(&self, vars: &[Variable]) -> String {
        if self.services.is_empty() {
            return String::new();
        }
        let items: Vec<String> = self
            .services
            .iter()
            .map(|s| s.to_ci_job_services(vars))
            .collect();
        format!("[{}]", items.join(","))
    }

    /// Values that gitlab-runner would mask in the job log.
    #[must_use]
    pub fn masked_values(&self) -> Vec<String> {
        self.payload_variables()
            .into_iter()
            .filter(|v| v.masked)
            .map(|v| v.value)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_token_strips_prefixes() {
        let job = JobBuilder::new(1).build();
        assert_eq!(job.runner_short_token(), "AbCdEf123");
    }

    #[test]
    fn response_json_has_go_key_order_and_services() {
        let job = JobBuilder::new(7)
            .service(Service::new("redis:7", "cache").command(&["--save", ""]))
            .build();
        let text = job.response_json();
        assert!(text.starts_with("{\"id\":7,\"token\":"));
        assert!(text.ends_with("}\n"));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["services"][0]["alias"], "cache");
        assert_eq!(v["services"][0]["command"], json!(["--save", ""]));
        let order = [
            ",\"allow_git_fetch\":",
            ",\"job_info\":",
            ",\"git_info\":",
            ",\"runner_info\":",
            ",\"variables\":",
            ",\"steps\":",
            ",\"image\":",
            ",\"services\":",
            ",\"cache\":",
            ",\"credentials\":",
            ",\"features\":",
        ];
        let positions: Vec<usize> = order.iter().map(|k| text.find(k).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    }

    #[test]
    fn ci_job_services_matches_runner_shape() {
        let job = JobBuilder::new(1)
            .service(
                Service::new("postgres:16", "db")
                    .variable("POSTGRES_DB", "x")
                    .variable("POSTGRES_USER", "u-$CI_JOB_ID-${CI_JOB_ID}-$NOPE."),
            )
            .build();
        let vars = job.all_variables("/builds", "running");
        assert_eq!(
            job.ci_job_services(&vars),
            r#"[{"name":"postgres:16","alias":"db","entrypoint":null,"command":null,"variables":{"POSTGRES_DB":"x","POSTGRES_USER":"u-1-1-."}}]"#
        );
        assert_eq!(JobBuilder::new(2).build().ci_job_services(&vars), "");
    }
}
