//! The apiserver's object semantics on top of the store (admission, defaults, optimistic
//! concurrency, graceful pod deletion, owner cascade), plus the scheduler loop and the
//! node-level fault actions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};

use super::faults::FaultAction;
use super::patch::{self, PatchKind};
use super::sched::{self, NodeFit};
use super::status::ApiError;
use super::store::Res;
use super::{EmulatorConfig, NodeSpec, Shared, clock, kubelet, validate};

pub(crate) fn seed(shared: &Shared, cfg: &EmulatorConfig) {
    let mut st = shared.store();
    for ns in &cfg.namespaces {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        let obj = stamp_new(obj, "");
        st.put(Res::Namespaces, "", ns, obj);
    }
    for n in &cfg.nodes {
        st.put(Res::Nodes, "", &n.name, stamp_new(n.to_object(), ""));
    }
}

fn new_uid() -> String {
    let mut rng = rand::rng();
    let b: [u8; 16] = rng.random();
    let h = hex_string(&b);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

pub(crate) fn hex_string(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn stamp_new(mut obj: Value, ns: &str) -> Value {
    let md = &mut obj["metadata"];
    md["uid"] = json!(new_uid());
    md["creationTimestamp"] = json!(clock::now_rfc3339());
    if !ns.is_empty() {
        md["namespace"] = json!(ns);
    }
    obj
}

pub(crate) fn name_of(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or("")
}

/// Names of a pod's `containers` or `initContainers`.
pub(crate) fn container_names(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn uid_of(obj: &Value) -> &str {
    obj["metadata"]["uid"].as_str().unwrap_or("")
}

fn check_namespace(shared: &Shared, res: Res, ns: &str) -> Result<(), ApiError> {
    if res.namespaced() && !shared.store().contains(Res::Namespaces, "", ns) {
        return Err(ApiError::namespace_not_found(ns));
    }
    Ok(())
}

fn default_pod(obj: &mut Value) {
    let spec = &mut obj["spec"];
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("serviceAccountName", json!("default")),
        ("serviceAccount", json!("default")),
        ("securityContext", json!({})),
        ("enableServiceLinks", json!(true)),
        ("priority", json!(0)),
        ("preemptionPolicy", json!("PreemptLowerPriority")),
    ] {
        if spec.get(k).is_none_or(Value::is_null) {
            spec[k] = v;
        }
    }
    let tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
    let mut tol = tolerations.clone();
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        if !tolerations.iter().any(|t| t["key"] == key) {
            tol.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
        }
    }
    spec["tolerations"] = json!(tol);
    let mut any_requests = false;
    for list in ["initContainers", "containers"] {
        if let Some(cs) = spec[list].as_array_mut() {
            for c in cs {
                let image = c["image"].as_str().unwrap_or("").to_string();
                let tag = image.rsplit('/').next().unwrap_or("");
                let latest = !tag.contains(':') || tag.ends_with(":latest");
                for (k, v) in [
                    (
                        "imagePullPolicy",
                        json!(if latest && !image.contains('@') {
                            "Always"
                        } else {
                            "IfNotPresent"
                        }),
                    ),
                    ("terminationMessagePath", json!("/dev/termination-log")),
                    ("terminationMessagePolicy", json!("File")),
                    ("resources", json!({})),
                ] {
                    if c.get(k).is_none_or(Value::is_null) {
                        c[k] = v;
                    }
                }
                any_requests |= c["resources"].as_object().is_some_and(|r| !r.is_empty());
            }
        }
    }
    let qos = if any_requests {
        "Burstable"
    } else {
        "BestEffort"
    };
    obj["status"] = json!({"phase": "Pending", "qosClass": qos});
}

fn normalize_secret(obj: &mut Value) {
    use base64::Engine as _;
    if let Some(sd) = obj.get("stringData").and_then(Value::as_object).cloned() {
        for (k, v) in sd {
            let enc = base64::engine::general_purpose::STANDARD
                .encode(v.as_str().unwrap_or("").as_bytes());
            obj["data"][k] = json!(enc);
        }
    }
    if let Some(m) = obj.as_object_mut() {
        m.remove("stringData");
    }
    if obj.get("type").is_none_or(Value::is_null) {
        obj["type"] = json!("Opaque");
    }
}

fn parse_object(res: Res, body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("error decoding the request body as JSON: {e}"))
    })?;
    if !v.is_object() {
        return Err(ApiError::bad_request(format!(
            "the body must be a JSON object (a {}), got {}",
            res.kind(),
            short(&v)
        )));
    }
    if let Some(k) = v.get("kind").and_then(Value::as_str)
        && k != res.kind()
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the body ({k}) does not match the resource ({})",
            res.kind()
        )));
    }
    if let Some(a) = v.get("apiVersion").and_then(Value::as_str)
        && a != "v1"
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({a}) does not match the expected API version (v1)"
        )));
    }
    if !v.get("metadata").is_none_or(Value::is_object) {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    Ok(v)
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}...", &s[..40])
    } else {
        s
    }
}

