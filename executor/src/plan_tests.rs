//! Snapshot tests of `plan_pod` for representative jobs, and schema validation of every pod.
//!
//! Snapshots live in `executor/tests/snapshots/*.json`; regenerate with `SPOTRUN_UPDATE_SNAPSHOTS=1`.

use std::path::{Path, PathBuf};

use super::*;
use crate::job::{Credential, JobVariable, job_knobs};
use crate::settings::Settings;

const FIXTURE: &str = include_str!("../tests/fixtures/job-response.json");

fn example_settings() -> Settings {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/executor.example.toml");
    Settings::from_toml(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
}

fn env(pairs: &[(&str, &str)]) -> CustomEnv {
    CustomEnv::from_vars(
        pairs
            .iter()
            .map(|(k, v)| (format!("CUSTOM_ENV_{k}"), (*v).to_string())),
    )
}

struct Case {
    name: &'static str,
    settings: Settings,
    job: JobResponse,
    env: CustomEnv,
    fallback: bool,
}

fn minimal_job(id: u64) -> JobResponse {
    let mut job = JobResponse {
        id,
        ..JobResponse::default()
    };
    job.job_info.name = "build".into();
    job.job_info.project_id = 7;
    job.job_info.pipeline_id = 70;
    job.job_info.project_name = "demo".into();
    job.job_info.project_full_path = "group/demo".into();
    job.git_info.git_ref = "main".into();
    job.git_info.sha = "0123456789abcdef0123456789abcdef01234567".into();
    job
}

fn cases() -> Vec<Case> {
    let base_env = |id: &str| {
        vec![
            ("CI_JOB_ID", id.to_string()),
            ("CI_RUNNER_SHORT_TOKEN", "t1_Zx9Qw".to_string()),
            ("CI_CONCURRENT_ID", "3".to_string()),
        ]
    };
    let mk_env = |id: &str, extra: &[(&str, &str)]| {
        let mut v: Vec<(String, String)> = base_env(id)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        v.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string())),
        );
        CustomEnv(v.into_iter().collect())
    };

    // 1. The runner fixture (two services, registry credentials, entrypoint [""]) with the example file.
    let fixture = JobResponse::parse(FIXTURE, "fixture").unwrap();
    // 2. A bare job on default settings: default image, no services, no credentials.
    let bare = minimal_job(1001);
    // 3. Entrypoint honoured, service with entrypoint + command, spot fallback after preemption.
    let mut entry = minimal_job(1002);
    entry.image.name = "registry.example.com/tools/node:22".into();
    entry.image.entrypoint = vec!["/usr/bin/tini".into(), "--".into()];
    entry.services.push(ImageSpec {
        name: "docker.io/library/redis:7-alpine".into(),
        entrypoint: vec!["redis-server".into()],
        command: vec![
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
        ],
        ..ImageSpec::default()
    });
    // 4. Resource knobs within caps, a job spot override and DOCKER_AUTH_CONFIG.
    let mut knobs_job = minimal_job(1003);
    knobs_job.image.name = "registry.example.com/ci/rust:1.89".into();
    knobs_job.credentials.push(Credential {
        kind: "registry".into(),
        url: "registry.example.com".into(),
        username: "gitlab-ci-token".into(),
        password: "job-token-1003".into(),
    });
    // 5. Three services with colliding aliases and a JSON-patch escape hatch.
    let mut multi = minimal_job(1004);
    multi.image.name = "registry.example.com/ci/python:3.13".into();
    for (name, alias) in [
        ("postgres:16-alpine", "db"),
        ("mysql:8", "db"),
        ("registry.example.com/mocks/http-echo:1", ""),
    ] {
        multi.services.push(ImageSpec {
            name: name.into(),
            alias: alias.into(),
            variables: vec![JobVariable {
                key: "MODE".into(),
                value: "test".into(),
                ..JobVariable::default()
            }],
            ..ImageSpec::default()
        });
    }
    let mut patched = Settings::default();
    patched.pod.patch = Some(crate::settings::PodSpecPatch {
        patch_type: PatchType::Json,
        patch: r#"[{"op":"add","path":"/spec/dnsPolicy","value":"ClusterFirst"},{"op":"add","path":"/spec/runtimeClassName","value":"gvisor"}]"#.into(),
    });
    patched.spot.policy = SpotPolicy::Require;

    let mut capped = example_settings();
    capped.spot.policy = SpotPolicy::Require;

    // 6. The Kubernetes executor's job variables within the operator's maxima and regexps.
    let mut k8s_vars = Settings::default();
    let q = |t: &str| Some(crate::quantity::Quantity::parse(t).unwrap());
    k8s_vars.resources.build.memory_request = q("1Gi");
    k8s_vars.resources.build.memory_limit = q("2Gi");
    k8s_vars.resources.build.memory_limit_overwrite_max_allowed = q("4Gi");
    k8s_vars.resources.build.cpu_request_overwrite_max_allowed = q("2");
    k8s_vars.resources.helper.memory_limit_overwrite_max_allowed = q("1Gi");
    k8s_vars.resources.services.cpu_limit_overwrite_max_allowed = q("1");
    k8s_vars.pod.node_selector_overwrite_allowed = Some("^kubernetes.io/arch=".into());
    k8s_vars.pod.pod_labels_overwrite_allowed = Some("^team=".into());
    k8s_vars.pod.pod_annotations_overwrite_allowed = Some(".*".into());
    k8s_vars.pod.service_account_overwrite_allowed = Some("^ci-".into());
    let mut k8s_job = minimal_job(1005);
    k8s_job.services.push(ImageSpec {
        name: "postgres:16".into(),
        alias: "db".into(),
        variables: vec![JobVariable {
            key: "KUBERNETES_SERVICE_CPU_LIMIT".into(),
            value: "500m".into(),
            ..JobVariable::default()
        }],
        ..ImageSpec::default()
    });
    // 7. Operator volumes of every kind (a PVC at builds_dir with job-variable expansion), an arm64
    //    job getting the arm64 helper of a flavor, and pulls through the service account's secrets.
    let mut vol_settings = Settings::from_toml(
        r#"
[images]
helper_image = "registry.example.com/gitlab-runner-helper:${FLAVOR}${ARCH}-v19.4.0"
helper_image_flavor = "ubuntu"
[pod]
node_selector_overwrite_allowed = '^kubernetes\.io/arch='
image_pull_secrets = ["registry-mirror"]
use_service_account_image_pull_secrets = true
[[volumes.pvc]]
name = "builds-$CI_CONCURRENT_ID"
mount_path = "/builds"
sub_path = "${CI_PROJECT_PATH}"
[[volumes.host_path]]
name = "docker-sock"
mount_path = "/var/run/docker.sock"
read_only = true
[[volumes.config_map]]
name = "ca-bundle"
mount_path = "/etc/ssl/ci"
read_only = true
items = { "ca.crt" = "ca.crt" }
[[volumes.secret]]
name = "deploy-key"
mount_path = "/secrets/$CI_PROJECT_NAME"
read_only = true
[[volumes.empty_dir]]
name = "scratch"
mount_path = "/scratch"
medium = "Memory"
size_limit = "512Mi"
[[volumes.csi]]
name = "datasets"
mount_path = "/data"
read_only = true
driver = "gcsfuse.csi.storage.gke.io"
volume_attributes = { bucketName = "ci-datasets" }
"#,
        Path::new("volumes.toml"),
    )
    .unwrap();
    vol_settings.spot.policy = SpotPolicy::Require;
    let mut vol_job = minimal_job(1006);
    vol_job.image.name = "registry.example.com/ci/node:22".into();
    vol_job.credentials.push(Credential {
        kind: "registry".into(),
        url: "registry.example.com".into(),
        username: "gitlab-ci-token".into(),
        password: "job-token-1006".into(),
    });
    vol_job.services.push(ImageSpec {
        name: "docker:27-dind".into(),
        alias: "docker".into(),
        ..ImageSpec::default()
    });

    // 8. Non-root images: the job's `kubernetes: user` on the build container and a service's own
    //    on that service, within the operator's allow-lists; the helper keeps the operator's.
    let mut users = Settings::from_toml(
        r#"
[pod]
allowed_users = ["1000", "999"]
allowed_groups = ["1000", "999"]
[pod.build_security_context]
allowPrivilegeEscalation = false
[pod.helper_security_context]
runAsUser = 0
"#,
        Path::new("users.toml"),
    )
    .unwrap();
    users.spot.policy = SpotPolicy::Require;
    let mut users_job = minimal_job(1007);
    users_job.image.name = "registry.example.com/ci/node:22".into();
    users_job.image.executor_opts = serde_json::json!({
        "docker": { "platform": "", "user": "" },
        "kubernetes": { "user": "1000:1000" }
    });
    users_job.services.push(ImageSpec {
        name: "redis:7".into(),
        alias: "cache".into(),
        executor_opts: serde_json::json!({ "kubernetes": { "user": 999 } }),
        ..ImageSpec::default()
    });

    vec![
        Case {
            name: "fixture-job",
            settings: example_settings(),
            job: fixture,
            env: mk_env(
                "987654",
                &[(
                    "CI_JOB_URL",
                    "https://gitlab.example.com/acme/platform/inventory-service/-/jobs/987654",
                )],
            ),
            fallback: false,
        },
        Case {
            name: "bare-job-defaults",
            settings: Settings::default(),
            job: bare,
            env: mk_env("1001", &[]),
            fallback: false,
        },
        Case {
            name: "entrypoint-service-fallback",
            settings: example_settings(),
            job: entry,
            env: mk_env("1002", &[]),
            fallback: true,
        },
        Case {
            name: "resource-knobs-auth-config",
            settings: capped,
            job: knobs_job,
            env: mk_env(
                "1003",
                &[
                    ("SPOTRUN_CPU_REQUEST", "1500m"),
                    ("SPOTRUN_CPU_LIMIT", "2"),
                    ("SPOTRUN_MEMORY_LIMIT", "3Gi"),
                    ("SPOTRUN_SPOT", "prefer"),
                    (
                        "DOCKER_AUTH_CONFIG",
                        r#"{"auths":{"docker.io":{"auth":"dXNlcjpwYXNz"}}}"#,
                    ),
                ],
            ),
            fallback: false,
        },
        Case {
            name: "three-services-json-patch",
            settings: patched,
            job: multi,
            env: mk_env("1004", &[]),
            fallback: false,
        },
        Case {
            name: "kubernetes-executor-variables",
            settings: k8s_vars,
            job: k8s_job,
            env: mk_env(
                "1005",
                &[
                    ("KUBERNETES_MEMORY_LIMIT", "8Gi"),
                    ("KUBERNETES_CPU_REQUEST", "1500m"),
                    ("KUBERNETES_HELPER_MEMORY_LIMIT", "768Mi"),
                    ("KUBERNETES_SERVICE_CPU_LIMIT", "2"),
                    ("KUBERNETES_NODE_SELECTOR_ARCH", "kubernetes.io/arch=arm64"),
                    ("KUBERNETES_POD_LABELS_TEAM", "team=payments"),
                    (
                        "KUBERNETES_POD_ANNOTATIONS_OWNER",
                        "example.com/owner=payments",
                    ),
                    ("KUBERNETES_SERVICE_ACCOUNT_OVERWRITE", "ci-deployer"),
                ],
            ),
            fallback: false,
        },
        Case {
            name: "volumes-arm64-helper",
            settings: vol_settings,
            job: vol_job,
            env: mk_env(
                "1006",
                &[
                    ("CI_PROJECT_PATH", "group/demo"),
                    ("CI_PROJECT_NAME", "demo"),
                    ("KUBERNETES_NODE_SELECTOR_ARCH", "kubernetes.io/arch=arm64"),
                ],
            ),
            fallback: false,
        },
        Case {
            name: "non-root-users",
            settings: users,
            job: users_job,
            env: mk_env("1007", &[]),
            fallback: false,
        },
    ]
}

