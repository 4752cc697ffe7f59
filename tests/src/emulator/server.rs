//! HTTP/1.1 front: routing of /api/v1 paths to the API semantics, discovery documents,
//! list/watch streaming, pod logs, the audit log, injected faults and the control endpoint.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt as _;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::api::{self, DeleteOpts};
use super::select::{FieldSelector, LabelSelector, labels_of};
use super::status::ApiError;
use super::store::{Change, EventType, Res};
use super::{AuditEntry, NodeSpec, Shared, Taint, exec, podlog, table};

pub(crate) type Body = BoxBody<Bytes, Infallible>;

pub(crate) fn empty_body() -> Body {
    Full::new(Bytes::new()).boxed()
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.to_status());
    if let Some(secs) = e.retry_after
        && let Ok(v) = header::HeaderValue::from_str(&secs.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

pub(crate) async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    loop {
        let sock = tokio::select! {
            () = shared.stopping.cancelled() => return,
            r = listener.accept() => if let Ok((s, _)) = r { s } else { tokio::time::sleep(Duration::from_millis(10)).await; continue; },
        };
        let sh = shared.clone();
        tokio::spawn(async move {
            let sh2 = sh.clone();
            let svc = hyper::service::service_fn(move |req| {
                let sh = sh2.clone();
                async move { Ok::<_, Infallible>(handle(sh, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                () = sh.stopping.cancelled() => {}
            }
        });
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if let Ok(r) = AssertUnwindSafe(route(&shared, req)).catch_unwind().await {
        r
    } else {
        shared.panics.fetch_add(1, Ordering::SeqCst);
        error_response(&ApiError::internal(
            "the emulator panicked while handling this request",
        ))
    }
}

/// A parsed `/api/v1/...` resource path.
#[derive(Debug, Clone)]
struct Target {
    res: Res,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
    /// `Some(full_object)` when the client asked for server-side printing (kubectl get).
    table: Option<bool>,
}

fn parse_target(path: &str) -> Result<Option<Target>, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segs.len() < 3 || segs[0] != "api" || segs[1] != "v1" {
        return Ok(None);
    }
    let rest = &segs[2..];
    let (ns, rest) = if rest.len() >= 3 && rest[0] == "namespaces" {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    let res = Res::from_plural(rest[0]).ok_or_else(ApiError::page_not_found)?;
    if ns.is_some() && !res.namespaced() || rest.len() > 3 {
        return Err(ApiError::page_not_found());
    }
    let name = rest.get(1).map(|s| (*s).to_string());
    let sub = rest.get(2).map(|s| (*s).to_string());
    if name.is_some() && ns.is_none() && res.namespaced() {
        return Err(ApiError::page_not_found());
    }
    if let Some(s) = &sub {
        let ok = match res {
            Res::Pods => matches!(s.as_str(), "status" | "log" | "exec"),
            Res::Nodes | Res::Namespaces => s == "status",
            _ => false,
        };
        if !ok {
            return Err(ApiError::page_not_found());
        }
    }
    Ok(Some(Target {
        res,
        ns,
        name,
        sub,
        table: None,
    }))
}

fn query_pairs(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

fn qget<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

fn verb_of(method: &Method, t: &Target, q: &[(String, String)]) -> &'static str {
    let watch = matches!(qget(q, "watch"), Some("true" | "1"));
    match (method.as_str(), t.name.is_some()) {
        ("GET", _) if t.sub.as_deref() == Some("exec") => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let q = query_pairs(&req);
    if path.starts_with("/emulator/") {
        return control(shared, req, &path).await;
    }
    if req.method() == Method::GET
        && let Some(doc) = discovery(&path)
    {
        return doc;
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes().starts_with(b"Bearer "));
    let mut target = match parse_target(&path) {
        Ok(Some(t)) => t,
        Ok(None) => return error_response(&ApiError::page_not_found()),
        Err(e) => return error_response(&e),
    };
    let verb = verb_of(req.method(), &target, &q);
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if table::wants_table(accept) && target.sub.is_none() {
        target.table = Some(qget(&q, "includeObject") == Some("Object"));
    }
    let mut entry = AuditEntry {
        verb: verb.to_string(),
        resource: target.res.plural().to_string(),
        subresource: target.sub.clone(),
        namespace: target.ns.clone(),
        name: target.name.clone(),
        bearer_token: bearer,
        code: 0,
    };
    let resp =
        if let Some((code, retry)) = shared.faults.injected_failure(verb, target.res.plural()) {
            error_response(&ApiError::injected(code, retry))
        } else {
            match dispatch(shared, req, &target, verb, &q).await {
                Ok(r) => r,
                Err(e) => error_response(&e),
            }
        };
    entry.code = resp.status().as_u16();
    let mut audit = shared
        .audit
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Since Kubernetes 1.31 (AuthorizePodWebsocketUpgradeCreatePermission, on by default) a
    // websocket exec is authorised as `create` on pods/exec as well as `get`.
    if entry.subresource.as_deref() == Some("exec") && entry.verb == "get" {
        let mut create = entry.clone();
        create.verb = "create".into();
        audit.push(create);
    }
    audit.push(entry);
    drop(audit);
    resp
}

async fn read_body(req: Request<Incoming>) -> Result<(String, Bytes), ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?
        .to_bytes();
    Ok((ct, body))
}

async fn dispatch(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    t: &Target,
    verb: &str,
    q: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let ns = t.ns.clone().unwrap_or_default();
    let name = t.name.clone().unwrap_or_default();
    let status_only = t.sub.as_deref() == Some("status");
    match (verb, t.sub.as_deref()) {
        (_, Some("exec")) if matches!(*req.method(), Method::GET | Method::POST) => {
            exec::handle(shared, req, &ns, &name, q)
        }
        ("get", Some("log")) => logs(shared, &ns, &name, q).await,
        ("list", None) => list(shared, t, q),
        ("watch", None) => watch(shared, t, q),
        ("get", None | Some("status")) => {
            let obj = api::get(shared, t.res, &ns, &name)?;
            match t.table {
                Some(full) => Ok(json_response(
                    200,
                    &table::table(t.res, &[&*obj], shared.store().current_rv(), full),
                )),
                None => Ok(json_response(200, &obj)),
            }
        }
        ("create", None) if t.name.is_none() => {
            if t.res.namespaced() && t.ns.is_none() {
                return Err(ApiError::method_not_allowed(
                    "create requires a namespace in the path",
                ));
            }
            let (ct, body) = read_body(req).await?;
            check_json_ct(&ct)?;
            Ok(json_response(
                201,
                &*api::create(shared, t.res, &ns, &body)?,
            ))
        }
        ("update", None | Some("status")) => {
            let (ct, body) = read_body(req).await?;
            check_json_ct(&ct)?;
            Ok(json_response(
                200,
                &*api::update(shared, t.res, &ns, &name, &body, status_only)?,
            ))
        }
        ("patch", None | Some("status")) => {
            let (ct, body) = read_body(req).await?;
            Ok(json_response(
                200,
                &*api::patch(shared, t.res, &ns, &name, &ct, &body, status_only)?,
            ))
        }
        ("delete", None) => {
            let opts = delete_opts(req, q).await?;
            Ok(json_response(
                200,
                &*api::delete(shared, t.res, &ns, &name, &opts)?,
            ))
        }
        ("deletecollection", None) => {
            let opts = delete_opts(req, q).await?;
            let items = selected(shared, t, q)?;
            let mut out = Vec::new();
            for o in items {
                let ons = o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                if let Ok(d) = api::delete(shared, t.res, &ons, api::name_of(&o), &opts) {
                    out.push(strip_type(&d));
                }
            }
            let rv = shared.store().current_rv();
            Ok(json_response(
                200,
                &json!({"kind": format!("{}List", t.res.kind()), "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": out}),
            ))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({} {})",
            verb_or_method(verb),
            t.res.plural()
        ))),
    }
}

fn verb_or_method(verb: &str) -> &str {
    if verb == "unknown" {
        "this method"
    } else {
        verb
    }
}

fn check_json_ct(ct: &str) -> Result<(), ApiError> {
    let base = ct.split(';').next().unwrap_or("").trim();
    if base.is_empty() || base == "application/json" || base == "*/*" {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(ct, "application/json"))
    }
}

async fn delete_opts(
    req: Request<Incoming>,
    q: &[(String, String)],
) -> Result<DeleteOpts, ApiError> {
    let (_, body) = read_body(req).await?;
    let mut o = DeleteOpts::default();
    let mut policy = qget(q, "propagationPolicy").map(str::to_string);
    if let Some(g) = qget(q, "gracePeriodSeconds") {
        o.grace = Some(g.parse().map_err(|_| {
            ApiError::bad_request(format!("gracePeriodSeconds must be an integer, got {g:?}"))
        })?);
    }
    if !body.is_empty() {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?;
        if let Some(g) = v["gracePeriodSeconds"].as_i64() {
            o.grace = Some(g);
        }
        if let Some(p) = v["propagationPolicy"].as_str() {
            policy = Some(p.to_string());
        }
        if v["orphanDependents"].as_bool() == Some(true) {
            policy = Some("Orphan".into());
        }
        o.precondition_uid = v["preconditions"]["uid"].as_str().map(str::to_string);
        o.precondition_rv = v["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_string);
    }
    match policy.as_deref() {
        None | Some("Background" | "Foreground") => {}
        Some("Orphan") => o.orphan = true,
        Some(p) => {
            return Err(ApiError::bad_request(format!(
                "unknown propagationPolicy {p:?}: use Orphan, Background or Foreground"
            )));
        }
    }
    Ok(o)
}

fn strip_type(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    v
}

struct Selectors {
    label: LabelSelector,
    field: FieldSelector,
}

impl Selectors {
    fn parse(res: Res, q: &[(String, String)]) -> Result<Self, ApiError> {
        Ok(Self {
            label: LabelSelector::parse(qget(q, "labelSelector").unwrap_or(""))?,
            field: FieldSelector::parse(res, qget(q, "fieldSelector").unwrap_or(""))?,
        })
    }
    fn matches(&self, o: &Value) -> bool {
        self.label.matches(&labels_of(o)) && self.field.matches(o)
    }
}

fn selected(
    shared: &Shared,
    t: &Target,
    q: &[(String, String)],
) -> Result<Vec<Arc<Value>>, ApiError> {
    let sel = Selectors::parse(t.res, q)?;
    Ok(shared
        .store()
        .list(t.res, t.ns.as_deref())
        .into_iter()
        .filter(|o| sel.matches(o))
        .collect())
}

fn list(shared: &Shared, t: &Target, q: &[(String, String)]) -> Result<Response<Body>, ApiError> {
    if let Some(full) = t.table {
        let objs = selected(shared, t, q)?;
        let refs: Vec<&Value> = objs.iter().map(|o| &**o).collect();
        let rv = shared.store().current_rv();
        return Ok(json_response(200, &table::table(t.res, &refs, rv, full)));
    }
    let items: Vec<Value> = selected(shared, t, q)?
        .iter()
        .map(|o| strip_type(o))
        .collect();
    let rv = shared.store().current_rv();
    Ok(json_response(
        200,
        &json!({"kind": format!("{}List", t.res.kind()), "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    ))
}

fn event_line(kind: &str, obj: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": obj}).to_string();
    s.push('\n');
    Bytes::from(s)
}

/// The wire event for a change as seen through selectors (MODIFIED may become ADDED/DELETED).
fn filtered(change: &Change, t: &Target, sel: &Selectors) -> Option<Bytes> {
    if change.res != t.res || t.ns.as_deref().is_some_and(|ns| ns != change.namespace) {
        return None;
    }
    let now = sel.matches(&change.object);
    let before = change.prev.as_ref().is_some_and(|p| sel.matches(p));
    let kind = match (change.kind, before, now) {
        (EventType::Added, _, true) | (EventType::Modified, false, true) => "ADDED",
        (EventType::Modified, true, true) => "MODIFIED",
        (EventType::Modified, true, false)
        | (EventType::Deleted, true, _)
        | (EventType::Deleted, false, true) => "DELETED",
        _ => return None,
    };
    Some(object_line(kind, &change.object, t))
}

/// A watch event line; the object becomes a one-row Table when the client asked for tables.
fn object_line(kind: &str, obj: &Value, t: &Target) -> Bytes {
    match t.table {
        Some(full) => event_line(kind, &table::table(t.res, &[obj], 0, full)),
        None => event_line(kind, obj),
    }
}

fn bookmark(res: Res, rv: u64, initial_end: bool) -> Bytes {
    let mut md = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": res.kind(), "apiVersion": "v1", "metadata": md}),
    )
}

fn streaming_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn watch(
    shared: &Arc<Shared>,
    t: &Target,
    q: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let sel = Selectors::parse(t.res, q)?;
    let bookmarks = matches!(qget(q, "allowWatchBookmarks"), Some("true" | "1"));
    let initial_events = matches!(qget(q, "sendInitialEvents"), Some("true" | "1"));
    let timeout = match qget(q, "timeoutSeconds") {
        Some(s) => Some(Duration::from_secs(s.parse().map_err(|_| {
            ApiError::bad_request(format!("timeoutSeconds must be an integer, got {s:?}"))
        })?)),
        None => None,
    };
    let rv = match qget(q, "resourceVersion").filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("invalid resourceVersion {s:?}: must be an integer"))
        })?),
        None => None,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let mut initial: Vec<Bytes> = Vec::new();
    let mut gone = false;
    let (sub, start_rv) = {
        let st = shared.store();
        let sub = st.subscribe();
        let current = st.current_rv();
        match rv {
            Some(n) if n != 0 && !initial_events => {
                if n < st.floor() {
                    let e = ApiError::gone(format!(
                        "too old resource version: {n} ({})",
                        st.floor() + 1
                    ));
                    initial.push(event_line("ERROR", &e.to_status()));
                    gone = true;
                } else {
                    initial.extend(
                        st.history_after(n)
                            .iter()
                            .filter_map(|c| filtered(c, t, &sel)),
                    );
                }
            }
            _ => {
                for o in st
                    .list(t.res, t.ns.as_deref())
                    .iter()
                    .filter(|o| sel.matches(o))
                {
                    initial.push(object_line("ADDED", o, t));
                }
                if initial_events {
                    initial.push(bookmark(t.res, current, true));
                }
            }
        }
        (sub, current)
    };
    let t = t.clone();
    let mut gen_rx = shared.watch_gen.clone();
    gen_rx.borrow_and_update();
    let interval = shared.cfg.bookmark_interval;
    let stopping = shared.stopping.clone();
    tokio::spawn(async move {
        for b in initial {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        if gone {
            return;
        }
        let mut sub = sub;
        let mut last_rv = start_rv;
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        let deadline = tokio::time::Instant::now() + timeout.unwrap_or(Duration::from_hours(8760));
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = stopping.cancelled() => return,
                _ = gen_rx.changed() => return,
                () = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick(), if bookmarks => {
                    if tx.send(bookmark(t.res, last_rv, false)).await.is_err() { return; }
                }
                msg = sub.recv() => match msg {
                    Ok(change) => {
                        last_rv = last_rv.max(change.rv);
                        if let Some(line) = filtered(&change, &t, &sel)
                            && tx.send(line).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher that fell behind ends; clients re-list, as after an apiserver restart.
                    Err(_) => return,
                },
            }
        }
    });
    Ok(streaming_response(rx))
}

/// `GET pods/{name}/log` (see `podlog` for the parameters and how lines are stamped).
async fn logs(
    shared: &Arc<Shared>,
    ns: &str,
    name: &str,
    q: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let query = podlog::parse_query(q, std::time::SystemTime::now())?;
    let pod = api::get(shared, Res::Pods, ns, name)?;
    let names = api::container_names(&pod, "containers");
    let init_names = api::container_names(&pod, "initContainers");
    let container = match &query.container {
        Some(c) => c.clone(),
        None if names.len() == 1 => names[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )));
        }
    };
    if !names.contains(&container) && !init_names.contains(&container) {
        return Err(ApiError::bad_request(format!(
            "container {container} is not valid for pod {name}"
        )));
    }
    let handle = shared
        .pods
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(api::uid_of(&pod))
        .cloned();
    let waiting = || {
        ApiError::bad_request(format!(
            "container {container:?} in pod {name:?} is waiting to start: ContainerCreating"
        ))
    };
    let handle = handle.ok_or_else(waiting)?;
    if handle.container_started(&container) != Some(true) {
        return Err(waiting());
    }
    let path = handle.log_path(&container);
    let (len, _) = podlog::extent(&handle, &container);
    let data = read_range(&path, 0, len).await;
    let mut first = Vec::new();
    let mut renderer = podlog::with_marks(&handle, &container, |m| {
        let (mut r, from) = podlog::Renderer::start(&query, &data, m);
        r.render(&data[from..], from as u64, m, &mut first);
        r
    });
    let text_plain = |mut r: Response<Body>| {
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain"),
        );
        r
    };
    if !query.follow {
        return Ok(text_plain(Response::new(
            Full::new(Bytes::from(first)).boxed(),
        )));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut offset = data.len() as u64;
    let stopping = shared.stopping.clone();
    // Ends once the container stopped and everything it wrote is sent, or the client went away.
    tokio::spawn(async move {
        if !first.is_empty() && tx.send(Bytes::from(first)).await.is_err() {
            return;
        }
        loop {
            let (len, settled) = podlog::extent(&handle, &container);
            if len > offset {
                let more = read_range(&path, offset, len).await;
                if more.is_empty() {
                    // The pod's files are gone (deleted pod).
                    return;
                }
                let mut out = Vec::new();
                podlog::with_marks(&handle, &container, |m| {
                    renderer.render(&more, offset, m, &mut out);
                });
                offset += more.len() as u64;
                if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                    return;
                }
                continue;
            }
            if settled {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(podlog::SAMPLE_EVERY) => {}
                () = tx.closed() => return,
                () = stopping.cancelled() => return,
            }
        }
    });
    Ok(text_plain(streaming_response(rx)))
}

