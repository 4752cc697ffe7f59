//! The real kube-rs client against the emulator: create, watch, wait, exec, delete.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom"
)]

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Event as KEvent, Node, Pod};
use kube::api::{AttachParams, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt as _};
use serde_json::json;
use tokio::io::AsyncReadExt as _;

use super::emulator_support::{
    gke, pod, pod_phase, sleeper, spawn_pod_watcher, wait_pod, wait_running,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_create_watch_exec_delete() {
    let emu = gke().await;
    let client = emu.client().await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut watch = spawn_pod_watcher(pods.clone(), watcher::Config::default());
    let created = pods
        .create(
            &PostParams::default(),
            &pod("job-1", &json!([sleeper("build")])),
        )
        .await
        .unwrap();
    assert_eq!(created.namespace().as_deref(), Some("ci-jobs"));
    assert!(created.uid().is_some() && created.resource_version().is_some());
    let running = wait_running(&pods, "job-1").await;
    // Not tolerating the spot taint, the pod lands on the on-demand node.
    assert_eq!(
        running.spec.as_ref().unwrap().node_name.as_deref(),
        Some("gke-ondemand-1")
    );
    let st = running.status.unwrap();
    let cs = &st.container_statuses.unwrap()[0];
    assert!(cs.ready && cs.started == Some(true) && cs.state.as_ref().unwrap().running.is_some());
    assert!(
        st.conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "PodScheduled" && c.status == "True")
    );

    let mut proc = pods
        .exec(
            "job-1",
            vec!["sh", "-c", "echo out; echo err >&2; exit 3"],
            &AttachParams::default().container("build").stderr(true),
        )
        .await
        .unwrap();
    let mut out = String::new();
    let mut err = String::new();
    proc.stdout()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    proc.stderr()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    let status = proc.take_status().unwrap().await.expect("a status frame");
    proc.join().await.unwrap();
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    assert_eq!(status.reason.as_deref(), Some("NonZeroExitCode"));
    let cause = &status.details.unwrap().causes.unwrap()[0];
    assert_eq!(
        (cause.reason.as_deref(), cause.message.as_deref()),
        (Some("ExitCode"), Some("3"))
    );

    // stdin through the v5 close signal: cat sees EOF.
    let mut cat = pods
        .exec(
            "job-1",
            vec!["cat"],
            &AttachParams::default().stdin(true).stderr(false),
        )
        .await
        .unwrap();
    let mut stdin = cat.stdin().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"hello via stdin")
        .await
        .unwrap();
    // kube-rs sends the v5 stdin close signal on EOF of its stdin pipe: shut it down (dropping is not enough).
    tokio::io::AsyncWriteExt::shutdown(&mut stdin)
        .await
        .unwrap();
    drop(stdin);
    let mut echoed = String::new();
    cat.stdout()
        .unwrap()
        .read_to_string(&mut echoed)
        .await
        .unwrap();
    assert_eq!(echoed, "hello via stdin");
    assert_eq!(
        cat.take_status().unwrap().await.unwrap().status.as_deref(),
        Some("Success")
    );

    let events: Api<KEvent> = Api::default_namespaced(client.clone());
    let evs = events
        .list(&ListParams::default().fields("involvedObject.name=job-1"))
        .await
        .unwrap();
    let reasons: Vec<String> = evs.items.iter().filter_map(|e| e.reason.clone()).collect();
    for r in ["Scheduled", "Pulling", "Pulled", "Created", "Started"] {
        assert!(
            reasons.iter().any(|x| x == r),
            "missing event {r} in {reasons:?}"
        );
    }

    let deleted = pods
        .delete("job-1", &DeleteParams::default())
        .await
        .unwrap();
    let obj = deleted.left().expect("graceful delete returns the pod");
    assert!(obj.metadata.deletion_timestamp.is_some());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut saw_delete = false;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, watch.events.recv()).await {
        if let watcher::Event::Delete(p) = ev
            && p.name_any() == "job-1"
        {
            saw_delete = true;
            break;
        }
    }
    assert!(saw_delete, "the watcher saw the pod deleted");
    assert!(pods.get_opt("job-1").await.unwrap().is_none());
    watch.stop().await;
    assert_eq!(emu.panics(), 0);
    let audit = emu.audit();
    assert!(
        audit
            .iter()
            .any(|a| a.verb == "watch" && a.resource == "pods")
    );
    assert!(
        audit
            .iter()
            .any(|a| a.verb == "get" && a.subresource.as_deref() == Some("exec"))
    );
    assert!(audit.iter().all(|a| a.bearer_token));
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_phases_follow_processes_and_cascade_deletes_owned_objects() {
    let emu = gke().await;
    let client = emu.client().await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut p = pod(
        "short",
        &json!([{"name": "a", "image": "busybox", "command": ["sh", "-c", "echo hi; exit 0"]}, {"name": "b", "image": "busybox", "command": ["sh", "-c", "exit 2"]}]),
    );
    p.metadata
        .labels
        .get_or_insert_default()
        .insert("job".to_string(), "7".to_string());
    let p = pods.create(&PostParams::default(), &p).await.unwrap();
    let done = wait_pod(&pods, "short", "Failed", |p| pod_phase(p) == "Failed").await;
    let cs = done.status.unwrap().container_statuses.unwrap();
    let code = |n: &str| {
        cs.iter()
            .find(|c| c.name == n)
            .unwrap()
            .state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .clone()
    };
    assert_eq!(
        (code("a").exit_code, code("a").reason.as_deref()),
        (0, Some("Completed"))
    );
    assert_eq!(
        (code("b").exit_code, code("b").reason.as_deref()),
        (2, Some("Error"))
    );
    assert_eq!(
        pods.logs(
            "short",
            &kube::api::LogParams {
                container: Some("a".into()),
                ..Default::default()
            }
        )
        .await
        .unwrap(),
        "hi\n"
    );

    // A configmap owned by the pod disappears with it.
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owned", "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "short", "uid": p.uid().unwrap()}]}, "data": {"k": "v"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    // Label selectors with set operators, field selectors on phase.
    let lp = ListParams::default()
        .labels("job in (7,8),app")
        .fields("status.phase=Failed");
    assert_eq!(pods.list(&lp).await.unwrap().items.len(), 1);
    assert_eq!(
        pods.list(&ListParams::default().labels("job notin (7)"))
            .await
            .unwrap()
            .items
            .len(),
        0
    );
    // Merge, strategic and JSON patches.
    pods.patch(
        "short",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"m": "1"}}})),
    )
    .await
    .unwrap();
    pods.patch(
        "short",
        &PatchParams::default(),
        &Patch::Strategic(json!({"metadata": {"annotations": {"s": "2"}}})),
    )
    .await
    .unwrap();
    let patched = pods
        .patch(
            "short",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(
                    json!([{"op": "add", "path": "/metadata/labels/j", "value": "3"}]),
                )
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(patched.labels().get("m").map(String::as_str), Some("1"));
    assert_eq!(patched.labels().get("j").map(String::as_str), Some("3"));
    assert_eq!(
        patched.annotations().get("s").map(String::as_str),
        Some("2")
    );
    pods.delete("short", &DeleteParams::default())
        .await
        .unwrap();
    wait_pod_gone(&pods, "short").await;
    assert!(
        cms.get_opt("owned").await.unwrap().is_none(),
        "owned configmap cascaded"
    );
    let nodes: Api<Node> = Api::all(client);
    assert_eq!(
        nodes
            .list(&ListParams::default().labels("cloud.google.com/gke-spot=true"))
            .await
            .unwrap()
            .items
            .len(),
        2
    );
    assert_eq!(emu.panics(), 0);
    emu.shutdown().await;
}