fn case_named(name: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == name)
        .expect("a case of that name")
}

fn plan(case: &Case) -> PodPlan {
    let identity = JobIdentity::from_env(&case.env).unwrap();
    let knobs = job_knobs(&case.settings, &case.env, &case.job).unwrap();
    let spot = effective_spot_policy(&case.settings, &knobs, case.fallback);
    // The default launcher image carries the crate version: pinned, so a release does not
    // rewrite every snapshot (the default is checked in `the_launcher_comes_from_an_init_container`).
    let mut settings = case.settings.clone();
    if settings.images.launcher_image == crate::settings::LAUNCHER_IMAGE {
        settings.images.launcher_image = "registry.gitlab.com/spotrun/spotrun:VERSION".into();
    }
    plan_pod(
        &settings,
        &PlanInput {
            job: &case.job,
            identity: &identity,
            env: &case.env,
            knobs: &knobs,
            spot,
            pull_attempt: 0,
        },
    )
    .unwrap()
}

fn snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots")
}

fn documents(p: &PodPlan) -> serde_json::Value {
    let mut pod = serde_json::to_value(&p.pod).unwrap();
    pod["apiVersion"] = "v1".into();
    pod["kind"] = "Pod".into();
    let mut docs = vec![pod];
    if let Some(s) = &p.secret {
        let mut s = serde_json::to_value(s).unwrap();
        s["apiVersion"] = "v1".into();
        s["kind"] = "Secret".into();
        docs.push(s);
    }
    serde_json::Value::Array(docs)
}

