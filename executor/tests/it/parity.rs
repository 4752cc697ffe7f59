//! What users of GitLab's Kubernetes executor rely on (issue 17, items 3, 5 and 9) through the
//! runner harness and the emulator: operator volumes in the containers, the helper image of the
//! node's architecture, and the periodic "Waiting for pod" lines.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use spotrun_testkit::emulator::{EmulatorConfig, NodeSpec, Taint};
use spotrun_testkit::harness::{JobBuilder, JobResult, Service};

use crate::support::{Env, node_of};

/// Secret, `ConfigMap`, `hostPath`, `emptyDir` and a PVC holding the builds directory (claim name and
/// paths expanded from job variables) are mounted in the build container and in services; the
/// helper's checkout lands on the PVC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_volumes_reach_the_build_and_service_containers() {
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("hello"), "from-the-node\n").unwrap();
    let env = Env::start(&format!(
        r#"
[[volumes.secret]]
name = "deploy-key"
mount_path = "/secrets/job-$CI_JOB_ID"
read_only = true
[[volumes.config_map]]
name = "ca-bundle"
mount_path = "/etc/ci-ca"
read_only = true
[[volumes.host_path]]
name = "node-data"
mount_path = "/hostdata"
host_path = "{host}"
read_only = true
[[volumes.empty_dir]]
name = "scratch"
mount_path = "/scratch"
medium = "Memory"
size_limit = "64Mi"
[[volumes.pvc]]
name = "builds-$CI_CONCURRENT_ID"
mount_path = "/builds"
sub_path = "job-${{CI_JOB_ID}}"
"#,
        host = host.path().display()
    ))
    .await;
    let client = env.emu.client().await;
    let pp = PostParams::default();
    Api::<Secret>::namespaced(client.clone(), "ci-jobs")
        .create(
            &pp,
            &Secret {
                metadata: ObjectMeta {
                    name: Some("deploy-key".into()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    "token".to_string(),
                    ByteString(b"key-material\n".to_vec()),
                )])),
                ..Secret::default()
            },
        )
        .await
        .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), "ci-jobs")
        .create(
            &pp,
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("ca-bundle".into()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    "ca.crt".to_string(),
                    "ca-certificate\n".to_string(),
                )])),
                ..ConfigMap::default()
            },
        )
        .await
        .unwrap();

    let job = JobBuilder::new(5301)
        .service(Service::new("alpine:3.22", "probe").entrypoint(&[
            "sh",
            "-c",
            "cat /secrets/job-$CI_JOB_ID/token /etc/ci-ca/ca.crt /hostdata/hello > /scratch/svc-saw; sleep 300",
        ]))
        .script(&[
            "cat /secrets/job-5301/token /etc/ci-ca/ca.crt /hostdata/hello",
            "for i in $(seq 100); do [ -s /scratch/svc-saw ] && break; sleep 0.1; done",
            "sed 's/^/service: /' /scratch/svc-saw",
            "echo written > /builds/on-the-pvc",
            "if touch /secrets/job-5301/x 2>/dev/null; then echo secret-writable; fi",
        ])
        .build();
    let out = env.runner().run(&job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    for line in [
        "key-material",
        "ca-certificate",
        "from-the-node",
        "service: key-material",
        "service: ca-certificate",
        "service: from-the-node",
    ] {
        assert!(
            out.log.lines().any(|l| l == line),
            "{line:?} missing:\n{}",
            out.log
        );
    }
    // read_only holds: the build cannot write into the secret.
    assert!(
        !out.log.lines().any(|l| l == "secret-writable"),
        "{}",
        out.log
    );
}

/// A job variable that makes an expanded volume invalid fails the job (its fault) naming the
/// volume and the value, before any pod exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_variable_making_a_claim_name_invalid_fails_the_job_by_name() {
    let env =
        Env::start("[[volumes.pvc]]\nname = \"cache-$CACHE_SLOT\"\nmount_path = \"/slot\"\n").await;
    let out = env
        .runner()
        .run(
            &JobBuilder::new(5306)
                .variable("CACHE_SLOT", "Bad_Slot")
                .script(&["echo never"])
                .build(),
        )
        .await;
    assert!(
        matches!(out.result, JobResult::BuildFailure { .. }),
        "{:?}\n{}",
        out.result,
        out.log
    );
    assert!(
        out.log.contains("volumes.pvc[0].name: \"cache-Bad_Slot\""),
        "{}",
        out.log
    );
    assert!(env.pods().await.is_empty());
}

