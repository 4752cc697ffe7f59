//! Hands what a helper stage wrote to the build container's user. The helper runs as root, the job
//! image may not (`USER 1000`, `image: kubernetes: user`): `owner` records in a shared file who the
//! build container runs as, and after a helper stage the supervisor gives that user every entry of
//! the handed-over trees (the checkout, file variables, restored caches, downloaded artifacts)
//! that it does not own yet. GitLab's Kubernetes executor does this with
//! `FF_DISABLE_UMASK_FOR_KUBERNETES_EXECUTOR` (gitlab-runner#38382 for what it misses).
//!
//! The walk works on directory descriptors (`openat`, `fstatat`, `fchownat` with
//! `AT_SYMLINK_NOFOLLOW`): a symlink is changed itself, never followed, even one swapped in while
//! the walk runs, and entries on another filesystem (a mount inside the tree) are left alone.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use nix::unistd::{Gid, Uid, fchown, fchownat};

use crate::files::write_new;

/// A stage's options about the files it writes: the `start` and `supervise` flags
/// `--umask <octal>`, `--owner-file <path>` and `--chown-tree <dir>` (repeatable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageOwnership {
    /// The script's umask (the Kubernetes executor's `umask 0000` fallback).
    pub umask: Option<u32>,
    /// Where `owner` recorded the build container's user.
    pub owner_file: Option<PathBuf>,
    /// Trees handed over to that user once the script ended.
    pub trees: Vec<PathBuf>,
}

impl StageOwnership {
    /// The flags that carry these options from `start` to `supervise`.
    pub fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(m) = self.umask {
            out.extend(["--umask".to_string(), format!("{m:04o}")]);
        }
        if let Some(f) = &self.owner_file {
            out.extend(["--owner-file".to_string(), f.display().to_string()]);
        }
        for t in &self.trees {
            out.extend(["--chown-tree".to_string(), t.display().to_string()]);
        }
        out
    }

    /// Sets the umask the script inherits.
    pub fn apply_umask(&self) {
        if let Some(m) = self.umask {
            nix::sys::stat::umask(Mode::from_bits_truncate(m));
        }
    }

    /// Environment for the script: git (2.35.2 and later) refuses a repository owned by another
    /// user ("detected dubious ownership"), so the root helper's `git fetch` in a checkout an
    /// earlier job handed to the build user (a builds directory that outlives the pod: a PVC or a
    /// host path) would fail. The handed-over trees, and (git 2.46 and later) everything below
    /// them, are marked safe for this stage's git alone, through git's environment configuration:
    /// command-line scope, where `safe.directory` counts, after any entries already there.
    /// Nothing when this stage hands nothing over.
    pub fn git_env(&self, inherited_count: Option<&str>) -> Vec<(String, String)> {
        if self.owner_file.is_none() || self.trees.is_empty() {
            return Vec::new();
        }
        let mut n: usize = inherited_count.and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut out = Vec::new();
        for tree in &self.trees {
            let tree = tree.display().to_string();
            for value in [format!("{}/*", tree.trim_end_matches('/')), tree] {
                out.push((format!("GIT_CONFIG_KEY_{n}"), "safe.directory".to_string()));
                out.push((format!("GIT_CONFIG_VALUE_{n}"), value));
                n += 1;
            }
        }
        out.push(("GIT_CONFIG_COUNT".to_string(), n.to_string()));
        out
    }

    /// After the script: hands the trees over to the recorded owner. Returns the one warning line
    /// for the stage log when that could not be done (never fails the stage: the build may not
    /// even need those files).
    pub fn hand_over(&self) -> Option<String> {
        let file = self.owner_file.as_ref()?;
        if self.trees.is_empty() {
            return None;
        }
        let to = match Owner::read(file) {
            Ok(o) => o,
            Err(e) => {
                return Some(format!(
                    "WARNING: spotrun-launch: the build container's user is not known ({e}); files written by this stage keep the helper's owner"
                ));
            }
        };
        // Root builds need nothing; a helper running as the build's user already wrote them so.
        if to == (Owner { uid: 0, gid: 0 }) || to == Owner::me() {
            return None;
        }
        let mut walked = Walked::default();
        for tree in &self.trees {
            hand_over(tree, to, &mut walked);
        }
        walked.warning(to)
    }
}

/// A uid and gid, as the owner file holds them (`1000:1000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// Who this process runs as.
    pub fn me() -> Self {
        Self {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let (uid, gid) = text.trim().split_once(':')?;
        Some(Self {
            uid: uid.parse().ok()?,
            gid: gid.parse().ok()?,
        })
    }

    /// Reads an owner file written by [`record`].
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text)
            .ok_or_else(|| format!("{}: not uid:gid: {:?}", path.display(), text.trim()))
    }

    fn owns(self, st: &FileStat) -> bool {
        st.st_uid == self.uid && st.st_gid == self.gid
    }
}

/// `owner <file>`: records who this process (exec'd in the build container) runs as. Temp file,
/// then rename: a helper stage never reads half a record.
pub fn record(path: &Path) -> io::Result<Owner> {
    let me = Owner::me();
    let tmp = PathBuf::from(format!("{}.{}.tmp", path.display(), std::process::id()));
    let written = write_new(&tmp, format!("{}:{}\n", me.uid, me.gid).as_bytes())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| me)
}