#[test]
fn pod_snapshots_match() {
    let update = std::env::var_os("SPOTRUN_UPDATE_SNAPSHOTS").is_some();
    let mut mismatches = Vec::new();
    for case in cases() {
        let got = serde_json::to_string_pretty(&documents(&plan(&case))).unwrap() + "\n";
        let path = snapshot_dir().join(format!("{}.json", case.name));
        if update {
            std::fs::create_dir_all(snapshot_dir()).unwrap();
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (set SPOTRUN_UPDATE_SNAPSHOTS=1)", path.display()));
        if want != got {
            mismatches.push(format!("{} differs; got:\n{got}", path.display()));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn every_generated_pod_passes_kubernetes_validate_strict() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for case in cases() {
        for (i, doc) in documents(&plan(&case))
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let f = dir.path().join(format!("{}-{i}.json", case.name));
            std::fs::write(&f, serde_json::to_vec(doc).unwrap()).unwrap();
            files.push(f);
        }
    }
    // Deliberately not skipped when missing: CI installs it (pip install kubernetes-validate).
    let out = std::process::Command::new("kubernetes-validate")
        .args(["-k", "1.33.0", "--strict", "--quiet"])
        .args(&files)
        .output()
        .expect("kubernetes-validate must be installed (pip install kubernetes-validate)");
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kubernetes_validate_rejects_a_broken_pod() {
    // Proves the validation test above can fail: an unknown field under --strict.
    let dir = tempfile::tempdir().unwrap();
    let mut doc = documents(&plan(&cases().remove(1)))[0].clone();
    doc["spec"]["notAField"] = true.into();
    let f = dir.path().join("bad.json");
    std::fs::write(&f, serde_json::to_vec(&doc).unwrap()).unwrap();
    let out = std::process::Command::new("kubernetes-validate")
        .args(["-k", "1.33.0", "--strict", "--quiet"])
        .arg(&f)
        .output()
        .expect("kubernetes-validate must be installed");
    assert!(!out.status.success());
}

#[test]
fn spot_policies_place_as_documented() {
    let s = Settings::default();
    let (sel, aff, tol) = placement(&s, &JobKnobs::default(), SpotPolicy::Require);
    assert_eq!(sel.get(SPOT_LABEL).map(String::as_str), Some("true"));
    assert!(aff.is_none());
    assert_eq!(tol, vec![spot_toleration()]);
    let (sel, aff, tol) = placement(&s, &JobKnobs::default(), SpotPolicy::Prefer);
    assert!(sel.is_empty() && tol == vec![spot_toleration()]);
    let pref = aff
        .unwrap()
        .node_affinity
        .unwrap()
        .preferred_during_scheduling_ignored_during_execution
        .unwrap();
    assert_eq!(
        pref[0].preference.match_expressions.as_ref().unwrap()[0],
        spot_requirement("In")
    );
    let (sel, aff, tol) = placement(&s, &JobKnobs::default(), SpotPolicy::Never);
    assert!(sel.is_empty() && tol.is_empty());
    let req = aff
        .unwrap()
        .node_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap();
    assert_eq!(
        req.node_selector_terms[0]
            .match_expressions
            .as_ref()
            .unwrap()[0],
        spot_requirement("NotIn")
    );
}

#[test]
fn images_outside_the_allow_list_are_refused_by_name() {
    let mut s = Settings::default();
    s.images.allowed_images = vec!["registry.example.com/**".into()];
    s.images.allowed_services = vec!["postgres:*".into()];
    let e = env(&[("CI_JOB_ID", "5")]);
    let id = JobIdentity::from_env(&e).unwrap();
    let knobs = JobKnobs::default();
    let mut job = minimal_job(5);
    job.image.name = "evil.example.org/miner:latest".into();
    let err = plan_pod(
        &s,
        &PlanInput {
            job: &job,
            identity: &id,
            env: &e,
            knobs: &knobs,
            spot: SpotPolicy::Never,
            pull_attempt: 0,
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("evil.example.org/miner:latest")
            && err.to_string().contains("images.allowed_images"),
        "{err}"
    );
    job.image.name = "registry.example.com/ci/rust:1".into();
    job.services.push(ImageSpec {
        name: "mysql:8".into(),
        ..ImageSpec::default()
    });
    let err = plan_pod(
        &s,
        &PlanInput {
            job: &job,
            identity: &id,
            env: &e,
            knobs: &knobs,
            spot: SpotPolicy::Never,
            pull_attempt: 0,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("mysql:8"), "{err}");
    job.services[0].name = "postgres:16".into();
    assert!(
        plan_pod(
            &s,
            &PlanInput {
                job: &job,
                identity: &id,
                env: &e,
                knobs: &knobs,
                spot: SpotPolicy::Never,
                pull_attempt: 0,
            }
        )
        .is_ok()
    );
}

#[test]
fn deadline_is_job_timeout_plus_margin_and_names_are_deterministic() {
    let case = &cases()[0];
    let a = plan(case);
    let b = plan(case);
    assert_eq!(a, b);
    let spec = a.pod.spec.unwrap();
    assert_eq!(
        spec.active_deadline_seconds,
        Some(3600 + i64::try_from(case.settings.timeouts.deadline_margin_seconds).unwrap())
    );
    assert_eq!(
        a.pod.metadata.name.as_deref(),
        Some("spotrun-t1-zx9qw-c3-987654")
    );
    let hosts = spec.host_aliases.unwrap()[0].hostnames.clone().unwrap();
    assert!(
        hosts.contains(&"db".to_string()) && hosts.contains(&"postgres".to_string()),
        "{hosts:?}"
    );
}

#[test]
fn service_host_names_follow_the_runner_convention() {
    let svc = |name: &str, alias: &str| ImageSpec {
        name: name.into(),
        alias: alias.into(),
        ..ImageSpec::default()
    };
    assert_eq!(
        service_host_names(&svc("tutum/wordpress:latest", "")),
        vec!["tutum-wordpress"],
        "`__` names are not valid hostAliases"
    );
    assert_eq!(
        service_host_names(&svc("registry.example.com:5000/a/b:1", "x y")),
        vec!["x", "y", "a-b"]
    );
    assert_eq!(
        service_host_names(&svc("docker.io/library/redis@sha256:00", "")),
        vec!["redis"]
    );
}

#[test]
fn strategic_patch_merges_into_generated_containers() {
    let mut case = cases().remove(0);
    case.settings.pod.patch = Some(crate::settings::PodSpecPatch {
        patch_type: PatchType::Strategic,
        patch: r#"{"spec": {"containers": [
            {"name": "helper", "env": [{"name": "GOMAXPROCS", "value": "2"}]},
            {"name": "proxy-sidecar", "image": "envoyproxy/envoy:v1.31"}
        ]}}"#
            .into(),
    });
    let pod = plan(&case).pod;
    let containers = pod.spec.unwrap().containers;
    let helper = containers.iter().find(|c| c.name == "helper").unwrap();
    let env = helper.env.as_ref().unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "GOMAXPROCS" && e.value.as_deref() == Some("2")),
        "the patch's variable is merged in"
    );
    assert!(
        env.iter().any(|e| e.name == "PATH"),
        "the generated variables are kept (merged by name, not replaced)"
    );
    assert!(helper.image.is_some(), "unpatched fields stay");
    assert!(containers.iter().any(|c| c.name == "build"));
    assert_eq!(containers.last().unwrap().name, "proxy-sidecar");

    case.settings.pod.patch = Some(crate::settings::PodSpecPatch {
        patch_type: PatchType::Strategic,
        patch: r#"{"spec": {"containers": [{"image": "no-name"}]}}"#.into(),
    });
    let identity = JobIdentity::from_env(&case.env).unwrap();
    let knobs = job_knobs(&case.settings, &case.env, &case.job).unwrap();
    let err = plan_pod(
        &case.settings,
        &PlanInput {
            job: &case.job,
            identity: &identity,
            env: &case.env,
            knobs: &knobs,
            spot: SpotPolicy::Never,
            pull_attempt: 0,
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("spec.containers[]") && err.to_string().contains("\"name\""),
        "{err}"
    );
}

#[test]
fn services_get_public_job_variables_their_own_expanded_and_dollars_kept() {
    let mut job = minimal_job(1200);
    job.variables = vec![
        JobVariable {
            key: "CI_JOB_TOKEN".into(),
            value: "glcbt-secret".into(),
            masked: true,
            ..JobVariable::default()
        },
        JobVariable {
            key: "DEPLOY_KEY".into(),
            value: "project-secret".into(),
            public: false,
            ..JobVariable::default()
        },
        JobVariable {
            key: "MASKED_BUT_PUBLIC".into(),
            value: "hidden-too".into(),
            public: true,
            masked: true,
            ..JobVariable::default()
        },
        JobVariable {
            key: "POSTGRES_PASSWORD".into(),
            value: "pw".into(),
            public: true,
            ..JobVariable::default()
        },
        JobVariable {
            key: "DOCKER_TLS_CERTDIR".into(),
            value: String::new(),
            public: true,
            ..JobVariable::default()
        },
    ];
    job.services.push(ImageSpec {
        name: "postgres:16".into(),
        alias: "db".into(),
        variables: vec![JobVariable {
            key: "POSTGRES_DB".into(),
            value: "app-$CI_JOB_ID".into(),
            ..JobVariable::default()
        }],
        ports: vec![crate::job::ServicePort {
            number: 5432,
            protocol: "tcp".into(),
            name: "PG".into(),
        }],
        ..ImageSpec::default()
    });
    let env = env(&[
        ("CI_JOB_ID", "1200"),
        ("CI_JOB_TOKEN", "glcbt-secret"),
        ("DEPLOY_KEY", "project-secret"),
        ("MASKED_BUT_PUBLIC", "hidden-too"),
        ("POSTGRES_PASSWORD", "pw"),
        ("DOCKER_TLS_CERTDIR", ""),
        ("WEIRD", "a$(HOME)b$$c"),
        ("FF_NETWORK_PER_BUILD", "false"),
        ("1BAD", "x"),
        (
            "CI_JOB_SERVICES",
            r#"[{"name":"postgres:16","alias":"db","entrypoint":null,"command":null,"variables":{"POSTGRES_DB":"app-1200","POSTGRES_PASSWORD":"own"}}]"#,
        ),
    ]);
    let case = Case {
        name: "services-env",
        settings: Settings::default(),
        job,
        env,
        fallback: false,
    };
    let p = plan(&case);
    let svc = &p.pod.spec.as_ref().unwrap().containers[2];
    let env: Vec<(String, String)> = svc
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        env,
        [
            ("CI_JOB_ID", "1200"),
            ("DOCKER_TLS_CERTDIR", ""),
            ("FF_NETWORK_PER_BUILD", "false"),
            ("WEIRD", "a$$(HOME)b$$$$c"),
            ("POSTGRES_DB", "app-1200"),
            ("POSTGRES_PASSWORD", "own"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
    );
    let mounts: Vec<&str> = svc
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(mounts.contains(&"/builds"), "{mounts:?}");
    let port = &svc.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.container_port, port.name.as_deref()),
        (5432, Some("pg"))
    );
    assert_eq!(
        svc.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
}

#[test]
fn pull_policies_follow_the_job_within_what_the_operator_allows() {
    use crate::settings::PullPolicy::{Always, IfNotPresent, Never};
    let v = |xs: &[&str]| xs.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
    let mut s = Settings::default();
    let mut notes = Vec::new();
    // Nothing configured: the job decides; no job policy: the cluster default.
    assert_eq!(
        pull_policies(&s, "img", &v(&["always", "if-not-present"]), &mut notes).unwrap(),
        [Always, IfNotPresent]
    );
    assert!(
        pull_policies(&s, "img", &[], &mut notes)
            .unwrap()
            .is_empty()
    );
    // The operator's list is the default and, without allowed_pull_policies, the allow-list.
    s.images.pull_policy = vec![IfNotPresent];
    assert_eq!(
        pull_policies(&s, "img", &[], &mut notes).unwrap(),
        [IfNotPresent]
    );
    let e = pull_policies(&s, "img", &v(&["always"]), &mut notes).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid pull policy for image \"img\": pull_policy ([always]) defined in GitLab pipeline config is not one of the allowed_pull_policies ([if-not-present])"
    );
    // allowed_pull_policies: the allowed part of the job's list is kept, with one warning.
    s.images.allowed_pull_policies = vec![Always, IfNotPresent];
    assert_eq!(
        pull_policies(&s, "img", &v(&["never", "always"]), &mut notes).unwrap(),
        [Always]
    );
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("WARNING: image \"img\": pull_policy [never always]"),
        "{notes:?}"
    );
    let e = pull_policies(&s, "img", &v(&["sometimes"]), &mut notes).unwrap_err();
    assert!(
        e.to_string()
            .contains("\"sometimes\" is not always, if-not-present or never"),
        "{e}"
    );
    assert_eq!(
        policy_for_attempt(&[Always, Never], 0).as_deref(),
        Some("Always")
    );
    assert_eq!(
        policy_for_attempt(&[Always, Never], 5).as_deref(),
        Some("Never")
    );
    assert_eq!(policy_for_attempt(&[], 0), None);
}

