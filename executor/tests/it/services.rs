//! Services as users of GitLab's Kubernetes executor expect them (issue 17, item 1): job
//! variables, the build volumes, the `HEALTHCHECK_TCP_PORT` wait, and a stopped service reported
//! at once with its last log lines.

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
