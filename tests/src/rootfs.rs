//! Image root filesystems for the emulator (`ImageRule::rootfs`), and the in-pod launcher.
//!
//! A container of an image with a rootfs sees only that tree (plus the pod's volumes, /proc and a
//! minimal /dev), so a job proves what it needs from its image:
//! - [`busybox`]: Debian's `busybox-static` at /bin/busybox with a link per applet, as a busybox
//!   image has them (its `sh` is ash);
//! - [`dash_only`]: /bin/sh is dash and nothing else: no coreutils, not even `sleep` or `cat`;
//!   only the C library files dash is linked against (`ldd`), which no script can call.
//!
//! The spotrun image's `spotrun-launch` is the static release binary that `./test.sh` builds
//! ([`launcher_binary`]); [`launcher_image`] stands for the spotrun image in the emulator.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::emulator::{ImageRule, PullOutcome};

fn musl_target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

/// The static `spotrun-launch` (`cargo build --profile dist --target <arch>-unknown-linux-musl -p
/// spotrun-launch`, which `./test.sh` runs before the tests). Panics saying how to build it.
#[must_use]
pub fn launcher_binary() -> PathBuf {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let path = target_dir
        .join(musl_target())
        .join("dist")
        .join("spotrun-launch");
    assert!(
        path.is_file(),
        "{} is missing: jobs in the emulator run the static in-pod launcher; build it with \
         `cargo build --profile dist --locked --target {} -p spotrun-launch` (./test.sh does)",
        path.display(),
        musl_target()
    );
    path
}

/// The spotrun image (the executor's `images.launcher_image`) as the emulator runs it: the
/// init container finds `spotrun-launch` on its PATH. Matches any spotrun image reference.
#[must_use]
pub fn launcher_image() -> ImageRule {
    let bin = launcher_binary();
    ImageRule {
        pattern: "*spotrun/spotrun:*".into(),
        outcome: PullOutcome::Ok,
        default_command: None,
        env: Vec::new(),
        bin_dirs: vec![bin.parent().expect("dist dir").to_path_buf()],
        rootfs: None,
        user: None,
    }
}

/// A rule running containers of images matching `pattern` in `rootfs`.
#[must_use]
pub fn image(pattern: &str, rootfs: &Path) -> ImageRule {
    ImageRule {
        pattern: pattern.into(),
        outcome: PullOutcome::Ok,
        default_command: None,
        env: Vec::new(),
        bin_dirs: Vec::new(),
        rootfs: Some(rootfs.to_path_buf()),
        user: None,
    }
}

/// The directories every image has (mount points and `HOME`).
fn skeleton(root: &Path) -> std::io::Result<()> {
    for d in ["bin", "etc", "root", "tmp", "dev", "proc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    // An image's `/` and `/bin`: every user of the container may enter them.
    for d in [root.to_path_buf(), root.join("bin")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
}

/// The busybox image: /bin/busybox (static) and a symlink per applet in /bin.
pub fn busybox(root: &Path) -> std::io::Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            std::io::Error::other("busybox not found: apt-get install busybox-static")
        })?;
    skeleton(root)?;
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    let list = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if !applet.is_empty() && applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
    }
    Ok(())
}

/// The dash-only image: /bin/sh is dash; the shared libraries `ldd` names, at their paths.
pub fn dash_only(root: &Path) -> std::io::Result<()> {
    let dash = ["/bin/dash", "/usr/bin/dash"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| std::io::Error::other("dash not found"))?;
    skeleton(root)?;
    std::fs::copy(dash, root.join("bin/sh"))?;
    let ldd = Command::new("ldd").arg(dash).output()?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(lib) = path {
            let dest = root.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().expect("lib dir"))?;
            std::fs::copy(lib, &dest)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only what each image should hold: busybox has its applets, the dash image has none.
    #[test]
    fn fixtures_hold_only_their_programs() {
        let dir = tempfile::tempdir().unwrap();
        let bb = dir.path().join("busybox");
        busybox(&bb).unwrap();
        for applet in ["sh", "tail", "sleep", "setsid"] {
            assert!(bb.join("bin").join(applet).exists(), "{applet}");
        }
        let dash = dir.path().join("dash");
        dash_only(&dash).unwrap();
        let bins: Vec<_> = std::fs::read_dir(dash.join("bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(bins, ["sh"]);
        let out = Command::new("chroot")
            .arg(&dash)
            .args(["/bin/sh", "-c", "echo $((6 * 7)); sleep 1"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("sleep: not found"),
            "{out:?}"
        );
    }
}