#[test]
fn helper_image_follows_the_pods_architecture() {
    let mut case = case_named("bare-job-defaults");
    let spec = |case: &Case| plan(case).pod.spec.unwrap();
    // Nothing selects an architecture: amd64's helper, and the pod is pinned to amd64 nodes.
    let s = spec(&case);
    assert_eq!(
        s.containers[1].image.as_deref(),
        Some("registry.gitlab.com/gitlab-org/gitlab-runner/gitlab-runner-helper:x86_64-v19.4.0")
    );
    assert_eq!(
        s.node_selector.unwrap().get(ARCH_LABEL).map(String::as_str),
        Some("amd64")
    );
    // The operator's node selector picks arm64: the arm64 helper and the GKE arm64 toleration.
    case.settings
        .pod
        .node_selector
        .insert(ARCH_LABEL.into(), "arm64".into());
    let s = spec(&case);
    assert!(
        s.containers[1]
            .image
            .as_deref()
            .unwrap()
            .ends_with(":arm64-v19.4.0"),
        "{:?}",
        s.containers[1].image
    );
    assert!(s.tolerations.unwrap().iter().any(|t| {
        t.key.as_deref() == Some(ARCH_LABEL)
            && t.value.as_deref() == Some("arm64")
            && t.effect.as_deref() == Some("NoSchedule")
    }));
    // A job's allowed overwrite wins over the operator's; an unknown architecture fails the job.
    case.settings.pod.node_selector_overwrite_allowed = Some("^kubernetes\\.io/arch=".into());
    case.env.0.insert(
        "KUBERNETES_NODE_SELECTOR_ARCH".into(),
        "kubernetes.io/arch=s390x".into(),
    );
    assert!(
        spec(&case).containers[1]
            .image
            .as_deref()
            .unwrap()
            .ends_with(":s390x-v19.4.0")
    );
    case.env.0.insert(
        "KUBERNETES_NODE_SELECTOR_ARCH".into(),
        "kubernetes.io/arch=mips".into(),
    );
    let identity = JobIdentity::from_env(&case.env).unwrap();
    let knobs = job_knobs(&case.settings, &case.env, &case.job).unwrap();
    let err = plan_pod(
        &case.settings,
        &PlanInput {
            job: &case.job,
            identity: &identity,
            env: &case.env,
            knobs: &knobs,
            spot: SpotPolicy::Prefer,
            pull_attempt: 0,
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, PlanError::UnsupportedArch { arch, .. } if arch == "mips"),
        "{err}"
    );
    // A literal helper image is used as written and pins nothing.
    case.env.0.remove("KUBERNETES_NODE_SELECTOR_ARCH");
    case.settings.pod.node_selector.clear();
    case.settings.images.helper_image = "mirror.example.com/helper:pinned".into();
    let s = spec(&case);
    assert_eq!(
        s.containers[1].image.as_deref(),
        Some("mirror.example.com/helper:pinned")
    );
    assert!(s.node_selector.is_none_or(|n| !n.contains_key(ARCH_LABEL)));
}

