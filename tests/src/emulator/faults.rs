//! Fault knobs: injected API failures, dropped watches, cut exec streams, preemption and delays.
//! `Faults` is a cheap clone handle over state the server consults on every request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
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

#[derive(Debug, Default)]
pub(crate) struct FaultState {
    fail_next: Vec<FailRule>,
    fail_ratio: Option<(u32, Vec<u16>)>,
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

    /// `percent` % of all API requests fail with a status picked at random from `statuses`.
    /// `fail_ratio(0, ..)` turns it off.
    pub fn fail_ratio(&self, percent: u32, statuses: &[u16]) {
        self.lock().fail_ratio =
            (percent > 0 && !statuses.is_empty()).then(|| (percent.min(100), statuses.to_vec()));
    }

    /// Clears injected request failures and exec cuts.
    pub fn clear(&self) {
        let mut s = self.lock();
        s.fail_next.clear();
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
        if let Some((pct, statuses)) = &s.fail_ratio {
            let mut rng = rand::rng();
            if rng.random_range(0..100) < *pct {
                return Some((statuses[rng.random_range(0..statuses.len())], None));
            }
        }
        None
    }
}
