//! How a lost pod is classified (issue 17, item 8): only a spot node reclaimed is a preemption;
//! a kubelet eviction is a system failure quoting the kubelet, with no on-demand fallback.

use std::time::{Duration, Instant};

use spotrun_testkit::harness::{JobBuilder, JobResult};

use crate::support::{Env, node_of};

const MEMORY_EVICTION: &str = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51200Ki. Container build was using 3145728Ki, request is 1Gi, has larger consumption of memory.";

/// Waits until the job's build stage runs; returns the pod's node.
async fn build_running_on(env: &Env) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&env.events).unwrap_or_default();
        let started = text.contains("\"stage\":\"build_script\"") && text.contains("stage_start");
        let node = if started {
            env.pods()
                .await
                .first()
                .and_then(|p| p.spec.as_ref()?.node_name.clone())
        } else {
            None
        };
        if let Some(n) = node {
            return n;
        }
        assert!(Instant::now() < deadline, "build_script never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_eviction_is_a_system_failure_quoting_the_kubelet_without_fallback() {
    let env = Env::start("[spot]\npolicy = \"require\"\nfallback_on_preemption = true\n").await;
    let job = JobBuilder::new(6101)
        .name("memory-hungry")
        .script(&["echo started", "sleep 600"])
        .build();
    let runner = env.runner();
    let handle = tokio::spawn(async move { runner.run(&job).await });
    let node = build_running_on(&env).await;
    env.emu.faults().evict_pods_on_node(&node, MEMORY_EVICTION);
    // A liveness bound only (noticed: seconds; missed: the 600 s sleep).
    let out = tokio::time::timeout(Duration::from_secs(120), handle)
        .await
        .expect("the eviction was noticed")
        .unwrap();
    assert!(
        matches!(out.result, JobResult::SystemFailure { .. }),
        "{:?}\n{}",
        out.result,
        out.log
    );
    assert!(
        out.log.contains(&format!(
            "Job pod was evicted from node {node}: TerminationByKubelet: {MEMORY_EVICTION}"
        )),
        "{}",
        out.log
    );
    assert!(!out.log.contains("preempted"), "{}", out.log);
    assert!(
        !env.events()
            .iter()
            .any(|e| e["event"] == "preemption_recorded"),
        "an eviction was recorded as a preemption"
    );
    // The retry of the same job stays on spot: an eviction says nothing about spot capacity.
    let retry = JobBuilder::new(6102)
        .name("memory-hungry")
        .script(&["echo retried"])
        .build();
    let out = env.runner().run(&retry).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(node_of(&out.log).starts_with("gke-spot-"), "{}", out.log);
    assert!(!out.log.contains("A previous attempt"), "{}", out.log);
}
