//! Non-root images (issue 17, item 4) through the runner harness and the emulator, whose execs run
//! as the container's user with real file permissions (the tests run as root): a build container
//! running as uid 1000 changes what the helper (root) wrote for it — the checkout, a file
//! variable, a restored cache — with the default `helper_file_ownership = "build-user"` and with
//! the `"umask"` fallback; `image: kubernetes: user` is honoured within `allowed_users` /
//! `allowed_groups`, the operator's own `runAsUser` wins, and a user name is ignored, each with
//! one warning line.
//!
//! The helper image here carries a `gitlab-runner` stand-in whose `cache-extractor` writes the
//! downloaded archive to its `--file` (under the cache directory, outside the project) and
//! unpacks a fixed tree into the project directory, as the real one does with the cache zip.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use spotrun_testkit::emulator::{EmulatorConfig, ImageRule, PullOutcome};
use spotrun_testkit::harness::{CachePresigner, JobBuilder, JobResult, JobSpec};

use crate::support::Env;

const EXTRACTOR: &str = r#"#!/bin/sh
# gitlab-runner stand-in (non_root.rs): cache-extractor without a network.
case "$1" in
  --version) echo "Version: 19.4.0 (non-root test stand-in)" ;;
  cache-extractor)
    file=
    while [ $# -gt 0 ]; do
      case "$1" in --file) file="$2"; shift 2 ;; *) shift ;; esac
    done
    mkdir -p "$(dirname "$file")" vendor/lib
    echo archive > "$file"
    echo dep-v1 > vendor/lib/dep.txt
    echo "extracted (stand-in)"
    ;;
  cache-archiver) echo "archived (stand-in)" ;;
  *) exit 1 ;;
esac
"#;

