//! The kubelet: per bound pod, one worker task that pulls images (per the image rules),
//! runs every container as local processes in a `bwrap` sandbox (own pid namespace, the
//! pod's volume dirs bound at their mount paths), follows them and publishes pod status. A
//! container's root is the host's, or its image's own tree when the image rule has a `rootfs`.
//! Execs run as the container's user (`securityContext`, else the image rule's `user`); its main
//! process stays root.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::api::{self, name_of, uid_of};
use super::podlog;
use super::store::Res;
use super::{PullOutcome, Shared, clock};

/// What exec needs to enter a running container.
#[derive(Debug, Clone)]
pub(crate) struct ProcInfo {
    pub init_pid: Option<u32>,
    /// The bwrap monitor process; a SIGKILL to it kills the sandbox (`--die-with-parent`).
    pub bwrap_pid: Option<u32>,
    pub env: Vec<(String, String)>,
    pub working_dir: String,
    pub running: bool,
    /// The (uid, gid) an exec runs as: `securityContext` `runAsUser` / `runAsGroup` (the
    /// container's, else the pod's), else the image's user; `None`: root.
    pub user: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    terminal: bool,
    finished: bool,
}

#[derive(Debug)]
enum PodCmd {
    Pulled(usize),
    /// The image is on the node already (no pull, no `Pulled` event beyond "already present").
    Present(usize),
    PullFailed(usize, String),
    BackOff(usize),
    Start(usize),
    Exited(usize, u64, i32),
    /// The sandbox of container `.0` (generation `.1`) has exec'd its command; `.2` is its pid-1.
    Sandboxed(usize, u64, Option<u32>),
    Delete(Duration, bool),
    Preempt,
    /// A kubelet pressure eviction with this message.
    Evict(String),
    Deadline,
    Kill(u64),
}

/// The kubelet's handle on one pod's worker.
pub(crate) struct PodHandle {
    pub(crate) ns: String,
    pub(crate) name: String,
    tx: mpsc::UnboundedSender<PodCmd>,
    procs: Mutex<HashMap<String, ProcInfo>>,
    progress: watch::Sender<Progress>,
    pub(crate) pod_dir: PathBuf,
    /// When each container's log grew (`podlog`: `sinceTime`, `timestamps`, `follow`'s end).
    pub(crate) log_marks: podlog::PodLogs,
}

/// Why exec cannot enter a container.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExecTargetError {
    #[error("container {0} is not valid for pod {1}")]
    UnknownContainer(String, String),
    #[error("container {0:?} in pod {1:?} is not running")]
    NotRunning(String, String),
}

impl PodHandle {
    pub(crate) fn delete(&self, grace: Duration, cascade: bool) {
        let _ = self.tx.send(PodCmd::Delete(grace, cascade));
    }

    pub(crate) fn preempt(&self) {
        let _ = self.tx.send(PodCmd::Preempt);
    }

    pub(crate) fn evict(&self, message: &str) {
        let _ = self.tx.send(PodCmd::Evict(message.to_string()));
    }

    /// SIGKILLs every container now (shutdown path; no status is published).
    pub(crate) fn kill_all_now(&self) {
        let procs = self
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in procs.values().filter(|p| p.running) {
            if let Some(pid) = p.init_pid.or(p.bwrap_pid) {
                signal(pid, "KILL");
            }
        }
    }

    pub(crate) async fn wait_terminal(&self, timeout: Duration) {
        let mut rx = self.progress.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|p| p.terminal || p.finished)).await;
    }

    pub(crate) async fn wait_dead(&self, timeout: Duration) {
        let mut rx = self.progress.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|p| p.finished)).await;
    }

    pub(crate) fn exec_target(&self, container: &str) -> Result<ProcInfo, ExecTargetError> {
        let procs = self
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match procs.get(container) {
            None => Err(ExecTargetError::UnknownContainer(
                container.into(),
                self.name.clone(),
            )),
            Some(p) if p.running && p.init_pid.is_some() => Ok(p.clone()),
            Some(_) => Err(ExecTargetError::NotRunning(
                container.into(),
                self.name.clone(),
            )),
        }
    }

    pub(crate) fn log_path(&self, container: &str) -> PathBuf {
        self.pod_dir.join("logs").join(format!("{container}.log"))
    }

    /// None for an unknown container, else whether it has ever started (its log exists).
    pub(crate) fn container_started(&self, container: &str) -> Option<bool> {
        let known = self
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(container);
        known.then(|| self.log_path(container).exists())
    }
}

/// Sends a signal through kill(1): the workspace forbids `unsafe`, so no `libc::kill`.
pub(crate) fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[derive(Debug, Clone)]
enum CState {
    Waiting(String, Option<String>),
    Running(String),
    Terminated {
        code: i32,
        reason: String,
        started: String,
        finished: String,
        /// The termination message (`FallbackToLogsOnError`: the log tail of a failure).
        message: Option<String>,
    },
}

struct Ctr {
    spec: Value,
    name: String,
    image: String,
    state: CState,
    restarts: u32,
    last: Option<Value>,
    id: String,
    generation: u64,
    pulled: bool,
    bwrap_pid: Option<u32>,
    /// An init container: runs to completion, in order, before the app containers start.
    init: bool,
    /// Its processes exist (from spawn until the sandbox exits).
    alive: bool,
}

struct Worker {
    shared: Arc<Shared>,
    h: Arc<PodHandle>,
    pod: Value,
    ctrs: Vec<Ctr>,
    start_time: String,
    deleting: Option<bool>,
    kill_gen: u64,
    /// (reason, message) of a kubelet-forced end: `DeadlineExceeded`, preemption.
    forced: Option<(String, String)>,
    /// (reason, message) of the `DisruptionTarget` condition set when the pod ends.
    disruption: Option<(String, String)>,
}

