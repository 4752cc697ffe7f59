//! Services as users of GitLab's Kubernetes executor expect them (issue 17, item 1): job
//! variables, the build volumes, the `HEALTHCHECK_TCP_PORT` wait, a stopped service reported
//! at once with its last log lines, and `CI_DEBUG_SERVICES`.

use spotrun_testkit::harness::{JobBuilder, JobResult, Service};

use crate::support::Env;

/// A stand-in for the postgres image's entrypoint: refuses to start without a password (as
/// `docker-entrypoint.sh` does), records what it saw on the build volume, then listens on
/// `$HEALTHCHECK_TCP_PORT` after `$START_DELAY` seconds.
const POSTGRES_LIKE: &str = r#"if [ -z "$POSTGRES_PASSWORD" ]; then
  echo "Error: Database is uninitialized and superuser password is not specified." >&2
  echo "       You must specify POSTGRES_PASSWORD to a non-empty value for the superuser." >&2
  exit 1
fi
printf '%s|%s|%s|%s\n' "$POSTGRES_PASSWORD" "$POSTGRES_DB" "${SECRET_TOKEN:-no-secret}" "${CI_JOB_TOKEN:-no-job-token}" > /builds/db-saw.txt
exec python3 -c "import socket,time; time.sleep(float('${START_DELAY:-0}')); s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int('$HEALTHCHECK_TCP_PORT'))); s.listen(); time.sleep(300)"
"#;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// One connection attempt, no retry: passes only if the service already listens.
fn connect_once(port: u16) -> String {
    format!(
        "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('port-{port}-open')\""
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_style_service_starts_with_a_job_variable_and_sees_the_build_volume() {
    let env = Env::start("").await;
    let port = free_port();
    let job = JobBuilder::new(5101)
        .variable("POSTGRES_PASSWORD", "pw")
        .masked_variable("SECRET_TOKEN", "s3cr3t-token-value")
        .service(
            Service::new("postgres:16", "db")
                .entrypoint(&["sh", "-c", POSTGRES_LIKE])
                .variable("HEALTHCHECK_TCP_PORT", &port.to_string())
                .variable("POSTGRES_DB", "app-$CI_JOB_ID"),
        )
        .script(&["cat /builds/db-saw.txt", &connect_once(port)])
        .build();
    let out = env.runner().run(&job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    // The job variable, the service's own (expanded by the runner), no secret, no job token.
    assert!(
        out.log.contains("pw|app-5101|no-secret|no-job-token"),
        "{}",
        out.log
    );
    assert!(
        out.log.contains(&format!("port-{port}-open")),
        "{}",
        out.log
    );
    assert!(
        out.log
            .contains("Waiting for services to be up and running (timeout 30 seconds)..."),
        "{}",
        out.log
    );
    assert!(!out.log.contains("probably didn't start"), "{}", out.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_port_opening_after_two_seconds_is_waited_for() {
    let env = Env::start("").await;
    let port = free_port();
    let job = JobBuilder::new(5102)
        .variable("POSTGRES_PASSWORD", "pw")
        .service(
            Service::new("postgres:16", "slow")
                .entrypoint(&["sh", "-c", POSTGRES_LIKE])
                .variable("START_DELAY", "2")
                .variable("HEALTHCHECK_TCP_PORT", &port.to_string()),
        )
        .script(&[&connect_once(port)])
        .build();
    let out = env.runner().run(&job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(
        out.log.contains(&format!("port-{port}-open")),
        "{}",
        out.log
    );
    assert!(
        out.log
            .contains("Waiting for services to be up and running"),
        "{}",
        out.log
    );
    assert!(!out.log.contains("probably didn't start"), "{}", out.log);
    assert!(
        env.events().iter().any(|e| e["event"] == "services_ready"),
        "no services_ready event"
    );
}

/// A service that exits: reported during prepare with its exit code, reason and last log lines,
/// its health check ends at once, and the job goes on, as with the Kubernetes executor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_service_is_reported_at_once_with_its_log_lines() {
    // A long service wait: the health check must end because the service stopped (the line
    // naming its exit), not because the wait ran out ("nothing listens").
    let env = Env::start("[services]\nwait_for_services_timeout = 120\n").await;
    let port = free_port();
    let job = JobBuilder::new(5103)
        .service(
            Service::new("postgres:16", "db")
                .entrypoint(&["sh", "-c", POSTGRES_LIKE])
                .variable("HEALTHCHECK_TCP_PORT", &port.to_string()),
        )
        .script(&["echo job-ran-without-db"])
        .build();
    let out = env.runner().run(&job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    let log = &out.log;
    assert!(
        log.contains("WARNING: Service svc-db (postgres:16) exited with code 1 (Error)"),
        "{log}"
    );
    assert!(
        log.contains("[service:svc-db] Error: Database is uninitialized and superuser password is not specified."),
        "{log}"
    );
    assert!(
        log.contains("*** WARNING: Service svc-db probably didn't start properly."),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "service svc-db exited with code 1 (Error) before TCP port {port} opened"
        )),
        "{log}"
    );
    assert!(!log.contains("nothing listens"), "{log}");
    assert!(log.contains("job-ran-without-db"), "{log}");
}

/// A service that says one thing at start-up, one when the build script asks and one when the
/// after script asks (marker files on the shared build volume), then idles; and one that says a
/// line and exits during the build script.
const CHATTY: &str = "echo svc-starting-up; until [ -e /builds/mid ]; do sleep 0.05; done; echo svc-during-build; until [ -e /builds/late ]; do sleep 0.05; done; echo svc-during-after; exec sleep 60";
const QUICK: &str = "until [ -e /builds/mid ]; do sleep 0.05; done; echo quick-says-bye";

fn debug_services_job(id: u64, debug: Option<&str>) -> spotrun_testkit::harness::JobSpec {
    let mut job = JobBuilder::new(id)
        .service(Service::new("python:3.13", "svc").entrypoint(&["sh", "-c", CHATTY]))
        .service(
            Service::new("registry.example.com:5000/tools/quick:1", "")
                .entrypoint(&["sh", "-c", QUICK]),
        )
        .script(&["touch /builds/mid", "sleep 1", "echo build-done"])
        .after_script(&["touch /builds/late", "sleep 1", "echo after-done"]);
    if let Some(v) = debug {
        job = job.variable("CI_DEBUG_SERVICES", v);
    }
    job.build()
}

/// Issue 17 item 1: with `CI_DEBUG_SERVICES`, each service's log is in the job log, every line
/// once, prefixed `[service:<image>-<alias>]` and stamped: the start-up line and the build-time
/// lines in the build script, the after-script line in the after script. A service that exits
/// ends its copy quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_services_copies_each_service_line_into_the_job_log_once() {
    let env = Env::start("").await;
    let out = env
        .runner()
        .run(&debug_services_job(5104, Some("true")))
        .await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    let log = &out.log;
    let line_of = |text: &str| -> (usize, &str) {
        let found: Vec<(usize, &str)> = log
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains(text))
            .collect();
        assert_eq!(found.len(), 1, "{text} once:\n{log}");
        found[0]
    };
    let index_of = |text: &str| {
        log.lines()
            .position(|l| l.contains(text))
            .unwrap_or_else(|| panic!("{text}:\n{log}"))
    };
    for (text, label) in [
        ("svc-starting-up", "python-svc"),
        ("svc-during-build", "python-svc"),
        ("svc-during-after", "python-svc"),
        ("quick-says-bye", "registry.example.com:5000/tools/quick"),
    ] {
        let (_, line) = line_of(text);
        let rest = line
            .strip_prefix(&format!("[service:{label}] "))
            .unwrap_or_else(|| panic!("{line:?} has the prefix of {label}"));
        let (stamp, said) = rest.split_once(' ').unwrap();
        assert!(
            stamp.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
            "{line:?}"
        );
        assert_eq!(said, text);
    }
    // Each line in the stage that ran when the service said it.
    let build = index_of("$ touch /builds/mid");
    let after = index_of("$ touch /builds/late");
    assert!(
        index_of("svc-starting-up") < index_of("build-done"),
        "{log}"
    );
    assert!(build < index_of("svc-during-build"), "{log}");
    assert!(index_of("svc-during-build") < after, "{log}");
    assert!(build < index_of("quick-says-bye"), "{log}");
    assert!(after < index_of("svc-during-after"), "{log}");
    assert!(!log.contains("is not shown from here on"), "{log}");
    assert!(
        !env.events()
            .iter()
            .any(|e| e["event"] == "service_log_failed"),
        "a copy failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_debug_services_no_service_line_reaches_the_job_log() {
    let env = Env::start("").await;
    for (id, value) in [(5105, None), (5106, Some("false"))] {
        let out = env.runner().run(&debug_services_job(id, value)).await;
        assert_eq!(out.result, JobResult::Success, "{}", out.log);
        assert!(out.log.contains("after-done"), "{}", out.log);
        for text in [
            "svc-starting-up",
            "svc-during-build",
            "svc-during-after",
            "quick-says-bye",
            "[service:",
        ] {
            assert!(
                !out.log.contains(text),
                "{text} with {value:?}:\n{}",
                out.log
            );
        }
    }
}
