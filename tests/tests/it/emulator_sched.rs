//! Scheduling, volumes and image pulls as pods see them.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom"
)]

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event as KEvent, Pod};
use kube::Api;
use kube::api::{AttachParams, ListParams, PostParams};
use serde_json::json;
use spotrun_testkit::emulator::{Emulator, EmulatorConfig, ImageRule, NodeSpec, PullOutcome};
use tokio::io::AsyncReadExt as _;

use super::emulator_support::{gke, pod, sleeper, wait_pod, wait_running};

async fn exec_out(pods: &Api<Pod>, name: &str, container: &str, script: &str) -> String {
    let mut p = pods
        .exec(
            name,
            vec!["sh", "-c", script],
            &AttachParams::default().container(container),
        )
        .await
        .unwrap();
    let mut s = String::new();
    p.stdout().unwrap().read_to_string(&mut s).await.unwrap();
    let st = p.take_status().unwrap().await.unwrap();
    assert_eq!(st.status.as_deref(), Some("Success"), "{script}: {st:?}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_share_empty_dir_and_host_aliases() {
    let emu = gke().await;
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "shared"},
        "spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
            "hostAliases": [{"ip": "127.0.0.1", "hostnames": ["db", "cache.local"]}],
            "volumes": [{"name": "builds", "emptyDir": {}}, {"name": "scripts", "emptyDir": {}}],
            "containers": [
                {"name": "build", "image": "alpine:3", "command": ["sh", "-c", "sleep 3600"], "workingDir": "/builds",
                 "env": [{"name": "GREETING", "value": "hi"}, {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                 "volumeMounts": [{"name": "builds", "mountPath": "/builds"}, {"name": "scripts", "mountPath": "/scripts"}]},
                {"name": "helper", "image": "alpine:3", "command": ["sh", "-c", "sleep 3600"],
                 "volumeMounts": [{"name": "builds", "mountPath": "/work/b"}]}
            ]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    wait_running(&pods, "shared").await;
    exec_out(&pods, "shared", "helper", "echo from-helper > /work/b/file").await;
    assert_eq!(
        exec_out(&pods, "shared", "build", "pwd; cat /builds/file").await,
        "/builds\nfrom-helper\n"
    );
    assert_eq!(
        exec_out(&pods, "shared", "build", "echo $GREETING $POD").await,
        "hi shared\n"
    );
    let hosts = exec_out(&pods, "shared", "build", "cat /etc/hosts").await;
    assert!(hosts.contains("127.0.0.1\tdb\tcache.local"), "{hosts}");
    // The helper does not mount /scripts; the build container's /scripts is private to the pod.
    exec_out(&pods, "shared", "build", "echo s > /scripts/x").await;
    assert_eq!(
        exec_out(
            &pods,
            "shared",
            "helper",
            "test -e /scripts/x && echo leaked || echo private"
        )
        .await,
        "private\n"
    );
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_pods_land_on_spot_nodes_and_unschedulable_pods_wait() {
    let emu = gke().await;
    let client = emu.client().await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut spot = pod("spot", &json!([sleeper("build")]));
    let spec = spot.spec.as_mut().unwrap();
    spec.node_selector =
        Some([("cloud.google.com/gke-spot".to_string(), "true".to_string())].into());
    spec.tolerations = Some(vec![serde_json::from_value(json!({"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"})).unwrap()]);
    pods.create(&PostParams::default(), &spot).await.unwrap();
    let running = wait_running(&pods, "spot").await;
    assert!(
        running
            .spec
            .unwrap()
            .node_name
            .unwrap()
            .starts_with("gke-spot-")
    );

    let mut lost = pod("lost", &json!([sleeper("build")]));
    lost.spec.as_mut().unwrap().node_selector =
        Some([("pool".to_string(), "gpu".to_string())].into());
    pods.create(&PostParams::default(), &lost).await.unwrap();
    let p = wait_pod(&pods, "lost", "Unschedulable", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.reason.as_deref() == Some("Unschedulable"))
            })
    })
    .await;
    let cond = p
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "PodScheduled")
        .unwrap();
    assert_eq!(cond.status, "False");
    let msg = cond.message.unwrap();
    assert_eq!(
        msg,
        "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 2 node(s) had untolerated taint(s). preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."
    );
    let events: Api<KEvent> = Api::default_namespaced(client);
    let evs = events
        .list(&ListParams::default().fields("involvedObject.name=lost,reason=FailedScheduling"))
        .await
        .unwrap();
    assert_eq!(evs.items.len(), 1);
    assert_eq!(evs.items[0].type_.as_deref(), Some("Warning"));
    assert_eq!(evs.items[0].message.as_deref(), Some(msg.as_str()));
    // A matching node appears: the pending pod is retried and binds.
    let mut gpu = NodeSpec::gke("gpu-1", false);
    gpu.labels.insert("pool".into(), "gpu".into());
    emu.faults().add_node(gpu);
    let bound = wait_running(&pods, "lost").await;
    assert_eq!(bound.spec.unwrap().node_name.as_deref(), Some("gpu-1"));
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_requests_fill_nodes() {
    let mut cfg = EmulatorConfig::gke();
    cfg.nodes.retain(|n| n.name == "gke-ondemand-1");
    let emu = Emulator::start(cfg).await.unwrap();
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    let big = |name: &str| {
        pod(
            name,
            &json!([{"name": "c", "image": "busybox", "command": ["sleep", "3600"], "resources": {"requests": {"cpu": "3", "memory": "1Gi"}}}]),
        )
    };
    pods.create(&PostParams::default(), &big("first"))
        .await
        .unwrap();
    wait_running(&pods, "first").await;
    pods.create(&PostParams::default(), &big("second"))
        .await
        .unwrap();
    let p = wait_pod(&pods, "second", "Unschedulable", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.reason.as_deref() == Some("Unschedulable"))
            })
    })
    .await;
    let msg = p.status.unwrap().conditions.unwrap()[0]
        .message
        .clone()
        .unwrap();
    assert!(
        msg.starts_with("0/1 nodes are available: 1 Insufficient cpu."),
        "{msg}"
    );
    assert!(
        msg.contains("1 No preemption victims found for incoming pod"),
        "{msg}"
    );
    // Freeing the node lets the second pod in.
    pods.delete(
        "first",
        &kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    wait_running(&pods, "second").await;
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pull_failure_backs_off_while_other_containers_run() {
    let mut cfg = EmulatorConfig::gke();
    cfg.images.push(ImageRule {
        pattern: "registry.example.com/missing:*".into(),
        outcome: PullOutcome::NotFound,
        default_command: None,
        env: Vec::new(),
        bin_dirs: Vec::new(),
        rootfs: None,
        user: None,
    });
    cfg.images.push(ImageRule {
        pattern: "registry.example.com/tool:*".into(),
        outcome: PullOutcome::Delay(Duration::from_millis(200)),
        default_command: Some(vec![
            "sh".into(),
            "-c".into(),
            "echo default-cmd $TOOL_HOME; sleep 3600".into(),
        ]),
        env: vec![("TOOL_HOME".into(), "/opt/tool".into())],
        bin_dirs: Vec::new(),
        rootfs: None,
        user: None,
    });
    let emu = Emulator::start(cfg).await.unwrap();
    let client = emu.client().await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(
        &PostParams::default(),
        &pod(
            "pull",
            &json!([
                {"name": "build", "image": "registry.example.com/missing:1.0"},
                {"name": "helper", "image": "registry.example.com/tool:2"}
            ]),
        ),
    )
    .await
    .unwrap();
    let img = "registry.example.com/missing:1.0";
    let p = wait_pod(&pods, "pull", "ImagePullBackOff", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.state
                        .as_ref()
                        .and_then(|s| s.waiting.as_ref())
                        .and_then(|w| w.reason.as_deref())
                        == Some("ImagePullBackOff")
                }) && cs.iter().any(|c| c.name == "helper" && c.ready)
            })
    })
    .await;
    let st = p.status.unwrap();
    assert_eq!(st.phase.as_deref(), Some("Pending"));
    let build = st
        .container_statuses
        .unwrap()
        .into_iter()
        .find(|c| c.name == "build")
        .unwrap();
    let w = build.state.unwrap().waiting.unwrap();
    assert_eq!(
        w.message.unwrap(),
        format!(
            "Back-off pulling image \"{img}\": ErrImagePull: rpc error: code = NotFound desc = failed to pull and unpack image \"{img}\": failed to resolve reference \"{img}\": {img}: not found"
        )
    );
    let ready = st
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        ready.message.as_deref(),
        Some("containers with unready status: [build]")
    );
    let events: Api<KEvent> = Api::default_namespaced(client);
    let evs = events
        .list(&ListParams::default().fields("involvedObject.name=pull"))
        .await
        .unwrap();
    let msgs: Vec<String> = evs
        .items
        .iter()
        .filter(|e| e.involved_object.field_path.as_deref() == Some("spec.containers{build}"))
        .map(|e| {
            format!(
                "{} {} {}",
                e.type_.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default()
            )
        })
        .collect();
    assert!(
        msgs.iter().any(|m| m.starts_with(&format!(
            "Warning Failed Failed to pull image \"{img}\": rpc error: code = NotFound"
        ))),
        "{msgs:?}"
    );
    assert!(
        msgs.contains(&"Warning Failed Error: ErrImagePull".to_string()),
        "{msgs:?}"
    );
    assert!(
        msgs.contains(&format!("Normal BackOff Back-off pulling image \"{img}\"")),
        "{msgs:?}"
    );
    assert!(
        msgs.contains(&"Warning Failed Error: ImagePullBackOff".to_string()),
        "{msgs:?}"
    );
    // The helper ran its image's default command.
    let log = pods
        .logs(
            "pull",
            &kube::api::LogParams {
                container: Some("helper".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        log, "default-cmd /opt/tool\n",
        "image ENV reaches the container"
    );
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_run_in_order_before_app_containers() {
    let emu = gke().await;
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "inits"}, "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
        "volumes": [{"name": "w", "emptyDir": {}}],
        "initContainers": [
            {"name": "one", "image": "busybox", "command": ["sh", "-c", "sleep 0.2; echo one >> /w/order"], "volumeMounts": [{"name": "w", "mountPath": "/w"}]},
            {"name": "two", "image": "busybox", "command": ["sh", "-c", "echo two >> /w/order"], "volumeMounts": [{"name": "w", "mountPath": "/w"}]}
        ],
        "containers": [{"name": "app", "image": "busybox", "command": ["sh", "-c", "echo app >> /w/order; sleep 3600"], "volumeMounts": [{"name": "w", "mountPath": "/w"}]}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    let running = wait_running(&pods, "inits").await;
    let st = running.status.unwrap();
    let inits = st.init_container_statuses.unwrap();
    assert!(inits.iter().all(|c| {
        c.state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .is_some_and(|t| t.exit_code == 0 && t.reason.as_deref() == Some("Completed"))
    }));
    assert!(
        st.conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Initialized" && c.status == "True")
    );
    assert_eq!(
        exec_out(&pods, "inits", "app", "cat /w/order").await,
        "one\ntwo\napp\n"
    );

    // A failing init container with restartPolicy Never fails the pod; the app never starts.
    let bad: Pod = serde_json::from_value(
        json!({"metadata": {"name": "bad-init"}, "spec": {"restartPolicy": "Never",
        "initContainers": [{"name": "boom", "image": "busybox", "command": ["sh", "-c", "exit 5"]}],
        "containers": [{"name": "app", "image": "busybox", "command": ["sleep", "3600"]}]}}),
    )
    .unwrap();
    pods.create(&PostParams::default(), &bad).await.unwrap();
    let failed = wait_pod(&pods, "bad-init", "Failed", |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
    })
    .await;
    let st = failed.status.unwrap();
    let app = &st.container_statuses.unwrap()[0];
    assert_eq!(
        app.state
            .as_ref()
            .unwrap()
            .waiting
            .as_ref()
            .unwrap()
            .reason
            .as_deref(),
        Some("PodInitializing")
    );
    let init = st
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Initialized")
        .unwrap();
    assert_eq!(
        (init.status.as_str(), init.message.as_deref()),
        ("False", Some("containers with incomplete status: [boom]"))
    );
    emu.shutdown().await;
}
