//! The Helm chart (helm/spotrun): lint, render and schema-validate every CI values file, check the
//! executor Role against the committed verb list, and parse the rendered TOML configs.
//!
//! Needs `helm` (v4), `helm3` (v3.18) and `kubernetes-validate` on PATH (`.ci/install` prints the PATH);
//! a missing tool fails the tests with a message saying so.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::thread;

use serde::Deserialize as _;
use serde_yaml::Value;

const RELEASE: &str = "spotrun";
const NAMESPACE: &str = "ci";
const KUBE_VERSIONS: [&str; 2] = ["1.33.0", "1.34.0"];
/// CRD kinds kubernetes-validate has no schema for; rendered only in the everything case.
const CRD_API_VERSIONS: &str = "monitoring.coreos.com/v1/ServiceMonitor";

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo_root().join("helm/spotrun")
}

/// Finds a program on PATH, or fails the test saying how to get it.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not on PATH: the Helm chart tests need helm and kubernetes-validate; \
         run `eval \"$(bash .ci/install)\"` (it installs both and prints the PATH)"
    );
}

/// Isolated Helm homes so the tests never read or write the user's Helm config.
fn helm_home() -> &'static Path {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| tempfile::tempdir().expect("helm home tempdir"))
        .path()
}

fn helm(args: &[&str]) -> Output {
    helm_bin("helm", args)
}

