//! S3 request parsing and routing: arbitrary method, target, headers and body through the real router
//! (disk store) never panic and always get an HTTP answer; unsigned requests never reach the store.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use spotrun_cache_proxy::config::{AccessKey, HttpLimits, Settings, StoreChoice};
use spotrun_cache_proxy::metrics::Metrics;
use spotrun_cache_proxy::server::{AppState, router};

struct World {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            ops_listen: "127.0.0.1:0".parse().unwrap(),
            region: "us-east-1".into(),
            buckets: vec!["runner-cache".into()],
            durable_buckets: Vec::new(),
            access_keys: vec![AccessKey {
                id: "fuzz-key".into(),
                secret: "fuzz-secret".into(),
                buckets: Vec::new(),
                prefix: None,
            }],
            store: StoreChoice::Disk(dir.path().join("store")),
            spool_dir: dir.path().join("spool"),
            max_object_bytes: 1 << 20,
            http: HttpLimits::default(),
            gc_interval: None,
            gc_grace: Duration::from_hours(1),
            expire_unread: None,
            max_logical_bytes: None,
            expire_uploads: Duration::from_hours(7 * 24),
            tls: None,
            tls_reload_check: Duration::from_secs(10),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        let dedup = rt
            .block_on(spotrun_cache_proxy::open_dedup(&settings, metrics.clone()))
            .unwrap();
        let app = router(AppState::new(settings, dedup, metrics));
        World { rt, app, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    // Layout: "METHOD TARGET\nname: value\n...\n\nbody"
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(p) => (&data[..p], &data[p + 2..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split('\n');
    let first = lines.next().unwrap_or("");
    let (method, target) = first.split_once(' ').unwrap_or(("GET", first));
    let mut b = http::Request::builder().method(method).uri(target);
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            b = b.header(k.trim(), v.trim());
        }
    }
    let Ok(req) = b.body(Body::from(body.to_vec())) else {
        return;
    };
    let path = req.uri().path().to_owned();
    let w = world();
    let resp = w
        .rt
        .block_on(tower::ServiceExt::oneshot(w.app.clone(), req))
        .expect("the router is infallible");
    let status = resp.status();
    // Without a valid signature nothing succeeds (the operations endpoints are on their own
    // listener, not this router).
    assert!(
        !status.is_success(),
        "an unsigned request succeeded: {method} {target} -> {status} ({path})"
    );
    let _ = w.rt.block_on(resp.into_body().collect());
});
