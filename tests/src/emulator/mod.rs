//! Kubernetes API emulator: a loopback apiserver (pods, secrets, configmaps, events, nodes,
//! namespaces, watch, pods/exec over websocket) with a scheduler and a kubelet that runs each
//! container for real as local processes in a `bwrap` sandbox.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use spotrun_testkit::emulator::{Emulator, EmulatorConfig};
//! let emu = Emulator::start(EmulatorConfig::gke()).await?;
//! let client = emu.client().await; // or KUBECONFIG=emu.kubeconfig_path() for kubectl / Config::infer()
//! emu.faults().preempt_node("gke-spot-1");
//! emu.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Semantics worth knowing:
//! - Containers see the host filesystem plus their volume mounts, a private `/tmp`, the pod's
//!   `/etc/hosts` (with `hostAliases`), their own pid namespace (the command is pid 1, so a
//!   shell ignores SIGTERM as in a real container) and the host network (pod IP 127.0.0.1).
//! - Exec runs through `nsenter` into the container's mount and pid namespaces; processes it
//!   leaves behind survive the session and die with the container. It runs as the container's
//!   user: `securityContext.runAsUser` / `runAsGroup` (the container's, else the pod's), else the
//!   image rule's `user` (an image's `USER`), else root; without capabilities or supplementary
//!   groups, so file permissions hold as in a real container (the tests run as root).
//!   Limitation: the container's main process (pid 1) stays root whatever the user, and
//!   `fsGroup`, `supplementalGroups` and `runAsNonRoot` are not applied.
//! - `emptyDir` volumes are mode 0777 and each container's private `/tmp` 1777, as the kubelet
//!   and images make them.
//! - Pod logs (`container`, `follow`, `tailLines`, `sinceTime`, `sinceSeconds`, `timestamps`;
//!   other parameters are refused by name): stamps come from sampling each log file's size every
//!   50 ms (`podlog`), and `follow` ends once the container stopped and its output is sent.
//! - HTTP control endpoint (for the `kube-emulator` binary; JSON bodies): `POST /emulator/fail-next`
//!   `{count, verb?, resource?, status, retryAfter?}`, `/emulator/fail-every` `{every, statuses}`,
//!   `/emulator/fail-ratio` `{percent, statuses, seed?}`,
//!   `/emulator/clear`, `/emulator/close-watches`, `/emulator/close-watches-every` `{seconds}`,
//!   `/emulator/cut-exec` `{bytes, sessions?}`, `/emulator/preempt-node` `{name}`,
//!   `/emulator/delay-scheduling` `{seconds}`, `/emulator/delay-pulls` `{seconds}`,
//!   `/emulator/add-node` `{name, spot?, labels?, taints?}`; `GET /emulator/audit`.
//! - JSON only (no protobuf); server-side apply answers 415. `kubectl get` tables are printed
//!   server-side for every resource (pods show READY/STATUS/RESTARTS/AGE, `-o wide` IP/NODE).

mod api;
mod clock;
mod exec;
mod faults;
mod kubelet;
mod patch;
mod podlog;
mod sched;
mod select;
mod server;
mod status;
mod store;
mod table;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

pub use faults::Faults;
pub use status::ApiError;

/// A node taint (`key=value:effect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// One node of the emulated cluster.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// What pulling an image does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullOutcome {
    Ok,
    /// The registry says the tag does not exist: `ErrImagePull`, then `ImagePullBackOff`.
    NotFound,
    /// The pull succeeds after this long.
    Delay(Duration),
    /// The registry cannot be reached but the node has the image: `imagePullPolicy: Always`
    /// fails (`ErrImagePull`), `IfNotPresent` / `Never` start from the node's copy.
    RegistryDownImageCached,
}

/// How images matching a glob behave.
#[derive(Debug, Clone)]
pub struct ImageRule {
    /// Glob over the full image reference, e.g. `registry.example.com/missing:*`.
    pub pattern: String,
    pub outcome: PullOutcome,
    /// The image's ENTRYPOINT+CMD, used when the container sets no command.
    pub default_command: Option<Vec<String>>,
    /// The image's ENV, applied before the container's own env.
    pub env: Vec<(String, String)>,
    /// Host directories standing for the programs the image carries in its system directories
    /// (e.g. `gitlab-runner` in the helper image): appended to the container's final PATH.
    pub bin_dirs: Vec<std::path::PathBuf>,
    /// The image's root filesystem (e.g. `rootfs::busybox()`): its containers run with it as
    /// `/` (bwrap: the pod's volumes, a fresh /proc and a minimal /dev on top) instead of the
    /// host's. `None`: the host's root, with `bin_dirs` added.
    pub rootfs: Option<std::path::PathBuf>,
    /// The image's user (uid, gid), as a Dockerfile's `USER 1000:1000`: execs run as it unless
    /// the pod's `securityContext` says otherwise. `None`: root.
    pub user: Option<(u32, u32)>,
}

