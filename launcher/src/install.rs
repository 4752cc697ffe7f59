//! `install`: the init container's job: copies this binary into the pod's shared volume.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::ExitCode;

pub fn install(dir: &Path) -> ExitCode {
    match copy_self(dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spotrun-launch: installing into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// Temp file, then rename: a container never sees a half-copied program.
fn copy_self(dir: &Path) -> std::io::Result<()> {
    let me = std::env::current_exe()?;
    let tmp = dir.join(format!(".spotrun-launch.{}", std::process::id()));
    std::fs::copy(&me, &tmp)?;
    // World-executable: the build container may run as any user.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, dir.join("spotrun-launch"))
}
