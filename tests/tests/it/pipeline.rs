//! The project's own GitLab pipeline (`.gitlab-ci.yml`), which cannot run here: its structure (stages,
//! jobs, needs, extends, what each job builds and from which file), every script through `bash -n`,
//! and the release helpers `.ci/version` and `.ci/changelog-section` under busybox (the helm and
//! release-cli images are Alpine: no bash).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_yaml::{Mapping, Value};

use super::helm::repo_root;
use super::image::workspace_version;

/// Top-level keys that are not jobs.
const GLOBAL_KEYWORDS: [&str; 6] = [
    "stages",
    "variables",
    "default",
    "workflow",
    "include",
    "image",
];

fn pipeline() -> Mapping {
    let text =
        std::fs::read_to_string(repo_root().join(".gitlab-ci.yml")).expect("read .gitlab-ci.yml");
    serde_yaml::from_str(&text).expect(".gitlab-ci.yml parses")
}

/// Every job and template (hidden `.name` keys included), by name.
fn jobs(p: &Mapping) -> Vec<(String, Mapping)> {
    p.iter()
        .filter_map(|(k, v)| {
            let name = k.as_str()?;
            (!GLOBAL_KEYWORDS.contains(&name)).then(|| {
                (
                    name.to_owned(),
                    v.as_mapping().expect("a job is a mapping").clone(),
                )
            })
        })
        .collect()
}

/// A job with its `extends` chain merged in (the job's own keys win; `variables` merge).
fn resolved(p: &Mapping, name: &str) -> Mapping {
    let job = p[name].as_mapping().expect("job").clone();
    let Some(parent) = job.get("extends").and_then(Value::as_str) else {
        return job;
    };
    let mut out = resolved(p, parent);
    for (k, v) in job {
        if k == "variables" {
            let mut vars = out
                .get("variables")
                .and_then(Value::as_mapping)
                .cloned()
                .unwrap_or_default();
            vars.extend(v.as_mapping().expect("variables").clone());
            out.insert(k, Value::Mapping(vars));
        } else if k != "extends" {
            out.insert(k, v);
        }
    }
    out
}

fn lines(job: &Mapping, key: &str) -> Vec<String> {
    job.get(key)
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .map(|l| l.as_str().expect("script lines are strings").to_owned())
        .collect()
}

/// The job's shell text: `before_script` then `script`.
fn shell(job: &Mapping) -> String {
    let mut all = lines(job, "before_script");
    all.extend(lines(job, "script"));
    all.join("\n")
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

#[test]
fn pipeline_tests_builds_the_image_from_the_containerfile_and_releases_on_tags() {
    let p = pipeline();
    let stages = string_list(p.get("stages"));
    assert_eq!(stages, ["test", "build", "publish", "release"]);
    let all = jobs(&p);
    let names: BTreeSet<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    let visible: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !n.starts_with('.'))
        .collect();

    for name in &visible {
        let job = resolved(&p, name);
        let stage = job.get("stage").and_then(Value::as_str).unwrap_or("test");
        assert!(
            stages.iter().any(|s| s == stage),
            "{name}: stage {stage} is not in stages"
        );
        assert!(!lines(&job, "script").is_empty(), "{name} has no script");
        for need in string_list(job.get("needs")) {
            assert!(
                names.contains(need.as_str()),
                "{name} needs unknown job {need}"
            );
            let needed = resolved(&p, &need);
            let order = |j: &Mapping| {
                let s = j.get("stage").and_then(Value::as_str).unwrap_or("test");
                stages.iter().position(|x| x == s).expect("known stage")
            };
            assert!(
                order(&needed) <= order(&job),
                "{name} needs {need} from a later stage"
            );
        }
    }
    for (name, job) in &all {
        if let Some(parent) = job.get("extends").and_then(Value::as_str) {
            assert!(names.contains(parent), "{name} extends unknown {parent}");
        }
    }

    // test: the README's test command, within CI's limit.
    let test = resolved(&p, "test");
    assert_eq!(lines(&test, "script"), ["./.ci/run"]);
    let ci_run = std::fs::read_to_string(repo_root().join(".ci/run")).expect(".ci/run");
    assert!(
        ci_run.lines().any(|l| l.trim() == "./test.sh"),
        ".ci/run runs ./test.sh"
    );
    assert_eq!(test["timeout"].as_str(), Some("90 minutes"));

    // The Rust toolchain CI builds with is the workspace's rust-version, and the Containerfile's.
    let manifest: toml::Table = toml::from_str(
        &std::fs::read_to_string(repo_root().join("Cargo.toml")).expect("Cargo.toml"),
    )
    .expect("Cargo.toml parses");
    let rust_version = manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .expect("rust-version");
    let rust_image = p["variables"]["RUST_IMAGE"].as_str().expect("RUST_IMAGE");
    assert_eq!(
        rust_image,
        format!("docker.io/library/rust:{rust_version}-bookworm")
    );
    let containerfile =
        std::fs::read_to_string(repo_root().join("Containerfile")).expect("Containerfile");
    assert!(
        containerfile.contains(&format!("ARG RUST_IMAGE={rust_image}\n")),
        "the Containerfile's default RUST_IMAGE is {rust_image}"
    );

    // The image: one job per architecture, each from the Containerfile's runtime stage, on a
    // runner of that architecture, joined into one manifest.
    let mut arches = Vec::new();
    for name in &visible {
        let job = resolved(&p, name);
        let sh = shell(&job);
        if !sh.contains("buildah bud") {
            continue;
        }
        assert!(
            sh.contains("-f Containerfile --target runtime"),
            "{name}: {sh}"
        );
        for arg in [
            "VERSION=",
            "REVISION=",
            "SPOTRUN_GIT_REV=",
            "SOURCE_DATE_EPOCH=",
        ] {
            assert!(
                sh.contains(&format!("--build-arg {arg}")),
                "{name} passes {arg}"
            );
        }
        assert!(
            sh.contains("--timestamp \"$SOURCE_DATE_EPOCH\""),
            "{name}: reproducible time"
        );
        let arch = job["variables"]["ARCH"].as_str().expect("ARCH").to_owned();
        let tags = string_list(job.get("tags"));
        assert!(
            tags.iter().any(|t| t.ends_with(&format!("-{arch}"))),
            "{name} runs on {arch}: {tags:?}"
        );
        arches.push(arch);
    }
    arches.sort();
    assert_eq!(arches, ["amd64", "arm64"]);
    let manifest_job = resolved(&p, "image:manifest");
    assert_eq!(
        string_list(manifest_job.get("needs")),
        ["image:amd64", "image:arm64"]
    );
    let sh = shell(&manifest_job);
    assert!(sh.contains("buildah manifest push --all"), "{sh}");
    assert!(
        sh.contains("\"docker://$IMAGE:$(./.ci/version)\""),
        "tags push the version: {sh}"
    );
    assert_eq!(p["variables"]["IMAGE"].as_str(), Some("$CI_REGISTRY_IMAGE"));

    // The chart: linted, packaged, pushed to the OCI registry on tags.
    let sh = shell(&resolved(&p, "chart"));
    for want in [
        "helm lint --strict helm/spotrun",
        "helm package helm/spotrun",
        "helm push",
        "oci://$IMAGE/charts",
    ] {
        assert!(sh.contains(want), "chart job lacks {want}: {sh}");
    }

    // Release: tags only, notes from the changelog, static binaries with checksums.
    let release = resolved(&p, "release");
    let on_tags = |job: &Mapping| {
        job.get("rules")
            .and_then(Value::as_sequence)
            .is_some_and(|r| r.len() == 1 && r[0]["if"].as_str() == Some("$CI_COMMIT_TAG"))
    };
    assert!(on_tags(&release), "release runs on tags only");
    let sh = shell(&release);
    assert!(sh.contains("./.ci/changelog-section \"$VERSION\""), "{sh}");
    assert!(
        sh.contains("test \"$CI_COMMIT_TAG\" = \"v$VERSION\""),
        "{sh}"
    );
    for arch in ["amd64", "arm64"] {
        let job = resolved(&p, &format!("binaries:{arch}"));
        assert!(on_tags(&job));
        let sh = shell(&job);
        assert!(
            sh.contains("cargo build --profile dist --locked --target \"$TARGET\""),
            "{sh}"
        );
        assert!(sh.contains("sha256sum"), "{sh}");
        assert!(string_list(release.get("needs")).contains(&format!("binaries:{arch}")));
    }
}