async fn wait_pod_gone(pods: &Api<Pod>, name: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while pods.get_opt(name).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pod {name} still exists"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_delete_sends_sigterm_then_sigkill() {
    let emu = gke().await;
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    // The shell traps TERM and exits 0 quickly; the second container (pid-1 sleep) ignores it and is SIGKILLed.
    let mut p = pod(
        "grace",
        &json!([
            {"name": "trap", "image": "busybox", "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"]},
            {"name": "stubborn", "image": "busybox", "command": ["sleep", "3600"]}
        ]),
    );
    p.spec.as_mut().unwrap().termination_grace_period_seconds = Some(1);
    pods.create(&PostParams::default(), &p).await.unwrap();
    wait_running(&pods, "grace").await;
    let mut w = pods
        .watch(
            &kube::api::WatchParams::default().fields("metadata.name=grace"),
            "0",
        )
        .await
        .unwrap()
        .boxed();
    let t0 = std::time::Instant::now();
    pods.delete("grace", &DeleteParams::default())
        .await
        .unwrap();
    let mut last_codes = Vec::new();
    let mut kinds = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        match ev.unwrap() {
            kube::api::WatchEvent::Modified(p) => {
                kinds.push("MODIFIED");
                if let Some(cs) = p.status.and_then(|s| s.container_statuses) {
                    last_codes = cs
                        .iter()
                        .map(|c| {
                            c.state
                                .as_ref()
                                .and_then(|s| s.terminated.as_ref())
                                .map(|t| t.exit_code)
                        })
                        .collect();
                }
            }
            kube::api::WatchEvent::Deleted(_) => {
                kinds.push("DELETED");
                break;
            }
            kube::api::WatchEvent::Added(_) => kinds.push("ADDED"),
            _ => {}
        }
    }
    assert_eq!(kinds.last(), Some(&"DELETED"), "{kinds:?}");
    assert_eq!(last_codes, vec![Some(0), Some(137)]);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "SIGKILL waited for the grace period"
    );
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_and_tail_and_delete_collection() {
    let emu = gke().await;
    let client = emu.client().await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &pod("talker", &json!([{"name": "c", "image": "busybox", "command": ["sh", "-c", "for i in 1 2 3 4 5; do echo line-$i; sleep 0.1; done"]}])))
        .await
        .unwrap();
    wait_running(&pods, "talker").await;
    let mut stream = pods
        .log_stream(
            "talker",
            &kube::api::LogParams {
                follow: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        futures::AsyncReadExt::read_to_end(&mut stream, &mut all),
    )
    .await
    .expect("follow ends when the container exits")
    .unwrap();
    assert_eq!(
        String::from_utf8(all).unwrap(),
        "line-1\nline-2\nline-3\nline-4\nline-5\n"
    );
    let tail = pods
        .logs(
            "talker",
            &kube::api::LogParams {
                tail_lines: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(tail, "line-4\nline-5\n");

    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    for (name, team) in [("a", "x"), ("b", "x"), ("c", "y")] {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": {"team": team}}}))
                .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    cms.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("team=x"),
    )
    .await
    .unwrap();
    let left: Vec<String> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(kube::ResourceExt::name_any)
        .collect();
    assert_eq!(left, ["c"]);
    assert!(
        emu.audit()
            .iter()
            .any(|a| a.verb == "deletecollection" && a.resource == "configmaps")
    );
    emu.shutdown().await;
}

/// `timestamps` stamps each line once and for all, `sinceTime` selects by the same stamps, and
/// `follow` ends when the container stops (what `CI_DEBUG_SERVICES` in the executor relies on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_stamps_since_time_and_follow_end_agree() {
    use futures::AsyncBufReadExt as _;
    use k8s_openapi::jiff::Timestamp;
    let emu = gke().await;
    let client = emu.client().await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &pod("stamper", &json!([{"name": "c", "image": "busybox", "command": ["sh", "-c", "echo early; sleep 2.5; echo late; sleep 0.3; echo last"]}])))
        .await
        .unwrap();
    wait_running(&pods, "stamper").await;
    let stamped = kube::api::LogParams {
        timestamps: true,
        ..Default::default()
    };
    let mut lines = pods
        .log_stream(
            "stamper",
            &kube::api::LogParams {
                follow: true,
                ..stamped.clone()
            },
        )
        .await
        .unwrap()
        .lines();
    let mut followed = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(l) = futures::TryStreamExt::try_next(&mut lines).await.unwrap() {
            followed.push(l);
        }
    })
    .await
    .expect("follow ends when the container stops");
    let split = |l: &String| {
        let (t, text) = l.split_once(' ').unwrap();
        (t.parse::<Timestamp>().unwrap(), text.to_string())
    };
    let parsed: Vec<(Timestamp, String)> = followed.iter().map(split).collect();
    let texts: Vec<&str> = parsed.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(texts, ["early", "late", "last"], "{followed:?}");
    let (early, late) = (parsed[0].0, parsed[1].0);
    assert!(
        late.duration_since(early).as_secs_f64() >= 2.4 && parsed[2].0 >= late,
        "{followed:?}"
    );
    // The same stamps in a later, plain read.
    let again = pods.logs("stamper", &stamped).await.unwrap();
    assert_eq!(again.lines().collect::<Vec<_>>(), followed);
    assert!(again.ends_with('\n'));
    // sinceTime (whole seconds) between the two: the early line is left out.
    let cut = Timestamp::from_second(early.as_second() + 1).unwrap();
    assert!(early < cut && cut <= late);
    let since = pods
        .logs(
            "stamper",
            &kube::api::LogParams {
                since_time: Some(cut),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(since, "late\nlast\n");
    emu.shutdown().await;
}

/// Issue 17: a spawned pod watcher whose requests all fail (here: its apiserver is gone) backs
/// off between attempts, so aborting it takes effect and the test ends instead of spinning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_watcher_stops_after_its_apiserver_is_gone() {
    let emu = gke().await;
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    let mut watch = spawn_pod_watcher(pods, watcher::Config::default());
    let first = tokio::time::timeout(Duration::from_secs(15), watch.events.recv())
        .await
        .expect("the watcher's initial list");
    assert!(matches!(first, Some(watcher::Event::Init)), "{first:?}");
    emu.shutdown().await;
    // Every retry now fails at once; stop() panics if the task does not end within 10 s.
    tokio::time::sleep(Duration::from_millis(300)).await;
    watch.stop().await;
}
