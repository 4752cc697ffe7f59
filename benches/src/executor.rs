//! P8 (the emulator marks the pod Running → `spotrun-executor prepare` returns) and P9 (an empty
//! stage: binary start, exec of the runner's stage script with no user lines, exit), with the
//! executor binary driven by the gitlab-runner harness against the Kubernetes API emulator.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, ensure};
use spotrun_testkit::emulator::{Emulator, EmulatorConfig};
use spotrun_testkit::harness::{JobBuilder, JobResult, Runner};

use crate::bins::workspace_binary;
use crate::report::{Goal, Row};

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

/// `jobs` jobs, each with `empty_stages` empty user stages (`build_script` and `step_*`).
pub async fn run(jobs: u32, empty_stages: u32) -> anyhow::Result<Vec<Row>> {
    let executor = workspace_binary("spotrun-executor", "spotrun-executor")?;
    let mut cfg = EmulatorConfig::gke();
    cfg.images.push(spotrun_testkit::rootfs::launcher_image());
    let emu = Emulator::start(cfg).await?;
    let dir = tempfile::tempdir()?;
    let settings = dir.path().join("executor.toml");
    std::fs::write(
        &settings,
        format!(
            "namespace = \"ci-jobs\"\nevents_log = \"{}\"\n",
            dir.path().join("events.jsonl").display()
        ),
    )?;
    let runner = Runner::new(&executor)
        .args(["--config", settings.to_str().context("utf-8 temp path")?])
        .env("KUBECONFIG", emu.kubeconfig_path().to_string_lossy())
        .prepare_retry_delay(Duration::from_millis(50))
        .graceful_kill_timeout(Duration::from_secs(10));
    let steps: Vec<String> = (1..empty_stages).map(|i| format!("empty{i}")).collect();
    let (mut ready, mut stages) = (Vec::new(), Vec::new());
    for j in 0..jobs {
        let before: HashSet<String> = emu.running_marks().into_iter().map(|m| m.0).collect();
        let mut job = JobBuilder::new(7000 + u64::from(j))
            .name("bench:empty")
            .image("alpine:3.22")
            .script(&[]);
        for s in &steps {
            job = job.step(s, &[]);
        }
        let outcome = runner.run(&job.build()).await;
        ensure!(
            outcome.result == JobResult::Success,
            "benchmark job {j} did not succeed ({:?}); job log:\n{}",
            outcome.result,
            outcome.log
        );
        let prepare = outcome
            .stages
            .iter()
            .rfind(|s| s.stage == "prepare")
            .context("no prepare stage")?;
        let marks: Vec<_> = emu
            .running_marks()
            .into_iter()
            .filter(|m| !before.contains(&m.0))
            .collect();
        ensure!(
            marks.len() == 1,
            "expected one pod to turn Running during job {j}, saw {}",
            marks.len()
        );
        ready.push(prepare.ended_at.saturating_duration_since(marks[0].1));
        stages.extend(
            outcome
                .stages
                .iter()
                .filter(|s| s.stage == "build_script" || s.stage.starts_with("step_"))
                .map(|s| s.duration),
        );
    }
    emu.shutdown().await;
    // The executor's own account of each stage (`stage_end.duration_ms`: connect, exec, exit
    // code), to split P9 into in-process time and process start + settings.
    let inside: Vec<Duration> = std::fs::read_to_string(dir.path().join("events.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "stage_end")
        .filter(|v| {
            v["stage"]
                .as_str()
                .is_some_and(|s| s == "build_script" || s.starts_with("step_"))
        })
        .filter_map(|v| v["duration_ms"].as_u64())
        .map(Duration::from_millis)
        .collect();
    let (n_ready, n_stages) = (ready.len(), stages.len());
    let inside_ms = median_ms(inside);
    let bash_ms = median_ms(bash_alone(&steps, n_stages.max(1))?);
    Ok(vec![
        Row {
            id: "P8",
            measure: "pod Running in the emulator → `prepare` returns (median)".into(),
            value: median_ms(ready),
            unit: " ms",
            goal: Goal::AtMost(100.0),
            detail: format!("{n_ready} jobs"),
        },
        Row {
            id: "P9",
            measure: "empty stage round trip: binary start → exit (median)".into(),
            value: median_ms(stages),
            unit: " ms",
            goal: Goal::AtMost(15.0),
            detail: format!(
                "{n_stages} stages of {n_ready} jobs; inside the executor (connect → exit code) {inside_ms:.0} ms; bash alone runs the same stage script in {bash_ms:.1} ms"
            ),
        },
    ])
}

/// Baseline for P9: the runner's own empty-stage script (the same exports, `mkdir`, `touch`, `cd`)
/// run by `bash` directly on this machine, `runs` times, in a project dir under a temp dir.
fn bash_alone(steps: &[String], runs: usize) -> anyhow::Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let builds = dir.path().join("builds");
    let builds_dir = builds.to_str().context("utf-8 temp path")?;
    let mut job = JobBuilder::new(7000).name("bench:empty").script(&[]);
    for s in steps {
        job = job.step(s, &[]);
    }
    let job = job.build();
    std::fs::create_dir_all(job.project_dir(builds_dir))?;
    let script = spotrun_testkit::harness::script::ScriptWriter {
        job: &job,
        builds_dir,
        hostname: None,
    }
    .user_stage(&[], "running");
    let path = dir.path().join("build_script");
    std::fs::write(&path, script)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = std::time::Instant::now();
        let st = std::process::Command::new("bash")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .status()?;
        times.push(t.elapsed());
        ensure!(
            st.success(),
            "the stage script failed under bash alone: {st}"
        );
    }
    Ok(times)
}
