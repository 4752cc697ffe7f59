//! Process trees through /proc: whether a process still runs, and stopping a process's whole
//! tree of descendants, including those that left its process group or session.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One process as /proc/<pid>/stat shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    ppid: i32,
    /// Start time in clock ticks since boot: with the pid, it names a process unambiguously
    /// (pids are reused).
    start: u64,
    zombie: bool,
}

fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(Stat {
        zombie: fields.first()? == &"Z",
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Whether `pid` runs (a zombie nobody reaps does not).
pub fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|s| !s.zombie)
}

fn all() -> BTreeMap<i32, Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .collect()
}

/// The live descendants of `root`, with their start times.
fn descendants(root: i32, procs: &BTreeMap<i32, Stat>) -> Vec<(i32, u64)> {
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (&pid, s) in procs {
            if s.ppid == parent && !s.zombie {
                found.push((pid, s.start));
                frontier.push(pid);
            }
        }
    }
    found
}

/// Stops every descendant of `root` (not `root` itself): SIGTERM once each, SIGKILL to whatever
/// still runs after `grace`; gives up after `grace` + 2 s. The tree is walked again every round,
/// so processes forked meanwhile are caught; processes seen once stay targeted after their
/// parent died (they are reparented out of the tree). Returns when nothing of it runs.
pub fn stop_descendants(root: i32, grace: Duration) {
    let started = Instant::now();
    let mut known: BTreeMap<i32, (u64, bool)> = BTreeMap::new();
    loop {
        let procs = all();
        for (pid, start) in descendants(root, &procs) {
            known.entry(pid).or_insert((start, false));
        }
        known.retain(|pid, (start, _)| {
            procs
                .get(pid)
                .is_some_and(|s| s.start == *start && !s.zombie)
        });
        if known.is_empty() {
            return;
        }
        let hard = started.elapsed() >= grace;
        for (&pid, (_, termed)) in &mut known {
            if hard {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            } else if !*termed {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                *termed = true;
            }
        }
        if started.elapsed() >= grace + Duration::from_secs(2) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell with two children: they show as its descendants and are stopped; the shell's
    /// `wait` then returns and it ends on its own.
    #[test]
    fn a_tree_is_found_and_stopped() {
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let pid = i32::try_from(sh.id()).unwrap();
        assert!(alive(pid));
        let t = Instant::now();
        while descendants(pid, &all()).len() < 2 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "children never showed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let children = descendants(pid, &all());
        stop_descendants(pid, Duration::from_secs(1));
        for (child, _) in children {
            assert!(!alive(child), "{child} survived");
        }
        assert!(sh.wait().unwrap().success(), "the shell's wait returned");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
