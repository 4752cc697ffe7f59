//! Exec sessions: detached processes, exact frames, cuts, exec into pods that are not running.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom"
)]

use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{AttachParams, DeleteParams, PostParams};
use serde_json::json;
use tokio::io::AsyncReadExt as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use super::emulator_support::{
    gke, pod, pod_phase, raw, sleeper, spawn_pod_watcher, wait_pod, wait_running,
};

async fn run(pods: &Api<Pod>, name: &str, script: &str) -> (String, Option<String>) {
    let mut p = pods
        .exec(name, vec!["sh", "-c", script], &AttachParams::default())
        .await
        .unwrap();
    let mut s = String::new();
    p.stdout().unwrap().read_to_string(&mut s).await.unwrap();
    let st = p.take_status().unwrap().await;
    (s, st.and_then(|s| s.status))
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_process_outlives_the_session_and_dies_with_the_pod() {
    let emu = gke().await;
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "bg"}, "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
        "volumes": [{"name": "logs", "emptyDir": {}}],
        "containers": [{"name": "build", "image": "busybox", "command": ["sleep", "3600"], "volumeMounts": [{"name": "logs", "mountPath": "/logs"}]}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    wait_running(&pods, "bg").await;
    // The detached sleep's argument is unique to this test process: the host-wide scan below must
    // not pick up the same test's sleeper from another run on the machine.
    let secs = format!("300.{}", std::process::id());
    // One detached without redirection (still holding the session's stdout), one with nohup + redirection.
    // The session must end when its command does, not when the detached `sleep 300` does: the
    // bound sits far from both (no timing assert on how fast it ends).
    let (out, st) = tokio::time::timeout(
        Duration::from_secs(60),
        run(&pods, "bg", &format!("sleep {secs} & nohup sh -c 'while true; do date +%s%N >> /logs/tick; sleep 0.05; done' >/dev/null 2>&1 & echo started")),
    )
    .await
    .expect("the session ended when its command did");
    assert_eq!(
        (out.as_str(), st.as_deref()),
        ("started\n", Some("Success"))
    );
    // The detached loop keeps running: the tick count grows (polled, however loaded the machine).
    let ticks = async || {
        let (t, _) = run(&pods, "bg", "wc -l < /logs/tick 2>/dev/null || echo 0").await;
        t.trim().parse::<u32>().unwrap()
    };
    let first = ticks().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = ticks().await;
        if now > first {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the detached loop stopped: {first} ticks, still {now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = |s: &str| s.trim().parse::<u32>().unwrap();
    // The processes live in the container's pid namespace: find their host pids via ps inside.
    let (host_pids, _) = run(
        &pods,
        "bg",
        &format!("ps -o pid,args 2>/dev/null | grep -c 'sleep {secs}' || true"),
    )
    .await;
    assert!(
        n(&host_pids) >= 1,
        "sleep visible inside the container: {host_pids}"
    );
    let before: Vec<u32> = sleepers_on_host(&secs);
    assert!(!before.is_empty());
    pods.delete("bg", &DeleteParams::default()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pods.get_opt("bg").await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The pod object goes before its processes are reaped: wait for them, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for pid in before {
        while pid_alive(pid) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "detached process {pid} outlived the pod: {}",
                std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    emu.shutdown().await;
}

/// Host pids of `sleep SECS` processes (SECS unique to this test process).
fn sleepers_on_host(secs: &str) -> Vec<u32> {
    let argv = format!("sleep\0{secs}\0");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmd == argv.as_bytes() {
            out.push(pid);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_and_v5_frames_are_byte_exact() {
    let emu = gke().await;
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    pods.create(
        &PostParams::default(),
        &pod("frames", &json!([sleeper("build")])),
    )
    .await
    .unwrap();
    wait_running(&pods, "frames").await;
    let url = format!(
        "{}/api/v1/namespaces/ci-jobs/pods/frames/exec?stdin=true&stdout=true&stderr=true&container=build&command=sh&command=-c&command=cat%3B+echo+oops+%3E%262%3B+exit+3",
        emu.url().replace("http://", "ws://")
    );
    for (offer, proto, status) in [
        (
            "v5.channel.k8s.io, v4.channel.k8s.io",
            "v5.channel.k8s.io",
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: command terminated with exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#,
        ),
        (
            "v4.channel.k8s.io",
            "v4.channel.k8s.io",
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c cat; echo oops \u003e\u00262; exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#,
        ),
    ] {
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", offer.parse().unwrap());
        let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(resp.headers()["sec-websocket-protocol"], proto);
        let first = ws.next().await.unwrap().unwrap();
        assert_eq!(first.into_data().as_ref(), &[1u8]);
        ws.send(Message::binary(b"\x00hi\n".to_vec()))
            .await
            .unwrap();
        // The v5 half-close of stdin (the emulator also honours it on v4, leniently).
        ws.send(Message::binary(vec![255u8, 0])).await.unwrap();
        let mut frames: Vec<Vec<u8>> = Vec::new();
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Binary(b) => frames.push(b.to_vec()),
                Message::Close(c) => {
                    assert_eq!(u16::from(c.unwrap().code), 1000);
                    break;
                }
                _ => {}
            }
        }
        let out: Vec<u8> = frames
            .iter()
            .filter(|f| f[0] == 1)
            .flat_map(|f| f[1..].to_vec())
            .collect();
        let err: Vec<u8> = frames
            .iter()
            .filter(|f| f[0] == 2)
            .flat_map(|f| f[1..].to_vec())
            .collect();
        assert_eq!(out, b"hi\n");
        assert_eq!(err, b"oops\n");
        let last = frames.last().unwrap();
        assert_eq!(last[0], 3);
        assert_eq!(std::str::from_utf8(&last[1..]).unwrap(), status);
    }
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_exec_streams_end_without_status() {
    let emu = gke().await;
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    pods.create(
        &PostParams::default(),
        &pod("cut", &json!([sleeper("build")])),
    )
    .await
    .unwrap();
    wait_running(&pods, "cut").await;
    emu.faults().cut_exec_after(10);
    let mut p = pods
        .exec(
            "cut",
            vec![
                "sh",
                "-c",
                "for i in 1 2 3 4 5 6; do echo line-$i; done; sleep 1",
            ],
            &AttachParams::default(),
        )
        .await
        .unwrap();
    let mut stdout = p.stdout().unwrap();
    let status = p.take_status().unwrap();
    // kube-rs 5 ends its message loop with an error on an abrupt close *without* shutting its
    // stdout pipe, so a reader alone would wait forever: race it against the session task.
    let joined = tokio::time::timeout(Duration::from_secs(10), p.join())
        .await
        .expect("the session ended");
    assert!(joined.is_err(), "an abrupt close is an error: {joined:?}");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(200), stdout.read_to_end(&mut got)).await;
    assert_eq!(got, b"line-1\nlin");
    assert!(status.await.is_none(), "a cut stream has no status");
    // The knob was one-shot.
    let (out, st) = run(&pods, "cut", "echo again").await;
    assert_eq!((out.as_str(), st.as_deref()), ("again\n", Some("Success")));
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_into_pods_that_are_not_running_fails_cleanly() {
    let mut cfg = spotrun_testkit::emulator::EmulatorConfig::gke();
    cfg.images.push(spotrun_testkit::emulator::ImageRule {
        pattern: "slow/*".into(),
        outcome: spotrun_testkit::emulator::PullOutcome::Delay(Duration::from_secs(30)),
        default_command: None,
        env: Vec::new(),
        bin_dirs: Vec::new(),
        rootfs: None,
        user: None,
    });
    let emu = spotrun_testkit::emulator::Emulator::start(cfg)
        .await
        .unwrap();
    let client = emu.client().await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(
        &PostParams::default(),
        &pod("slow", &json!([{"name": "build", "image": "slow/img:1"}])),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod(
            "done",
            &json!([{"name": "build", "image": "busybox", "command": ["true"]}]),
        ),
    )
    .await
    .unwrap();
    wait_pod(&pods, "done", "Succeeded", |p| pod_phase(p) == "Succeeded").await;
    let (code, body) = raw(
        &client,
        "GET",
        "/api/v1/namespaces/ci-jobs/pods/slow/exec?command=ls&stdout=true",
        None,
        b"",
    )
    .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (400, Some("BadRequest")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("is not running"),
        "{body}"
    );
    let (code, body) = raw(
        &client,
        "GET",
        "/api/v1/namespaces/ci-jobs/pods/done/exec?command=ls&stdout=true",
        None,
        b"",
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        body["message"],
        "cannot exec into a container in a completed pod; current phase is Succeeded"
    );
    // kube-rs surfaces the upgrade failure as an error.
    assert!(
        pods.exec("done", vec!["ls"], &AttachParams::default())
            .await
            .is_err()
    );
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_stdin_reaches_the_container_and_watchers_survive_dropped_watches() {
    let emu = gke().await;
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "copy"}, "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
        "volumes": [{"name": "scripts", "emptyDir": {}}],
        "containers": [{"name": "build", "image": "busybox", "command": ["sleep", "3600"], "volumeMounts": [{"name": "scripts", "mountPath": "/scripts"}]}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    wait_running(&pods, "copy").await;
    // A kube-rs watcher keeps going across dropped watch connections (it re-lists or resumes).
    emu.faults().close_watches_every(Duration::from_millis(150));
    let mut watch = spawn_pod_watcher(pods.clone(), kube::runtime::watcher::Config::default());
    // 4 MiB through stdin, as a script/tar upload would do.
    let payload: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let mut proc = pods
        .exec(
            "copy",
            vec![
                "sh",
                "-c",
                "cat > /scripts/blob && wc -c < /scripts/blob && cksum < /scripts/blob",
            ],
            &AttachParams::default().stdin(true).stderr(false),
        )
        .await
        .unwrap();
    let mut stdin = proc.stdin().unwrap();
    let mut stdout = proc.stdout().unwrap();
    let writer = tokio::spawn(async move {
        tokio::io::AsyncWriteExt::write_all(&mut stdin, &payload)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut stdin)
            .await
            .unwrap();
    });
    let mut out = String::new();
    stdout.read_to_string(&mut out).await.unwrap();
    writer.await.unwrap();
    assert_eq!(
        proc.take_status().unwrap().await.unwrap().status.as_deref(),
        Some("Success")
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("4194304"));
    // The same bytes land on the host side of the emptyDir.
    let (sum, _) = run(&pods, "copy", "cksum < /scripts/blob").await;
    assert_eq!(Some(sum.trim()), lines.next());
    // tty=true: stderr is merged into stdout.
    let mut t = pods
        .exec(
            "copy",
            vec!["sh", "-c", "echo a; echo b >&2"],
            &AttachParams::default().stderr(false).tty(true),
        )
        .await
        .unwrap();
    let mut s = String::new();
    t.stdout().unwrap().read_to_string(&mut s).await.unwrap();
    assert!(s.contains('a') && s.contains('b'), "{s:?}");
    // Changes made while watches keep being dropped still reach the watcher.
    tokio::time::sleep(Duration::from_millis(400)).await;
    pods.patch(
        "copy",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"labels": {"seen": "yes"}}})),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut seen = false;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, watch.events.recv()).await {
        let kube::runtime::watcher::Event::Apply(p) = ev else {
            continue;
        };
        if p.metadata
            .labels
            .unwrap_or_default()
            .get("seen")
            .map(String::as_str)
            == Some("yes")
        {
            seen = true;
            break;
        }
    }
    assert!(seen, "the watcher saw the change despite dropped watches");
    watch.stop().await;
    emu.faults().close_watches_every(Duration::ZERO);
    emu.shutdown().await;
}

/// Execs run as the container's user: its `securityContext` (field by field over the pod's),
/// else the image's `USER`, else root; without root's capabilities, so a root-owned file in an
/// `emptyDir` (mode 0777, as the kubelet makes it) cannot be changed, and nothing can be chown'd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execs_run_as_the_containers_user_with_real_permissions() {
    let mut cfg = spotrun_testkit::emulator::EmulatorConfig::gke();
    cfg.images.push(spotrun_testkit::emulator::ImageRule {
        pattern: "nonroot/*".into(),
        outcome: spotrun_testkit::emulator::PullOutcome::Ok,
        default_command: None,
        env: Vec::new(),
        bin_dirs: Vec::new(),
        rootfs: None,
        user: Some((1000, 1000)),
    });
    let emu = spotrun_testkit::emulator::Emulator::start(cfg)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::default_namespaced(emu.client().await);
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "users"}, "spec": {
    "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
    "securityContext": {"runAsGroup": 3000},
    "volumes": [{"name": "shared", "emptyDir": {}}],
    "containers": [
        {"name": "root", "image": "busybox", "command": ["sleep", "3600"],
         "securityContext": {"runAsUser": 0, "runAsGroup": 0},
         "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
        {"name": "ctx", "image": "busybox", "command": ["sleep", "3600"],
         "securityContext": {"runAsUser": 2000},
         "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
        {"name": "image", "image": "nonroot/app:1", "command": ["sleep", "3600"],
         "securityContext": {"runAsGroup": 1000},
         "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}
    ]}}))
    .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    wait_running(&pods, "users").await;
    let exec_in = async |container: &str, script: &str| {
        let mut p = pods
            .exec(
                "users",
                vec!["sh", "-c", script],
                &AttachParams::default().container(container),
            )
            .await
            .unwrap();
        let mut s = String::new();
        p.stdout().unwrap().read_to_string(&mut s).await.unwrap();
        let _ = p.take_status().unwrap().await;
        s
    };
    let (r, c, i) = (
        exec_in("root", "id -u; id -g").await,
        exec_in("ctx", "id -u; id -g").await,
        exec_in("image", "id -u; id -g").await,
    );
    assert_eq!(r, "0\n0\n");
    assert_eq!(
        c, "2000\n3000\n",
        "the pod's group under the container's user"
    );
    assert_eq!(i, "1000\n1000\n", "the image's user");
    assert_eq!(
        exec_in(
            "root",
            "umask 022; echo root-file > /shared/f; stat -c '%u %a' /shared /shared/f"
        )
        .await,
        "0 777\n0 644\n"
    );
    let try_write = "if echo more >> /shared/f 2>/dev/null; then echo wrote; else echo denied; fi; \
                     if chown 1000 /shared/f 2>/dev/null; then echo chowned; else echo no-chown; fi; \
                     touch /shared/mine && stat -c %u /shared/mine && rm /shared/mine; \
                     touch /tmp/t && echo tmp-ok";
    assert_eq!(
        exec_in("image", try_write).await,
        "denied\nno-chown\n1000\ntmp-ok\n"
    );
    assert_eq!(
        exec_in("root", try_write).await,
        "wrote\nchowned\n0\ntmp-ok\n"
    );
    emu.shutdown().await;
}