#[test]
fn volumes_are_mounted_in_every_container_and_replace_the_builds_dir() {
    let case = case_named("volumes-arm64-helper");
    let p = plan(&case);
    let spec = p.pod.spec.unwrap();
    let volumes: Vec<&str> = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert!(
        !volumes.contains(&"builds"),
        "the PVC replaces it: {volumes:?}"
    );
    for c in &spec.containers {
        let mounts: Vec<(&str, &str)> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        for want in [
            ("builds-3", "/builds"),
            ("docker-sock", "/var/run/docker.sock"),
            ("ca-bundle", "/etc/ssl/ci"),
            ("deploy-key", "/secrets/demo"),
            ("scratch", "/scratch"),
            ("datasets", "/data"),
        ] {
            assert!(
                mounts.contains(&want),
                "{}: {mounts:?} lacks {want:?}",
                c.name
            );
        }
    }
    // Pulls rely on the service account: no pull secrets, no registry secret, one note.
    assert!(spec.image_pull_secrets.is_none());
    assert!(p.secret.is_none());
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("use_service_account_image_pull_secrets")),
        "{:?}",
        p.notes
    );
}

/// Regression: a `pod.patch` setting `affinity` replaced the spot node affinity (merge and
/// strategic patches replace lists), so `never` pods could land on spot nodes.
#[test]
fn a_patch_setting_affinity_is_merged_with_the_spot_placement() {
    let patch = r#"{"spec": {"affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ci"]}]},
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ci-big"]}]}
            ]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}
            ]
        },
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
        ]}
    }, "tolerations": [{"key": "dedicated", "operator": "Exists"}]}}"#;
    for patch_type in [PatchType::Merge, PatchType::Strategic] {
        for spot in [SpotPolicy::Require, SpotPolicy::Prefer, SpotPolicy::Never] {
            let mut case = case_named("bare-job-defaults");
            case.settings.pod.patch = Some(crate::settings::PodSpecPatch {
                patch_type,
                patch: patch.into(),
            });
            let identity = JobIdentity::from_env(&case.env).unwrap();
            let knobs = job_knobs(&case.settings, &case.env, &case.job).unwrap();
            let spec = plan_pod(
                &case.settings,
                &PlanInput {
                    job: &case.job,
                    identity: &identity,
                    env: &case.env,
                    knobs: &knobs,
                    spot,
                    pull_attempt: 0,
                },
            )
            .unwrap()
            .pod
            .spec
            .unwrap();
            let what = format!("{patch_type:?} {spot:?}");
            let affinity = spec.affinity.unwrap();
            assert!(
                affinity.pod_anti_affinity.is_some(),
                "{what}: the patch's own part stays"
            );
            let na = affinity.node_affinity.unwrap();
            let terms = na
                .required_during_scheduling_ignored_during_execution
                .unwrap()
                .node_selector_terms;
            assert_eq!(terms.len(), 2, "{what}");
            for t in &terms {
                let exprs = t.match_expressions.as_ref().unwrap();
                assert_eq!(exprs[0].key, "pool", "{what}");
                assert_eq!(
                    exprs.contains(&spot_requirement("NotIn")),
                    spot == SpotPolicy::Never,
                    "{what}: {exprs:?}"
                );
            }
            let preferred = na
                .preferred_during_scheduling_ignored_during_execution
                .unwrap();
            assert_eq!(preferred[0].weight, 10, "{what}");
            assert_eq!(
                preferred
                    .iter()
                    .any(|p| p.preference.match_expressions.as_ref().unwrap()[0]
                        == spot_requirement("In")),
                spot == SpotPolicy::Prefer,
                "{what}: {preferred:?}"
            );
            let tolerations = spec.tolerations.unwrap();
            assert!(
                tolerations
                    .iter()
                    .any(|t| t.key.as_deref() == Some("dedicated"))
            );
            assert_eq!(
                tolerations.contains(&spot_toleration()),
                spot != SpotPolicy::Never,
                "{what}"
            );
            assert_eq!(
                spec.node_selector
                    .unwrap_or_default()
                    .get(SPOT_LABEL)
                    .map(String::as_str),
                (spot == SpotPolicy::Require).then_some("true"),
                "{what}"
            );
        }
    }
}
/// Build and helper get `spotrun-launch` from the init container through a read-only volume;
/// services do not; the build container idles in it. The image is this version's.
#[test]
fn the_launcher_comes_from_an_init_container() {
    let case = cases().remove(1);
    let p = plan_pod(
        &case.settings,
        &PlanInput {
            job: &case.job,
            identity: &JobIdentity::from_env(&case.env).unwrap(),
            env: &case.env,
            knobs: &job_knobs(&case.settings, &case.env, &case.job).unwrap(),
            spot: SpotPolicy::Never,
            pull_attempt: 0,
        },
    )
    .unwrap();
    let spec = p.pod.spec.unwrap();
    let init = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(
        init.image.as_deref(),
        Some(concat!(
            "registry.gitlab.com/spotrun/spotrun:",
            env!("CARGO_PKG_VERSION")
        ))
    );
    assert_eq!(
        init.command.as_deref().unwrap(),
        ["spotrun-launch", "install", crate::plan::LAUNCHER_DIR]
    );
    for c in &spec.containers {
        let m = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == crate::plan::LAUNCHER_DIR);
        if c.name == "build" || c.name == "helper" {
            assert_eq!(m.and_then(|m| m.read_only), Some(true), "{}", c.name);
        } else {
            assert!(m.is_none(), "{}", c.name);
        }
    }
    let build = spec.containers.iter().find(|c| c.name == "build").unwrap();
    let idle = build.args.as_ref().or(build.command.as_ref()).unwrap();
    assert_eq!(
        idle.last().unwrap(),
        &format!("exec {} idle", crate::plan::LAUNCHER)
    );
}

