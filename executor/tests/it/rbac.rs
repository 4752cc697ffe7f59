//! The (verb, resource, subresource) list the executor needs, derived from the emulator's audit
//! log over a job exercising every code path, must equal the committed `executor/rbac-verbs.txt`
//! (the Helm chart's Role is built from it). Regenerate with `SPOTRUN_UPDATE_RBAC=1`.
#![allow(clippy::collapsible_if)] // Reason: the polling loop reads clearer with nested conditions.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use spotrun_testkit::harness::{Cancel, CancelMode, JobBuilder, JobResult, Service};

use crate::support::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_derived_verb_list_equals_the_committed_file() {
    // Two spot preemptions of the same job: the retry must stay on spot (only a spot reclaim is
    // recorded), so the fallback waits for a third.
    let env = Env::start("[spot]\npolicy = \"require\"\nspot_attempts_before_fallback = 3\n").await;
    // 1. A full job with a service and registry credentials (secret + owner patch), its log
    //    copied into the job log (`CI_DEBUG_SERVICES`: pods/log).
    let job = JobBuilder::new(7001)
        .name("rbac")
        .variable("CI_DEBUG_SERVICES", "true")
        .service(Service::new("python:3.13", "svc").entrypoint(&[
            "sh",
            "-c",
            "echo rbac-svc-up; exec sleep 60",
        ]))
        .script(&["echo ok"])
        .build();
    let out = env.runner().run(&job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(out.log.contains("[service:python-svc] "), "{}", out.log);
    // 2. A preempted job (pod + node watch, preemption record create), then its retry (record
    //    read) and a second preemption (record update).
    for id in [7002u64, 7003] {
        let job = JobBuilder::new(id)
            .name("rbac-preempt")
            .script(&["sleep 30"])
            .build();
        let node_watches = |env: &Env| {
            env.emu
                .audit()
                .iter()
                .filter(|a| a.verb == "watch" && a.resource == "nodes")
                .count()
        };
        let watches_before = node_watches(&env);
        let runner = env.runner();
        let handle = tokio::spawn(async move { runner.run(&job).await });
        let deadline = Instant::now() + Duration::from_secs(60);
        let node = loop {
            let text = std::fs::read_to_string(&env.events).unwrap_or_default();
            let started = text
                .lines()
                .filter(|l| l.contains("\"stage_start\"") && l.contains("build_script"))
                .count();
            // Job 7001 and every earlier attempt also logged a build_script start.
            // The stage's monitor watches the node some time after the stage starts: the
            // preemption waits for that watch, which the verb list must contain.
            if started >= usize::try_from(id - 7000).unwrap() && node_watches(&env) > watches_before
            {
                if let Some(n) = env
                    .events()
                    .iter()
                    .rev()
                    .find(|e| e["event"] == "pod_running")
                    .and_then(|e| e["node"].as_str().map(String::from))
                {
                    break n;
                }
            }
            assert!(
                Instant::now() < deadline,
                "job {id}: build_script never started or its node was never watched; events so far:\n{}",
                std::fs::read_to_string(&env.events).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        env.emu.faults().preempt_node(&node);
        let out = handle.await.unwrap();
        assert!(
            matches!(out.result, JobResult::SystemFailure { .. }),
            "{}",
            out.log
        );
        // Bring the capacity back for the next round, once the preemption has deleted the node
        // (it does so after the node's pods are gone, which may come after the job's end).
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
            kube::Api::all(env.emu.client().await);
        let deadline = Instant::now() + Duration::from_secs(30);
        while nodes.get_opt(&node).await.ok().flatten().is_some() {
            assert!(
                Instant::now() < deadline,
                "job {id}: the preempted node {node} was never deleted"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        env.emu
            .faults()
            .add_node(spotrun_testkit::emulator::NodeSpec::gke(
                &node,
                node.contains("spot"),
            ));
    }
    // 3. Cancel during prepare (rollback delete) and gc.
    let job = JobBuilder::new(7004).script(&["echo x"]).build();
    let _ = env
        .runner()
        .run_with(
            &job,
            Some(Cancel {
                stage: "prepare".into(),
                after: Duration::from_millis(100),
                mode: CancelMode::Abort,
            }),
        )
        .await;
    let gc = env.exec(&["gc"], &[]);
    assert!(gc.status.success(), "{gc:?}");

    let got: BTreeSet<String> = env
        .emu
        .audit()
        .into_iter()
        .map(|a| match a.subresource {
            Some(sub) => format!("{} {}/{sub}", a.verb, a.resource),
            None => format!("{} {}", a.verb, a.resource),
        })
        .collect();
    let mut text = String::from(
        "# (verb resource[/subresource]) the executor uses; generated by the `rbac` integration test.\n",
    );
    for line in &got {
        text.push_str(line);
        text.push('\n');
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rbac-verbs.txt");
    if std::env::var_os("SPOTRUN_UPDATE_RBAC").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        want, text,
        "the executor's API calls changed: review, then SPOTRUN_UPDATE_RBAC=1"
    );
}
