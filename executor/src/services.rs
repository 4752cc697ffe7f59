//! The job's services during `prepare`: a stopped service is reported at once with its last log
//! lines, and the TCP ports services declare are waited for, as the Kubernetes executor does.
//!
//! The port wait needs no program in the pod beyond `sh`: every container of a pod shares one
//! network namespace, so `/proc/net/tcp{,6}` read from the helper lists the services' listening
//! sockets. The exit report needs no `pods/log` either (only `CI_DEBUG_SERVICES` does, in
//! `stage::service_logs`): services carry `terminationMessagePolicy: FallbackToLogsOnError`, so a
//! failed one's last log lines are in its status.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use serde_json::json;

use crate::Ctx;
use crate::kubeapi::Kube;
use crate::plan::HELPER_CONTAINER;
use crate::podstate::{self, EXEC_CONTAINERS, ServiceExit};
use crate::prepare::say;

/// The job variable naming the port a service is waited for on (GitLab's service health check).
pub const HEALTHCHECK_VAR: &str = "HEALTHCHECK_TCP_PORT";

/// Prints the local ports of listening TCP sockets (hex) in the pod's network namespace; POSIX sh
/// builtins only.
const LISTENING_SCRIPT: &str = "for f in /proc/net/tcp /proc/net/tcp6; do [ -r \"$f\" ] || continue; while read -r _ l _ s _; do [ \"$s\" = 0A ] && printf '%s\\n' \"${l##*:}\"; done < \"$f\"; done; exit 0";

/// The job-log lines reporting a stopped service.
#[must_use]
pub fn exit_report(e: &ServiceExit) -> Vec<String> {
    let reason = if e.reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", e.reason)
    };
    let mut lines = vec![format!(
        "WARNING: Service {} ({}) exited with code {}{reason}; the job continues without it, as with the Kubernetes executor.",
        e.container, e.image, e.exit_code
    )];
    let message = e.message.trim_end();
    if message.is_empty() {
        lines.push(format!("[service:{}] (no log output)", e.container));
    } else {
        lines.push(format!("Last log lines of service {}:", e.container));
        lines.extend(
            message
                .lines()
                .map(|l| format!("[service:{}] {l}", e.container)),
        );
    }
    lines
}

/// Prints the exit report of every stopped service not reported yet.
pub fn report_exits(ctx: &Ctx, exits: &[ServiceExit], reported: &mut BTreeSet<String>) {
    for exit in exits {
        if reported.insert(exit.container.clone()) {
            ctx.events.warn(
                "service_exited",
                json!({ "container": exit.container, "exit_code": exit.exit_code, "reason": exit.reason }),
            );
            for line in exit_report(exit) {
                say(&line);
            }
        }
    }
}

/// Service containers and the TCP ports each is waited for on: `HEALTHCHECK_TCP_PORT` in its env
/// and its declared `ports`, read from the pod spec the plan built.
pub fn wanted_ports(pod: &Pod) -> Result<Vec<(String, Vec<u16>)>, String> {
    let mut out = Vec::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        if EXEC_CONTAINERS.contains(&c.name.as_str()) {
            continue;
        }
        let mut ports: Vec<u16> = Vec::new();
        for e in c.env.iter().flatten().filter(|e| e.name == HEALTHCHECK_VAR) {
            // The plan doubled every `$` for the kubelet; a port has none, so this is the value.
            let v = e.value.clone().unwrap_or_default();
            let port: u16 = v.trim().parse().ok().filter(|p| *p > 0).ok_or_else(|| {
                format!(
                    "service {}: {HEALTHCHECK_VAR}={v:?} is not a TCP port (1-65535)",
                    c.name
                )
            })?;
            ports.push(port);
        }
        for p in c.ports.iter().flatten() {
            if let Ok(p) = u16::try_from(p.container_port) {
                if p > 0 && !ports.contains(&p) {
                    ports.push(p);
                }
            }
        }
        if !ports.is_empty() {
            out.push((c.name.clone(), ports));
        }
    }
    Ok(out)
}

/// The ports with a listening socket in `/proc/net/tcp`-style output (one hex port per line).
#[must_use]
pub fn listening_ports(text: &str) -> BTreeSet<u16> {
    text.lines()
        .filter_map(|l| u16::from_str_radix(l.trim(), 16).ok())
        .collect()
}