/// Everything the emulator starts with.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub nodes: Vec<NodeSpec>,
    /// First match wins; images matching no rule pull fine and have no default command.
    pub images: Vec<ImageRule>,
    pub namespaces: Vec<String>,
    /// How many changes watches can resume from; older resourceVersions get 410 Expired.
    pub watch_history: usize,
    /// Interval of BOOKMARK events for watches that allow them.
    pub bookmark_interval: Duration,
    /// Delay between `ErrImagePull` and `ImagePullBackOff`.
    pub pull_backoff: Duration,
}

impl EmulatorConfig {
    /// The first image rule matching `image`, if any.
    pub(crate) fn image_rule(&self, image: &str) -> Option<&ImageRule> {
        self.images
            .iter()
            .find(|r| kubelet::glob_match(&r.pattern, image))
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            images: Vec::new(),
            namespaces: vec!["default".into()],
            watch_history: 10_000,
            bookmark_interval: Duration::from_secs(1),
            pull_backoff: Duration::from_millis(500),
        }
    }
}

impl NodeSpec {
    /// A GKE node with 4 cores / 16 GiB allocatable.
    #[must_use]
    pub fn gke(name: &str, spot: bool) -> Self {
        let mut labels = BTreeMap::new();
        labels.insert("kubernetes.io/os".into(), "linux".into());
        labels.insert("kubernetes.io/arch".into(), "amd64".into());
        labels.insert(
            "cloud.google.com/gke-nodepool".into(),
            if spot { "spot-pool" } else { "default-pool" }.into(),
        );
        labels.insert(
            "cloud.google.com/gke-provisioning".into(),
            if spot { "spot" } else { "standard" }.into(),
        );
        let mut taints = Vec::new();
        if spot {
            labels.insert("cloud.google.com/gke-spot".into(), "true".into());
            taints.push(Taint {
                key: "cloud.google.com/gke-spot".into(),
                value: "true".into(),
                effect: "NoSchedule".into(),
            });
        }
        Self {
            name: name.into(),
            labels,
            taints,
            cpu_millis: 3920,
            memory_bytes: 13 * 1024 * 1024 * 1024,
        }
    }

    fn to_object(&self) -> Value {
        let mut labels: serde_json::Map<String, Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        labels
            .entry("kubernetes.io/hostname")
            .or_insert(json!(self.name));
        let taints: Vec<Value> = self
            .taints
            .iter()
            .map(|t| json!({"key": t.key, "value": t.value, "effect": t.effect}))
            .collect();
        let mut spec = json!({"podCIDR": "10.52.0.0/24", "providerID": format!("gce://emulator/europe-west1-b/{}", self.name)});
        if !taints.is_empty() {
            spec["taints"] = json!(taints);
        }
        let res = json!({"cpu": format!("{}m", self.cpu_millis), "memory": format!("{}", self.memory_bytes), "pods": "110", "ephemeral-storage": "47060071478"});
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": labels},
            "spec": spec,
            "status": {
                "capacity": res, "allocatable": res,
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": clock::now_rfc3339(), "lastTransitionTime": clock::now_rfc3339()}],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
                "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.33.5-gke.1000000",
                    "containerRuntimeVersion": "emulator://1.0", "kernelVersion": "", "osImage": "Emulated", "kubeProxyVersion": "",
                    "machineID": "", "systemUUID": "", "bootID": ""}
            }
        })
    }
}

impl EmulatorConfig {
    /// Two tainted spot nodes and one on-demand node, namespaces `default` and `ci-jobs`.
    #[must_use]
    pub fn gke() -> Self {
        Self {
            nodes: vec![
                NodeSpec::gke("gke-spot-1", true),
                NodeSpec::gke("gke-spot-2", true),
                NodeSpec::gke("gke-ondemand-1", false),
            ],
            namespaces: vec!["default".into(), "ci-jobs".into()],
            ..Self::default()
        }
    }
}

/// One API request as the audit log saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// get list watch create update patch delete deletecollection
    pub verb: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// A bearer token was sent (its value is never recorded).
    pub bearer_token: bool,
    pub code: u16,
}

pub(crate) struct Shared {
    pub(crate) store: Mutex<store::Store>,
    pub(crate) cfg: EmulatorConfig,
    pub(crate) faults: Faults,
    pub(crate) audit: Mutex<Vec<AuditEntry>>,
    /// When each pod (`namespace/name`) was first published as phase Running (for benchmarks).
    pub(crate) running_at: Mutex<HashMap<String, std::time::Instant>>,
    pub(crate) state_dir: PathBuf,
    pub(crate) pods: Mutex<HashMap<String, Arc<kubelet::PodHandle>>>,
    pub(crate) sched_wake: Notify,
    pub(crate) panics: AtomicU64,
    pub(crate) watch_gen: watch::Receiver<u64>,
    pub(crate) stopping: tokio_util::sync::CancellationToken,
}