pub(crate) fn spawn_pod(shared: Arc<Shared>, pod: &Value) {
    let uid = uid_of(pod).to_string();
    let (tx, rx) = mpsc::unbounded_channel();
    let (progress, _) = watch::channel(Progress::default());
    let h = Arc::new(PodHandle {
        ns: pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        name: name_of(pod).to_string(),
        tx,
        procs: Mutex::new(HashMap::new()),
        progress,
        pod_dir: shared.state_dir.join("pods").join(&uid),
        log_marks: podlog::PodLogs::default(),
    });
    shared
        .pods
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(uid, h.clone());
    let pod = pod.clone();
    tokio::spawn(async move { run(shared, h, rx, pod).await });
}

/// Init containers first (flagged), then the app containers.
fn containers_of(pod: &Value) -> Vec<(Value, bool)> {
    let list = |k: &str| pod["spec"][k].as_array().cloned().unwrap_or_default();
    let inits = list("initContainers").into_iter().map(|c| (c, true));
    inits
        .chain(list("containers").into_iter().map(|c| (c, false)))
        .collect()
}

async fn run(
    shared: Arc<Shared>,
    h: Arc<PodHandle>,
    mut rx: mpsc::UnboundedReceiver<PodCmd>,
    pod: Value,
) {
    let has_inits = !pod["spec"]["initContainers"]
        .as_array()
        .is_none_or(Vec::is_empty);
    let ctrs = containers_of(&pod)
        .into_iter()
        .map(|(spec, init)| Ctr {
            name: spec["name"].as_str().unwrap_or("").to_string(),
            image: spec["image"].as_str().unwrap_or("").to_string(),
            spec,
            state: CState::Waiting(
                if has_inits && !init {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                }
                .into(),
                None,
            ),
            restarts: 0,
            last: None,
            id: String::new(),
            generation: 0,
            pulled: false,
            bwrap_pid: None,
            init,
            alive: false,
        })
        .collect();
    let mut w = Worker {
        shared: shared.clone(),
        h: h.clone(),
        pod,
        ctrs,
        start_time: clock::now_rfc3339(),
        deleting: None,
        kill_gen: 0,
        forced: None,
        disruption: None,
    };
    if let Err(e) = w.prepare_dirs() {
        tracing::warn!(pod = %h.name, "preparing pod dirs: {e}");
    }
    {
        let mut procs = h
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in &w.ctrs {
            procs.insert(
                c.name.clone(),
                ProcInfo {
                    init_pid: None,
                    bwrap_pid: None,
                    env: Vec::new(),
                    working_dir: String::new(),
                    running: false,
                    user: None,
                },
            );
        }
    }
    w.publish();
    w.pull_next_stage(0);
    if let Some(secs) = w.pod["spec"]["activeDeadlineSeconds"].as_u64() {
        let tx = h.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let _ = tx.send(PodCmd::Deadline);
        });
    }
    loop {
        let cmd = tokio::select! {
            () = shared.stopping.cancelled() => { h.kill_all_now(); break; }
            cmd = rx.recv() => cmd,
        };
        let Some(cmd) = cmd else { break };
        w.handle(cmd);
        if !w.publish() {
            // The pod object vanished (namespace deleted): stop everything.
            h.kill_all_now();
            w.wait_all_stopped(&mut rx).await;
            break;
        }
        if let Some(cascade) = w.deleting
            && w.all_stopped()
        {
            api::finalize_pod(&shared, &h.ns, &h.name, uid_of(&w.pod), cascade);
            break;
        }
    }
    shared
        .pods
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(uid_of(&w.pod));
    for v in w.pod["spec"]["volumes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if sized_memory_volume(v).is_some() {
            let vdir = h
                .pod_dir
                .join("volumes")
                .join(v["name"].as_str().unwrap_or("_"));
            let _ = tokio::process::Command::new("umount")
                .arg("-l")
                .arg(vdir)
                .stderr(Stdio::null())
                .status()
                .await;
        }
    }
    let _ = tokio::fs::remove_dir_all(&h.pod_dir).await;
    h.progress.send_modify(|p| p.finished = true);
}