pub(crate) fn create(
    shared: &Shared,
    res: Res,
    ns: &str,
    body: &[u8],
) -> Result<Arc<Value>, ApiError> {
    let mut obj = parse_object(res, body)?;
    let ns = if res.namespaced() { ns } else { "" };
    if let Some(bns) = obj["metadata"]["namespace"].as_str()
        && !bns.is_empty()
        && res.namespaced()
        && bns != ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    check_namespace(shared, res, ns)?;
    obj["apiVersion"] = json!("v1");
    obj["kind"] = json!(res.kind());
    if name_of(&obj).is_empty()
        && let Some(g) = obj["metadata"]["generateName"]
            .as_str()
            .filter(|g| !g.is_empty())
    {
        obj["metadata"]["name"] = json!(format!("{g}{}", random_suffix()));
    }
    let name = name_of(&obj).to_string();
    let errs = validate::validate(res, &obj);
    if !errs.is_empty() {
        return Err(ApiError::invalid(res, &name, &errs));
    }
    if let Some(md) = obj["metadata"].as_object_mut() {
        for k in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            md.remove(k);
        }
    }
    match res {
        Res::Pods => {
            default_pod(&mut obj);
            obj["metadata"]["generation"] = json!(1);
        }
        Res::Secrets => normalize_secret(&mut obj),
        Res::Namespaces => {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        _ => {}
    }
    let obj = stamp_new(obj, ns);
    let stored = {
        let mut st = shared.store();
        if st.contains(res, ns, &name) {
            return Err(ApiError::already_exists(res, &name));
        }
        st.put(res, ns, &name, obj)
    };
    if matches!(res, Res::Pods | Res::Nodes) {
        shared.sched_wake.notify_one();
    }
    Ok(stored)
}

pub(crate) fn get(shared: &Shared, res: Res, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
    let ns = if res.namespaced() { ns } else { "" };
    shared
        .store()
        .get(res, ns, name)
        .ok_or_else(|| ApiError::not_found(res, name))
}

/// Replaces `current` with `new`, keeping what a client may not change through this endpoint.
fn merge_for_update(res: Res, current: &Value, mut new: Value, status_only: bool) -> Value {
    if status_only {
        let mut out = current.clone();
        out["status"] = new["status"].take();
        return out;
    }
    for k in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "namespace",
        "generateName",
    ] {
        match current["metadata"].get(k) {
            Some(v) => new["metadata"][k] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(k);
                }
            }
        }
    }
    new["apiVersion"] = json!("v1");
    new["kind"] = json!(res.kind());
    if matches!(res, Res::Pods | Res::Nodes | Res::Namespaces) {
        new["status"] = current["status"].clone();
    }
    if res == Res::Pods {
        let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
        let bump = i64::from(new["spec"] != current["spec"]);
        new["metadata"]["generation"] = json!(generation + bump);
    }
    if res == Res::Secrets {
        normalize_secret(&mut new);
    }
    new
}

