//! The scheduler's decision as a pure function: filters (taints, node affinity/selector,
//! resources) in kube-scheduler's order, preferred-affinity scoring, and the `FitError` message.

use std::collections::BTreeMap;

use serde_json::Value;

use super::select::labels_of;
use super::validate::parse_quantity;

/// What a node has left, as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct NodeFit<'a> {
    pub node: &'a Value,
    pub used_cpu_millis: u64,
    pub used_memory: u64,
}

/// Requested cpu (millicores) and memory (bytes) of a pod: max(sum of containers, any init container).
pub fn pod_requests(pod: &Value) -> (u64, u64) {
    let one = |c: &Value| {
        let get = |k: &str| {
            let r = &c["resources"];
            let v = r["requests"][k]
                .as_str()
                .or_else(|| r["limits"][k].as_str());
            v.and_then(parse_quantity).unwrap_or(0.0)
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        (
            (get("cpu") * 1000.0).ceil() as u64,
            get("memory").ceil() as u64,
        )
    };
    let sum = pod["spec"]["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(one)
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    pod["spec"]["initContainers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(one)
        .fold(sum, |a, b| (a.0.max(b.0), a.1.max(b.1)))
}

fn allocatable(node: &Value, key: &str) -> f64 {
    node["status"]["allocatable"][key]
        .as_str()
        .and_then(parse_quantity)
        .unwrap_or(0.0)
}

fn tolerates(tolerations: &[Value], taint: &Value) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t["effect"]
            .as_str()
            .is_none_or(|e| e.is_empty() || Some(e) == taint["effect"].as_str());
        let key = t["key"].as_str().unwrap_or("");
        let op = t["operator"].as_str().unwrap_or("Equal");
        let key_ok = if key.is_empty() {
            op == "Exists"
        } else {
            Some(key) == taint["key"].as_str()
        };
        let value_ok = op == "Exists"
            || t["value"].as_str().unwrap_or("") == taint["value"].as_str().unwrap_or("");
        effect_ok && key_ok && value_ok
    })
}