impl Worker {
    fn prepare_dirs(&self) -> std::io::Result<()> {
        let dir = &self.h.pod_dir;
        for sub in ["volumes", "logs", "tmp"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mut hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.0.1\t{}\n",
            self.h.name
        );
        for a in self.pod["spec"]["hostAliases"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let names: Vec<&str> = a["hostnames"]
                .as_array()
                .map(|n| n.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let _ = write!(
                hosts,
                "\n# Entries added by HostAliases.\n{}\t{}\n",
                a["ip"].as_str().unwrap_or(""),
                names.join("\t")
            );
        }
        std::fs::write(dir.join("hosts"), hosts)?;
        let st = self.shared.store();
        let ns = &self.h.ns;
        for v in self.pod["spec"]["volumes"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let vdir = dir.join("volumes").join(v["name"].as_str().unwrap_or("_"));
            std::fs::create_dir_all(&vdir)?;
            if v["emptyDir"].is_object() {
                // As the kubelet makes it: any container user may write an emptyDir.
                std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o777))?;
            }
            if let Some(size) = sized_memory_volume(v) {
                // As the kubelet mounts it: a tmpfs of that size, so a full volume gives ENOSPC.
                // Needs root (CI's machines are); elsewhere a plain directory, without the limit.
                let mounted = std::process::Command::new("mount")
                    .args([
                        "-t",
                        "tmpfs",
                        "-o",
                        &format!("size={size},mode=1777"),
                        "tmpfs",
                    ])
                    .arg(&vdir)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !mounted {
                    tracing::warn!(pod = %self.h.name, "no tmpfs for memory emptyDir {}: not root?", vdir.display());
                }
            }
            let (src, key) = if v["secret"].is_object() {
                (
                    st.get(
                        Res::Secrets,
                        ns,
                        v["secret"]["secretName"].as_str().unwrap_or(""),
                    ),
                    true,
                )
            } else if v["configMap"].is_object() {
                (
                    st.get(
                        Res::ConfigMaps,
                        ns,
                        v["configMap"]["name"].as_str().unwrap_or(""),
                    ),
                    false,
                )
            } else {
                continue;
            };
            if let Some(src) = src {
                for (k, val) in data_of(&src, key) {
                    std::fs::write(vdir.join(k), val)?;
                }
            }
        }
        Ok(())
    }

    fn event(&self, kind: &str, reason: &str, msg: &str, ctr: Option<&str>) {
        let cur = self.shared.store().get(Res::Pods, &self.h.ns, &self.h.name);
        let obj = cur.map_or_else(|| self.pod.clone(), |c| (*c).clone());
        let list = |c: &str| {
            if self.ctrs.iter().any(|x| x.init && x.name == c) {
                "initContainers"
            } else {
                "containers"
            }
        };
        let fp = ctr.map(|c| format!("spec.{}{{{c}}}", list(c)));
        api::emit_event(
            &self.shared,
            &obj,
            kind,
            reason,
            msg,
            "kubelet",
            fp.as_deref(),
        );
    }

    fn spawn_pull(&self, i: usize) {
        let c = &self.ctrs[i];
        let rule = self.shared.cfg.image_rule(&c.image).cloned();
        if matches!(
            rule.as_ref().map(|r| &r.outcome),
            Some(PullOutcome::RegistryDownImageCached)
        ) {
            // The kubelet's defaulting: Always for `:latest` or no tag, else IfNotPresent.
            let last = c.image.rsplit('/').next().unwrap_or(&c.image);
            let default = if last.contains(':') && !last.ends_with(":latest") {
                "IfNotPresent"
            } else {
                "Always"
            };
            let policy = c.spec["imagePullPolicy"].as_str().unwrap_or(default);
            let tx = self.h.tx.clone();
            if policy == "Always" {
                self.event(
                    "Normal",
                    "Pulling",
                    &format!("Pulling image {:?}", c.image),
                    Some(&c.name),
                );
                let err = format!(
                    "rpc error: code = Unavailable desc = failed to pull and unpack image {:?}: failed to resolve reference {:?}: failed to do request: dial tcp 10.0.0.53:443: i/o timeout",
                    c.image, c.image
                );
                let _ = tx.send(PodCmd::PullFailed(i, err));
            } else {
                self.event(
                    "Normal",
                    "Pulled",
                    &format!("Container image {:?} already present on machine", c.image),
                    Some(&c.name),
                );
                let _ = tx.send(PodCmd::Present(i));
            }
            return;
        }
        self.event(
            "Normal",
            "Pulling",
            &format!("Pulling image {:?}", c.image),
            Some(&c.name),
        );
        let delay = self.shared.faults.pull_delay()
            + match rule.as_ref().map(|r| &r.outcome) {
                Some(PullOutcome::Delay(d)) => *d,
                _ => Duration::ZERO,
            };
        let not_found = matches!(rule.map(|r| r.outcome), Some(PullOutcome::NotFound));
        let image = c.image.clone();
        let tx = self.h.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = if not_found {
                tx.send(PodCmd::PullFailed(i, format!("rpc error: code = NotFound desc = failed to pull and unpack image {image:?}: failed to resolve reference {image:?}: {image}: not found")))
            } else {
                tx.send(PodCmd::Pulled(i))
            };
        });
    }

    #[allow(
        clippy::too_many_lines,
        reason = "one arm per kubelet command reads best as a single match"
    )]
    fn handle(&mut self, cmd: PodCmd) {
        match cmd {
            PodCmd::Pulled(i) => {
                let c = &mut self.ctrs[i];
                c.pulled = true;
                let img = c.image.clone();
                let name = c.name.clone();
                self.event("Normal", "Pulled", &format!("Successfully pulled image {img:?} in 10ms (10ms including waiting). Image size: 0 bytes."), Some(&name));
                if self.deleting.is_none() && self.forced.is_none() {
                    self.start(i);
                }
            }
            PodCmd::PullFailed(i, err) => {
                let (img, name) = (self.ctrs[i].image.clone(), self.ctrs[i].name.clone());
                self.event(
                    "Warning",
                    "Failed",
                    &format!("Failed to pull image {img:?}: {err}"),
                    Some(&name),
                );
                self.event("Warning", "Failed", "Error: ErrImagePull", Some(&name));
                self.ctrs[i].state = CState::Waiting("ErrImagePull".into(), Some(err.clone()));
                let tx = self.h.tx.clone();
                let backoff = self.shared.cfg.pull_backoff;
                tokio::spawn(async move {
                    tokio::time::sleep(backoff).await;
                    let _ = tx.send(PodCmd::BackOff(i));
                });
                self.ctrs[i].last = Some(json!(err));
            }
            PodCmd::BackOff(i) => {
                if self.deleting.is_some() {
                    return;
                }
                let (img, name) = (self.ctrs[i].image.clone(), self.ctrs[i].name.clone());
                let err = self.ctrs[i]
                    .last
                    .take()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                self.event(
                    "Normal",
                    "BackOff",
                    &format!("Back-off pulling image {img:?}"),
                    Some(&name),
                );
                self.event("Warning", "Failed", "Error: ImagePullBackOff", Some(&name));
                self.ctrs[i].state = CState::Waiting(
                    "ImagePullBackOff".into(),
                    Some(format!(
                        "Back-off pulling image {img:?}: ErrImagePull: {err}"
                    )),
                );
            }
            PodCmd::Start(i) => {
                if self.deleting.is_none() && self.forced.is_none() {
                    self.start(i);
                }
            }
            PodCmd::Present(i) => {
                self.ctrs[i].pulled = true;
                if self.deleting.is_none() && self.forced.is_none() {
                    self.start(i);
                }
            }
            PodCmd::Exited(i, generation, code) => self.exited(i, generation, code),
            PodCmd::Sandboxed(i, generation, pid) => self.sandboxed(i, generation, pid),
            PodCmd::Delete(grace, cascade) => {
                self.deleting = Some(cascade);
                self.stop_all(grace);
            }
            PodCmd::Preempt => {
                self.forced = Some((
                    "Terminated".into(),
                    "Pod was terminated in response to imminent node shutdown.".into(),
                ));
                self.disruption = Some((
                    "TerminationByKubelet".into(),
                    "Pod was terminated in response to imminent node shutdown.".into(),
                ));
                self.stop_all(Duration::from_secs(1));
            }
            PodCmd::Evict(message) => {
                // The kubelet's eviction manager (memory / ephemeral-storage pressure): the pod
                // fails with reason Evicted; the node stays.
                self.forced = Some(("Evicted".into(), message.clone()));
                self.disruption = Some(("TerminationByKubelet".into(), message.clone()));
                self.event("Warning", "Evicted", &message, None);
                self.stop_all(Duration::from_secs(1));
            }
            PodCmd::Deadline => {
                if self.phase() == "Succeeded" || self.phase() == "Failed" {
                    return;
                }
                self.forced = Some((
                    "DeadlineExceeded".into(),
                    "Pod was active on the node longer than the specified deadline".into(),
                ));
                self.event(
                    "Normal",
                    "DeadlineExceeded",
                    "Pod was active on the node longer than the specified deadline",
                    None,
                );
                self.stop_all(Duration::ZERO);
            }
            PodCmd::Kill(generation) => {
                if generation == self.kill_gen {
                    for c in self.ctrs.iter().filter(|c| c.alive) {
                        if let Some(p) = self.init_pid(&c.name).or(c.bwrap_pid) {
                            signal(p, "KILL");
                        }
                    }
                }
            }
        }
    }

    fn init_pid(&self, name: &str) -> Option<u32> {
        self.h
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .and_then(|p| p.init_pid)
    }

    fn stop_all(&mut self, grace: Duration) {
        self.kill_gen += 1;
        for c in self.ctrs.iter().filter(|c| c.alive) {
            self.event(
                "Normal",
                "Killing",
                &format!("Stopping container {}", c.name),
                Some(&c.name),
            );
            match self.init_pid(&c.name) {
                Some(p) => signal(p, if grace.is_zero() { "KILL" } else { "TERM" }),
                // Still being created: no pid-1 to ask yet, so stop the sandbox outright.
                None => c.bwrap_pid.into_iter().for_each(|p| signal(p, "KILL")),
            }
        }
        // Containers that never started will not start now.
        for c in &mut self.ctrs {
            if let CState::Waiting(..) = c.state
                && !c.alive
                && self.deleting.is_none()
            {
                c.state = CState::Terminated {
                    code: 137,
                    reason: "ContainerStatusUnknown".into(),
                    started: String::new(),
                    finished: clock::now_rfc3339(),
                    message: None,
                };
            }
        }
        let tx = self.h.tx.clone();
        let generation = self.kill_gen;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let _ = tx.send(PodCmd::Kill(generation));
        });
    }

    fn all_stopped(&self) -> bool {
        self.ctrs.iter().all(|c| !c.alive)
    }

    async fn wait_all_stopped(&mut self, rx: &mut mpsc::UnboundedReceiver<PodCmd>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.all_stopped() && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                Ok(Some(PodCmd::Exited(i, g, code))) => self.exited(i, g, code),
                Ok(None) => break,
                _ => {}
            }
        }
    }

    fn env_for(&self, c: &Value) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), "/root".into()),
            ("HOSTNAME".into(), self.h.name.clone()),
        ];
        // The image's own ENV (e.g. a PATH with `gitlab-runner` for the helper image) comes
        // before the container's env, as with a real runtime.
        let image = c["image"].as_str().unwrap_or_default();
        if let Some(rule) = self.shared.cfg.image_rule(image) {
            for (k, v) in &rule.env {
                set_env(&mut env, k.clone(), v.clone());
            }
        }
        let st = self.shared.store();
        let ns = &self.h.ns;
        for from in c["envFrom"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let prefix = from["prefix"].as_str().unwrap_or("");
            let (src, secret) = if from["secretRef"].is_object() {
                (
                    st.get(
                        Res::Secrets,
                        ns,
                        from["secretRef"]["name"].as_str().unwrap_or(""),
                    ),
                    true,
                )
            } else {
                (
                    st.get(
                        Res::ConfigMaps,
                        ns,
                        from["configMapRef"]["name"].as_str().unwrap_or(""),
                    ),
                    false,
                )
            };
            if let Some(src) = src {
                for (k, v) in data_of(&src, secret) {
                    set_env(
                        &mut env,
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
            }
        }
        for e in c["env"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let name = e["name"].as_str().unwrap_or("").to_string();
            let vf = &e["valueFrom"];
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if let Some(path) = vf["fieldRef"]["fieldPath"].as_str() {
                match path {
                    "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                    "spec.nodeName" => self.pod["spec"]["nodeName"].as_str().unwrap_or("").into(),
                    p => {
                        let mut cur = &self.pod;
                        for part in p.split('.') {
                            cur = &cur[part];
                        }
                        cur.as_str().unwrap_or("").to_string()
                    }
                }
            } else if vf["secretKeyRef"].is_object() || vf["configMapKeyRef"].is_object() {
                let secret = vf["secretKeyRef"].is_object();
                let r = if secret {
                    &vf["secretKeyRef"]
                } else {
                    &vf["configMapKeyRef"]
                };
                let res = if secret {
                    Res::Secrets
                } else {
                    Res::ConfigMaps
                };
                st.get(res, ns, r["name"].as_str().unwrap_or(""))
                    .and_then(|o| {
                        data_of(&o, secret)
                            .into_iter()
                            .find(|(k, _)| Some(k.as_str()) == r["key"].as_str())
                    })
                    .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            // $(VAR) references to earlier variables, as the kubelet expands them.
            let expanded = expand_refs(&value, &env);
            set_env(&mut env, name, expanded);
        }
        drop(st);
        // Programs the image carries in its system directories stay reachable whatever PATH
        // the pod sets, as `/usr/bin` would be in a real image.
        if let Some(rule) = self.shared.cfg.image_rule(image)
            && !rule.bin_dirs.is_empty()
        {
            let mut path = env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            for dir in &rule.bin_dirs {
                path.push(':');
                path.push_str(&dir.to_string_lossy());
            }
            set_env(&mut env, "PATH".into(), path);
        }
        env
    }

    #[allow(
        clippy::too_many_lines,
        reason = "the bwrap command line is built in one place"
    )]
    fn start(&mut self, i: usize) {
        let spec = self.ctrs[i].spec.clone();
        let name = self.ctrs[i].name.clone();
        let rule = self.shared.cfg.image_rule(&self.ctrs[i].image);
        let mut argv: Vec<String> = spec["command"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .or_else(|| rule.and_then(|r| r.default_command.clone()))
            .unwrap_or_default();
        argv.extend(
            spec["args"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        );
        if argv.is_empty() {
            argv.push("sh".into());
        }
        let env = self.env_for(&spec);
        let argv: Vec<String> = argv.iter().map(|a| expand_refs(a, &env)).collect();
        let wd = spec["workingDir"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("/")
            .to_string();
        let dir = self.h.pod_dir.clone();
        let tmp = dir.join("tmp").join(&name);
        let _ = std::fs::create_dir_all(&tmp);
        // An image's /tmp: every user may write it.
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777));
        let user = run_as_user(
            &self.pod,
            &spec,
            self.shared
                .cfg
                .image_rule(&self.ctrs[i].image)
                .and_then(|r| r.user),
        );
        let mut cmd = tokio::process::Command::new("bwrap");
        let image = spec["image"].as_str().unwrap_or_default();
        let rootfs = self
            .shared
            .cfg
            .image_rule(image)
            .and_then(|r| r.rootfs.clone());
        if let Some(root) = &rootfs {
            // The image's own root: nothing of the host is visible but the pod's volumes.
            cmd.arg("--bind").arg(root).arg("/");
            cmd.args(["--dev", "/dev", "--proc", "/proc"]);
        } else {
            cmd.args(["--dev-bind", "/", "/", "--proc", "/proc"]);
        }
        cmd.arg("--bind").arg(&tmp).arg("/tmp");
        cmd.arg("--bind").arg(dir.join("hosts")).arg("/etc/hosts");
        // An image's programs stay visible at their host paths, even under the private /tmp.
        if let Some(rule) = self.shared.cfg.image_rule(image)
            && rootfs.is_none()
        {
            for d in &rule.bin_dirs {
                cmd.arg("--ro-bind").arg(d).arg(d);
            }
        }
        let volumes = self.pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for m in spec["volumeMounts"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let vname = m["name"].as_str().unwrap_or("");
            let Some(vol) = volumes.iter().find(|v| v["name"] == vname) else {
                continue;
            };
            let mut src = if let Some(hp) = vol["hostPath"]["path"].as_str() {
                PathBuf::from(hp)
            } else {
                dir.join("volumes").join(vname)
            };
            if let Some(sub) = m["subPath"].as_str().filter(|s| !s.is_empty()) {
                src = src.join(sub);
                let _ = std::fs::create_dir_all(&src);
            }
            let ro = m["readOnly"].as_bool() == Some(true);
            let target = m["mountPath"].as_str().unwrap_or("/");
            if rootfs.is_none() {
                mount_point_parents_traversable(Path::new(target));
            }
            cmd.arg(if ro { "--ro-bind" } else { "--bind" })
                .arg(src)
                .arg(target);
        }
        cmd.args([
            "--chdir",
            &wd,
            "--unshare-pid",
            "--die-with-parent",
            "--as-pid-1",
            "--",
        ]);
        cmd.args(&argv);
        cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.h.log_path(&name));
        let (out, err) = match log.and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
            Err(_) => (Stdio::null(), Stdio::null()),
        };
        let keep_stdin = spec["stdin"].as_bool() == Some(true);
        cmd.stdin(if keep_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
        self.ctrs[i].generation += 1;
        let generation = self.ctrs[i].generation;
        self.ctrs[i].id = format!(
            "emulator://{}",
            api::hex_string(&rand::random::<[u8; 32]>())
        );
        if self.ctrs[i].restarts == 0 {
            self.event(
                "Normal",
                "Created",
                &format!("Created container: {name}"),
                Some(&name),
            );
        }
        match cmd.spawn() {
            Ok(mut child) => {
                let run = podlog::run_started(&self.h, &name);
                tokio::spawn(podlog::sample_while_running(
                    self.h.clone(),
                    name.clone(),
                    run,
                    self.shared.stopping.clone(),
                ));
                let bwrap_pid = child.id().unwrap_or(0);
                self.ctrs[i].bwrap_pid = Some(bwrap_pid);
                self.ctrs[i].alive = true;
                self.ctrs[i].state = CState::Waiting("ContainerCreating".into(), None);
                self.h
                    .procs
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(
                        name.clone(),
                        ProcInfo {
                            init_pid: None,
                            bwrap_pid: Some(bwrap_pid),
                            env,
                            working_dir: wd,
                            running: true,
                            user,
                        },
                    );
                let tx = self.h.tx.clone();
                tokio::spawn(async move {
                    let pid = find_child(bwrap_pid, Duration::from_secs(5)).await;
                    let _ = tx.send(PodCmd::Sandboxed(i, generation, pid));
                });
                let tx = self.h.tx.clone();
                tokio::spawn(async move {
                    let stdin = child.stdin.take();
                    let code = match child.wait().await {
                        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9)),
                        Err(_) => 128,
                    };
                    drop(stdin);
                    let _ = tx.send(PodCmd::Exited(i, generation, code));
                });
            }
            Err(e) => {
                podlog::settle(&self.h, &name);
                self.event(
                    "Warning",
                    "Failed",
                    &format!("Error: failed to start container {name:?}: {e}"),
                    Some(&name),
                );
                self.ctrs[i].state = CState::Terminated {
                    code: 128,
                    reason: "StartError".into(),
                    started: String::new(),
                    finished: clock::now_rfc3339(),
                    message: Some(format!("failed to start container {name:?}: {e}")),
                };
            }
        }
    }

    fn sandboxed(&mut self, i: usize, generation: u64, pid: Option<u32>) {
        let c = &self.ctrs[i];
        if c.generation != generation || !c.alive {
            return;
        }
        let name = c.name.clone();
        if let Some(p) = self
            .h
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(&name)
        {
            p.init_pid = pid;
        }
        if self.deleting.is_some() || self.forced.is_some() {
            // Stopped while it was being created.
            if let Some(pid) = pid {
                signal(pid, "KILL");
            }
            return;
        }
        self.ctrs[i].state = CState::Running(clock::now_rfc3339());
        self.event(
            "Normal",
            "Started",
            &format!("Started container {name}"),
            Some(&name),
        );
    }

    fn exited(&mut self, i: usize, generation: u64, code: i32) {
        if self.ctrs[i].generation != generation {
            return;
        }
        self.ctrs[i].alive = false;
        // Its output is complete: stamped now, before the status shows the container stopped.
        podlog::settle(&self.h, &self.ctrs[i].name);
        let started = match &self.ctrs[i].state {
            CState::Running(s) => s.clone(),
            _ => String::new(),
        };
        let reason = if code == 0 { "Completed" } else { "Error" };
        // As the kubelet: with `FallbackToLogsOnError`, a failed container's message is the tail
        // of its log (at most 80 lines and 2048 bytes).
        let message = (code != 0
            && self.ctrs[i].spec["terminationMessagePolicy"] == "FallbackToLogsOnError")
            .then(|| log_tail(&self.h.log_path(&self.ctrs[i].name)))
            .filter(|m| !m.is_empty());
        self.ctrs[i].state = CState::Terminated {
            code,
            reason: reason.into(),
            started,
            finished: clock::now_rfc3339(),
            message,
        };
        if let Some(p) = self
            .h
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(&self.ctrs[i].name)
        {
            p.running = false;
        }
        let policy = self.pod["spec"]["restartPolicy"]
            .as_str()
            .unwrap_or("Always");
        let init = self.ctrs[i].init;
        let restart = self.deleting.is_none()
            && self.forced.is_none()
            && if init {
                policy != "Never" && code != 0
            } else {
                policy == "Always" || (policy == "OnFailure" && code != 0)
            };
        if init && code == 0 && self.deleting.is_none() && self.forced.is_none() {
            self.pull_next_stage(i + 1);
        }
        if restart {
            let c = &mut self.ctrs[i];
            c.restarts += 1;
            c.last = Some(state_json(&c.state));
            c.state = CState::Waiting(
                "CrashLoopBackOff".into(),
                Some(format!(
                    "back-off 10s restarting failed container={} pod={}",
                    c.name, self.h.name
                )),
            );
            let tx = self.h.tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = tx.send(PodCmd::Start(i));
            });
        }
    }

    /// Pulls the init container at `from`, or every app container once the inits are done.
    fn pull_next_stage(&self, from: usize) {
        match self.ctrs.get(from) {
            Some(c) if c.init => self.spawn_pull(from),
            _ => {
                for i in from..self.ctrs.len() {
                    self.spawn_pull(i);
                }
            }
        }
    }

    fn inits_done(&self) -> bool {
        self.ctrs
            .iter()
            .filter(|c| c.init)
            .all(|c| matches!(c.state, CState::Terminated { code: 0, .. }))
    }

    fn phase(&self) -> &'static str {
        if self.forced.is_some() && self.all_stopped() {
            return "Failed";
        }
        let never = self.pod["spec"]["restartPolicy"].as_str() == Some("Never");
        let init_failed = self
            .ctrs
            .iter()
            .any(|c| c.init && matches!(c.state, CState::Terminated { code, .. } if code != 0));
        if never && init_failed {
            return "Failed";
        }
        if !self.inits_done() {
            return "Pending";
        }
        let apps: Vec<&Ctr> = self.ctrs.iter().filter(|c| !c.init).collect();
        let term: Vec<i32> = apps
            .iter()
            .filter_map(|c| {
                if let CState::Terminated { code, .. } = c.state {
                    Some(code)
                } else {
                    None
                }
            })
            .collect();
        if term.len() == apps.len() {
            return if term.iter().all(|c| *c == 0) {
                "Succeeded"
            } else {
                "Failed"
            };
        }
        let all_started = apps
            .iter()
            .all(|c| !matches!(c.state, CState::Waiting(..)) || c.restarts > 0);
        if all_started { "Running" } else { "Pending" }
    }

    /// Writes the pod status; false when the pod object no longer exists.
    #[allow(
        clippy::too_many_lines,
        reason = "the whole pod status is rendered in one place"
    )]
    fn publish(&mut self) -> bool {
        let phase = self.phase();
        let status_of = |c: &Ctr| {
            let running = matches!(c.state, CState::Running(_));
            let mut s = json!({
                "name": c.name, "state": state_json(&c.state), "lastState": c.last.as_ref().filter(|l| l.is_object()).cloned().unwrap_or(json!({})),
                "ready": running, "restartCount": c.restarts, "image": c.image,
                "imageID": if c.pulled { format!("{}@sha256:{}", c.image.split(':').next().unwrap_or(""), "0".repeat(64)) } else { String::new() },
                "started": running,
            });
            if !c.id.is_empty() {
                s["containerID"] = json!(c.id);
            }
            s
        };
        let statuses: Vec<Value> = self
            .ctrs
            .iter()
            .filter(|c| !c.init)
            .map(status_of)
            .collect();
        let init_statuses: Vec<Value> =
            self.ctrs.iter().filter(|c| c.init).map(status_of).collect();
        let incomplete: Vec<&str> = self
            .ctrs
            .iter()
            .filter(|c| c.init && !matches!(c.state, CState::Terminated { code: 0, .. }))
            .map(|c| c.name.as_str())
            .collect();
        let incomplete_msg = format!(
            "containers with incomplete status: [{}]",
            incomplete.join(" ")
        );
        let unready: Vec<&str> = self
            .ctrs
            .iter()
            .filter(|c| !c.init && !matches!(c.state, CState::Running(_)))
            .map(|c| c.name.as_str())
            .collect();
        let terminal = matches!(phase, "Succeeded" | "Failed");
        let forced = self.forced.clone();
        let disruption = self.disruption.clone().filter(|_| terminal);
        let start = self.start_time.clone();
        let updated = api::mutate(&self.shared, Res::Pods, &self.h.ns, &self.h.name, |p| {
            let generation = p["metadata"]["generation"].clone();
            let st = &mut p["status"];
            st["phase"] = json!(phase);
            st["hostIP"] = json!("127.0.0.1");
            st["hostIPs"] = json!([{"ip": "127.0.0.1"}]);
            st["podIP"] = json!("127.0.0.1");
            st["podIPs"] = json!([{"ip": "127.0.0.1"}]);
            st["startTime"] = json!(start);
            st["containerStatuses"] = json!(statuses);
            if !init_statuses.is_empty() {
                st["initContainerStatuses"] = json!(init_statuses);
            }
            st["observedGeneration"] = generation;
            if let Some((reason, message)) = &forced
                && terminal
            {
                p["status"]["reason"] = json!(reason);
                p["status"]["message"] = json!(message);
            }
            cond(
                p,
                "PodReadyToStartContainers",
                !terminal || phase == "Running",
                None,
                None,
            );
            if incomplete.is_empty() {
                cond(p, "Initialized", true, None, None);
            } else {
                cond(
                    p,
                    "Initialized",
                    false,
                    Some("ContainersNotInitialized"),
                    Some(&incomplete_msg),
                );
            }
            let (reason, msg) = if terminal {
                (Some("PodFailed".to_string()), None)
            } else if unready.is_empty() {
                (None, None)
            } else {
                (
                    Some("ContainersNotReady".to_string()),
                    Some(format!(
                        "containers with unready status: [{}]",
                        unready.join(" ")
                    )),
                )
            };
            let reason = if terminal && phase == "Succeeded" {
                Some("PodCompleted".to_string())
            } else {
                reason
            };
            cond(
                p,
                "ContainersReady",
                unready.is_empty() && !terminal,
                reason.as_deref(),
                msg.as_deref(),
            );
            cond(
                p,
                "Ready",
                unready.is_empty() && !terminal,
                reason.as_deref(),
                msg.as_deref(),
            );
            if let Some((reason, message)) = &disruption {
                cond(p, "DisruptionTarget", true, Some(reason), Some(message));
            }
        });
        if terminal {
            self.h.progress.send_modify(|p| p.terminal = true);
        }
        if phase == "Running" && updated.is_some() {
            self.shared
                .running_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(format!("{}/{}", self.h.ns, self.h.name))
                .or_insert_with(Instant::now);
        }
        match updated {
            Some(p) if uid_of(&p) == uid_of(&self.pod) => {
                self.pod = (*p).clone();
                true
            }
            _ => false,
        }
    }
}