fn write_update(
    shared: &Shared,
    res: Res,
    ns: &str,
    name: &str,
    new: Value,
    expect_rv: Option<&str>,
    status_only: bool,
) -> Result<Arc<Value>, ApiError> {
    let ns = if res.namespaced() { ns } else { "" };
    let stored = {
        let mut st = shared.store();
        let current = st
            .get(res, ns, name)
            .ok_or_else(|| ApiError::not_found(res, name))?;
        if let Some(rv) = expect_rv.filter(|rv| !rv.is_empty())
            && current["metadata"]["resourceVersion"].as_str() != Some(rv)
        {
            return Err(ApiError::conflict(res, name));
        }
        let merged = merge_for_update(res, &current, new, status_only);
        let errs = validate::validate(res, &merged);
        if !errs.is_empty() {
            return Err(ApiError::invalid(res, name, &errs));
        }
        let mut cmp = merged.clone();
        cmp["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        if cmp == *current {
            // No-op updates do not bump the resourceVersion, like the apiserver.
            return Ok(current);
        }
        st.put(res, ns, name, merged)
    };
    if matches!(res, Res::Nodes | Res::Pods) {
        shared.sched_wake.notify_one();
    }
    Ok(stored)
}

pub(crate) fn update(
    shared: &Shared,
    res: Res,
    ns: &str,
    name: &str,
    body: &[u8],
    status_only: bool,
) -> Result<Arc<Value>, ApiError> {
    let new = parse_object(res, body)?;
    let body_name = name_of(&new);
    if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let rv = new["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string);
    write_update(shared, res, ns, name, new, rv.as_deref(), status_only)
}

pub(crate) fn patch(
    shared: &Shared,
    res: Res,
    ns: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
    status_only: bool,
) -> Result<Arc<Value>, ApiError> {
    let kind = PatchKind::from_content_type(content_type)
        .ok_or_else(|| ApiError::unsupported_media_type(
            content_type,
            "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json",
        ))?;
    let p: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("error decoding the patch body as JSON: {e}"))
    })?;
    let current = get(shared, res, ns, name)?;
    let mut target = (*current).clone();
    patch::apply(kind, &mut target, &p)
        .map_err(|e| ApiError::bad_request(format!("the patch could not be applied: {e}")))?;
    if name_of(&target) != name {
        return Err(ApiError::bad_request(
            "metadata.name cannot be changed by a patch",
        ));
    }
    let rv = if kind == PatchKind::Json {
        None
    } else {
        p["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_string)
    };
    write_update(shared, res, ns, name, target, rv.as_deref(), status_only)
}

