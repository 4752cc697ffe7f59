//! Fault knobs: injected failures, dropped watches, preemption.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom"
)]

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{PostParams, WatchEvent, WatchParams};
use kube::runtime::WatchStreamExt as _;
use serde_json::json;

use super::emulator_support::{gke, pod, pod_phase, sleeper, wait_pod, wait_running};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_next_and_ratio() {
    let emu = gke().await;
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    // kube-rs retries 429/503/504 by itself, so the plain failures use 500 and 409.
    emu.faults()
        .fail_next(1, Some("list"), Some("pods"), 500, None);
    emu.faults()
        .fail_next(1, Some("list"), Some("pods"), 409, None);
    for (code, reason) in [(500, "InternalError"), (409, "Conflict")] {
        match pods.list(&kube::api::ListParams::default()).await {
            Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (code, reason)),
            other => panic!("expected an injected {code}, got {other:?}"),
        }
    }
    // A 503 with Retry-After is retried by kube-rs and the request then succeeds.
    emu.faults()
        .fail_next(1, Some("list"), Some("pods"), 503, Some(1));
    pods.list(&kube::api::ListParams::default()).await.unwrap();
    // Other verbs were not affected and the third list works.
    assert!(pods.get_opt("x").await.unwrap().is_none());
    pods.list(&kube::api::ListParams::default()).await.unwrap();
    emu.faults().fail_ratio(100, &[500]);
    assert!(
        matches!(pods.list(&kube::api::ListParams::default()).await, Err(kube::Error::Api(s)) if s.code == 500)
    );
    emu.faults().fail_ratio(0, &[]);
    pods.list(&kube::api::ListParams::default()).await.unwrap();
    let audit = emu.audit();
    assert_eq!(audit.iter().filter(|a| a.code == 503).count(), 1);
    assert_eq!(audit.iter().filter(|a| a.code == 500).count(), 2);

    // Deterministic modes: every n-th request, or a seeded ratio that replays the same failures.
    let codes = async |n: usize| {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(match pods.get_opt("x").await {
                Ok(_) => 200,
                Err(kube::Error::Api(s)) => s.code,
                Err(e) => panic!("{e}"),
            });
        }
        out
    };
    emu.faults().fail_every(3, &[500, 409]);
    assert_eq!(codes(6).await, [200, 200, 500, 200, 200, 409]);
    emu.faults().fail_every(0, &[]);
    emu.faults().fail_ratio_seeded(50, &[500], 17);
    let first = codes(16).await;
    emu.faults().fail_ratio_seeded(50, &[500], 17);
    assert_eq!(codes(16).await, first);
    assert!(first.contains(&200) && first.contains(&500), "{first:?}");
    emu.faults().clear();
    assert_eq!(codes(3).await, [200, 200, 200]);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_watches_ends_streams() {
    let emu = gke().await;
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    let mut w = pods
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    tokio::time::sleep(Duration::from_millis(100)).await;
    emu.faults().close_watches();
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        while w.next().await.is_some() {}
    })
    .await;
    assert!(end.is_ok(), "the watch stream ended");
    // Bookmarks arrive on watches that allow them (kube-rs asks by default).
    let mut w = pods
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    let ev = tokio::time::timeout(Duration::from_secs(15), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(ev, WatchEvent::Bookmark(_)), "{ev:?}");
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempting_a_node_fails_its_pods_and_deletes_it() {
    let emu = gke().await;
    let client = emu.client().await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut p = pod(
        "victim",
        &json!([sleeper("build"), {"name": "svc", "image": "redis", "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"]}]),
    );
    let spec = p.spec.as_mut().unwrap();
    spec.node_selector =
        Some([("cloud.google.com/gke-spot".to_string(), "true".to_string())].into());
    spec.tolerations = Some(vec![
        serde_json::from_value(json!({"operator": "Exists"})).unwrap(),
    ]);
    pods.create(&PostParams::default(), &p).await.unwrap();
    let running = wait_running(&pods, "victim").await;
    let node = running.spec.unwrap().node_name.unwrap();
    let nodes: Api<Node> = Api::all(client);
    let mut nw = nodes
        .watch(
            &WatchParams::default().fields(&format!("metadata.name={node}")),
            "0",
        )
        .await
        .unwrap()
        .boxed();
    emu.faults().preempt_node(&node);
    let failed = wait_pod(&pods, "victim", "Failed", |p| pod_phase(p) == "Failed").await;
    let st = failed.status.unwrap();
    assert_eq!(st.reason.as_deref(), Some("Terminated"));
    assert_eq!(
        st.message.as_deref(),
        Some("Pod was terminated in response to imminent node shutdown.")
    );
    let dt = st
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "DisruptionTarget")
        .expect("DisruptionTarget condition");
    assert_eq!(
        (dt.status.as_str(), dt.reason.as_deref()),
        ("True", Some("TerminationByKubelet"))
    );
    let codes: Vec<i32> = st
        .container_statuses
        .unwrap()
        .iter()
        .map(|c| {
            c.state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .exit_code
        })
        .collect();
    assert_eq!(codes, vec![137, 0]);
    let mut deleted = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(10), nw.next()).await {
        if matches!(ev, Ok(WatchEvent::Deleted(_))) {
            deleted = true;
            break;
        }
    }
    assert!(deleted, "the node was deleted");
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_deadlines_restarts_and_the_control_endpoint() {
    let emu = gke().await;
    let client = emu.client().await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    // The scheduling delay is long enough that the get right after the create sees the pod
    // unbound however slow the machine; the elapsed-time check is a lower bound (the delays
    // happened), which load cannot break.
    emu.faults().delay_scheduling(Duration::from_millis(2000));
    emu.faults().delay_pulls(Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    pods.create(
        &PostParams::default(),
        &pod("slow", &json!([sleeper("build")])),
    )
    .await
    .unwrap();
    let p = pods.get("slow").await.unwrap();
    assert!(p.spec.unwrap().node_name.is_none(), "not bound yet");
    wait_running(&pods, "slow").await;
    assert!(
        t0.elapsed() >= Duration::from_millis(2300),
        "{:?}",
        t0.elapsed()
    );
    emu.faults().delay_scheduling(Duration::ZERO);
    emu.faults().delay_pulls(Duration::ZERO);

    // activeDeadlineSeconds: killed, phase Failed, reason DeadlineExceeded.
    let mut dl = pod("deadline", &json!([sleeper("build")]));
    dl.spec.as_mut().unwrap().active_deadline_seconds = Some(1);
    pods.create(&PostParams::default(), &dl).await.unwrap();
    let failed = wait_pod(&pods, "deadline", "Failed", |p| pod_phase(p) == "Failed").await;
    let st = failed.status.unwrap();
    assert_eq!(st.reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(
        st.container_statuses.unwrap()[0]
            .state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code,
        137
    );

    // restartPolicy OnFailure restarts a failing container.
    let mut rp = pod(
        "again",
        &json!([{"name": "c", "image": "busybox", "command": ["sh", "-c", "exit 1"]}]),
    );
    rp.spec.as_mut().unwrap().restart_policy = Some("OnFailure".into());
    pods.create(&PostParams::default(), &rp).await.unwrap();
    let restarted = wait_pod(&pods, "again", "restarted twice", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| c[0].restart_count >= 2)
    })
    .await;
    let last = restarted.status.unwrap().container_statuses.unwrap()[0]
        .last_state
        .clone()
        .unwrap();
    assert_eq!(last.terminated.unwrap().exit_code, 1);

    // The HTTP control endpoint drives the same knobs (what the standalone binary offers).
    let (code, _) = super::emulator_support::raw(
        &client,
        "POST",
        "/emulator/fail-next",
        Some("application/json"),
        br#"{"count": 1, "verb": "get", "resource": "pods", "status": 500}"#,
    )
    .await;
    assert_eq!(code, 200);
    assert!(matches!(pods.get("slow").await, Err(kube::Error::Api(s)) if s.code == 500));
    pods.get("slow").await.unwrap();
    let (code, audit) =
        super::emulator_support::raw(&client, "GET", "/emulator/audit", None, b"").await;
    assert_eq!(code, 200);
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["code"] == 500 && e["verb"] == "get")
    );
    let (code, body) = super::emulator_support::raw(
        &client,
        "POST",
        "/emulator/preempt-node",
        Some("application/json"),
        b"{}",
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (400, Some("BadRequest")));
    assert_eq!(emu.panics(), 0);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_watches_end_their_initial_events() {
    let emu = gke().await;
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    pods.create(
        &PostParams::default(),
        &pod("one", &json!([sleeper("build")])),
    )
    .await
    .unwrap();
    // Polled inline and bounded by the timeout below; the backoff keeps a failing request from
    // being retried in a loop that never yields (issue 17).
    let mut w = kube::runtime::watcher(
        pods.clone(),
        kube::runtime::watcher::Config::default().streaming_lists(),
    )
    .default_backoff()
    .boxed();
    let mut got = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(15), w.next()).await {
        match ev.unwrap() {
            kube::runtime::watcher::Event::Init => got.push("init".to_string()),
            kube::runtime::watcher::Event::InitApply(p) => got.push(p.metadata.name.unwrap()),
            kube::runtime::watcher::Event::InitDone => {
                got.push("done".into());
                break;
            }
            _ => {}
        }
    }
    assert_eq!(got, ["init", "one", "done"]);
    emu.shutdown().await;
}