fn cond(pod: &mut Value, cond_type: &str, ok: bool, reason: Option<&str>, message: Option<&str>) {
    let now = clock::now_rfc3339();
    let status = if ok { "True" } else { "False" };
    let mut conds = pod["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let idx = conds
        .iter()
        .position(|c| c["type"] == cond_type)
        .unwrap_or_else(|| {
            conds.push(
                json!({"type": cond_type, "status": "", "lastProbeTime": null, "lastTransitionTime": now}),
            );
            conds.len() - 1
        });
    let entry = &mut conds[idx];
    if entry["status"] != status {
        entry["lastTransitionTime"] = json!(now);
    }
    entry["status"] = json!(status);
    entry["observedGeneration"] = pod["metadata"]["generation"].clone();
    let m = entry.as_object_mut().expect("condition is an object");
    match reason {
        Some(r) => m.insert("reason".into(), json!(r)),
        None => m.remove("reason"),
    };
    match message {
        Some(r) => m.insert("message".into(), json!(r)),
        None => m.remove("message"),
    };
    pod["status"]["conditions"] = json!(conds);
}

fn state_json(s: &CState) -> Value {
    match s {
        CState::Waiting(reason, msg) => {
            let mut w = json!({"reason": reason});
            if let Some(m) = msg {
                w["message"] = json!(m);
            }
            json!({"waiting": w})
        }
        CState::Running(at) => json!({"running": {"startedAt": at}}),
        CState::Terminated {
            code,
            reason,
            started,
            finished,
            message,
        } => {
            let mut t = json!({"exitCode": code, "reason": reason, "finishedAt": finished});
            if !started.is_empty() {
                t["startedAt"] = json!(started);
            }
            if let Some(m) = message {
                t["message"] = json!(m);
            }
            json!({"terminated": t})
        }
    }
}

/// The last 80 lines of a log file, cut to its last 2048 bytes (the kubelet's fallback message).
fn log_tail(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(2048);
    let text = String::from_utf8_lossy(&data[start..]).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

fn set_env(env: &mut Vec<(String, String)>, k: String, v: String) {
    env.retain(|(ek, _)| *ek != k);
    env.push((k, v));
}

/// Expands `$(VAR)` from `env`; `$$(VAR)` escapes; unknown references stay as written.
fn expand_refs(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Key → bytes of a Secret (`data` is base64) or a `ConfigMap` (`data` is text).
fn data_of(obj: &Value, secret: bool) -> Vec<(String, Vec<u8>)> {
    use base64::Engine as _;
    let mut out = Vec::new();
    if let Some(m) = obj["data"].as_object() {
        for (k, v) in m {
            let s = v.as_str().unwrap_or("");
            let bytes = if secret {
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .unwrap_or_default()
            } else {
                s.as_bytes().to_vec()
            };
            out.push((k.clone(), bytes));
        }
    }
    if let Some(m) = obj["binaryData"].as_object() {
        for (k, v) in m {
            out.push((
                k.clone(),
                base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap_or(""))
                    .unwrap_or_default(),
            ));
        }
    }
    out
}

/// The tmpfs `size=` of an `emptyDir` with `medium: Memory` and a `sizeLimit` (a quantity:
/// `64Ki`, `1Mi`, `1000`), if it is one.
fn sized_memory_volume(v: &Value) -> Option<String> {
    let ed = &v["emptyDir"];
    if ed["medium"] != "Memory" {
        return None;
    }
    let limit = ed["sizeLimit"].as_str()?;
    let (digits, unit) = limit.split_at(
        limit
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(limit.len()),
    );
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return None,
    };
    Some((digits.parse::<u64>().ok()? * factor).to_string())
}

/// With the host's root, bwrap makes a mount point's missing parents (`/spotrun` for
/// `/spotrun/logs`) on the host, with whatever umask the emulator had. A runtime's are 0755, so
/// any container user can reach its mounts: a parent that holds nothing but directories (mount
/// point skeletons) gets the missing read and search bits; one with files in it (`/etc`, `/root`)
/// is the host's own and is left alone.
fn mount_point_parents_traversable(target: &Path) {
    let parents: Vec<&Path> = target
        .ancestors()
        .skip(1)
        .filter(|d| !d.as_os_str().is_empty() && d.as_os_str() != "/")
        .collect();
    // Outermost first, so each is created inside an existing one.
    for dir in parents.into_iter().rev() {
        if std::fs::create_dir(dir).is_ok() {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        } else if let Ok(meta) = std::fs::symlink_metadata(dir)
            && meta.is_dir()
            && meta.permissions().mode() & 0o055 != 0o055
        {
            let only_dirs = std::fs::read_dir(dir).is_ok_and(|entries| {
                entries
                    .flatten()
                    .all(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            });
            if only_dirs {
                let mode = meta.permissions().mode() | 0o055;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
            }
        }
    }
}

/// Who a container's execs run as: `runAsUser` / `runAsGroup` of its `securityContext`, else of
/// the pod's, else the image's user (`ImageRule::user`). A `runAsUser` without a group takes the
/// image user's group when it is that user (a runtime reads the image's /etc/passwd), else 0.
fn run_as_user(pod: &Value, spec: &Value, image: Option<(u32, u32)>) -> Option<(u32, u32)> {
    let field = |k: &str| {
        spec["securityContext"][k]
            .as_u64()
            .or_else(|| pod["spec"]["securityContext"][k].as_u64())
            .and_then(|v| u32::try_from(v).ok())
    };
    let uid = field("runAsUser").or(image.map(|(u, _)| u));
    let gid =
        field("runAsGroup").or_else(|| image.filter(|(u, _)| Some(*u) == uid).map(|(_, g)| g));
    match (uid, gid) {
        (None, None) => None,
        (u, g) => Some((u.unwrap_or(0), g.unwrap_or(0))),
    }
}

/// The first child of `parent` (bwrap's sandboxed pid-1), found through /proc, once it has
/// exec'd the container command: before that its mounts are still being set up, and an exec
/// entering it too early would see a half-built sandbox.
async fn find_child(parent: u32, timeout: Duration) -> Option<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(pid) = scan_children(parent) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !cmdline.starts_with(b"bwrap\0") || Instant::now() > deadline {
                return Some(pid);
            }
        }
        if Instant::now() > deadline || !Path::new(&format!("/proc/{parent}")).exists() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn scan_children(parent: u32) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        let Some(after) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
            == Some(parent)
        {
            return Some(pid);
        }
    }
    None
}