/// Options of a DELETE (query parameters and/or a `DeleteOptions` body).
#[derive(Debug, Default, Clone)]
pub(crate) struct DeleteOpts {
    pub grace: Option<i64>,
    pub orphan: bool,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

pub(crate) fn delete(
    shared: &Shared,
    res: Res,
    ns: &str,
    name: &str,
    opts: &DeleteOpts,
) -> Result<Arc<Value>, ApiError> {
    let ns = if res.namespaced() { ns } else { "" };
    let current = get(shared, res, ns, name)?;
    if let Some(uid) = &opts.precondition_uid
        && uid_of(&current) != uid
    {
        return Err(ApiError::conflict(res, name));
    }
    if let Some(rv) = &opts.precondition_rv
        && current["metadata"]["resourceVersion"].as_str() != Some(rv)
    {
        return Err(ApiError::conflict(res, name));
    }
    match res {
        Res::Pods => delete_pod(shared, ns, name, &current, opts),
        Res::Namespaces => {
            let mut pods = Vec::new();
            {
                let mut st = shared.store();
                for r in Res::ALL.into_iter().filter(|r| r.namespaced()) {
                    for o in st.list(r, Some(name)) {
                        if r == Res::Pods {
                            pods.push(o);
                        } else {
                            st.remove(r, name, name_of(&o));
                        }
                    }
                }
            }
            for p in pods {
                let _ = delete_pod(
                    shared,
                    name,
                    name_of(&p),
                    &p,
                    &DeleteOpts {
                        grace: Some(0),
                        ..DeleteOpts::default()
                    },
                );
            }
            shared
                .store()
                .remove(res, "", name)
                .ok_or_else(|| ApiError::not_found(res, name))
        }
        _ => {
            let out = shared
                .store()
                .remove(res, ns, name)
                .ok_or_else(|| ApiError::not_found(res, name))?;
            if res == Res::Nodes {
                shared.sched_wake.notify_one();
            }
            Ok(out)
        }
    }
}

fn delete_pod(
    shared: &Shared,
    ns: &str,
    name: &str,
    current: &Value,
    opts: &DeleteOpts,
) -> Result<Arc<Value>, ApiError> {
    if !current["metadata"]["deletionTimestamp"].is_null() && opts.grace != Some(0) {
        return Ok(Arc::new(current.clone()));
    }
    let uid = uid_of(current).to_string();
    let handle = shared
        .pods
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&uid)
        .cloned();
    let Some(handle) = handle else {
        // Never bound to a node: nothing to stop, removed at once.
        return finalize_pod(shared, ns, name, &uid, !opts.orphan)
            .ok_or_else(|| ApiError::not_found(Res::Pods, name));
    };
    let grace = opts
        .grace
        .or_else(|| current["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(30)
        .max(0);
    let updated = mutate(shared, Res::Pods, ns, name, |p| {
        if p["metadata"]["deletionTimestamp"].is_null() || grace == 0 {
            let at = std::time::SystemTime::now() + Duration::from_secs(grace.unsigned_abs());
            p["metadata"]["deletionTimestamp"] = json!(clock::format_system_time(at));
        }
        p["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
    })
    .ok_or_else(|| ApiError::not_found(Res::Pods, name))?;
    handle.delete(Duration::from_secs(grace.unsigned_abs()), !opts.orphan);
    Ok(updated)
}

/// Removes a pod for good and cascades to the secrets/configmaps it owns.
pub(crate) fn finalize_pod(
    shared: &Shared,
    ns: &str,
    name: &str,
    uid: &str,
    cascade: bool,
) -> Option<Arc<Value>> {
    let mut st = shared.store();
    let cur = st.get(Res::Pods, ns, name)?;
    if uid_of(&cur) != uid {
        return None;
    }
    let last = st.remove(Res::Pods, ns, name);
    if cascade {
        for res in [Res::Secrets, Res::ConfigMaps] {
            for o in st.list(res, Some(ns)) {
                let owned = o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid));
                if owned {
                    st.remove(res, ns, name_of(&o));
                }
            }
        }
    }
    drop(st);
    shared.sched_wake.notify_one();
    last
}

/// Applies `f` to a stored object and writes it when it changed. None when the object is gone.
pub(crate) fn mutate(
    shared: &Shared,
    res: Res,
    ns: &str,
    name: &str,
    f: impl FnOnce(&mut Value),
) -> Option<Arc<Value>> {
    let mut st = shared.store();
    let cur = st.get(res, ns, name)?;
    let mut next = (*cur).clone();
    f(&mut next);
    if next == *cur {
        return Some(cur);
    }
    Some(st.put(res, ns, name, next))
}

/// Records a core/v1 Event about `obj` (legacy recorder shape).
pub(crate) fn emit_event(
    shared: &Shared,
    obj: &Value,
    kind: &str,
    reason: &str,
    message: &str,
    component: &str,
    field_path: Option<&str>,
) {
    let ns = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    let host = obj["spec"]["nodeName"].as_str().unwrap_or("");
    let now = clock::now_rfc3339();
    let mut involved = json!({
        "kind": obj["kind"].as_str().unwrap_or("Pod"), "namespace": ns, "name": name_of(obj), "uid": uid_of(obj),
        "apiVersion": "v1", "resourceVersion": obj["metadata"]["resourceVersion"],
    });
    if let Some(fp) = field_path {
        involved["fieldPath"] = json!(fp);
    }
    let mut source = json!({"component": component});
    if !host.is_empty() && component == "kubelet" {
        source["host"] = json!(host);
    }
    let mut st = shared.store();
    let mut ev_name = format!("{}.{:x}", name_of(obj), clock::unix_nanos());
    while st.contains(Res::Events, &ns, &ev_name) {
        ev_name.push('0');
    }
    let ev = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": ev_name, "namespace": ns},
        "involvedObject": involved, "reason": reason, "message": message, "source": source,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1, "type": kind, "eventTime": null,
        "reportingComponent": component, "reportingInstance": if component == "kubelet" { host } else { "" },
    });
    let ev = stamp_new(ev, &ns);
    st.put(Res::Events, &ns, &ev_name, ev);
}