/// What handing over trees did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Walked {
    /// Entries given to the owner.
    pub changed: u64,
    /// Entries that could not be (read or changed).
    pub failed: u64,
    /// The first failure, with its path.
    pub first_error: Option<String>,
}

impl Walked {
    fn fail(&mut self, path: &Path, e: Errno) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{}: {}", path.display(), e.desc()));
        }
    }

    /// The one line a stage log gets when something could not be handed over.
    pub fn warning(&self, to: Owner) -> Option<String> {
        let first = self.first_error.as_ref()?;
        Some(format!(
            "WARNING: spotrun-launch: {} entr{} written by this stage could not be given to the build container's user {}:{} (first: {first}); the build may not be able to change them. Is the helper container running as root?",
            self.failed,
            if self.failed == 1 { "y" } else { "ies" },
            to.uid,
            to.gid
        ))
    }
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Gives `to` the tree at `root` (itself included) and everything below it on the same
/// filesystem. A missing root is nothing to do.
pub fn hand_over(root: &Path, to: Owner, out: &mut Walked) {
    let dir = match openat(AT_FDCWD, root, DIR_FLAGS, Mode::empty()).and_then(Dir::from_fd) {
        Ok(d) => d,
        Err(Errno::ENOENT) => return,
        Err(e) => return out.fail(root, e),
    };
    let st = match fstat(&dir) {
        Ok(st) => st,
        Err(e) => return out.fail(root, e),
    };
    if !to.owns(&st) {
        match fchown(
            &dir,
            Some(Uid::from_raw(to.uid)),
            Some(Gid::from_raw(to.gid)),
        ) {
            Ok(()) => out.changed += 1,
            Err(e) => out.fail(root, e),
        }
    }
    walk(dir, root, st.st_dev, to, out);
}

fn walk(mut dir: Dir, path: &Path, dev: u64, to: Owner, out: &mut Walked) {
    // Names first, then the changes: the directory stream is not read while entries change.
    let names: Vec<CString> = dir
        .iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_owned())
        .filter(|n| !matches!(n.as_bytes(), b"." | b".."))
        .collect();
    for name in names {
        let child = path.join(OsStr::from_bytes(name.as_bytes()));
        let st = match fstatat(&dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Removed meanwhile (a background process of the job): nothing to hand over.
            Err(Errno::ENOENT) => continue,
            Err(e) => {
                out.fail(&child, e);
                continue;
            }
        };
        // A mount inside the tree (another volume) is not this stage's to change.
        if st.st_dev != dev {
            continue;
        }
        if !to.owns(&st) {
            match fchownat(
                &dir,
                name.as_c_str(),
                Some(Uid::from_raw(to.uid)),
                Some(Gid::from_raw(to.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(()) => out.changed += 1,
                Err(Errno::ENOENT) => continue,
                Err(e) => out.fail(&child, e),
            }
        }
        if is_dir(&st) {
            match openat(&dir, name.as_c_str(), DIR_FLAGS, Mode::empty()).and_then(Dir::from_fd) {
                Ok(sub) => walk(sub, &child, dev, to, out),
                // Gone, or swapped for a symlink or a file since the stat: not followed.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => {}
                Err(e) => out.fail(&child, e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_records_parse() {
        assert_eq!(
            Owner::parse("1000:1001\n"),
            Some(Owner {
                uid: 1000,
                gid: 1001
            })
        );
        for bad in ["", "1000", "root:root", "1000:", ":1000", "-1:0", "1:2:3"] {
            assert_eq!(Owner::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn options_travel_as_flags() {
        let o = StageOwnership {
            umask: Some(0),
            owner_file: Some("/spotrun/logs/build-owner".into()),
            trees: vec!["/builds/g/p".into(), "/builds/g/p.tmp".into()],
        };
        assert_eq!(
            o.args(),
            [
                "--umask",
                "0000",
                "--owner-file",
                "/spotrun/logs/build-owner",
                "--chown-tree",
                "/builds/g/p",
                "--chown-tree",
                "/builds/g/p.tmp"
            ]
        );
        assert!(StageOwnership::default().args().is_empty());
    }

    #[test]
    fn handed_over_trees_are_safe_for_git_after_inherited_entries() {
        let o = StageOwnership {
            umask: None,
            owner_file: Some("/spotrun/logs/build-owner".into()),
            trees: vec!["/builds/g/p".into()],
        };
        let env = |n| {
            o.git_env(n)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            env(Some("2")),
            [
                "GIT_CONFIG_KEY_2=safe.directory",
                "GIT_CONFIG_VALUE_2=/builds/g/p/*",
                "GIT_CONFIG_KEY_3=safe.directory",
                "GIT_CONFIG_VALUE_3=/builds/g/p",
                "GIT_CONFIG_COUNT=4"
            ]
        );
        assert_eq!(env(None)[1], "GIT_CONFIG_VALUE_0=/builds/g/p/*");
        assert_eq!(env(Some("junk")).last().unwrap(), "GIT_CONFIG_COUNT=2");
        // The umask mode hands nothing over: git's own rules stay.
        let umask = StageOwnership {
            umask: Some(0),
            ..StageOwnership::default()
        };
        assert!(umask.git_env(None).is_empty());
    }
}