/// The bytes `[from, to)` of a file (fewer if it is shorter or gone).
async fn read_range(path: &std::path::Path, from: u64, to: u64) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if f.seek(std::io::SeekFrom::Start(from)).await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(to.saturating_sub(from)).read_to_end(&mut buf).await;
    buf
}

fn resource_entry(res: Res, sub: Option<&str>) -> Value {
    let name = sub.map_or_else(
        || res.plural().to_string(),
        |s| format!("{}/{s}", res.plural()),
    );
    let verbs: Vec<&str> = match sub {
        None if matches!(res, Res::Nodes | Res::Namespaces) => vec![
            "create", "delete", "get", "list", "patch", "update", "watch",
        ],
        None => vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ],
        Some("exec") => vec!["create", "get"],
        Some("log") => vec!["get"],
        Some(_) => vec!["get", "patch", "update"],
    };
    let mut e = json!({"name": name, "singularName": if sub.is_none() { res.kind().to_lowercase() } else { String::new() }, "namespaced": res.namespaced(), "kind": res.kind(), "verbs": verbs});
    if sub.is_none() {
        e["shortNames"] = json!(res.short_names());
        e["storageVersionHash"] = json!("emulator");
        if res == Res::Pods {
            e["categories"] = json!(["all"]);
        }
    }
    if sub == Some("exec") {
        e["kind"] = json!("PodExecOptions");
    }
    if sub == Some("log") {
        e["kind"] = json!("Pod");
    }
    e
}