#[test]
fn every_pipeline_script_is_valid_shell() {
    let p = pipeline();
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, _) in jobs(&p) {
        let job = resolved(&p, &name);
        let text = shell(&job);
        if text.is_empty() {
            continue;
        }
        let file = dir.path().join("script.sh");
        std::fs::write(&file, &text).expect("write script");
        // POSIX mode: the buildah, helm and release-cli images run scripts with sh, not bash.
        let out = Command::new("bash")
            .args(["--posix", "-n"])
            .arg(&file)
            .output()
            .expect("run bash -n");
        assert!(
            out.status.success(),
            "{name}: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A directory whose only programs are busybox applets: what Alpine-based job images have.
fn busybox_path(dir: &Path) -> std::ffi::OsString {
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("busybox is installed (busybox-static, .ci/install)");
    for applet in ["sh", "awk", "dirname", "cat"] {
        std::os::unix::fs::symlink(busybox, dir.join(applet)).expect("symlink applet");
    }
    dir.as_os_str().to_owned()
}

#[test]
fn release_helpers_print_the_version_and_its_changelog_section_under_busybox() {
    let bin = tempfile::tempdir().expect("tempdir");
    let path = busybox_path(bin.path());
    let run = |args: &[&str]| {
        Command::new(bin.path().join("sh"))
            .args(args)
            .current_dir(repo_root())
            .env_clear()
            .env("PATH", &path)
            .output()
            .expect("run busybox sh")
    };
    let out = run(&[".ci/version"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", workspace_version())
    );

    let changelog = tempfile::NamedTempFile::new().expect("changelog");
    std::fs::write(
        changelog.path(),
        "# Changelog\n\n## [Unreleased]\n\n### Added\n\n- next\n\n## [1.2.0] - 2026-11-30\n\n### Fixed\n\n\
         - the thing\n\n## [1.1.0] - 2026-10-01\n\n- older\n\n## [1.0.0]\n\n[1.2.0]: https://example.com\n",
    )
    .expect("write changelog");
    let cl = changelog.path().to_str().unwrap();
    let out = run(&[".ci/changelog-section", "1.2.0", cl]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "\n### Fixed\n\n- the thing\n\n"
    );
    // 1.2 must not match 1.2.0; an empty section and a missing one both fail the release.
    for missing in ["1.2", "1.0.0", "9.9.9"] {
        let out = run(&[".ci/changelog-section", missing, cl]);
        assert!(
            !out.status.success(),
            "{missing}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The project's own changelog has the section a release of this version will need.
    let out = run(&[".ci/changelog-section", "Unreleased"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("### Added"));
}