/// The pod a job ran with, read while it runs (it exists from prepare until cleanup).
async fn run_capturing_pod(env: &Env, job: spotrun_testkit::harness::JobSpec) -> (String, Pod) {
    let id = job.id.to_string();
    let runner = env.runner();
    let mut handle = tokio::spawn(async move { runner.run(&job).await });
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut pod = None;
    let out = loop {
        if pod.is_none() {
            pod = env.pods().await.into_iter().find(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("job.runner.gitlab.com/id"))
                    == Some(&id)
            });
        }
        tokio::select! {
            r = &mut handle => break r.unwrap(),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        assert!(Instant::now() < deadline, "job did not finish");
    };
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    (out.log, pod.expect("the job's pod was seen"))
}

/// A job selecting arm64 through the node-selector overwrite gets the arm64 helper image and
/// runs on the (tainted, as GKE taints Arm nodes) arm64 node; a job selecting nothing gets the
/// `x86_64` helper on an amd64 node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm64_job_gets_the_arm64_helper_on_an_arm64_node() {
    let mut cfg = EmulatorConfig::gke();
    let mut arm = NodeSpec::gke("gke-spot-arm-1", true);
    arm.labels
        .insert("kubernetes.io/arch".into(), "arm64".into());
    arm.taints.push(Taint {
        key: "kubernetes.io/arch".into(),
        value: "arm64".into(),
        effect: "NoSchedule".into(),
    });
    cfg.nodes.push(arm);
    let env = Env::start_with(
        cfg,
        r#"[images]
helper_image = "registry.example.com/gitlab-runner-helper:${ARCH}-v19.4.0"
[pod]
node_selector_overwrite_allowed = "^kubernetes\\.io/arch="
"#,
    )
    .await;
    let helper_image = |pod: &Pod| {
        pod.spec.as_ref().unwrap().containers[1]
            .image
            .clone()
            .unwrap_or_default()
    };
    let job = JobBuilder::new(5302)
        .variable("KUBERNETES_NODE_SELECTOR_ARCH", "kubernetes.io/arch=arm64")
        .script(&["echo on-arm", "sleep 1"])
        .build();
    let (log, pod) = run_capturing_pod(&env, job).await;
    assert_eq!(
        helper_image(&pod),
        "registry.example.com/gitlab-runner-helper:arm64-v19.4.0"
    );
    assert_eq!(node_of(&log), "gke-spot-arm-1", "{log}");

    let job = JobBuilder::new(5303)
        .script(&["echo on-amd64", "sleep 1"])
        .build();
    let (log, pod) = run_capturing_pod(&env, job).await;
    assert_eq!(
        helper_image(&pod),
        "registry.example.com/gitlab-runner-helper:x86_64-v19.4.0"
    );
    let node = node_of(&log);
    assert!(
        node.starts_with("gke-") && node != "gke-spot-arm-1",
        "{log}"
    );
}

/// Replaces the test settings' `unschedulable_seconds` line (its `[timeouts]` table is written by
/// `Env`, so a second one cannot be added).
fn set_timeouts(env: &Env, lines: &str) {
    let text = std::fs::read_to_string(&env.settings).unwrap();
    assert!(text.contains("unschedulable_seconds = 3\n"), "{text}");
    std::fs::write(
        &env.settings,
        text.replace("unschedulable_seconds = 3\n", &format!("{lines}\n")),
    )
    .unwrap();
}

/// While the pod waits, the job log gets the Kubernetes executor's line every `poll_interval`,
/// with the reason: containers being created (slow pulls), then a pod no node accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_pod_lines_repeat_with_the_reason() {
    let env = Env::start("").await;
    set_timeouts(&env, "unschedulable_seconds = 6\npoll_interval_seconds = 1");
    env.emu.faults().delay_pulls(Duration::from_secs(4));
    let out = env
        .runner()
        .run(&JobBuilder::new(5304).script(&["echo started"]).build())
        .await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    let waiting: Vec<&str> = out
        .log
        .lines()
        .filter(|l| {
            l.starts_with("Waiting for pod ci-jobs/")
                && l.ends_with(" to be running, status is Pending")
        })
        .collect();
    assert!(waiting.len() >= 2, "{}", out.log);
    assert!(
        out.log
            .lines()
            .any(|l| l.starts_with("\tcontainer build: ")),
        "{}",
        out.log
    );

    // No node has this label: the scheduler's message under each line until the timeout.
    let env = Env::start("[pod]\nnode_selector = { pool = \"nowhere\" }\n").await;
    set_timeouts(&env, "unschedulable_seconds = 6\npoll_interval_seconds = 1");
    let out = env
        .runner()
        .run(&JobBuilder::new(5305).script(&["echo never"]).build())
        .await;
    assert!(
        matches!(out.result, JobResult::SystemFailure { .. }),
        "{:?}\n{}",
        out.result,
        out.log
    );
    let unschedulable = out
        .log
        .lines()
        .filter(|l| l.starts_with("\tUnschedulable: \"") && l.contains("node"))
        .count();
    assert!(unschedulable >= 2, "{}", out.log);
}