fn discovery(path: &str) -> Option<Response<Body>> {
    let p = path.trim_end_matches('/');
    let doc = match p {
        "/version" => {
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.5-emulator", "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc", "platform": "linux/amd64"})
        }
        "/api" => {
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        }
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        "/api/v1" => {
            let mut resources = Vec::new();
            for r in Res::ALL {
                resources.push(resource_entry(r, None));
                if r == Res::Pods {
                    for s in ["exec", "log", "status"] {
                        resources.push(resource_entry(r, Some(s)));
                    }
                }
                if matches!(r, Res::Nodes | Res::Namespaces) {
                    resources.push(resource_entry(r, Some("status")));
                }
            }
            json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": resources})
        }
        "/healthz" | "/readyz" | "/livez" => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            return Some(r);
        }
        _ => return None,
    };
    Some(json_response(200, &doc))
}

/// `/emulator/...`: the fault knobs over HTTP, for the standalone binary.
#[allow(clippy::too_many_lines, reason = "one arm per control endpoint")]
async fn control(shared: &Arc<Shared>, req: Request<Incoming>, path: &str) -> Response<Body> {
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(&ApiError::bad_request(e.to_string())),
    };
    let v: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return error_response(&ApiError::bad_request(format!(
                    "control body must be JSON: {e}"
                )));
            }
        }
    };
    let f = &shared.faults;
    let secs = |k: &str| Duration::from_secs_f64(v[k].as_f64().unwrap_or(0.0));
    let op = path.trim_start_matches("/emulator/");
    match (method.as_str(), op) {
        ("GET", "audit") => {
            let a = shared
                .audit
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let items: Vec<Value> = a.iter().map(|e| json!({"verb": e.verb, "resource": e.resource, "subresource": e.subresource, "namespace": e.namespace, "name": e.name, "bearerToken": e.bearer_token, "code": e.code})).collect();
            return json_response(200, &json!({"items": items}));
        }
        ("POST", "fail-next") => f.fail_next(
            u32::try_from(v["count"].as_u64().unwrap_or(1)).unwrap_or(1),
            v["verb"].as_str(),
            v["resource"].as_str(),
            u16::try_from(v["status"].as_u64().unwrap_or(500)).unwrap_or(500),
            v["retryAfter"].as_u64().and_then(|s| u32::try_from(s).ok()),
        ),
        ("POST", "fail-ratio" | "fail-every") => {
            let statuses: Vec<u16> = v["statuses"].as_array().map_or_else(
                || vec![500],
                |a| {
                    a.iter()
                        .filter_map(|s| s.as_u64().and_then(|s| u16::try_from(s).ok()))
                        .collect()
                },
            );
            let n = |k: &str| u32::try_from(v[k].as_u64().unwrap_or(0)).unwrap_or(0);
            match (op, v["seed"].as_u64()) {
                ("fail-every", _) => f.fail_every(n("every"), &statuses),
                (_, Some(seed)) => f.fail_ratio_seeded(n("percent"), &statuses, seed),
                (_, None) => f.fail_ratio(n("percent"), &statuses),
            }
        }
        ("POST", "clear") => f.clear(),
        ("POST", "close-watches") => f.close_watches(),
        ("POST", "close-watches-every") => f.close_watches_every(secs("seconds")),
        ("POST", "cut-exec") => f.cut_execs_after(
            v["bytes"].as_u64().unwrap_or(0),
            u32::try_from(v["sessions"].as_u64().unwrap_or(1)).unwrap_or(1),
        ),
        ("POST", "preempt-node") => match v["name"].as_str() {
            Some(n) => f.preempt_node(n),
            None => {
                return error_response(&ApiError::bad_request(
                    "preempt-node needs {\"name\": NODE}",
                ));
            }
        },
        ("POST", "delay-scheduling") => f.delay_scheduling(secs("seconds")),
        ("POST", "delay-pulls") => f.delay_pulls(secs("seconds")),
        ("POST", "add-node") => {
            let Some(name) = v["name"].as_str() else {
                return error_response(&ApiError::bad_request(
                    "add-node needs {\"name\": NODE, \"spot\": bool}",
                ));
            };
            let mut spec = NodeSpec::gke(name, v["spot"].as_bool() == Some(true));
            if let Some(labels) = v["labels"].as_object() {
                for (k, l) in labels {
                    spec.labels
                        .insert(k.clone(), l.as_str().unwrap_or("").to_string());
                }
            }
            if let Some(taints) = v["taints"].as_array() {
                spec.taints = taints
                    .iter()
                    .map(|t| Taint {
                        key: t["key"].as_str().unwrap_or("").into(),
                        value: t["value"].as_str().unwrap_or("").into(),
                        effect: t["effect"].as_str().unwrap_or("NoSchedule").into(),
                    })
                    .collect();
            }
            f.add_node(spec);
        }
        _ => return error_response(&ApiError::page_not_found()),
    }
    json_response(200, &json!({"ok": true}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let t = parse_target("/api/v1/namespaces/ci/pods/p/exec")
            .unwrap()
            .unwrap();
        assert_eq!(
            (t.res, t.ns.as_deref(), t.name.as_deref(), t.sub.as_deref()),
            (Res::Pods, Some("ci"), Some("p"), Some("exec"))
        );
        let t = parse_target("/api/v1/namespaces/ci").unwrap().unwrap();
        assert_eq!((t.res, t.name.as_deref()), (Res::Namespaces, Some("ci")));
        let t = parse_target("/api/v1/pods").unwrap().unwrap();
        assert!(t.ns.is_none() && t.name.is_none());
        assert_eq!(
            parse_target("/api/v1/namespaces/ci/widgets")
                .unwrap_err()
                .code,
            404
        );
        assert_eq!(
            parse_target("/api/v1/namespaces/ci/pods/p/attach")
                .unwrap_err()
                .code,
            404
        );
        assert!(parse_target("/apis/apps/v1/deployments").unwrap().is_none());
    }
}
