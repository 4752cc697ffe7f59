// Included (`include!`) by the build scripts of the three binaries: the environment their `--version`
// is made of. Plain functions, no crate: build scripts cannot share a module otherwise without a
// build-dependency package for twenty lines.

/// Sets `SPOTRUN_GIT_REV`, `SPOTRUN_BUILD_TARGET` and `SPOTRUN_VERSION` (what `--version`
/// prints: crate version, revision and target) for `env!` in the binary.
///
/// The revision is `$SPOTRUN_GIT_REV` when set (builds without `.git`, e.g. a container build
/// context; CI passes its commit), else `git rev-parse --short HEAD`, else `unknown`.
fn emit_version_env() {
    println!("cargo:rerun-if-env-changed=SPOTRUN_GIT_REV");
    let rev = std::env::var("SPOTRUN_GIT_REV")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(git_rev)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=SPOTRUN_GIT_REV={rev}");
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_owned());
    println!("cargo:rustc-env=SPOTRUN_BUILD_TARGET={target}");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_else(|_| "unknown".to_owned());
    println!("cargo:rustc-env=SPOTRUN_VERSION={version} (rev {rev}, {target})");
}

/// `git ARGS` in the package directory; `None` when git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(&dir)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// The short revision of HEAD, and a rebuild whenever HEAD moves (a checkout changes `HEAD`, a
/// commit changes the branch's ref file or `packed-refs`). Worktrees keep HEAD and refs in
/// different directories, hence `--git-path`.
fn git_rev() -> Option<String> {
    let rev = git(&["rev-parse", "--short", "HEAD"])?;
    let dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch_ref);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = dir.join(path);
            // A missing file would make cargo rerun this script on every build.
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    Some(rev)
}