/// Runs `helm` (v4) or `helm3` (v3.18) with isolated homes.
fn helm_bin(bin: &str, args: &[&str]) -> Output {
    let home = helm_home();
    Command::new(tool(bin))
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("run helm")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The values files CI renders: helm/spotrun/ci/*.yaml.
fn ci_values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("helm/spotrun/ci exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// `helm template` with extra arguments; panics with helm's stderr on failure.
pub(crate) fn render(extra: &[&str]) -> String {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
    ];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn render_file(values: &Path) -> String {
    render(&[
        "-f",
        values.to_str().unwrap(),
        "--api-versions",
        CRD_API_VERSIONS,
    ])
}

/// Every non-empty document of a multi-document YAML stream.
pub(crate) fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

fn find<'a>(docs: &'a [Value], k: &str, suffix: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| kind(d) == k && name(d).ends_with(suffix))
}

/// Runs closures on threads and returns their results in order (helm and kubernetes-validate are
/// separate processes, so this is what makes the suite fast).
fn parallel<T: Send + 'static>(jobs: Vec<Box<dyn FnOnce() -> T + Send>>) -> Vec<T> {
    let handles: Vec<_> = jobs.into_iter().map(thread::spawn).collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("worker thread panicked"))
        .collect()
}

#[test]
fn ci_values_files_cover_the_four_cases() {
    let names: BTreeSet<String> = ci_values_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "defaults-values.yaml",
        "minio-values.yaml",
        "gcs-values.yaml",
        "everything-values.yaml",
    ] {
        assert!(
            names.contains(want),
            "helm/spotrun/ci/{want} missing: {names:?}"
        );
    }
}

#[test]
fn lint_strict_passes_for_every_ci_values_file() {
    let jobs: Vec<Box<dyn FnOnce() -> (PathBuf, Output) + Send>> = ci_values_files()
        .into_iter()
        .map(|f| {
            Box::new(move || {
                let chart = chart_dir();
                let out = helm(&[
                    "lint",
                    "--strict",
                    chart.to_str().unwrap(),
                    "-f",
                    f.to_str().unwrap(),
                ]);
                (f, out)
            }) as Box<dyn FnOnce() -> _ + Send>
        })
        .collect();
    for (file, out) in parallel(jobs) {
        let stdout = text(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("0 chart(s) failed"),
            "helm lint --strict -f {}:\n{stdout}\n{}",
            file.display(),
            text(&out.stderr)
        );
        assert!(
            !stdout.contains("[WARNING]") && !stdout.contains("[ERROR]"),
            "lint findings for {}:\n{stdout}",
            file.display()
        );
    }
}

#[test]
fn rendered_manifests_pass_kubernetes_validate_strict_for_1_33_and_1_34() {
    let validator = tool("kubernetes-validate");
    let dir = tempfile::tempdir().unwrap();
    let mut rendered = Vec::new();
    for f in ci_values_files() {
        let yaml = render_file(&f);
        let docs = documents(&yaml);
        assert!(
            docs.len() >= 10,
            "{}: only {} objects rendered",
            f.display(),
            docs.len()
        );
        let out = dir
            .path()
            .join(f.file_name().unwrap())
            .with_extension("rendered.yaml");
        std::fs::write(&out, &yaml).unwrap();
        rendered.push((f, out, docs.len()));
    }
    let mut jobs: Vec<Box<dyn FnOnce() -> (String, Output) + Send>> = Vec::new();
    for (values, file, _) in &rendered {
        for version in KUBE_VERSIONS {
            let validator = validator.clone();
            let file = file.clone();
            let label = format!("{} @ {version}", values.display());
            jobs.push(Box::new(move || {
                let out = Command::new(&validator)
                    .args(["-k", version, "--strict"])
                    .arg(&file)
                    .output()
                    .expect("run kubernetes-validate");
                (label, out)
            }));
        }
    }
    for (label, out) in parallel(jobs) {
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "kubernetes-validate {label}:\n{all}");
        for line in all.lines().filter(|l| !l.trim().is_empty()) {
            let benign_crd = line.starts_with("WARN")
                && (line.contains("Couldn't find schema for kind ServiceMonitor")
                    || line.contains("Couldn't find schema for kind Certificate"));
            assert!(
                line.starts_with("INFO") && line.contains(" passed ") || benign_crd,
                "kubernetes-validate {label}: unexpected line {line:?}\n{all}"
            );
        }
    }
}

/// (verb, resource[/subresource]) pairs of the committed list; comments and blank lines ignored.
fn committed_rules(text: &str) -> BTreeSet<(String, String)> {
    let mut set = BTreeSet::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 2, "bad rules line {line:?}");
        assert!(
            set.insert((fields[0].to_owned(), fields[1].to_owned())),
            "duplicate rules line {line:?}"
        );
    }
    set
}

/// The (verb, resource) pairs a rendered `Role` or `ClusterRole` grants, refusing wildcards and names.
fn granted(role: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for rule in role["rules"].as_sequence().expect("rules is a list") {
        assert!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "unexpected rule shape {rule:?}"
        );
        let groups: Vec<&str> = rule["apiGroups"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|g| g.as_str().unwrap())
            .collect();
        for res in rule["resources"].as_sequence().unwrap() {
            let res = res.as_str().unwrap();
            for verb in rule["verbs"].as_sequence().unwrap() {
                let verb = verb.as_str().unwrap();
                assert!(
                    !verb.contains('*') && !res.contains('*'),
                    "wildcard in {rule:?}"
                );
                for g in &groups {
                    assert!(!g.contains('*'), "wildcard group in {rule:?}");
                    let (base, sub) = res
                        .split_once('/')
                        .map_or((res, None), |(b, s)| (b, Some(s)));
                    let qualified = if g.is_empty() {
                        base.to_owned()
                    } else {
                        format!("{base}.{g}")
                    };
                    let full = sub.map_or(qualified.clone(), |s| format!("{qualified}/{s}"));
                    out.push((verb.to_owned(), full));
                }
            }
        }
    }
    out
}

#[test]
fn executor_role_grants_exactly_the_committed_verb_list() {
    let list = std::fs::read_to_string(chart_dir().join("files/executor-rbac-rules.txt"))
        .expect("helm/spotrun/files/executor-rbac-rules.txt");
    let want = committed_rules(&list);
    assert!(!want.is_empty());

    let docs = documents(&render(&[]));
    let role = find(&docs, "Role", "-executor").expect("executor Role rendered");
    assert_eq!(role["metadata"]["namespace"].as_str(), Some(NAMESPACE));
    let cluster =
        find(&docs, "ClusterRole", "-executor-nodes").expect("nodes ClusterRole rendered");

    let mut got = granted(role);
    let cluster_got = granted(cluster);
    for (verb, res) in &cluster_got {
        assert!(
            res.starts_with("nodes") && ["get", "list", "watch"].contains(&verb.as_str()),
            "the ClusterRole must stay read-only on nodes, got {verb} {res}"
        );
        assert!(
            !got.iter().any(|(_, r)| r == res),
            "{res} is in both the Role and the ClusterRole"
        );
    }
    got.extend(cluster_got);
    let got_set: BTreeSet<_> = got.iter().cloned().collect();
    assert_eq!(got.len(), got_set.len(), "duplicate grants: {got:?}");
    let missing: Vec<_> = want.difference(&got_set).collect();
    let extra: Vec<_> = got_set.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "Role/ClusterRole differ from the committed list: missing {missing:?}, extra {extra:?}"
    );

    // Both bindings name the manager's and the gc's ServiceAccounts, and nothing else.
    for (k, suffix) in [
        ("RoleBinding", "-executor"),
        ("ClusterRoleBinding", "-executor-nodes"),
    ] {
        let binding = find(&docs, k, suffix).unwrap_or_else(|| panic!("{k} rendered"));
        let subjects: BTreeSet<&str> = binding["subjects"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            subjects,
            BTreeSet::from(["spotrun-manager", "spotrun-gc"]),
            "{k} subjects"
        );
    }

    // The chart's copy must equal the executor's audit-derived list (executor/rbac-verbs.txt).
    let theirs = std::fs::read_to_string(repo_root().join("executor/rbac-verbs.txt"))
        .expect("executor/rbac-verbs.txt");
    assert_eq!(
        committed_rules(&theirs),
        want,
        "helm/spotrun/files/executor-rbac-rules.txt differs from executor/rbac-verbs.txt"
    );
}

#[test]
fn rbac_toggles_remove_the_roles() {
    let docs = documents(&render(&["--set", "rbac.nodeAccess=false"]));
    assert!(find(&docs, "Role", "-executor").is_some());
    assert!(!docs.iter().any(|d| kind(d).starts_with("ClusterRole")));
    let docs = documents(&render(&["--set", "rbac.create=false"]));
    assert!(
        !docs
            .iter()
            .any(|d| kind(d).ends_with("Role") || kind(d).ends_with("RoleBinding")),
        "rbac.create=false still renders RBAC"
    );
}

/// Copies the chart into a tempdir so a test can break one of its files.
fn chart_copy() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&chart_dir(), &dir.path().join("spotrun"));
    dir
}

#[test]
fn a_wildcard_or_malformed_rules_line_fails_the_render_naming_the_line() {
    for (bad, want) in [
        ("get pods\n* pods\n", "line 2: unknown verb \"*\""),
        ("get pods\nget *\n", "line 2: bad resource \"*\""),
        ("get\n", "line 1: want"),
    ] {
        let dir = chart_copy();
        let chart = dir.path().join("spotrun");
        std::fs::write(chart.join("files/executor-rbac-rules.txt"), bad).unwrap();
        let out = helm(&["template", RELEASE, chart.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "rules {bad:?} rendered");
        assert!(
            err.contains(want),
            "rules {bad:?}: want {want:?} in:\n{err}"
        );
    }
}

/// A `helm template` run expected to fail: its arguments, the expected message and the output.
type RejectJob = Box<dyn FnOnce() -> (Vec<String>, &'static str, Output) + Send>;

#[test]
fn schema_rejects_bad_values_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.yaml");
    std::fs::write(&typo, "image:\n  iamge: gitlab-runner\n").unwrap();
    let typo = typo.to_str().unwrap().to_owned();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--set".into(), "concurrent=ten".into()], "/concurrent"),
        (
            vec!["--set".into(), "checkInterval=true".into()],
            "/checkInterval",
        ),
        (
            vec!["--set".into(), "cacheProxy.replicas=0".into()],
            "/cacheProxy/replicas",
        ),
        (
            vec!["--set".into(), "cacheProxy.bogus=1".into()],
            "'bogus' not allowed",
        ),
        (
            vec!["--set".into(), "runners.cache.bogus=1".into()],
            "'bogus' not allowed",
        ),
        (
            vec!["--set".into(), "executor.config.no_such_key=1".into()],
            "'no_such_key' not allowed",
        ),
        (vec!["-f".into(), typo], "'iamge' not allowed"),
        (
            vec![
                "--set".into(),
                "executor.config.spot.policy=sometimes".into(),
            ],
            "/executor/config/spot/policy",
        ),
        (
            vec!["--set".into(), "cacheProxy.backend.type=nfs".into()],
            "/cacheProxy/backend/type",
        ),
        (vec!["--set".into(), "logFormat=xml".into()], "/logFormat"),
        (
            vec!["--set".into(), "executor.gc.schedule=often".into()],
            "/executor/gc/schedule",
        ),
        (
            vec!["--set".into(), "runners.environment[0]=NOEQUALS".into()],
            "/runners/environment/0",
        ),
        // Cross-field checks the schema cannot express are template failures naming the value.
        (
            vec!["--set".into(), "cacheProxy.backend.type=s3".into()],
            "cacheProxy.backend.s3.endpoint is required",
        ),
        (
            vec![
                "--set".into(),
                "cacheProxy.backend.type=gcs".into(),
                "--set".into(),
                "cacheProxy.backend.gcs.bucket=b".into(),
            ],
            "cacheProxy.backend.gcs needs hmacSecret",
        ),
        (
            vec!["--set".into(), "cacheProxy.hpa.enabled=true".into()],
            "cacheProxy.hpa.enabled needs a shared backend",
        ),
        (
            vec!["--set".into(), "cacheProxy.enabled=false".into()],
            "runners.cache.enabled requires cacheProxy.enabled",
        ),
    ];
    let jobs: Vec<RejectJob> = cases
        .into_iter()
        .map(|(args, want)| {
            Box::new(move || {
                let chart = chart_dir();
                let mut all = vec![
                    "template".to_owned(),
                    RELEASE.to_owned(),
                    chart.to_string_lossy().into_owned(),
                ];
                all.extend(args.iter().cloned());
                let refs: Vec<&str> = all.iter().map(String::as_str).collect();
                let out = helm(&refs);
                (args, want, out)
            }) as Box<dyn FnOnce() -> _ + Send>
        })
        .collect();
    for (args, want, out) in parallel(jobs) {
        let err = text(&out.stderr);
        assert!(!out.status.success(), "helm template {args:?} should fail");
        assert!(
            err.contains(want),
            "helm template {args:?}: want {want:?} in:\n{err}"
        );
    }
}

/// A `ConfigMap`'s data entry.
fn config_map_entry<'a>(docs: &'a [Value], suffix: &str, key: &str) -> &'a str {
    find(docs, "ConfigMap", suffix)
        .unwrap_or_else(|| panic!("ConfigMap *{suffix} rendered"))["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap *{suffix} has {key}"))
}

fn table<'a>(v: &'a toml::Value, key: &str) -> &'a toml::Table {
    v.get(key)
        .and_then(toml::Value::as_table)
        .unwrap_or_else(|| panic!("[{key}] missing in {v:?}"))
}

fn strings(v: &toml::Value) -> Vec<&str> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string"))
        .collect()
}

#[test]
fn rendered_config_toml_has_the_custom_executor_and_the_proxy_cache() {
    for f in ci_values_files() {
        let label = f.display().to_string();
        let docs = documents(&render_file(&f));
        let raw = config_map_entry(&docs, "-manager", "config.toml");
        let config: toml::Table =
            toml::from_str(raw).unwrap_or_else(|e| panic!("{label}: config.toml: {e}\n{raw}"));
        assert!(config["concurrent"].as_integer().unwrap() >= 1, "{label}");
        assert!(
            config["check_interval"].as_integer().unwrap() >= 1,
            "{label}"
        );
        let runners = config["runners"].as_array().expect("[[runners]]");
        assert_eq!(runners.len(), 1, "{label}");
        let runner = &runners[0];
        assert_eq!(runner["executor"].as_str(), Some("custom"), "{label}");
        assert_eq!(
            runner["token"].as_str(),
            Some("@@RUNNER_TOKEN@@"),
            "{label}"
        );
        assert_eq!(runner["builds_dir"].as_str(), Some("/builds"), "{label}");
        assert_eq!(runner["cache_dir"].as_str(), Some("/cache"), "{label}");
        assert!(
            runner["url"].as_str().unwrap().starts_with("https://"),
            "{label}"
        );

        let custom = table(runner, "custom");
        let exe = "/opt/spotrun/bin/spotrun-executor";
        for stage in ["config", "prepare", "run", "cleanup"] {
            assert_eq!(
                custom[&format!("{stage}_exec")].as_str(),
                Some(exe),
                "{label} {stage}_exec"
            );
            assert_eq!(
                strings(&custom[&format!("{stage}_args")]),
                ["--config", "/etc/spotrun/executor.toml", stage],
                "{label} {stage}_args"
            );
        }
        for key in [
            "config_exec_timeout",
            "prepare_exec_timeout",
            "cleanup_exec_timeout",
            "graceful_kill_timeout",
            "force_kill_timeout",
        ] {
            assert!(custom[key].as_integer().unwrap() > 0, "{label} {key}");
        }

        // The executor binary the runner calls is the one the init container copies.
        let manager = find(&docs, "Deployment", "-manager").unwrap();
        let init = &manager["spec"]["template"]["spec"]["initContainers"][0]["command"];
        assert_eq!(
            init[2].as_str(),
            Some(exe),
            "{label}: init container target"
        );

        let cache = table(runner, "cache");
        assert_eq!(cache["Type"].as_str(), Some("s3"), "{label}");
        assert!(cache["Shared"].is_bool(), "{label}");
        let s3 = cache["s3"].as_table().expect("[runners.cache.s3]");
        let service = find(&docs, "Service", "-cache").expect("proxy Service");
        let port = service["spec"]["ports"][0]["port"].as_u64().unwrap();
        assert_eq!(
            s3["ServerAddress"].as_str().unwrap(),
            format!("{}.{NAMESPACE}.svc:{port}", name(service)),
            "{label}: ServerAddress must be the proxy Service"
        );
        // TLS on the proxy (the everything case, with a cert-manager Certificate) means a verified
        // connection; otherwise in-cluster plain HTTP.
        let proxy_tls = documents_has_certificate(&docs);
        assert_eq!(s3["Insecure"].as_bool(), Some(!proxy_tls), "{label}");
        assert_eq!(s3["PathStyle"].as_bool(), Some(true), "{label}");
        assert_eq!(
            s3["AuthenticationType"].as_str(),
            Some("access-key"),
            "{label}"
        );
        assert!(!s3["BucketName"].as_str().unwrap().is_empty(), "{label}");
        assert!(
            !s3["BucketLocation"].as_str().unwrap().is_empty(),
            "{label}: BucketLocation must be set"
        );
        assert_eq!(
            s3["AccessKey"].as_str(),
            Some("@@CACHE_S3_ACCESS_KEY@@"),
            "{label}"
        );
        assert_eq!(
            s3["SecretKey"].as_str(),
            Some("@@CACHE_S3_SECRET_KEY@@"),
            "{label}"
        );

        // The executor's and the proxy's files are TOML too.
        let exec = config_map_entry(&docs, "-manager", "executor.toml");
        let exec: toml::Table =
            toml::from_str(exec).unwrap_or_else(|e| panic!("{label}: executor.toml: {e}\n{exec}"));
        assert!(
            exec.contains_key("namespace"),
            "{label}: executor.toml namespace"
        );
        let proxy = config_map_entry(&docs, "-cache-proxy", "cache-proxy.toml");
        let proxy: toml::Table = toml::from_str(proxy)
            .unwrap_or_else(|e| panic!("{label}: cache-proxy.toml: {e}\n{proxy}"));
        // GCS without an HMAC Secret authenticates with metadata-server tokens (Workload Identity).
        if label.ends_with("gcs-values.yaml") {
            assert_eq!(
                proxy["store"]["credentials"].as_str(),
                Some("gce-metadata"),
                "{label}: {proxy:?}"
            );
        }
    }
}

#[test]
fn no_secret_material_in_config_maps_and_tokens_only_where_needed() {
    for f in ci_values_files() {
        let label = f.display().to_string();
        let docs = documents(&render_file(&f));
        let mut automount = BTreeMap::new();
        for d in &docs {
            let spec = match kind(d) {
                "Deployment" => &d["spec"]["template"]["spec"],
                "CronJob" => &d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                "Pod" => &d["spec"],
                _ => continue,
            };
            automount.insert(
                name(d).to_owned(),
                spec["automountServiceAccountToken"].as_bool(),
            );
            for c in spec["containers"].as_sequence().unwrap() {
                let sc = &c["securityContext"];
                assert_eq!(
                    sc["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{label} {}",
                    name(d)
                );
                assert_eq!(
                    sc["capabilities"]["drop"][0].as_str(),
                    Some("ALL"),
                    "{label} {}",
                    name(d)
                );
            }
        }
        // Only the manager (executor), the executor gc and the backup (kubectl exec) talk to the API.
        for (obj, mount) in &automount {
            let needs = obj.ends_with("-manager")
                || (obj.ends_with("-gc") && !obj.ends_with("cache-proxy-gc"))
                || obj.ends_with("-backup");
            assert_eq!(
                *mount,
                Some(needs),
                "{label}: automountServiceAccountToken of {obj}"
            );
        }
        let proxy = find(&docs, "Deployment", "-cache-proxy").unwrap();
        let sc = &proxy["spec"]["template"]["spec"]["containers"][0]["securityContext"];
        assert_eq!(
            sc["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{label}"
        );
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{label}");
        assert_eq!(
            sc["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault"),
            "{label}"
        );
        let c = &proxy["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            c["livenessProbe"]["httpGet"]["path"].as_str(),
            Some("/healthz")
        );
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"].as_str(),
            Some("/readyz")
        );
        // Generated secrets (the cache key pair) appear in their Secret only: everything else
        // references them through secretKeyRef.
        for secret in docs.iter().filter(|d| kind(d) == "Secret") {
            for value in secret["data"]
                .as_mapping()
                .into_iter()
                .flat_map(|m| m.values())
            {
                let plain = base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    value.as_str().unwrap(),
                )
                .unwrap();
                let plain = String::from_utf8(plain).unwrap();
                assert!(
                    plain.len() >= 16,
                    "{label}: weak generated secret in {}",
                    name(secret)
                );
                for d in docs.iter().filter(|d| kind(d) != "Secret") {
                    let body = serde_yaml::to_string(d).unwrap();
                    assert!(
                        !body.contains(&plain),
                        "{label}: secret of {} leaks into {} {}",
                        name(secret),
                        kind(d),
                        name(d)
                    );
                }
            }
        }
    }
}

/// Runs the manager's `entrypoint.sh` from the rendered `ConfigMap` with a stand-in `gitlab-runner`
/// that prints the config it was given: the secrets must land TOML-escaped in the right keys.
#[test]
fn manager_entrypoint_fills_in_secrets_as_valid_toml() {
    let docs = documents(&render(&[]));
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("config.toml");
    std::fs::write(
        &template,
        config_map_entry(&docs, "-manager", "config.toml"),
    )
    .unwrap();
    let entrypoint = dir.path().join("entrypoint.sh");
    std::fs::write(
        &entrypoint,
        config_map_entry(&docs, "-manager", "entrypoint.sh"),
    )
    .unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fake = bin.join("gitlab-runner");
    std::fs::write(
        &fake,
        "#!/bin/sh\n# prints its arguments, then the --config file\necho \"ARGS: $*\"\nwhile [ $# -gt 0 ]; do [ \"$1\" = --config ] && cat \"$2\"; shift; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let token = r#"glrt-a"b\c&d@@RUNNER_TOKEN@@"#;
    let secret = r"s3cr3t/+\&'x";
    let out = Command::new("sh")
        .arg(&entrypoint)
        .args(["run", "--working-directory", "/tmp"])
        .env("PATH", &path)
        .env("SPOTRUN_CONFIG_TEMPLATE", &template)
        .env("SPOTRUN_CONFIG_FILE", dir.path().join("rendered.toml"))
        .env("RUNNER_TOKEN", token)
        .env("CACHE_S3_ACCESS_KEY", "AKIDSPOTRUN")
        .env("CACHE_S3_SECRET_KEY", secret)
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "entrypoint failed: {stdout}\n{}",
        text(&out.stderr)
    );
    let (args, config) = stdout.split_once('\n').unwrap();
    assert!(
        args.starts_with("ARGS: run --working-directory /tmp --config "),
        "{args}"
    );
    let config: toml::Table = toml::from_str(config).unwrap_or_else(|e| panic!("{e}\n{config}"));
    let runner = &config["runners"][0];
    assert_eq!(runner["token"].as_str(), Some(token));
    let s3 = &runner["cache"]["s3"];
    assert_eq!(s3["AccessKey"].as_str(), Some("AKIDSPOTRUN"));
    assert_eq!(s3["SecretKey"].as_str(), Some(secret));

    // A missing token is a clear error, not a runner started with a placeholder.
    let out = Command::new("sh")
        .arg(&entrypoint)
        .env("PATH", &path)
        .env("SPOTRUN_CONFIG_TEMPLATE", &template)
        .env("SPOTRUN_CONFIG_FILE", dir.path().join("rendered.toml"))
        .env_remove("RUNNER_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("RUNNER_TOKEN is empty"),
        "{}",
        text(&out.stderr)
    );
}

/// TOML → YAML values file under `path` (e.g. `executor.config`).
fn values_from_toml(toml_text: &str, path: &[&str]) -> String {
    let parsed: toml::Table = toml::from_str(toml_text).expect("example TOML parses");
    let mut value = serde_json::to_value(parsed).unwrap();
    for key in path.iter().rev() {
        value = serde_json::json!({ *key: value });
    }
    serde_yaml::to_string(&value).unwrap()
}

/// The executor's and the proxy's example configs (config/*.example.toml, written by their owners)
/// go through the chart unchanged: the schema accepts every key they use and the rendered file is the
/// same TOML. Catches a key renamed or added on one side only. Runs once those files are in the tree.
#[test]
fn example_configs_round_trip_through_the_chart() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "config/executor.example.toml",
            ["executor", "config"],
            "-manager",
            "executor.toml",
        ),
        (
            "config/cache-proxy.example.toml",
            ["cacheProxy", "config"],
            "-cache-proxy",
            "cache-proxy.toml",
        ),
    ];
    for (example, path, cm, key) in cases {
        let text = std::fs::read_to_string(repo_root().join(example))
            .unwrap_or_else(|e| panic!("{example}: {e}"));
        let values = dir.path().join(format!("{key}.values.yaml"));
        std::fs::write(&values, values_from_toml(&text, &path)).unwrap();
        let docs = documents(&render(&["-f", values.to_str().unwrap()]));
        let mut rendered: toml::Table = toml::from_str(config_map_entry(&docs, cm, key)).unwrap();
        let want: toml::Table = toml::from_str(&text).unwrap();
        // The one key the chart adds when absent: job pods take the launcher from its own image.
        if key == "executor.toml" && want["images"].get("launcher_image").is_none() {
            let added = rendered["images"]
                .as_table_mut()
                .and_then(|t| t.remove("launcher_image"));
            assert_eq!(
                added.as_ref().and_then(toml::Value::as_str),
                Some(
                    format!(
                        "registry.gitlab.com/spotrun/spotrun:{}",
                        env!("CARGO_PKG_VERSION")
                    )
                    .as_str()
                ),
                "the chart fills images.launcher_image with its own image"
            );
        }
        assert_eq!(
            rendered, want,
            "{example} does not survive the chart as {key}"
        );
    }
}

fn leaf_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v.as_mapping() {
        Some(m) if !m.is_empty() && !prefix.ends_with(".config") => {
            for (k, sub) in m {
                let k = k.as_str().expect("string keys");
                let path = if prefix.is_empty() {
                    k.to_owned()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_paths(sub, &path, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

#[test]
fn readme_values_table_documents_every_value() {
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).unwrap();
    let mut paths = Vec::new();
    leaf_paths(&values, "", &mut paths);
    assert!(paths.len() > 100, "{paths:?}");
    let undocumented: Vec<&String> = paths
        .iter()
        .filter(|p| {
            // A value is documented by its own row or by a row of an enclosing object.
            let mut cur = p.as_str();
            loop {
                if readme.contains(&format!("| `{cur}` |")) {
                    return false;
                }
                match cur.rfind('.') {
                    Some(i) => cur = &cur[..i],
                    None => return true,
                }
            }
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "values missing from helm/spotrun/README.md: {undocumented:?}"
    );
}

/// Runs the backup `CronJob`'s script with stand-ins for kubectl (records its argv, runs the script it
/// receives on stdin) and backup-utility (records its argv and environment): the proxy's key pair must
/// reach backup-utility byte for byte and never appear on a command line.
#[test]
fn backup_job_hands_the_proxy_credentials_to_backup_utility_over_stdin() {
    let values = chart_dir().join("ci/everything-values.yaml");
    let docs = documents(&render_file(&values));
    let cron = docs
        .iter()
        .find(|d| kind(d) == "CronJob" && name(d).ends_with("-backup"))
        .expect("backup CronJob in the everything case");
    let container = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
    let command: Vec<&str> = container["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(&command[..2], ["/bin/sh", "-c"]);
    let env_names: BTreeSet<&str> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let write_exe = |name: &str, body: &str| {
        let p = bin.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write_exe(
        "kubectl",
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$OUT/kubectl.argv\"\ncat > \"$OUT/sent.sh\"\nexec sh \"$OUT/sent.sh\"\n",
    );
    write_exe(
        "backup-utility",
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$OUT/backup.argv\"\n\
         printf '%s' \"$AWS_ACCESS_KEY_ID\" > \"$OUT/ak\"\nprintf '%s' \"$AWS_SECRET_ACCESS_KEY\" > \"$OUT/sk\"\n\
         printf '%s' \"$BACKUP_BUCKET_NAME\" > \"$OUT/bucket\"\nprintf '%s' \"${AWS_CONFIG_FILE:-}\" > \"$OUT/aws-config\"\n",
    );
    let access = "AKID'quote";
    let secret = r#"s$e"c\r`e t\n"#;
    let mut cmd = Command::new("/bin/sh");
    cmd.args(&command[1..])
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("OUT", &out)
        .env("TMPDIR", dir.path())
        .env("CACHE_ACCESS_KEY", access)
        .env("CACHE_SECRET_KEY", secret);
    for e in container["env"].as_sequence().unwrap() {
        if let Some(v) = e["value"].as_str()
            && e["name"] != "HOME"
        {
            cmd.env(e["name"].as_str().unwrap(), v);
        }
    }
    assert!(env_names.contains("CACHE_ACCESS_KEY") && env_names.contains("CACHE_SECRET_KEY"));
    let run = cmd.output().unwrap();
    assert!(
        run.status.success(),
        "backup script: {}\n{}",
        text(&run.stdout),
        text(&run.stderr)
    );
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    assert_eq!(read("ak"), access);
    assert_eq!(read("sk"), secret);
    assert_eq!(read("bucket"), "gitlab-backups");
    // awscli's own multipart defaults: the proxy takes multipart uploads (no single-PUT workaround).
    assert_eq!(read("aws-config"), "", "no awscli config override");
    // The backup job signs with its own key pair (confined to the backup bucket by the proxy).
    for e in container["env"].as_sequence().unwrap() {
        if e["name"].as_str().is_some_and(|n| n.starts_with("CACHE_")) {
            let secret = e["valueFrom"]["secretKeyRef"]["name"].as_str().unwrap();
            assert!(secret.ends_with("-backup-credentials"), "{secret}");
        }
    }
    let kubectl = read("kubectl.argv");
    assert_eq!(
        kubectl.lines().collect::<Vec<_>>(),
        [
            "exec",
            "-i",
            "-n",
            "gitlab",
            "deploy/gitlab-toolbox",
            "-c",
            "toolbox",
            "--",
            "/bin/sh",
            "-s"
        ]
    );
    let backup = read("backup.argv");
    assert_eq!(
        backup.lines().collect::<Vec<_>>(),
        [
            "--s3tool",
            "awscli",
            "--aws-s3-endpoint-url",
            "https://spotrun-ci-cache.ci.svc:9000",
            "--skip",
            "registry"
        ]
    );
    for argv in [&kubectl, &backup] {
        assert!(
            !argv.contains("AKID") && !argv.contains("s$e"),
            "credential on a command line: {argv}"
        );
    }
}

/// Net bracket count of HCL code with string literals and comments removed.
fn hcl_brackets(code: &str) -> i32 {
    let mut net = 0;
    let mut in_str = false;
    let mut escaped = false;
    for c in code.chars() {
        if in_str {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => escaped = false,
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '#' => break,
            '{' | '[' | '(' => net += 1,
            '}' | ']' | ')' => net -= 1,
            _ => {}
        }
    }
    net
}

/// terraform is not installable here, so this checks the rules of `terraform fmt` (hclwrite) that
/// hand-written HCL gets wrong: two-space indent per open bracket line, `=` aligned across
/// consecutive single-line attributes, one space before `=` when the value spans lines, no tabs or
/// trailing spaces, one final newline.
#[test]
fn terraform_example_follows_fmt_layout() {
    let dir = repo_root().join("config/terraform");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("config/terraform")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tf"))
        .collect();
    files.sort();
    let names: BTreeSet<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["main.tf", "variables.tf", "outputs.tf", "versions.tf"] {
        assert!(names.contains(want), "config/terraform/{want} missing");
    }
    let mut problems = Vec::new();
    for file in &files {
        let label = file.file_name().unwrap().to_string_lossy().into_owned();
        let body = std::fs::read_to_string(file).unwrap();
        if !body.ends_with('\n') || body.ends_with("\n\n") {
            problems.push(format!("{label}: must end with exactly one newline"));
        }
        let mut depth: i32 = 0;
        // (line number, end column of the key, column of `=`) of the current run of single-line attributes.
        let mut chain: Vec<(usize, usize, usize)> = Vec::new();
        let close = |chain: &mut Vec<(usize, usize, usize)>, problems: &mut Vec<String>| {
            let width = chain.iter().map(|c| c.1).max().unwrap_or(0);
            for &(n, _, eq_col) in chain.iter() {
                if eq_col != width + 1 {
                    problems.push(format!(
                        "{label}:{n}: `=` at column {eq_col}, want {}",
                        width + 1
                    ));
                }
            }
            chain.clear();
        };
        for (i, raw) in body.lines().enumerate() {
            let n = i + 1;
            if raw.ends_with(' ') || raw.contains('\t') {
                problems.push(format!("{label}:{n}: trailing space or tab"));
            }
            let line = raw.trim();
            let net = hcl_brackets(line);
            let closing = line.starts_with(['}', ']', ')']);
            let want = 2 * usize::try_from(depth - i32::from(closing)).unwrap_or(0);
            let indent = raw.len() - raw.trim_start().len();
            if !line.is_empty() && indent != want {
                problems.push(format!("{label}:{n}: indent {indent}, want {want}"));
            }
            let assign = (!line.starts_with('#'))
                .then(|| {
                    raw.find(" =")
                        .filter(|&p| raw.as_bytes().get(p + 2) != Some(&b'='))
                })
                .flatten()
                .filter(|&p| {
                    let key = raw[..p].trim();
                    !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_-./\"".contains(c))
                });
            match assign {
                Some(p) if hcl_brackets(&raw[p..]) == 0 => {
                    let key_end = raw[..p].trim_end().len();
                    chain.push((n, key_end, p + 1));
                }
                Some(p) => {
                    close(&mut chain, &mut problems);
                    if raw[..p].ends_with(' ') {
                        problems.push(format!(
                            "{label}:{n}: one space before `=` of a multi-line value"
                        ));
                    }
                }
                None => close(&mut chain, &mut problems),
            }
            depth += net.signum();
        }
        close(&mut chain, &mut problems);
        if depth != 0 {
            problems.push(format!("{label}: unbalanced brackets"));
        }
    }
    assert!(
        problems.is_empty(),
        "terraform fmt layout:\n{}",
        problems.join("\n")
    );
}

type LintAndRender = Box<dyn FnOnce() -> (PathBuf, Output, Output) + Send>;

/// The chart supports Helm 3 and 4: Helm 3.18 lints every CI values file as strictly, renders the
/// same manifests as Helm 4 and enforces the same schema (draft 2020-12).
#[test]
fn helm3_lints_renders_the_same_manifests_and_enforces_the_schema() {
    let v = helm_bin("helm3", &["version", "--short"]);
    assert!(
        text(&v.stdout).starts_with("v3."),
        "helm3 is not Helm 3: {}",
        text(&v.stdout)
    );
    let jobs: Vec<LintAndRender> = ci_values_files()
        .into_iter()
        .map(|f| {
            Box::new(move || {
                let chart = chart_dir();
                let (chart, file) = (chart.to_str().unwrap(), f.to_str().unwrap());
                let lint = helm_bin("helm3", &["lint", "--strict", chart, "-f", file]);
                let template = helm_bin(
                    "helm3",
                    &[
                        "template",
                        RELEASE,
                        chart,
                        "--namespace",
                        NAMESPACE,
                        "-f",
                        file,
                        "--api-versions",
                        CRD_API_VERSIONS,
                    ],
                );
                (f, lint, template)
            }) as Box<dyn FnOnce() -> _ + Send>
        })
        .collect();
    for (file, lint, template) in parallel(jobs) {
        let stdout = text(&lint.stdout);
        assert!(
            lint.status.success()
                && stdout.contains("0 chart(s) failed")
                && !stdout.contains("[WARNING]")
                && !stdout.contains("[ERROR]"),
            "helm3 lint --strict -f {}:\n{stdout}\n{}",
            file.display(),
            text(&lint.stderr)
        );
        assert!(
            template.status.success(),
            "helm3 template -f {}:\n{}",
            file.display(),
            text(&template.stderr)
        );
        let v3 = without_generated_keys(documents(&text(&template.stdout)));
        let v4 = without_generated_keys(documents(&render_file(&file)));
        assert!(!v3.is_empty());
        assert_eq!(
            v3,
            v4,
            "Helm 3 and Helm 4 render {} differently",
            file.display()
        );
    }
    let chart = chart_dir();
    let bad = helm_bin(
        "helm3",
        &[
            "template",
            RELEASE,
            chart.to_str().unwrap(),
            "--set",
            "executor.config.spot.policy=sometimes",
        ],
    );
    assert!(!bad.status.success());
    // Helm 3 names the value with dots, Helm 4 with a JSON pointer.
    assert!(
        text(&bad.stderr).contains("executor.config.spot.policy")
            && text(&bad.stderr).contains("must be one of"),
        "{}",
        text(&bad.stderr)
    );
}

/// The chart generates the proxy's key pair when none is given (random on every render): blank it
/// so two renders compare equal.
/// Does the rendered chart include the proxy's cert-manager Certificate?
fn documents_has_certificate(docs: &[Value]) -> bool {
    docs.iter().any(|d| kind(d) == "Certificate")
}

fn without_generated_keys(mut docs: Vec<Value>) -> Vec<Value> {
    for d in &mut docs {
        if kind(d) == "Secret"
            && [
                "-cache-credentials",
                "-backup-credentials",
                "-gitlab-object-storage",
            ]
            .iter()
            .any(|suffix| name(d).ends_with(suffix))
            && let Some(data) = d.get_mut("data").and_then(Value::as_mapping_mut)
        {
            for (_, v) in data.iter_mut() {
                *v = Value::String("<generated>".into());
            }
        }
    }
    docs
}

/// Regression (issue 16): `/metrics` was scraped (and `/readyz` probed) on the S3 port, which job
/// pods reach; its chunk-hit counters tell whether a guessed file is already cached. Now the
/// operations endpoints have their own port, and the `NetworkPolicy` keeps job pods off it.
#[test]
fn metrics_and_probes_use_the_ops_port_that_job_pods_cannot_reach() {
    let docs = documents(&render_file(&chart_dir().join("ci/everything-values.yaml")));
    let proxy = find(&docs, "Deployment", "-cache-proxy").expect("proxy Deployment");
    let c = &proxy["spec"]["template"]["spec"]["containers"][0];
    let ports: Vec<(&str, i64)> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports, [("s3", 9000), ("ops", 9090)]);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"].as_str(), Some("ops"), "{probe}");
    }
    let toml: toml::Table =
        toml::from_str(config_map_entry(&docs, "-cache-proxy", "cache-proxy.toml")).unwrap();
    assert_eq!(toml["listen"].as_str(), Some("0.0.0.0:9000"));
    assert_eq!(toml["ops_listen"].as_str(), Some("0.0.0.0:9090"));

    let svc = find(&docs, "Service", "-cache").expect("proxy Service");
    let svc_ports: Vec<&str> = svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["targetPort"].as_str().unwrap())
        .collect();
    assert_eq!(svc_ports, ["s3", "ops"]);
    let sm = find(&docs, "ServiceMonitor", "-cache-proxy").expect("ServiceMonitor");
    for ep in sm["spec"]["endpoints"].as_sequence().unwrap() {
        assert_eq!(ep["port"].as_str(), Some("ops"), "scrape only the ops port");
    }

    let np = find(&docs, "NetworkPolicy", "-cache-proxy").expect("NetworkPolicy");
    let rules = np["spec"]["ingress"].as_sequence().unwrap();
    let rule_for = |port: &str| {
        let matching: Vec<&Value> = rules
            .iter()
            .filter(|r| {
                r["ports"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"].as_str() == Some(port))
            })
            .collect();
        assert_eq!(matching.len(), 1, "one ingress rule names port {port}");
        assert_eq!(
            matching[0]["ports"].as_sequence().unwrap().len(),
            1,
            "the {port} rule opens no other port"
        );
        serde_yaml::to_string(&matching[0]["from"]).unwrap()
    };
    let s3_from = rule_for("s3");
    let ops_from = rule_for("ops");
    assert!(s3_from.contains("ci-jobs"), "job pods reach S3: {s3_from}");
    assert!(
        !ops_from.contains("ci-jobs") && !ops_from.contains("component: manager"),
        "neither job pods nor the manager reach the ops port: {ops_from}"
    );
    assert!(ops_from.contains("monitoring"), "opsFrom: {ops_from}");
    assert!(
        !s3_from.contains("monitoring"),
        "Prometheus does not need the S3 port: {s3_from}"
    );
}
