//! Finds the workspace binaries the benchmark runs as child processes (`spotrun-cache-proxy`,
//! `spotrun-executor`), building them with the running profile when they are missing, and the
//! static binary the image ships.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The target profile directory this program runs from (`target/release`, `target/debug`, ...).
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this program")?;
    let mut dir = exe.parent().context("program has no directory")?;
    // Test binaries live in `<profile>/deps`.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    Ok(dir.to_path_buf())
}

/// Path of workspace binary `name` from package `package`, built first if it is not there.
pub fn workspace_binary(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    let dir = profile_dir()?;
    let path = dir.join(name);
    if path.is_file() {
        return Ok(path);
    }
    build(&dir, name, package)?;
    if path.is_file() {
        Ok(path)
    } else {
        bail!("{} is missing after building it", path.display())
    }
}

fn build(dir: &Path, name: &str, package: &str) -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        bail!(
            "{name} not found in {}: run `cargo build --release --bins` first (or start this program with `cargo run`)",
            dir.display()
        );
    };
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("profile dir name")?;
    let profile = if profile == "debug" { "dev" } else { profile };
    let target_dir = dir.parent().context("profile dir has no parent")?;
    eprintln!("building {name} ({profile} profile) ...");
    let status = Command::new(cargo)
        .args(["build", "--profile", profile, "-p", package, "--bin", name])
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of {name} failed with {status}");
    }
    Ok(())
}

/// The static binary the image ships (`--profile dist`, musl target), built first if it is not
/// there, with the package set `test.sh` builds (another set would unify features differently and
/// rebuild every dependency).
pub fn shipped_binary(name: &str) -> anyhow::Result<PathBuf> {
    let profile = profile_dir()?;
    let target_dir = profile.parent().context("profile dir has no parent")?;
    let triple = format!("{}-unknown-linux-musl", std::env::consts::ARCH);
    let path = target_dir.join(&triple).join("dist").join(name);
    if path.is_file() {
        return Ok(path);
    }
    let command = format!(
        "cargo build --profile dist --locked --target {triple} -p spotrun-executor \
         -p spotrun-cache-proxy -p spotrun-launch"
    );
    let Some(cargo) = std::env::var_os("CARGO") else {
        bail!("{} not found: run `{command}` first", path.display());
    };
    eprintln!("building the shipped binaries: {command} ...");
    let status = Command::new(cargo)
        .args(command.split_whitespace().skip(1))
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .context("running cargo build")?;
    if !status.success() || !path.is_file() {
        bail!(
            "`{command}` failed ({status}) or made no {}",
            path.display()
        );
    }
    Ok(path)
}
