//! The object store: every API object as JSON, one global resourceVersion, and a bounded
//! history of changes that watches replay from and broadcast to.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

/// The resources the emulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Res {
    Pods,
    Secrets,
    ConfigMaps,
    Events,
    Nodes,
    Namespaces,
}

impl Res {
    pub const ALL: [Res; 6] = [
        Res::Pods,
        Res::Secrets,
        Res::ConfigMaps,
        Res::Events,
        Res::Nodes,
        Res::Namespaces,
    ];

    pub fn from_plural(s: &str) -> Option<Res> {
        Res::ALL.into_iter().find(|r| r.plural() == s)
    }

    pub fn plural(self) -> &'static str {
        match self {
            Res::Pods => "pods",
            Res::Secrets => "secrets",
            Res::ConfigMaps => "configmaps",
            Res::Events => "events",
            Res::Nodes => "nodes",
            Res::Namespaces => "namespaces",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Res::Pods => "Pod",
            Res::Secrets => "Secret",
            Res::ConfigMaps => "ConfigMap",
            Res::Events => "Event",
            Res::Nodes => "Node",
            Res::Namespaces => "Namespace",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Res::Nodes | Res::Namespaces)
    }

    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Res::Pods => &["po"],
            Res::ConfigMaps => &["cm"],
            Res::Events => &["ev"],
            Res::Nodes => &["no"],
            Res::Namespaces => &["ns"],
            Res::Secrets => &[],
        }
    }
}

/// Watch event types as they appear on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change of one object; `prev` lets selector-filtered watches turn MODIFIED into ADDED/DELETED.
#[derive(Debug)]
pub struct Change {
    pub res: Res,
    pub namespace: String,
    pub rv: u64,
    pub kind: EventType,
    pub object: Arc<Value>,
    pub prev: Option<Arc<Value>>,
}

type Key = (String, String);

/// The state behind the emulator's one lock.
pub struct Store {
    rv: u64,
    objects: BTreeMap<Res, BTreeMap<Key, Arc<Value>>>,
    history: VecDeque<Arc<Change>>,
    history_cap: usize,
    /// Watches may resume from any resourceVersion >= floor.
    floor: u64,
    tx: broadcast::Sender<Arc<Change>>,
}

impl Store {
    pub fn new(history_cap: usize) -> Self {
        let (tx, _) = broadcast::channel(8192);
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_cap: history_cap.max(1),
            floor: 0,
            tx,
        }
    }

    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    /// Changes strictly after `rv`, oldest first.
    pub fn history_after(&self, rv: u64) -> Vec<Arc<Change>> {
        self.history.iter().filter(|c| c.rv > rv).cloned().collect()
    }

    pub fn get(&self, res: Res, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.objects
            .get(&res)?
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    pub fn contains(&self, res: Res, ns: &str, name: &str) -> bool {
        self.get(res, ns, name).is_some()
    }

    /// Objects of `res`, in one namespace or all of them, in (namespace, name) order.
    pub fn list(&self, res: Res, ns: Option<&str>) -> Vec<Arc<Value>> {
        let Some(m) = self.objects.get(&res) else {
            return Vec::new();
        };
        m.iter()
            .filter(|((n, _), _)| ns.is_none_or(|want| want == n))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Writes an object (create or replace), stamping a new resourceVersion. Returns the stored value.
    pub fn put(&mut self, res: Res, ns: &str, name: &str, mut obj: Value) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let obj = Arc::new(obj);
        let key = (ns.to_string(), name.to_string());
        let prev = self
            .objects
            .entry(res)
            .or_default()
            .insert(key, obj.clone());
        let kind = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(Change {
            res,
            namespace: ns.to_string(),
            rv,
            kind,
            object: obj.clone(),
            prev,
        });
        obj
    }

    /// Removes an object; the DELETED event carries its last state at a new resourceVersion.
    pub fn remove(&mut self, res: Res, ns: &str, name: &str) -> Option<Arc<Value>> {
        let key = (ns.to_string(), name.to_string());
        let prev = self.objects.get_mut(&res)?.remove(&key)?;
        self.rv += 1;
        let rv = self.rv;
        let mut last = (*prev).clone();
        last["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let last = Arc::new(last);
        self.record(Change {
            res,
            namespace: ns.to_string(),
            rv,
            kind: EventType::Deleted,
            object: last.clone(),
            prev: Some(prev),
        });
        Some(last)
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push_back(change.clone());
        while self.history.len() > self.history_cap {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        // No receivers is fine: nobody watches yet.
        let _ = self.tx.send(change);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions_increase_and_history_is_bounded() {
        let mut s = Store::new(2);
        let a = s.put(Res::Pods, "ns", "a", json!({"metadata": {"name": "a"}}));
        let b = s.put(Res::Pods, "ns", "a", json!({"metadata": {"name": "a"}}));
        assert!(
            b["metadata"]["resourceVersion"].as_str() > a["metadata"]["resourceVersion"].as_str()
        );
        s.remove(Res::Pods, "ns", "a").unwrap();
        assert_eq!(s.history_after(0).len(), 2);
        assert_eq!(s.floor(), 2);
        assert!(s.get(Res::Pods, "ns", "a").is_none());
    }
}