fn set_condition(
    pod: &mut Value,
    cond_type: &str,
    status: &str,
    reason: Option<&str>,
    message: Option<&str>,
) {
    let now = clock::now_rfc3339();
    let conds = pod["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut found = false;
    for mut c in conds {
        if c["type"] == cond_type {
            found = true;
            if c["status"] != status {
                c["lastTransitionTime"] = json!(now);
            }
            c["status"] = json!(status);
            set_opt(&mut c, "reason", reason);
            set_opt(&mut c, "message", message);
        }
        out.push(c);
    }
    if !found {
        let mut c = json!({"type": cond_type, "status": status, "lastProbeTime": null, "lastTransitionTime": now});
        set_opt(&mut c, "reason", reason);
        set_opt(&mut c, "message", message);
        out.push(c);
    }
    pod["status"]["conditions"] = json!(out);
}

fn set_opt(v: &mut Value, k: &str, s: Option<&str>) {
    match s {
        Some(s) => v[k] = json!(s),
        None => {
            if let Some(m) = v.as_object_mut() {
                m.remove(k);
            }
        }
    }
}

fn pending_unbound(p: &Value) -> bool {
    p["spec"]["nodeName"].as_str().unwrap_or("").is_empty()
        && p["metadata"]["deletionTimestamp"].is_null()
        && p["status"]["phase"].as_str() == Some("Pending")
}

fn terminal(p: &Value) -> bool {
    matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
}

/// Binds pending pods to nodes; retried on every change of pods or nodes and every 200 ms.
pub(crate) async fn scheduler_loop(shared: Arc<Shared>) {
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            () = shared.stopping.cancelled() => return,
            () = shared.sched_wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let delay = shared.faults.scheduling_delay();
        let pods: Vec<Arc<Value>> = shared
            .store()
            .list(Res::Pods, None)
            .into_iter()
            .filter(|p| pending_unbound(p))
            .collect();
        first_seen.retain(|uid, _| pods.iter().any(|p| uid_of(p) == uid));
        for pod in pods {
            let seen = *first_seen
                .entry(uid_of(&pod).to_string())
                .or_insert_with(Instant::now);
            if seen.elapsed() < delay {
                continue;
            }
            schedule_one(&shared, &pod);
        }
    }
}

