//! Job images that need only a shell. The emulator runs the build container in three root
//! filesystems: busybox only (Debian's busybox-static, a link per applet), dash only (no
//! coreutils at all: not even `sleep`, `cat` or `tail`) and the host's. In each, a job's output
//! arrives complete and in order, its exit code is right, and a cancel stops every process the
//! script started: a plain child, one ignoring SIGTERM, one orphaned by a double fork and one in
//! its own process group. The launcher in the pod is the static release build (`rootfs.rs`).
//!
//! Busybox and the host run the runner's own bash-shaped scripts (ash runs them). Dash cannot
//! (they use `$'...'` quoting, and `mkdir`/`touch` for variables, under GitLab's Kubernetes
//! executor too), so there the build-container stages get a POSIX script verbatim
//! (`raw_stage_script`); the helper's stages are the runner's as usual.

use std::path::Path;
use std::time::Duration;

use spotrun_testkit::emulator::EmulatorConfig;
use spotrun_testkit::harness::{Cancel, CancelMode, JobBuilder, JobResult, JobSpec};
use spotrun_testkit::rootfs;

use crate::support::Env;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Image {
    Busybox,
    DashOnly,
    Host,
}

impl Image {
    fn reference(self) -> &'static str {
        match self {
            Self::Busybox => "fixture.local/busybox:static",
            Self::DashOnly => "fixture.local/dash:only",
            Self::Host => "alpine:3.22",
        }
    }
}

/// An emulator whose `image` runs in its fixture rootfs (built under `fixtures`).
async fn env_with(image: Image, fixtures: &Path) -> Env {
    let mut cfg = EmulatorConfig::gke();
    let root = fixtures.join("rootfs");
    match image {
        Image::Busybox => rootfs::busybox(&root).expect("busybox rootfs"),
        Image::DashOnly => rootfs::dash_only(&root).expect("dash rootfs"),
        Image::Host => {}
    }
    if image != Image::Host {
        cfg.images.push(rootfs::image(image.reference(), &root));
    }
    Env::start_with(cfg, "").await
}

/// A job running `lines` in the build container (`after` as its `after_script`), in `image`.
fn job(id: u64, image: Image, lines: &[&str], after: &[&str]) -> JobSpec {
    let after: &[&str] = if after.is_empty() { &["true"] } else { after };
    let mut b = JobBuilder::new(id)
        .image(image.reference())
        .script(lines)
        .after_script(after);
    if image == Image::DashOnly {
        b = b
            .raw_stage_script("build_script", &format!("{}\n", lines.join("\n")))
            .raw_stage_script("after_script", &format!("{}\n", after.join("\n")));
    }
    b.build()
}

const OUTPUT_LINES: usize = 3000;

async fn output_and_exit_code(image: Image, id: u64) {
    let fixtures = tempfile::tempdir().unwrap();
    let env = env_with(image, fixtures.path()).await;
    let lines = [
        "if command -v tail >/dev/null 2>&1; then echo image-has-tail; else echo image-has-no-tail; fi",
        "i=0; while [ $i -lt 3000 ]; do echo \"line-$i\"; i=$((i + 1)); done",
        "echo \"on-stderr-$((6 * 7))\" >&2",
        "exit 3",
    ];
    let out = env.runner().run(&job(id, image, &lines, &[])).await;
    assert_eq!(
        out.result,
        JobResult::BuildFailure { exit_code: 3 },
        "{}",
        out.log
    );
    let log = &out.log;
    let tail = if image == Image::DashOnly {
        "image-has-no-tail"
    } else {
        "image-has-tail"
    };
    assert!(
        log.lines().any(|l| l == tail),
        "the fixture is not in effect:\n{log}"
    );
    let numbered: Vec<&str> = log.lines().filter(|l| l.starts_with("line-")).collect();
    let want: Vec<String> = (0..OUTPUT_LINES).map(|i| format!("line-{i}")).collect();
    assert_eq!(numbered, want, "output lost or reordered");
    assert!(log.lines().any(|l| l == "on-stderr-42"), "{log}");
    assert!(
        env.no_pods_within(Duration::from_secs(20)).await,
        "cleanup left a pod"
    );
}

