//! Fault knobs: injected API failures, dropped watches, cut exec streams, preemption and delays.
//! `Faults` is a cheap clone handle over state the server consults on every request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::watch;

use super::NodeSpec;

#[derive(Debug, Clone)]
struct FailRule {
    remaining: u32,
    verb: Option<String>,
    resource: Option<String>,
    status: u16,
    retry_after: Option<u32>,
}

/// Every `every`-th API request fails, with `statuses` taken in turn.
#[derive(Debug)]
struct FailEvery {
    every: u32,
    statuses: Vec<u16>,
    seen: u64,
    failed: usize,
}

/// `percent` % of API requests fail, drawn from a seeded generator (a failure can be replayed).
#[derive(Debug)]
struct FailRatio {
    percent: u32,
    statuses: Vec<u16>,
    rng: StdRng,
}

#[derive(Debug, Default)]
pub(crate) struct FaultState {
    fail_next: Vec<FailRule>,
    fail_every: Option<FailEvery>,
    fail_ratio: Option<FailRatio>,
    exec_cuts: Vec<ExecFault>,
    pub(crate) scheduling_delay: Duration,
    pub(crate) pull_delay: Duration,
    pub(crate) exec_delay: Duration,
}

/// What happens to one exec session after `bytes` bytes of output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExecFault {
    /// The connection ends abruptly: no status frame, no close frame.
    Cut(u64),
    /// The connection stays open but goes dead: no more frames, no pong, nothing read.
    Stall(u64),
}

/// Requests from the fault handle to the emulator's tasks (node changes need the store).
#[derive(Debug)]
pub(crate) enum FaultAction {
    Preempt(String),
    /// (node, message): a kubelet pressure eviction of every pod on the node.
    Evict(String, String),
    AddNode(NodeSpec),
}

/// Handle to the emulator's fault knobs.
#[derive(Clone)]
pub struct Faults {
    pub(crate) state: Arc<Mutex<FaultState>>,
    pub(crate) watch_gen: Arc<watch::Sender<u64>>,
    pub(crate) actions: tokio::sync::mpsc::UnboundedSender<FaultAction>,
    pub(crate) watch_closer: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next `n` requests matching `verb`/`resource` (None = any) fail with `status`
    /// (500, 429, 409, 503, ...), with a `Retry-After` header when given.
    pub fn fail_next(
        &self,
        n: u32,
        verb: Option<&str>,
        resource: Option<&str>,
        status: u16,
        retry_after: Option<u32>,
    ) {
        self.lock().fail_next.push(FailRule {
            remaining: n,
            verb: verb.map(str::to_string),
            resource: resource.map(str::to_string),
            status,
            retry_after,
        });
    }

    /// Every `n`-th API request (the `n`-th, the `2n`-th, ...) fails with the next of `statuses`
    /// in turn: a test that makes at least `n` requests always sees a failure, at the same
    /// request in every run. `fail_every(0, ..)` turns it off.
    pub fn fail_every(&self, n: u32, statuses: &[u16]) {
        self.lock().fail_every = (n > 0 && !statuses.is_empty()).then(|| FailEvery {
            every: n,
            statuses: statuses.to_vec(),
            seen: 0,
            failed: 0,
        });
    }

    /// `percent` % of all API requests fail with a status picked at random from `statuses`,
    /// seeded from `SPOTRUN_TEST_SEED` or at random; the seed is printed so a failure can be
    /// replayed. `fail_ratio(0, ..)` turns it off. Whether any request fails depends on how many
    /// a test makes: to exercise recovery for sure, use [`Faults::fail_every`].
    pub fn fail_ratio(&self, percent: u32, statuses: &[u16]) {
        let seed = std::env::var("SPOTRUN_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        if percent > 0 {
            eprintln!("emulator fail_ratio seed {seed} (rerun with SPOTRUN_TEST_SEED={seed})");
        }
        self.fail_ratio_seeded(percent, statuses, seed);
    }

    /// [`Faults::fail_ratio`] with an explicit seed.
    pub fn fail_ratio_seeded(&self, percent: u32, statuses: &[u16], seed: u64) {
        self.lock().fail_ratio = (percent > 0 && !statuses.is_empty()).then(|| FailRatio {
            percent: percent.min(100),
            statuses: statuses.to_vec(),
            rng: StdRng::seed_from_u64(seed),
        });
    }

    /// Clears injected request failures and exec cuts.
    pub fn clear(&self) {
        let mut s = self.lock();
        s.fail_next.clear();
        s.fail_every = None;
        s.fail_ratio = None;
        s.exec_cuts.clear();
    }