fn schedule_one(shared: &Arc<Shared>, pod: &Value) {
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = name_of(pod).to_string();
    let decision = {
        let st = shared.store();
        let nodes = st.list(Res::Nodes, None);
        let pods = st.list(Res::Pods, None);
        let fits: Vec<NodeFit<'_>> = nodes
            .iter()
            .map(|n| {
                let (cpu, mem) = pods
                    .iter()
                    .filter(|p| {
                        p["spec"]["nodeName"].as_str() == n["metadata"]["name"].as_str()
                            && !terminal(p)
                    })
                    .map(|p| sched::pod_requests(p))
                    .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
                NodeFit {
                    node: n,
                    used_cpu_millis: cpu,
                    used_memory: mem,
                }
            })
            .collect();
        sched::schedule(pod, &fits)
    };
    match decision {
        Ok(node) => {
            let bound = mutate(shared, Res::Pods, &ns, &name, |p| {
                if pending_unbound(p) {
                    p["spec"]["nodeName"] = json!(node);
                    set_condition(p, "PodScheduled", "True", None, None);
                }
            });
            let Some(bound) = bound else { return };
            if bound["spec"]["nodeName"].as_str() != Some(&node) {
                return;
            }
            emit_event(
                shared,
                &bound,
                "Normal",
                "Scheduled",
                &format!("Successfully assigned {ns}/{name} to {node}"),
                "default-scheduler",
                None,
            );
            kubelet::spawn_pod(shared.clone(), &bound);
        }
        Err(msg) => {
            let before = pod["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "PodScheduled"))
                .and_then(|c| c["message"].as_str())
                .map(str::to_string);
            if before.as_deref() == Some(msg.as_str()) {
                return;
            }
            if let Some(p) = mutate(shared, Res::Pods, &ns, &name, |p| {
                set_condition(
                    p,
                    "PodScheduled",
                    "False",
                    Some("Unschedulable"),
                    Some(&msg),
                );
            }) {
                emit_event(
                    shared,
                    &p,
                    "Warning",
                    "FailedScheduling",
                    &msg,
                    "default-scheduler",
                    None,
                );
            }
        }
    }
}

/// Runs node-level faults that need the store and the kubelet.
pub(crate) async fn fault_actions(
    shared: Arc<Shared>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<FaultAction>,
) {
    while let Some(action) = rx.recv().await {
        match action {
            FaultAction::AddNode(spec) => add_node(&shared, &spec),
            FaultAction::Preempt(node) => {
                let sh = shared.clone();
                tokio::spawn(async move { preempt(&sh, &node).await });
            }
            FaultAction::Evict(node, message) => {
                for h in pods_on_node(&shared, &node) {
                    h.evict(&message);
                }
            }
        }
    }
}

fn add_node(shared: &Shared, spec: &NodeSpec) {
    let obj = stamp_new(spec.to_object(), "");
    shared.store().put(Res::Nodes, "", &spec.name, obj);
    shared.sched_wake.notify_one();
}

/// The kubelet handles of the pods bound to `node`.
fn pods_on_node(shared: &Shared, node: &str) -> Vec<Arc<super::kubelet::PodHandle>> {
    let uids: Vec<String> = shared
        .store()
        .list(Res::Pods, None)
        .iter()
        .filter(|p| p["spec"]["nodeName"].as_str() == Some(node))
        .map(|p| uid_of(p).to_string())
        .collect();
    let pods = shared
        .pods
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    uids.iter().filter_map(|u| pods.get(u).cloned()).collect()
}

async fn preempt(shared: &Arc<Shared>, node: &str) {
    mutate(shared, Res::Nodes, "", node, |n| {
        if let Some(conds) = n["status"]["conditions"].as_array_mut() {
            for c in conds.iter_mut().filter(|c| c["type"] == "Ready") {
                c["status"] = json!("False");
                c["reason"] = json!("KubeletNotReady");
                c["message"] = json!("node is shutting down");
                c["lastTransitionTime"] = json!(clock::now_rfc3339());
            }
        }
        n["spec"]["unschedulable"] = json!(true);
    });
    let handles = pods_on_node(shared, node);
    for h in &handles {
        h.preempt();
    }
    for h in &handles {
        h.wait_terminal(Duration::from_secs(10)).await;
    }
    shared.store().remove(Res::Nodes, "", node);
    shared.sched_wake.notify_one();
}
