//! Pull policies (issue 17, item 6): the job's `pull_policy` within `allowed_pull_policies`, and a
//! list falls back to its next entry when a pull fails, with a new pod.

use spotrun_testkit::emulator::{EmulatorConfig, ImageRule, PullOutcome};
use spotrun_testkit::harness::{JobBuilder, JobResult};

use crate::support::Env;

fn registry_down() -> EmulatorConfig {
    let mut cfg = EmulatorConfig::gke();
    cfg.images.insert(
        0,
        ImageRule {
            pattern: "registry.example.com/team/app:*".into(),
            outcome: PullOutcome::RegistryDownImageCached,
            default_command: None,
            env: Vec::new(),
            bin_dirs: Vec::new(),
            rootfs: None,
            user: None,
        },
    );
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_always_pull_falls_back_to_if_not_present() {
    let env = Env::start_with(
        registry_down(),
        "[images]\nallowed_pull_policies = [\"always\", \"if-not-present\"]\n",
    )
    .await;
    let out = env
        .runner()
        .run(
            &JobBuilder::new(5401)
                .image("registry.example.com/team/app:1.0")
                .image_pull_policy(&["always", "if-not-present"])
                .script(&["echo ran-from-the-node-copy"])
                .build(),
        )
        .await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(
        out.log
            .contains("retrying with the next pull policy (attempt 2 of 2)"),
        "{}",
        out.log
    );
    assert!(out.log.contains("i/o timeout"), "{}", out.log);
    assert!(out.log.contains("ran-from-the-node-copy"), "{}", out.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_policy_outside_the_allowed_ones_fails_naming_both() {
    let env = Env::start_with(
        registry_down(),
        "[images]\npull_policy = \"always\"\nallowed_pull_policies = [\"always\", \"if-not-present\"]\n",
    )
    .await;
    let out = env
        .runner()
        .run(
            &JobBuilder::new(5402)
                .image("registry.example.com/team/app:1.0")
                .image_pull_policy(&["never"])
                .build(),
        )
        .await;
    assert!(
        matches!(out.result, JobResult::BuildFailure { exit_code: 1 }),
        "{:?}\n{}",
        out.result,
        out.log
    );
    assert!(
        out.log.contains("pull_policy ([never]) defined in GitLab pipeline config is not one of the allowed_pull_policies ([always if-not-present])"),
        "{}",
        out.log
    );
    assert!(env.pods().await.is_empty());
    // With only `always` (the operator's), the registry outage is a pull failure: no fallback.
    let out = env
        .runner()
        .run(
            &JobBuilder::new(5403)
                .image("registry.example.com/team/app:1.0")
                .build(),
        )
        .await;
    assert!(
        matches!(out.result, JobResult::BuildFailure { exit_code: 1 }),
        "{:?}\n{}",
        out.result,
        out.log
    );
    assert!(
        !out.log.contains("retrying with the next pull policy"),
        "{}",
        out.log
    );
}