fn expr_matches(labels: &BTreeMap<String, String>, e: &Value) -> bool {
    let key = e["key"].as_str().unwrap_or("");
    let values: Vec<&str> = e["values"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let v = labels.get(key);
    let num = |s: &str| s.parse::<i64>().ok();
    match e["operator"].as_str().unwrap_or("") {
        "In" => v.is_some_and(|v| values.contains(&v.as_str())),
        "NotIn" => v.is_none_or(|v| !values.contains(&v.as_str())),
        "Exists" => v.is_some(),
        "DoesNotExist" => v.is_none(),
        "Gt" => {
            matches!((v.and_then(|v| num(v)), values.first().and_then(|s| num(s))), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((v.and_then(|v| num(v)), values.first().and_then(|s| num(s))), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

fn term_matches(node: &Value, term: &Value) -> bool {
    let labels = labels_of(node);
    let exprs = term["matchExpressions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let fields = term["matchFields"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    let name_labels: BTreeMap<String, String> = [(
        "metadata.name".to_string(),
        node["metadata"]["name"].as_str().unwrap_or("").to_string(),
    )]
    .into();
    exprs.iter().all(|e| expr_matches(&labels, e))
        && fields.iter().all(|e| expr_matches(&name_labels, e))
}

fn affinity_ok(pod: &Value, node: &Value) -> bool {
    let labels = labels_of(node);
    let selector_ok = pod["spec"]["nodeSelector"].as_object().is_none_or(|m| {
        m.iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
    });
    let req = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    let affinity_ok = req
        .as_array()
        .is_none_or(|terms| terms.iter().any(|t| term_matches(node, t)));
    selector_ok && affinity_ok
}

fn preference_score(pod: &Value, node: &Value) -> i64 {
    pod["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|p| term_matches(node, &p["preference"]))
        .map(|p| p["weight"].as_i64().unwrap_or(0))
        .sum()
}

/// Why one node was rejected, in the scheduler's words.
fn reject_reason(pod: &Value, fit: &NodeFit<'_>, req: (u64, u64)) -> Option<(String, bool)> {
    let node = fit.node;
    if node["spec"]["unschedulable"].as_bool() == Some(true) {
        return Some(("node(s) were unschedulable".into(), false));
    }
    let tolerations = pod["spec"]["tolerations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let untolerated = node["spec"]["taints"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|t| matches!(t["effect"].as_str(), Some("NoSchedule" | "NoExecute")))
        .any(|t| !tolerates(tolerations, t));
    if untolerated {
        return Some(("node(s) had untolerated taint(s)".into(), false));
    }
    if !affinity_ok(pod, node) {
        return Some((
            "node(s) didn't match Pod's node affinity/selector".into(),
            false,
        ));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let (cpu, mem) = (
        (allocatable(node, "cpu") * 1000.0) as u64,
        allocatable(node, "memory") as u64,
    );
    if req.0 > 0 && fit.used_cpu_millis + req.0 > cpu {
        return Some(("Insufficient cpu".into(), true));
    }
    if req.1 > 0 && fit.used_memory + req.1 > mem {
        return Some(("Insufficient memory".into(), true));
    }
    None
}

/// The node to bind to, or the `FitError` message (`0/N nodes are available: ...`).
pub fn schedule(pod: &Value, nodes: &[NodeFit<'_>]) -> Result<String, String> {
    let req = pod_requests(pod);
    let mut reasons: BTreeMap<String, (usize, bool)> = BTreeMap::new();
    let mut best: Option<(i64, &str)> = None;
    for fit in nodes {
        if let Some((why, resolvable)) = reject_reason(pod, fit, req) {
            let e = reasons.entry(why).or_insert((0, resolvable));
            e.0 += 1;
        } else {
            let score = preference_score(pod, fit.node);
            let name = fit.node["metadata"]["name"].as_str().unwrap_or("");
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, name));
            }
        }
    }
    if let Some((_, name)) = best {
        return Ok(name.to_string());
    }
    let n = nodes.len();
    if n == 0 {
        return Err("no nodes available to schedule pods".into());
    }
    let mut parts: Vec<String> = reasons
        .iter()
        .map(|(why, (c, _))| format!("{c} {why}"))
        .collect();
    parts.sort();
    let victims = reasons
        .values()
        .filter(|(_, r)| *r)
        .map(|(c, _)| c)
        .sum::<usize>();
    let helpless = n - victims;
    let mut pre = Vec::new();
    if victims > 0 {
        pre.push(format!(
            "{victims} No preemption victims found for incoming pod"
        ));
    }
    if helpless > 0 {
        pre.push(format!(
            "{helpless} Preemption is not helpful for scheduling"
        ));
    }
    pre.sort();
    Err(format!(
        "0/{n} nodes are available: {}. preemption: 0/{n} nodes are available: {}.",
        parts.join(", "),
        pre.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, spot: bool, cpu: &str) -> Value {
        let mut n = json!({"metadata": {"name": name, "labels": {"cloud.google.com/gke-provisioning": if spot {"spot"} else {"standard"}}},
            "spec": {}, "status": {"allocatable": {"cpu": cpu, "memory": "8Gi"}}});
        if spot {
            n["metadata"]["labels"]["cloud.google.com/gke-spot"] = json!("true");
            n["spec"]["taints"] = json!([{"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"}]);
        }
        n
    }

    #[test]
    fn spot_pod_needs_toleration_and_selector() {
        let nodes = [node("spot", true, "4"), node("od", false, "4")];
        let fits: Vec<NodeFit<'_>> = nodes
            .iter()
            .map(|n| NodeFit {
                node: n,
                used_cpu_millis: 0,
                used_memory: 0,
            })
            .collect();
        let plain = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(schedule(&plain, &fits).unwrap(), "od");
        let spot = json!({"spec": {"nodeSelector": {"cloud.google.com/gke-spot": "true"},
            "tolerations": [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
            "containers": [{"name": "a"}]}});
        assert_eq!(schedule(&spot, &fits).unwrap(), "spot");
        let prefer = json!({"spec": {"tolerations": [{"operator": "Exists"}], "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "preference": {"matchExpressions": [{"key": "cloud.google.com/gke-spot", "operator": "In", "values": ["true"]}]}}]}},
            "containers": [{"name": "a"}]}});
        assert_eq!(schedule(&prefer, &fits).unwrap(), "spot");
    }

    #[test]
    fn fit_error_message() {
        let nodes = [
            node("spot1", true, "4"),
            node("spot2", true, "4"),
            node("od", false, "4"),
        ];
        let fits: Vec<NodeFit<'_>> = nodes
            .iter()
            .map(|n| NodeFit {
                node: n,
                used_cpu_millis: 0,
                used_memory: 0,
            })
            .collect();
        let big = json!({"spec": {"containers": [{"name": "a", "resources": {"requests": {"cpu": "12"}}}]}});
        assert_eq!(
            schedule(&big, &fits).unwrap_err(),
            "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) had untolerated taint(s). preemption: 0/3 nodes are available: 1 No preemption victims found for incoming pod, 2 Preemption is not helpful for scheduling."
        );
        let gt = json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "missing", "operator": "Exists"}]}]}}}, "containers": [{"name": "a"}]}});
        assert!(
            schedule(&gt, &fits[2..])
                .unwrap_err()
                .contains("1 node(s) didn't match Pod's node affinity/selector")
        );
    }
}
