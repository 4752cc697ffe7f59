//! Bad requests get Kubernetes-shaped Status errors with the right reason and code.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom"
)]

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

use super::emulator_support::{gke, pod, raw, sleeper, wait_running};

struct Case {
    what: &'static str,
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    code: u16,
    reason: &'static str,
    message_has: &'static str,
}

fn case(
    what: &'static str,
    method: &'static str,
    path: &str,
    body: &Value,
    code: u16,
    reason: &'static str,
    message_has: &'static str,
) -> Case {
    Case {
        what,
        method,
        path: path.to_string(),
        content_type: Some("application/json"),
        body: body.to_string().into_bytes(),
        code,
        reason,
        message_has,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_status_errors() {
    let emu = gke().await;
    let client = emu.client().await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(
        &PostParams::default(),
        &pod("exists", &json!([sleeper("build")])),
    )
    .await
    .unwrap();
    let running = wait_running(&pods, "exists").await;
    let rv = running.metadata.resource_version.clone().unwrap();
    let p = "/api/v1/namespaces/ci-jobs/pods";
    let ok_pod = |name: &str| json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    let mut stale = running.clone();
    stale.metadata.resource_version = Some("1".into());
    let mut cases = vec![
        Case {
            what: "malformed JSON",
            method: "POST",
            path: p.into(),
            content_type: Some("application/json"),
            body: b"{not json".to_vec(),
            code: 400,
            reason: "BadRequest",
            message_has: "JSON",
        },
        case(
            "bad name",
            "POST",
            p,
            &ok_pod("Bad_Name"),
            422,
            "Invalid",
            "metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain",
        ),
        case(
            "missing image",
            "POST",
            p,
            &json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c"}]}}),
            422,
            "Invalid",
            "spec.containers[0].image: Required value",
        ),
        case(
            "missing containers",
            "POST",
            p,
            &json!({"metadata": {"name": "x"}, "spec": {}}),
            422,
            "Invalid",
            "spec.containers: Required value",
        ),
        case(
            "bad container name",
            "POST",
            p,
            &json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "C_1", "image": "b"}]}}),
            422,
            "Invalid",
            "spec.containers[0].name: Invalid value: \"C_1\"",
        ),
        case(
            "bad quantity",
            "POST",
            p,
            &json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "b", "resources": {"requests": {"cpu": "lots"}}}]}}),
            422,
            "Invalid",
            "spec.containers[0].resources.requests[cpu]: Invalid value: \"lots\": quantities must match",
        ),
        case(
            "bad label value",
            "POST",
            p,
            &json!({"metadata": {"name": "x", "labels": {"a": "not ok!"}}, "spec": {"containers": [{"name": "c", "image": "b"}]}}),
            422,
            "Invalid",
            "metadata.labels[a]",
        ),
        case(
            "unknown volume",
            "POST",
            p,
            &json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "b", "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]}}),
            422,
            "Invalid",
            "spec.containers[0].volumeMounts[0].name: Not found: \"v\"",
        ),
        case(
            "duplicate create",
            "POST",
            p,
            &ok_pod("exists"),
            409,
            "AlreadyExists",
            "pods \"exists\" already exists",
        ),
        case(
            "namespace mismatch",
            "POST",
            p,
            &json!({"metadata": {"name": "x", "namespace": "default"}, "spec": {"containers": [{"name": "c", "image": "b"}]}}),
            400,
            "BadRequest",
            "does not match the namespace",
        ),
        case(
            "missing namespace",
            "POST",
            "/api/v1/namespaces/nope/pods",
            &ok_pod("x"),
            404,
            "NotFound",
            "namespaces \"nope\" not found",
        ),
        case(
            "unknown pod",
            "GET",
            &format!("{p}/ghost"),
            &Value::Null,
            404,
            "NotFound",
            "pods \"ghost\" not found",
        ),
        case(
            "unknown resource",
            "GET",
            "/api/v1/namespaces/ci-jobs/widgets",
            &Value::Null,
            404,
            "NotFound",
            "could not find the requested resource",
        ),
        case(
            "stale resourceVersion",
            "PUT",
            &format!("{p}/exists"),
            &serde_json::to_value(&stale).unwrap(),
            409,
            "Conflict",
            "the object has been modified",
        ),
        case(
            "name mismatch on update",
            "PUT",
            &format!("{p}/exists"),
            &ok_pod("other"),
            400,
            "BadRequest",
            "does not match the name on the URL",
        ),
        case(
            "bad label selector",
            "GET",
            &format!("{p}?labelSelector=a%20in%20b"),
            &Value::Null,
            400,
            "BadRequest",
            "unable to parse requirement",
        ),
        case(
            "unsupported field selector",
            "GET",
            &format!("{p}?fieldSelector=spec.bogus%3D1"),
            &Value::Null,
            400,
            "BadRequest",
            "field label not supported: spec.bogus",
        ),
        case(
            "method not allowed",
            "POST",
            &format!("{p}/exists"),
            &ok_pod("exists"),
            405,
            "MethodNotAllowed",
            "does not allow",
        ),
        case(
            "exec unknown container",
            "GET",
            &format!("{p}/exists/exec?command=ls&stdout=true&container=builder"),
            &Value::Null,
            400,
            "BadRequest",
            "container builder is not valid for pod exists",
        ),
        case(
            "exec unknown pod",
            "GET",
            &format!("{p}/ghost/exec?command=ls&stdout=true"),
            &Value::Null,
            404,
            "NotFound",
            "pods \"ghost\" not found",
        ),
        case(
            "exec without command",
            "GET",
            &format!("{p}/exists/exec?stdout=true"),
            &Value::Null,
            400,
            "BadRequest",
            "at least one command",
        ),
        case(
            "logs of unknown container",
            "GET",
            &format!("{p}/exists/log?container=nope"),
            &Value::Null,
            400,
            "BadRequest",
            "container nope is not valid for pod exists",
        ),
        case(
            "logs with a parameter the emulator does not implement",
            "GET",
            &format!("{p}/exists/log?container=build&previous=true"),
            &Value::Null,
            400,
            "BadRequest",
            "does not implement the pod log parameter \"previous\"",
        ),
        case(
            "logs with both sinceTime and sinceSeconds",
            "GET",
            &format!("{p}/exists/log?sinceSeconds=5&sinceTime=2026-01-01T00:00:00Z"),
            &Value::Null,
            400,
            "BadRequest",
            "at most one of sinceTime or sinceSeconds",
        ),
        case(
            "bad propagation policy",
            "DELETE",
            &format!("{p}/exists?propagationPolicy=Sideways"),
            &Value::Null,
            400,
            "BadRequest",
            "propagationPolicy",
        ),
    ];
    cases.push(Case {
        what: "apply patch",
        method: "PATCH",
        path: format!("{p}/exists"),
        content_type: Some("application/apply-patch+yaml"),
        body: b"metadata: {}".to_vec(),
        code: 415,
        reason: "UnsupportedMediaType",
        message_has: "apply-patch",
    });
    cases.push(Case {
        what: "patch of missing pod",
        method: "PATCH",
        path: format!("{p}/ghost"),
        content_type: Some("application/merge-patch+json"),
        body: b"{}".to_vec(),
        code: 404,
        reason: "NotFound",
        message_has: "ghost",
    });
    cases.push(Case {
        what: "malformed patch",
        method: "PATCH",
        path: format!("{p}/exists"),
        content_type: Some("application/json-patch+json"),
        body: b"{\"op\":1}".to_vec(),
        code: 400,
        reason: "BadRequest",
        message_has: "array of operations",
    });
    cases.push(Case {
        what: "stale rv in patch",
        method: "PATCH",
        path: format!("{p}/exists"),
        content_type: Some("application/merge-patch+json"),
        body: json!({"metadata": {"resourceVersion": "1", "labels": {"a": "b"}}})
            .to_string()
            .into_bytes(),
        code: 409,
        reason: "Conflict",
        message_has: "modified",
    });
    for c in &cases {
        let (code, body) = raw(&client, c.method, &c.path, c.content_type, &c.body).await;
        assert_eq!(code, c.code, "{}: {body}", c.what);
        assert_eq!(body["kind"], "Status", "{}: {body}", c.what);
        assert_eq!(body["apiVersion"], "v1", "{}", c.what);
        assert_eq!(body["status"], "Failure", "{}", c.what);
        assert_eq!(body["code"], c.code, "{}", c.what);
        assert_eq!(body["reason"], c.reason, "{}: {body}", c.what);
        let msg = body["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(c.message_has),
            "{}: message {msg:?} lacks {:?}",
            c.what,
            c.message_has
        );
    }
    // Details name the object for NotFound/AlreadyExists.
    let (_, body) = raw(&client, "GET", &format!("{p}/ghost"), None, b"").await;
    assert_eq!(body["details"], json!({"name": "ghost", "kind": "pods"}));
    // The pod is untouched by the failed writes.
    assert_eq!(
        pods.get("exists").await.unwrap().metadata.resource_version,
        Some(rv)
    );
    // A watch from a resourceVersion older than the history gets a 410 Expired ERROR event.
    assert_eq!(emu.panics(), 0, "no handler panicked");
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_old_resource_version_is_expired() {
    let mut cfg = spotrun_testkit::emulator::EmulatorConfig::gke();
    cfg.watch_history = 3;
    let emu = spotrun_testkit::emulator::Emulator::start(cfg)
        .await
        .unwrap();
    let client = emu.client().await;
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::default_namespaced(client.clone());
    for i in 0..6 {
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}})).unwrap(),
        )
        .await
        .unwrap();
    }
    let (code, _) = raw(
        &client,
        "GET",
        "/api/v1/namespaces/ci-jobs/configmaps?watch=true&resourceVersion=2&timeoutSeconds=1",
        None,
        b"",
    )
    .await;
    assert_eq!(code, 200);
    let req = http::Request::get(
        "/api/v1/namespaces/ci-jobs/configmaps?watch=true&resourceVersion=2&timeoutSeconds=1",
    )
    .body(Vec::new())
    .unwrap();
    let text = client.request_text(req).await.unwrap();
    let ev: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["code"], 410);
    assert_eq!(ev["object"]["reason"], "Expired");
    assert!(
        ev["object"]["message"]
            .as_str()
            .unwrap()
            .starts_with("too old resource version: 2")
    );
    // kube-rs's watcher recovers by re-listing.
    let api = cms.clone();
    let err = api
        .watch(&kube::api::WatchParams::default().timeout(1), "2")
        .await
        .unwrap();
    let first = futures::StreamExt::next(&mut Box::pin(err))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(first, kube::api::WatchEvent::Error(e) if e.code == 410));
    emu.shutdown().await;
}