impl Shared {
    pub(crate) fn store(&self) -> std::sync::MutexGuard<'_, store::Store> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running emulator; dropping it kills its containers and server.
pub struct Emulator {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    kubeconfig: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Emulator {
    /// Binds 127.0.0.1 on a free port and starts serving.
    pub async fn start(cfg: EmulatorConfig) -> anyhow::Result<Emulator> {
        // The clients built by tests share the process: make rustls's provider choice explicit.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self::start_on(cfg, 0).await
    }

    /// Like `start`, on a given port (0 = any).
    pub async fn start_on(cfg: EmulatorConfig, port: u16) -> anyhow::Result<Emulator> {
        let dir = tempfile::Builder::new()
            .prefix("kube-emulator-")
            .tempdir()
            .context("creating the emulator state dir")?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .context("binding the emulator port")?;
        let addr = listener.local_addr()?;
        let (gen_tx, gen_rx) = watch::channel(0u64);
        let (act_tx, act_rx) = tokio::sync::mpsc::unbounded_channel();
        let faults = Faults {
            state: Arc::default(),
            watch_gen: Arc::new(gen_tx),
            actions: act_tx,
            watch_closer: Arc::default(),
        };
        let shared = Arc::new(Shared {
            store: Mutex::new(store::Store::new(cfg.watch_history)),
            cfg: cfg.clone(),
            faults,
            audit: Mutex::default(),
            running_at: Mutex::default(),
            state_dir: dir.path().to_path_buf(),
            pods: Mutex::default(),
            sched_wake: Notify::new(),
            panics: AtomicU64::new(0),
            watch_gen: gen_rx,
            stopping: tokio_util::sync::CancellationToken::new(),
        });
        api::seed(&shared, &cfg);
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(&format!("http://{addr}")))
            .context("writing the kubeconfig")?;
        let tasks = vec![
            tokio::spawn(server::serve(shared.clone(), listener)),
            tokio::spawn(api::scheduler_loop(shared.clone())),
            tokio::spawn(api::fault_actions(shared.clone(), act_rx)),
        ];
        Ok(Emulator {
            shared,
            addr,
            kubeconfig,
            tasks,
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:PORT`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (server = url, dummy bearer token, namespace `ci-jobs`).
    #[must_use]
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kube-rs client for this emulator, built from its kubeconfig.
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .expect("the emulator wrote a valid kubeconfig");
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("the emulator kubeconfig is usable");
        kube::Client::try_from(cfg).expect("building a kube client")
    }

    #[must_use]
    pub fn faults(&self) -> Faults {
        self.shared.faults.clone()
    }

    pub fn audit(&self) -> Vec<AuditEntry> {
        self.shared
            .audit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// When the pod `namespace/name` was first published as phase Running, if it was.
    #[must_use]
    pub fn running_at(&self, namespace: &str, name: &str) -> Option<std::time::Instant> {
        self.shared
            .running_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&format!("{namespace}/{name}"))
            .copied()
    }

    /// Every pod published as Running so far, as (`namespace/name`, when).
    #[must_use]
    pub fn running_marks(&self) -> Vec<(String, std::time::Instant)> {
        self.shared
            .running_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// How many request handlers panicked (always 0 unless the emulator has a bug).
    #[must_use]
    pub fn panics(&self) -> u64 {
        self.shared.panics.load(Ordering::SeqCst)
    }

    /// Where pod directories live (one per pod, named by uid).
    #[must_use]
    pub fn state_dir(&self) -> &Path {
        &self.shared.state_dir
    }

    /// Stops serving, kills every container process and removes the state dir.
    pub async fn shutdown(mut self) {
        // The server, scheduler and fault tasks end at their next await once aborted; waiting
        // for them means none outlives the test (a panic in one fails it).
        for t in self.stop_now() {
            let ended = tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("an emulator task ends within 10 s of abort()");
            if let Err(e) = ended
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        let handles: Vec<_> = self
            .shared
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for h in handles {
            h.wait_dead(Duration::from_secs(5)).await;
        }
    }

    /// Stops everything now; returns the aborted tasks (to wait for, if the caller can).
    fn stop_now(&mut self) -> Vec<tokio::task::JoinHandle<()>> {
        self.shared.stopping.cancel();
        self.shared.faults.close_watches_every(Duration::ZERO);
        let tasks: Vec<_> = self.tasks.drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        let handles: Vec<_> = self
            .shared
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for h in handles {
            h.kill_all_now();
        }
        tasks
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.stop_now();
    }
}

fn kubeconfig_text(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {server}\nusers:\n- name: emulator\n  user:\n    token: emulator-dummy-token\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: ci-jobs\ncurrent-context: emulator\n"
    )
}
