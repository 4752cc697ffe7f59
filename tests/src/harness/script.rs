//! Stage scripts shaped like the ones gitlab-runner's bash shell writes (`shells/bash.go` `Finish`,
//! `shells/abstract.go`): a fixed prologue, every variable exported inside an `eval`'d body, the
//! user's commands echoed in green before they run.

use super::job::{JobSpec, Variable};

/// Stage names as `run_exec` receives them (the runner translates `step_script` to `build_script`).
pub const PREPARE_SCRIPT: &str = "prepare_script";
pub const GET_SOURCES: &str = "get_sources";
pub const RESTORE_CACHE: &str = "restore_cache";
pub const BUILD_SCRIPT: &str = "build_script";
pub const AFTER_SCRIPT: &str = "after_script";
pub const ARCHIVE_CACHE: &str = "archive_cache";
pub const ARCHIVE_CACHE_ON_FAILURE: &str = "archive_cache_on_failure";
pub const CLEANUP_FILE_VARIABLES: &str = "cleanup_file_variables";

/// Quote a string the way the runner's `ShellEscape` does: bare when every byte is safe,
/// otherwise an ANSI-C `$'...'` string.
#[must_use]
pub fn shell_escape(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'@' | b'%' | b'+' | b'=' | b':' | b',' | b'.' | b'/' | b'-'
                )
        });
    if safe {
        return s.to_owned();
    }
    let mut out = String::from("$'");
    for b in s.bytes() {
        match b {
            b'\x07' => out.push_str("\\a"),
            b'\x08' => out.push_str("\\b"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            b'\x0b' => out.push_str("\\v"),
            b'\x0c' => out.push_str("\\f"),
            b'\r' => out.push_str("\\r"),
            b'\\' => out.push_str("\\\\"),
            b'\'' => out.push_str("\\'"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('\'');
    out
}

/// Wrap a body exactly like `BashWriter.Finish`.
#[must_use]
pub fn finish(body: &str) -> String {
    format!(
        "#!/usr/bin/env bash\n\ntrap 'exit 1' TERM\n\ncase \"$(set -o)\" in *\"pipefail\"*) set -o pipefail;; esac; set -o errexit\nset +o noclobber\n(trap 'exit 1' TERM; eval {}) < /dev/null\nexit 0\n",
        shell_escape(body)
    )
}

/// Renders the stage scripts of one job.
pub struct ScriptWriter<'a> {
    pub job: &'a JobSpec,
    pub builds_dir: &'a str,
    pub hostname: Option<&'a str>,
}

impl ScriptWriter<'_> {
    fn project_dir(&self) -> String {
        self.job.project_dir(self.builds_dir)
    }

    fn tmp_dir(&self) -> String {
        format!("{}.tmp", self.project_dir())
    }

    /// Every variable exported, file variables written under `<project>.tmp/`, then `GITLAB_ENV`.
    fn exports(&self, status: &str) -> String {
        let mut out = String::new();
        let tmp = self.tmp_dir();
        for Variable {
            key, value, file, ..
        } in self.job.all_variables(self.builds_dir, status)
        {
            if file {
                out.push_str(&format!("mkdir -p \"{tmp}\"\n"));
                out.push_str(&format!(
                    "printf '%s' {} > \"{tmp}/{key}\"\n",
                    shell_escape(&value)
                ));
                out.push_str(&format!("export {key}=\"{tmp}/{key}\"\n"));
            } else {
                out.push_str(&format!("export {key}={}\n", shell_escape(&value)));
            }
        }
        out.push_str(&format!("export GITLAB_ENV={tmp}/gitlab_runner_env\n"));
        out.push_str(&format!("mkdir -p \"{tmp}\"\n"));
        out.push_str(&format!("touch \"{tmp}/gitlab_runner_env\"\n"));
        out.push_str(&format!(
            "while read -r line; do export \"$line\"; done < \"{tmp}/gitlab_runner_env\"\n"
        ));
        out
    }

    fn user_commands(lines: &[String]) -> String {
        let mut out = String::new();
        for line in lines {
            let first = line.lines().next().unwrap_or("");
            let shown = if line.trim_end().contains('\n') {
                format!("{first} # collapsed multi-line command")
            } else {
                line.clone()
            };
            out.push_str(&format!(
                "echo {}\n{}\n",
                shell_escape(&format!("\x1b[32;1m$ {shown}\x1b[0;m")),
                line.trim_end()
            ));
        }
        out
    }

    #[must_use]
    pub fn prepare_script(&self) -> String {
        let via = self
            .hostname
            .map(|h| format!(" via {h}"))
            .unwrap_or_default();
        let tmp = self.tmp_dir();
        finish(&format!(
            "echo \"Running on $(hostname){via}...\"\nrm \"-f\" \"{tmp}/gitlab_runner_env\"\nrm \"-f\" \"{tmp}/masking.db\"\n"
        ))
    }

    #[must_use]
    pub fn get_sources(&self) -> String {
        let dir = self.project_dir();
        let mut body = self.exports("running");
        match &self.job.repo_url {
            Some(url) => {
                let r = &self.job.git_ref;
                let sha = &self.job.git_sha;
                body.push_str(&format!(
                    "echo {}\n",
                    shell_escape("\x1b[32;1mFetching changes with git depth set to 20...\x1b[0;m")
                ));
                body.push_str(&format!("git init -q {dir}\ncd {dir}\n"));
                body.push_str(&format!(
                    "if git remote add origin {u} >/dev/null 2>&1 ; then\n  echo {created}\nelse\n  git remote set-url origin {u}\nfi\n",
                    u = shell_escape(url),
                    created = shell_escape("\x1b[32;1mCreated fresh repository.\x1b[0;m")
                ));
                body.push_str(&format!(
                    "git fetch origin --no-recurse-submodules {} --depth 20 --prune --quiet\n",
                    shell_escape(&format!("+refs/heads/{r}:refs/remotes/origin/{r}"))
                ));
                body.push_str(&format!(
                    "echo {}\ngit -c advice.detachedHead=false checkout -f -q {sha}\ngit clean -ffdx\n",
                    shell_escape(&format!(
                        "\x1b[32;1mChecking out {} as detached HEAD (ref is {r})...\x1b[0;m",
                        &sha[..8.min(sha.len())]
                    ))
                ));
            }
            None => {
                body.push_str(&format!(
                    "echo {}\nmkdir -p {dir}\n",
                    shell_escape("\x1b[32;1mSkipping Git repository setup\x1b[0;m")
                ));
            }
        }
        finish(&body)
    }

    /// A user-script stage (`build_script`, `step_*`, `after_script`): exports, `cd`, commands.
    #[must_use]
    pub fn user_stage(&self, lines: &[String], status: &str) -> String {
        let mut body = self.exports(status);
        body.push_str(&format!("cd {}\n", self.project_dir()));
        body.push_str(&Self::user_commands(lines));
        finish(&body)
    }

    /// `restore_cache`: the `gitlab-runner cache-extractor` call with presigned URLs.
    #[must_use]
    pub fn restore_cache(&self, key: &str, archive: &str, get_url: &str, head_url: &str) -> String {
        let mut body = self.exports("running");
        body.push_str(&format!("cd {}\n", self.project_dir()));
        body.push_str(&format!(
            "if gitlab-runner --version >/dev/null 2>&1 ; then\n  echo {msg}\n  if gitlab-runner cache-extractor --file {a} --timeout 10 --url {g} --head-url {h} ; then\n    echo {ok}\n  else\n    echo {failed}\n  fi\nelse\n  echo {missing}\nfi\n",
            msg = shell_escape(&format!("\x1b[32;1mChecking cache for {key}...\x1b[0;m")),
            a = shell_escape(archive),
            g = shell_escape(get_url),
            h = shell_escape(head_url),
            ok = shell_escape("\x1b[32;1mSuccessfully extracted cache\x1b[0;m"),
            failed = shell_escape("\x1b[0;33mFailed to extract cache\x1b[0;m"),
            missing = shell_escape("\x1b[0;33mMissing gitlab-runner. Extracting cache is disabled.\x1b[0;m"),
        ));
        finish(&body)
    }

    /// `archive_cache`: the `gitlab-runner cache-archiver` call with a presigned PUT.
    #[must_use]
    pub fn archive_cache(
        &self,
        key: &str,
        archive: &str,
        paths: &[String],
        put_url: &str,
        headers: &[(String, String)],
        check_url: &str,
    ) -> String {
        let mut body = self.exports("success");
        body.push_str(&format!("cd {}\n", self.project_dir()));
        let mut cmd = format!(
            "gitlab-runner cache-archiver --file {} --timeout 10",
            shell_escape(archive)
        );
        for p in paths {
            cmd.push_str(&format!(" --path {}", shell_escape(p)));
        }
        cmd.push_str(&format!(" --url {}", shell_escape(put_url)));
        for (k, v) in headers {
            cmd.push_str(&format!(" --header {}", shell_escape(&format!("{k}: {v}"))));
        }
        cmd.push_str(&format!(" --check-url {}", shell_escape(check_url)));
        body.push_str(&format!(
            "if gitlab-runner --version >/dev/null 2>&1 ; then\n  echo {msg}\n  if {cmd} ; then\n    echo {ok}\n  else\n    echo {failed}\n  fi\nelse\n  echo {missing}\nfi\n",
            msg = shell_escape(&format!("\x1b[32;1mCreating cache {key}...\x1b[0;m")),
            ok = shell_escape("\x1b[32;1mCreated cache\x1b[0;m"),
            failed = shell_escape("\x1b[0;33mFailed to create cache\x1b[0;m"),
            missing = shell_escape("\x1b[0;33mMissing gitlab-runner. Creating cache is disabled.\x1b[0;m"),
        ));
        finish(&body)
    }

    #[must_use]
    pub fn cleanup_file_variables(&self) -> String {
        let tmp = self.tmp_dir();
        let mut body = String::new();
        body.push_str(&format!("mkdir -p \"{tmp}\"\n"));
        body.push_str(&format!("rm \"-f\" \"{tmp}/gitlab_runner_env\"\n"));
        body.push_str(&format!("rm \"-f\" \"{tmp}/masking.db\"\n"));
        for v in self.job.all_variables(self.builds_dir, "success") {
            if v.file {
                body.push_str(&format!("rm \"-f\" \"{tmp}/{}\"\n", v.key));
            }
        }
        finish(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::JobBuilder;

    #[test]
    fn escapes_like_the_runner() {
        assert_eq!(shell_escape("abc/def-1.2"), "abc/def-1.2");
        assert_eq!(shell_escape("Jane Doe"), "$'Jane Doe'");
        assert_eq!(shell_escape("a'b\nc"), "$'a\\'b\\nc'");
        assert_eq!(shell_escape("\x1b[0m"), "$'\\x1b[0m'");
        assert_eq!(shell_escape(""), "$''");
    }

    #[test]
    fn finish_matches_the_fixture_shape() {
        let fixture = include_str!("../../fixtures/stage-scripts/prepare_script");
        let body = "echo \"Running on $(hostname)...\"\nrm \"-f\" \"/builds/acme/platform/inventory-service.tmp/gitlab_runner_env\"\nrm \"-f\" \"/builds/acme/platform/inventory-service.tmp/masking.db\"\n";
        assert_eq!(finish(body), fixture);
    }

    #[test]
    fn generated_scripts_are_valid_bash_and_run() {
        let job = JobBuilder::new(5)
            .variable("GREETING", "hello 'world'\nline2")
            .file_variable("CONF", "a: 1\n")
            .script(&["echo \"$GREETING\"", "test -f \"$CONF\""])
            .build();
        let dir = tempfile::tempdir().unwrap();
        let builds = dir.path().join("builds");
        let w = ScriptWriter {
            job: &job,
            builds_dir: builds.to_str().unwrap(),
            hostname: None,
        };
        let run = |script: String| {
            let path = dir.path().join("script");
            std::fs::write(&path, script).unwrap();
            std::process::Command::new("bash")
                .arg(&path)
                .output()
                .unwrap()
        };
        assert!(run(w.get_sources()).status.success());
        let out = run(w.user_stage(&job.script, "running"));
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.contains("hello 'world'\nline2\n"), "{stdout}");
        let failing = run(w.user_stage(&["exit 42".to_owned()], "running"));
        assert_eq!(failing.status.code(), Some(42));
    }
}