/// Image glob: `*` matches any run of characters (including `/`), `?` one character.
pub(crate) fn glob_match(pattern: &str, s: &str) -> bool {
    globset::Glob::new(pattern).map_or(pattern == s, |g| g.compile_matcher().is_match(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_references() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand_refs("$(A)/$(B)/$$(A)", &env), "x/$(B)/$(A)");
    }

    #[test]
    fn memory_volume_sizes() {
        let vol = |ed: Value| serde_json::json!({ "name": "v", "emptyDir": ed });
        let sized = |ed| sized_memory_volume(&vol(ed));
        assert_eq!(
            sized(serde_json::json!({"medium": "Memory", "sizeLimit": "64Ki"})).as_deref(),
            Some("65536")
        );
        assert_eq!(
            sized(serde_json::json!({"medium": "Memory", "sizeLimit": "1000"})).as_deref(),
            Some("1000")
        );
        assert_eq!(sized(serde_json::json!({"medium": "Memory"})), None);
        assert_eq!(sized(serde_json::json!({"sizeLimit": "64Ki"})), None);
    }

    #[test]
    fn execs_run_as_the_security_context_then_the_image_user() {
        let pod = |sc: Value| json!({ "spec": { "securityContext": sc } });
        let ctr = |sc: Value| json!({ "securityContext": sc });
        let none = json!({});
        assert_eq!(
            run_as_user(&pod(none.clone()), &ctr(none.clone()), None),
            None
        );
        assert_eq!(
            run_as_user(&pod(none.clone()), &ctr(none.clone()), Some((1000, 1001))),
            Some((1000, 1001))
        );
        assert_eq!(
            run_as_user(
                &pod(json!({"runAsUser": 5, "runAsGroup": 6})),
                &ctr(json!({"runAsUser": 7})),
                None
            ),
            Some((7, 6)),
            "the container's wins, field by field"
        );
        assert_eq!(
            run_as_user(
                &pod(none.clone()),
                &ctr(json!({"runAsUser": 1000})),
                Some((1000, 50))
            ),
            Some((1000, 50)),
            "the image user's group for that user"
        );
        assert_eq!(
            run_as_user(
                &pod(none.clone()),
                &ctr(json!({"runAsUser": 2000})),
                Some((1000, 50))
            ),
            Some((2000, 0))
        );
        assert_eq!(
            run_as_user(&pod(none), &ctr(json!({"runAsGroup": 3000})), None),
            Some((0, 3000))
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match(
            "registry.example.com/missing:*",
            "registry.example.com/missing:1.0"
        ));
        assert!(!glob_match(
            "registry.example.com/missing:*",
            "registry.example.com/other:1.0"
        ));
    }
}