/// `image: kubernetes: user` (and a service's own) becomes `runAsUser` / `runAsGroup` of that
/// container only, within `pod.allowed_users` / `pod.allowed_groups`; the operator's own values
/// (container or pod level) win; whatever is not applied, or a user name, is one warning line.
#[test]
fn job_users_apply_within_the_allow_lists_and_the_operators_own_win() {
    let with_user = |user: serde_json::Value| {
        let mut job = minimal_job(1100);
        job.image.executor_opts = serde_json::json!({ "kubernetes": { "user": user } });
        job
    };
    let run = |settings: &Settings, job: &JobResponse| {
        let env = env(&[("CI_JOB_ID", "1100")]);
        let p = plan_pod(
            settings,
            &PlanInput {
                job,
                identity: &JobIdentity::from_env(&env).unwrap(),
                env: &env,
                knobs: &JobKnobs::default(),
                spot: SpotPolicy::Never,
                pull_attempt: 0,
            },
        )
        .unwrap();
        let ids = |name: &str| {
            let c = p
                .pod
                .spec
                .as_ref()
                .unwrap()
                .containers
                .iter()
                .find(|c| c.name == name);
            let sc = c
                .and_then(|c| c.security_context.clone())
                .unwrap_or_default();
            (sc.run_as_user, sc.run_as_group)
        };
        (ids("build"), ids("helper"), p.notes)
    };
    let mut s = Settings::default();
    // Any ID while the lists are empty; the helper keeps its own.
    let (build, helper, notes) = run(&s, &with_user(serde_json::json!("1000:1001")));
    assert_eq!(build, (Some(1000), Some(1001)));
    assert_eq!(helper, (None, None));
    assert!(notes.is_empty(), "{notes:?}");
    let (build, _, _) = run(&s, &with_user(serde_json::json!(1000)));
    assert_eq!(build, (Some(1000), None));

    s.pod.allowed_users = vec!["1000".into()];
    s.pod.allowed_groups = vec!["1000".into()];
    let (build, _, notes) = run(&s, &with_user(serde_json::json!("3000:3000")));
    assert_eq!(build, (None, None));
    assert_eq!(
        notes,
        [
            "WARNING: image \"alpine:3.22\": kubernetes user \"3000:3000\" not applied: uid 3000 is not in pod.allowed_users (1000); gid 3000 is not in pod.allowed_groups (1000)"
        ]
    );
    let (build, _, notes) = run(&s, &with_user(serde_json::json!("1000:3000")));
    assert_eq!(build, (Some(1000), None));
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("applied as uid 1000 only: gid 3000"),
        "{notes:?}"
    );

    let (build, _, notes) = run(&s, &with_user(serde_json::json!("root")));
    assert_eq!(build, (None, None));
    assert_eq!(
        notes,
        [
            "WARNING: image \"alpine:3.22\": kubernetes user \"root\" ignored: not a numeric uid or uid:gid (user names are not resolved); the image's own user runs it"
        ]
    );

    // The operator's runAsUser wins (container level), and so does its pod-level runAsGroup.
    let mut op = Settings::from_toml(
        "[pod.build_security_context]\nrunAsUser = 2000\n[pod.security_context]\nrunAsGroup = 2000\n",
        Path::new("op.toml"),
    )
    .unwrap();
    let (build, _, notes) = run(&op, &with_user(serde_json::json!("1000:1000")));
    assert_eq!(
        build,
        (Some(2000), None),
        "the pod-level group applies by itself"
    );
    assert_eq!(
        notes,
        [
            "WARNING: image \"alpine:3.22\": kubernetes user \"1000:1000\" not applied: pod.build_security_context sets runAsUser 2000; pod.security_context sets runAsGroup 2000"
        ]
    );
    // The same value as the operator's is no conflict.
    op.pod.security_context = None;
    let (build, _, notes) = run(&op, &with_user(serde_json::json!(2000)));
    assert_eq!(build, (Some(2000), None));
    assert!(notes.is_empty(), "{notes:?}");

    // A service's own user applies to that service only.
    let mut job = minimal_job(1100);
    job.services.push(ImageSpec {
        name: "postgres:16".into(),
        alias: "db".into(),
        executor_opts: serde_json::json!({ "kubernetes": { "user": "70:70" } }),
        ..ImageSpec::default()
    });
    let env = env(&[("CI_JOB_ID", "1100")]);
    let p = plan_pod(
        &Settings::default(),
        &PlanInput {
            job: &job,
            identity: &JobIdentity::from_env(&env).unwrap(),
            env: &env,
            knobs: &JobKnobs::default(),
            spot: SpotPolicy::Never,
            pull_attempt: 0,
        },
    )
    .unwrap();
    let spec = p.pod.spec.unwrap();
    let sc = |image: &str| {
        spec.containers
            .iter()
            .find(|c| c.image.as_deref() == Some(image))
            .and_then(|c| c.security_context.clone())
    };
    assert_eq!(sc("alpine:3.22"), None);
    let db = sc("postgres:16").unwrap();
    assert_eq!((db.run_as_user, db.run_as_group), (Some(70), Some(70)));
}