/// The emulator images: the helper with the `gitlab-runner` stand-in, and `fixture.local/nonroot`
/// whose image user (its `USER`) is 1000:1000.
fn images(dir: &Path) -> EmulatorConfig {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = dir.join("helper-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("gitlab-runner"), EXTRACTOR).unwrap();
    std::fs::set_permissions(
        bin.join("gitlab-runner"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let rule = |pattern: &str, bin_dirs: Vec<PathBuf>, user| ImageRule {
        pattern: pattern.into(),
        outcome: PullOutcome::Ok,
        default_command: None,
        env: Vec::new(),
        bin_dirs,
        rootfs: None,
        user,
    };
    let mut cfg = EmulatorConfig::gke();
    cfg.images
        .push(rule("*gitlab-runner-helper*", vec![bin], None));
    cfg.images.push(rule(
        "fixture.local/nonroot:*",
        Vec::new(),
        Some((1000, 1000)),
    ));
    cfg
}

/// A directory for the test's fixtures outside /tmp (each container has its own /tmp), and so
/// outside the target dir too, which a checkout under /tmp puts there.
fn fixtures() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("spotrun-non-root-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// A git repository on the host (the helper fetches it over `file://`): `hello.txt` and
/// `sub/inner.txt`. Returns its URL and commit.
fn repository(dir: &Path) -> (String, String) {
    let repo = dir.join("src");
    std::fs::create_dir_all(repo.join("sub")).unwrap();
    std::fs::write(repo.join("hello.txt"), "from git\n").unwrap();
    std::fs::write(repo.join("sub/inner.txt"), "inner\n").unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "init"]);
    let sha = git(&["rev-parse", "HEAD"]);
    (format!("file://{}", repo.display()), sha)
}

/// Cache URLs nobody fetches: the stand-in extractor needs none, but the runner runs the cache
/// stages only with a cache configured.
fn no_network_cache() -> CachePresigner {
    Arc::new(|method: &str, object: &str| {
        (
            format!("http://127.0.0.1:9/runner-cache/{object}?{method}"),
            Vec::new(),
        )
    })
}

/// What the build script reports: who runs it, and whether it could change each thing the
/// helper wrote. Every line is printed whatever the outcome (the script runs under `errexit`).
const PROBE: [&str; 7] = [
    "echo \"build-runs-as $(id -u):$(id -g)\"",
    "stat -c 'checkout-owner %u:%g' hello.txt",
    "if echo rewritten > hello.txt && echo new > sub/new.txt; then echo checkout-writable; else echo checkout-NOT-writable; fi",
    "if printf changed > \"$CONF\"; then echo \"file-variable-writable $(cat \"$CONF\")\"; else echo file-variable-NOT-writable; fi",
    "if echo more >> vendor/lib/dep.txt && echo new > vendor/lib/new.txt; then echo cache-writable; else echo cache-NOT-writable; fi",
    // Written by the helper outside the project directory: not handed over.
    "a=$(find /cache -name cache.zip); if echo x >> \"$a\" 2>/dev/null; then echo cache-archive-writable; else echo cache-archive-not-writable; fi",
    "echo probe-done",
];

fn job(id: u64, dir: &Path) -> JobBuilder {
    let (url, sha) = repository(&dir.join(id.to_string()));
    JobBuilder::new(id)
        .repo(&url, "main", &sha)
        .file_variable("CONF", "original\n")
        .cache("deps", &["vendor/"])
        .script(&PROBE)
}

async fn run(env: &Env, job: &JobSpec) -> String {
    let out = env.runner().cache(no_network_cache()).run(job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(
        out.log.lines().any(|l| l == "probe-done"),
        "the probe did not finish:\n{}",
        out.log
    );
    out.log
}

fn has(log: &str, line: &str) -> bool {
    log.lines().any(|l| l == line)
}

/// Each of `lines` is a whole line of the job log.
fn assert_lines(log: &str, lines: &[&str]) {
    for line in lines {
        assert!(has(log, line), "{line:?} missing:\n{log}");
    }
}

/// The job log's lines about an image's kubernetes user (the warnings).
fn user_warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("kubernetes user"))
        .collect()
}

/// The acceptance test: `image: kubernetes: user: "1000:1000"`; the build really runs as 1000
/// and rewrites the checkout, a file variable and the restored cache, all handed over to it. The
/// cache archive the helper wrote outside the project stays the helper's: uid 1000 cannot write
/// it, so the permissions are real and the handover is what made the rest writable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_as_uid_1000_rewrites_the_checkout_a_file_variable_and_the_restored_cache() {
    let dir = fixtures();
    let env = Env::start_with(images(dir.path()), "").await;
    let log = run(
        &env,
        &job(8401, dir.path()).image_user(json!("1000:1000")).build(),
    )
    .await;
    assert_lines(
        &log,
        &[
            "build-runs-as 1000:1000",
            "checkout-owner 1000:1000",
            "checkout-writable",
            "file-variable-writable changed",
            "cache-writable",
            "cache-archive-not-writable",
        ],
    );
    assert!(!log.contains("WARNING"), "{log}");
    let owners: Vec<String> = env
        .events()
        .iter()
        .filter(|e| e["event"] == "build_owner")
        .map(|e| e["owner"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(owners, ["1000:1000"], "one owner exec per job");
}

/// `helper_file_ownership = "umask"`: helper stages run with umask 0000, so the build (uid 1000)
/// can change everything — the helper's files stay root's, world-writable, the cache archive too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_umask_fallback_also_lets_uid_1000_write_and_leaves_everything_world_writable() {
    let dir = fixtures();
    let env = Env::start_with(
        images(dir.path()),
        "[pod]\nhelper_file_ownership = \"umask\"\n",
    )
    .await;
    let log = run(
        &env,
        &job(8402, dir.path()).image_user(json!("1000:1000")).build(),
    )
    .await;
    assert_lines(
        &log,
        &[
            "build-runs-as 1000:1000",
            "checkout-owner 0:0",
            "checkout-writable",
            "file-variable-writable changed",
            "cache-writable",
            "cache-archive-writable",
        ],
    );
    assert!(
        !env.events().iter().any(|e| e["event"] == "build_owner"),
        "no owner exec in umask mode"
    );
}

/// No user in the job or the pod: the image's own `USER` (1000:1000) is only known once the pod
/// runs, and the owner exec finds it; the helper's files are handed to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_user_is_found_at_run_time() {
    let dir = fixtures();
    let env = Env::start_with(images(dir.path()), "").await;
    let log = run(
        &env,
        &job(8403, dir.path())
            .image("fixture.local/nonroot:1")
            .build(),
    )
    .await;
    assert_lines(
        &log,
        &[
            "build-runs-as 1000:1000",
            "checkout-owner 1000:1000",
            "checkout-writable",
            "file-variable-writable changed",
            "cache-writable",
        ],
    );
}