    /// Ends every open watch now (the client sees the stream end, as when an apiserver restarts).
    pub fn close_watches(&self) {
        self.watch_gen.send_modify(|g| *g += 1);
    }

    /// Ends every open watch periodically; `Duration::ZERO` stops it.
    pub fn close_watches_every(&self, every: Duration) {
        let mut slot = self
            .watch_closer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(h) = slot.take() {
            h.abort();
        }
        if every.is_zero() {
            return;
        }
        let me = self.clone();
        *slot = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                me.close_watches();
            }
        }));
    }

    /// The next exec session is cut abruptly (no status frame) after `bytes` bytes of output.
    pub fn cut_exec_after(&self, bytes: u64) {
        self.cut_execs_after(bytes, 1);
    }

    /// The next `sessions` exec sessions are each cut after `bytes` bytes of output.
    pub fn cut_execs_after(&self, bytes: u64, sessions: u32) {
        let mut s = self.lock();
        s.exec_cuts.extend(std::iter::repeat_n(
            ExecFault::Cut(bytes),
            sessions as usize,
        ));
    }

    /// The next `sessions` exec sessions each go dead after `bytes` bytes of output: the TCP
    /// connection stays open but no frame (data, status, pong or close) is ever sent again.
    pub fn stall_execs_after(&self, bytes: u64, sessions: u32) {
        let mut s = self.lock();
        s.exec_cuts.extend(std::iter::repeat_n(
            ExecFault::Stall(bytes),
            sessions as usize,
        ));
    }

    /// Reclaims a node like a spot preemption: its pods are terminated (phase Failed, reason
    /// Terminated, `DisruptionTarget` condition), then the Node object is deleted.
    pub fn preempt_node(&self, name: &str) {
        let _ = self.actions.send(FaultAction::Preempt(name.to_string()));
    }

    /// Evicts every pod on a node as the kubelet's eviction manager does under memory or
    /// ephemeral-storage pressure: phase Failed, reason `Evicted` with `message`, a
    /// `DisruptionTarget` condition (`TerminationByKubelet`); the node stays.
    pub fn evict_pods_on_node(&self, node: &str, message: &str) {
        let _ = self
            .actions
            .send(FaultAction::Evict(node.to_string(), message.to_string()));
    }

    /// Adds a node (pending pods are retried against it).
    pub fn add_node(&self, node: NodeSpec) {
        let _ = self.actions.send(FaultAction::AddNode(node));
    }

    /// Every binding waits this long first.
    pub fn delay_scheduling(&self, d: Duration) {
        self.lock().scheduling_delay = d;
    }

    /// Every image pull takes this long (on top of image rule delays).
    pub fn delay_pulls(&self, d: Duration) {
        self.lock().pull_delay = d;
    }

    /// Every exec waits this long before its process starts (a real exec travels API server →
    /// kubelet → container runtime, tens of milliseconds or more).
    pub fn delay_execs(&self, d: Duration) {
        self.lock().exec_delay = d;
    }

    pub(crate) fn exec_delay(&self) -> Duration {
        self.lock().exec_delay
    }

    pub(crate) fn scheduling_delay(&self) -> Duration {
        self.lock().scheduling_delay
    }

    pub(crate) fn pull_delay(&self) -> Duration {
        self.lock().pull_delay
    }

    pub(crate) fn take_exec_cut(&self) -> Option<ExecFault> {
        let mut s = self.lock();
        if s.exec_cuts.is_empty() {
            None
        } else {
            Some(s.exec_cuts.remove(0))
        }
    }

    /// Whether this request must fail, and how.
    pub(crate) fn injected_failure(
        &self,
        verb: &str,
        resource: &str,
    ) -> Option<(u16, Option<u32>)> {
        let mut s = self.lock();
        if let Some(rule) = s.fail_next.iter_mut().find(|r| {
            r.remaining > 0
                && r.verb.as_deref().is_none_or(|v| v == verb)
                && r.resource.as_deref().is_none_or(|res| res == resource)
        }) {
            rule.remaining -= 1;
            let out = (rule.status, rule.retry_after);
            s.fail_next.retain(|r| r.remaining > 0);
            return Some(out);
        }
        if let Some(e) = &mut s.fail_every {
            e.seen += 1;
            if e.seen % u64::from(e.every) == 0 {
                let status = e.statuses[e.failed % e.statuses.len()];
                e.failed += 1;
                return Some((status, None));
            }
        }
        if let Some(r) = &mut s.fail_ratio
            && r.rng.random_range(0..100) < r.percent
        {
            return Some((r.statuses[r.rng.random_range(0..r.statuses.len())], None));
        }
        None
    }
}