/// Waits (bounded by `services.wait_for_services_timeout`) until every wanted port listens; a
/// service that does not make it gets the Kubernetes executor's warning, and the job goes on.
///
/// `reported` holds the services whose exit the job log already shows; one that stops now is
/// reported the same way.
pub async fn wait_for_services(
    ctx: &Ctx,
    kube: &Kube,
    pods: &Api<Pod>,
    name: &str,
    pod: &Pod,
    reported: &mut BTreeSet<String>,
) {
    let timeout = ctx.settings.services.wait_for_services_timeout;
    let wanted = match wanted_ports(pod) {
        Ok(w) => w,
        Err(e) => {
            say(&format!("WARNING: {e}; the service is not waited for"));
            return;
        }
    };
    if wanted.is_empty() || timeout == 0 {
        // No wait, but one last look: a service that stopped since the pod ran is still news.
        if let Ok(Some(p)) = kube.call("get pod", || pods.get_opt(name)).await {
            report_exits(ctx, &podstate::exited_services(&p), reported);
        }
        return;
    }
    say(&format!(
        "Waiting for services to be up and running (timeout {timeout} seconds)..."
    ));
    let silence = Duration::from_secs(ctx.settings.timeouts.exec_silence_seconds);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let mut pause = Duration::from_millis(200);
    let mut last_error = String::new();
    let mut pending = wanted;
    let mut failed: Vec<(String, Vec<u16>, Option<ServiceExit>)> = Vec::new();
    loop {
        let mut out = Vec::new();
        let mut sink = |b: &[u8]| out.extend_from_slice(b);
        let end = crate::stage::exec(
            pods,
            name,
            HELPER_CONTAINER,
            vec!["sh".into(), "-c".into(), LISTENING_SCRIPT.into()],
            None,
            silence,
            &mut sink,
        )
        .await;
        match end {
            crate::stage::ExecEnd::Finished { success: true, .. } => {
                let open = listening_ports(&String::from_utf8_lossy(&out));
                pending.retain(|(_, ports)| !ports.iter().any(|p| open.contains(p)));
                last_error.clear();
            }
            crate::stage::ExecEnd::Finished { stderr, .. } => {
                last_error = format!(
                    "the port check failed in the helper: {}",
                    String::from_utf8_lossy(&stderr).trim()
                );
            }
            crate::stage::ExecEnd::Dropped(e) => last_error = e,
        }
        // A stopped service will not open its port: report it now, not at the timeout.
        if !pending.is_empty() {
            if let Ok(Some(p)) = kube.call("get pod", || pods.get_opt(name)).await {
                let exits = podstate::exited_services(&p);
                report_exits(ctx, &exits, reported);
                pending.retain(
                    |(c, ports)| match exits.iter().find(|e| &e.container == c) {
                        Some(e) => {
                            failed.push((c.clone(), ports.clone(), Some(e.clone())));
                            false
                        }
                        None => true,
                    },
                );
            }
        }
        if pending.is_empty() || tokio::time::Instant::now() + pause >= deadline {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
    failed.extend(pending.into_iter().map(|(c, p)| (c, p, None)));
    if failed.is_empty() {
        ctx.events.info("services_ready", json!({}));
        return;
    }
    for (container, ports, exit) in &failed {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        ctx.events.warn(
            "service_not_ready",
            json!({ "container": container, "ports": list }),
        );
        say(&format!(
            "*** WARNING: Service {container} probably didn't start properly."
        ));
        say("");
        say("Health check error:");
        match exit {
            Some(e) => say(&format!(
                "service {container} exited with code {} ({}) before TCP port {} opened; its last log lines are above",
                e.exit_code,
                e.reason,
                list.join(", ")
            )),
            None if !last_error.is_empty() => say(&format!(
                "no answer on TCP port {} within {timeout} s ({last_error})",
                list.join(", ")
            )),
            None => say(&format!(
                "nothing listens on TCP port {} after {timeout} s",
                list.join(", ")
            )),
        }
        say("");
        say("*********");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, EnvVar, PodSpec};

    fn svc(name: &str, env: &[(&str, &str)], ports: &[i32]) -> Container {
        Container {
            name: name.into(),
            env: Some(
                env.iter()
                    .map(|(k, v)| EnvVar {
                        name: (*k).into(),
                        value: Some((*v).into()),
                        value_from: None,
                    })
                    .collect(),
            ),
            ports: (!ports.is_empty()).then(|| {
                ports
                    .iter()
                    .map(|p| ContainerPort {
                        container_port: *p,
                        ..ContainerPort::default()
                    })
                    .collect()
            }),
            ..Container::default()
        }
    }

    fn pod(containers: Vec<Container>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers,
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn ports_come_from_healthcheck_variable_and_declared_ports() {
        let p = pod(vec![
            svc("build", &[(HEALTHCHECK_VAR, "1")], &[]),
            svc(
                "db",
                &[("POSTGRES_PASSWORD", "pw"), (HEALTHCHECK_VAR, "5432")],
                &[],
            ),
            svc("web", &[], &[8080, 8443]),
            svc("plain", &[], &[]),
        ]);
        assert_eq!(
            wanted_ports(&p).unwrap(),
            vec![
                ("db".to_string(), vec![5432]),
                ("web".to_string(), vec![8080, 8443])
            ]
        );
        let bad = pod(vec![svc("db", &[(HEALTHCHECK_VAR, "abc")], &[])]);
        let e = wanted_ports(&bad).unwrap_err();
        assert!(
            e.contains("HEALTHCHECK_TCP_PORT=\"abc\"") && e.contains("db"),
            "{e}"
        );
    }

    #[test]
    fn listening_ports_parse_hex() {
        // 0x1538 = 5432, 0x0050 = 80; junk lines are ignored.
        let got = listening_ports("1538\n0050\n\nzz\n");
        assert_eq!(got.into_iter().collect::<Vec<_>>(), vec![80, 5432]);
    }

    #[test]
    fn the_listening_script_reads_proc_net_tcp_with_sh_only() {
        // The host's own table: whatever listens here must parse; the script must exit 0.
        let out = std::process::Command::new("sh")
            .args(["-c", LISTENING_SCRIPT])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let out = std::process::Command::new("sh")
            .args(["-c", LISTENING_SCRIPT])
            .output()
            .unwrap();
        assert!(
            listening_ports(&String::from_utf8_lossy(&out.stdout)).contains(&port),
            "{port} not in {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    #[test]
    fn exit_report_names_code_reason_and_last_lines() {
        let lines = exit_report(&ServiceExit {
            container: "db".into(),
            image: "postgres:16".into(),
            exit_code: 1,
            reason: "Error".into(),
            message: "initdb: error\nsuperuser password is not specified\n".into(),
        });
        assert!(
            lines[0].contains("db (postgres:16) exited with code 1 (Error)"),
            "{lines:?}"
        );
        assert_eq!(
            &lines[2..],
            [
                "[service:db] initdb: error",
                "[service:db] superuser password is not specified"
            ]
        );
    }
}