/// Children that block in `read` on a pty master (no `sleep` needed), each recording its pid.
const CHILDREN: [&str; 6] = [
    "sh -c 'echo $$ > /builds/pid-a; echo child-a-up; read x < /dev/ptmx' &",
    "sh -c 'trap \"\" TERM; echo $$ > /builds/pid-b; echo child-b-up; read x < /dev/ptmx' &",
    "( sh -c 'echo $$ > /builds/pid-c; echo child-c-up; read x < /dev/ptmx' & )",
    "set -m; sh -c 'echo $$ > /builds/pid-d; echo child-d-up; read x < /dev/ptmx' & set +m",
    "echo children-started",
    "wait",
];

/// Run after the cancel in the same container: which recorded pids still run (`|| true`: the
/// runner's scripts run under `errexit`).
const SURVIVORS: [&str; 1] = [
    "for n in a b c d; do p=; st=; read -r p < /builds/pid-$n || true; { read -r _ _ st _ < /proc/$p/stat; } 2>/dev/null || true; if [ -n \"$st\" ] && [ \"$st\" != Z ]; then echo \"survivor-$n\"; else echo \"gone-$n\"; fi; done",
];

async fn cancel_stops_every_child(image: Image, id: u64) {
    let fixtures = tempfile::tempdir().unwrap();
    let env = env_with(image, fixtures.path()).await;
    let cancel = Cancel {
        stage: "build_script".into(),
        after: Duration::from_millis(2500),
        mode: CancelMode::Cancel,
    };
    let out = env
        .runner()
        .run_with(&job(id, image, &CHILDREN, &SURVIVORS), Some(cancel))
        .await;
    let log = &out.log;
    assert_eq!(out.result, JobResult::Canceled, "{log}");
    for n in ["a", "b", "c", "d"] {
        assert!(
            log.lines().any(|l| l == format!("child-{n}-up")),
            "child {n} never ran:\n{log}"
        );
        assert!(
            log.lines().any(|l| l == format!("gone-{n}")),
            "child {n} survived the cancel:\n{log}"
        );
    }
    assert!(!log.lines().any(|l| l.starts_with("survivor-")), "{log}");
    assert!(
        env.no_pods_within(Duration::from_secs(20)).await,
        "cleanup left a pod"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_image_output_and_exit_code() {
    output_and_exit_code(Image::Busybox, 7101).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dash_only_image_output_and_exit_code() {
    output_and_exit_code(Image::DashOnly, 7102).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_image_output_and_exit_code() {
    output_and_exit_code(Image::Host, 7103).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_image_cancel_stops_every_child() {
    cancel_stops_every_child(Image::Busybox, 7111).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dash_only_image_cancel_stops_every_child() {
    cancel_stops_every_child(Image::DashOnly, 7112).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_image_cancel_stops_every_child() {
    cancel_stops_every_child(Image::Host, 7113).await;
}

/// No space left for a stage's files (a launcher that cannot write the script it received): the
/// stage is a system failure within seconds naming the cause, not a wait for the job timeout.
/// The scripts volume is a 64 KiB memory emptyDir, a real tmpfs in the emulator (root needed),
/// which `build_script` fills; the next step then cannot be started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_space_for_a_stage_is_a_system_failure_within_seconds() {
    let env = Env::start(
        r#"[pod.patch]
type = "strategic"
patch = '{"spec": {"volumes": [{"name": "scripts", "emptyDir": {"medium": "Memory", "sizeLimit": "64Ki"}}]}}'
"#,
    )
    .await;
    let job = JobBuilder::new(7121)
        .script(&[
            "head -c 1000000 /dev/zero > /spotrun/scripts/fill 2>/dev/null || true",
            "echo scripts-volume-full",
        ])
        .step("after_full", &["echo unreachable"])
        .timeout(600)
        .build();
    let out = env.runner().run(&job).await;
    let log = &out.log;
    assert!(
        matches!(out.result, JobResult::SystemFailure { .. }),
        "{:?}\n{log}",
        out.result
    );
    assert!(log.lines().any(|l| l == "scripts-volume-full"), "{log}");
    assert!(
        log.contains("could not be started") && log.contains("No space left on device"),
        "{log}"
    );
    assert!(!log.lines().any(|l| l == "unreachable"), "{log}");
    let step = out.stage("step_after_full").expect("the step ran");
    assert_eq!(step.exit_code, Some(2), "{log}");
    assert!(
        step.duration < Duration::from_secs(10),
        "{:?}",
        step.duration
    );
}