/// With `allowed_users` / `allowed_groups`, a job ID outside them is not applied, and a user
/// name is ignored: one warning line each, and the build runs as the image's user (root here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_user_outside_the_allow_lists_or_a_name_is_ignored_with_one_warning() {
    let dir = fixtures();
    let env = Env::start_with(
        images(dir.path()),
        "[pod]\nallowed_users = [\"1000\"]\nallowed_groups = [\"1000\"]\n",
    )
    .await;
    for (id, user, warning) in [
        (
            8404,
            json!("3000:3000"),
            "WARNING: image \"alpine:3.20\": kubernetes user \"3000:3000\" not applied: uid 3000 is not in pod.allowed_users (1000); gid 3000 is not in pod.allowed_groups (1000)",
        ),
        (
            8405,
            json!("root"),
            "WARNING: image \"alpine:3.20\": kubernetes user \"root\" ignored: not a numeric uid or uid:gid (user names are not resolved); the image's own user runs it",
        ),
    ] {
        let log = run(&env, &job(id, dir.path()).image_user(user).build()).await;
        let warnings = user_warnings(&log);
        assert_eq!(warnings, [warning], "{log}");
        assert!(has(&log, "build-runs-as 0:0"), "{log}");
    }
}

/// The operator's `build_security_context` `runAsUser` / `runAsGroup` win over the job's (the
/// administrator always wins, MR 5724), with one warning line; the helper's files are handed to
/// the user the build really runs as.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_run_as_user_wins_over_the_jobs() {
    let dir = fixtures();
    let env = Env::start_with(
        images(dir.path()),
        "[pod.build_security_context]\nrunAsUser = 2000\nrunAsGroup = 2000\n",
    )
    .await;
    let log = run(
        &env,
        &job(8406, dir.path()).image_user(json!("1000:1000")).build(),
    )
    .await;
    let warnings = user_warnings(&log);
    assert_eq!(
        warnings,
        [
            "WARNING: image \"alpine:3.20\": kubernetes user \"1000:1000\" not applied: pod.build_security_context sets runAsUser 2000; pod.build_security_context sets runAsGroup 2000"
        ],
        "{log}"
    );
    assert_lines(
        &log,
        &[
            "build-runs-as 2000:2000",
            "checkout-owner 2000:2000",
            "checkout-writable",
            "file-variable-writable changed",
            "cache-writable",
        ],
    );
}

/// A builds directory that outlives the pod (a host path here, a PVC in production): the first
/// job's checkout is handed to uid 1000, and the next job's helper (root) fetches into it again.
/// git refuses a repository another user owns ("detected dubious ownership") unless the stage
/// marks it safe, which the helper stages that hand trees over do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_job_fetches_into_a_persistent_checkout_the_build_user_owns() {
    let dir = fixtures();
    let builds = dir.path().join("builds");
    std::fs::create_dir_all(&builds).unwrap();
    let env = Env::start_with(
        images(dir.path()),
        &format!(
            "[[volumes.host_path]]\nname = \"ci-builds\"\nmount_path = \"/builds\"\nhost_path = \"{}\"\n",
            builds.display()
        ),
    )
    .await;
    let (url, sha) = repository(&dir.path().join("shared"));
    for id in [8410, 8411] {
        let job = JobBuilder::new(id)
            .repo(&url, "main", &sha)
            .file_variable("CONF", "original\n")
            .cache("deps", &["vendor/"])
            .script(&PROBE)
            .image_user(json!("1000:1000"))
            .build();
        let log = run(&env, &job).await;
        assert_lines(
            &log,
            &[
                "build-runs-as 1000:1000",
                "checkout-owner 1000:1000",
                "checkout-writable",
            ],
        );
        assert!(!log.contains("dubious ownership"), "{log}");
    }
    // The checkout really persisted: the second job found the first one's repository.
    let checkouts: Vec<_> = walk_git_dirs(&builds);
    assert_eq!(checkouts.len(), 1, "one persistent checkout: {checkouts:?}");
}

/// The `.git` directories below `dir`.
fn walk_git_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if p.file_name().is_some_and(|n| n == ".git") {
                    out.push(p);
                } else {
                    todo.push(p);
                }
            }
        }
    }
    out
}
