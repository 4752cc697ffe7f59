//! `pods/exec` over WebSocket (v5.channel.k8s.io / v4.channel.k8s.io): the command runs inside
//! the container's mount and pid namespaces through nsenter, as the container's user (its
//! `securityContext` or image user); frames carry a channel byte.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, frame::coding::CloseCode};

use super::faults::ExecFault;
use super::kubelet::{ExecTargetError, ProcInfo};
use super::server::{Body, empty_body};
use super::status::ApiError;
use super::store::Res;
use super::{Shared, api};

/// How long a stalled exec session keeps its dead connection open.
const STALL_HOLD: Duration = Duration::from_secs(120);

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const CLOSE: u8 = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    V5,
    V4,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::V5 => "v5.channel.k8s.io",
            Proto::V4 => "v4.channel.k8s.io",
        }
    }
}

#[allow(
    clippy::struct_excessive_bools,
    reason = "mirrors the exec query flags"
)]
struct ExecRequest {
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

fn flag(q: &[(String, String)], k: &str) -> bool {
    q.iter()
        .any(|(n, v)| n == k && matches!(v.as_str(), "true" | "1" | "True"))
}

/// Checks the request, then answers 101 and runs the session on the upgraded connection.
#[allow(
    clippy::too_many_lines,
    reason = "the pre-upgrade checks in the apiserver's order"
)]
pub(crate) fn handle(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    ns: &str,
    name: &str,
    q: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let pod = api::get(shared, Res::Pods, ns, name)?;
    let er = ExecRequest {
        command: q
            .iter()
            .filter(|(k, _)| k == "command")
            .map(|(_, v)| v.clone())
            .collect(),
        stdin: flag(q, "stdin"),
        stdout: flag(q, "stdout"),
        stderr: flag(q, "stderr"),
        tty: flag(q, "tty"),
    };
    let names = api::container_names(&pod, "containers");
    let init_names = api::container_names(&pod, "initContainers");
    let container = match q
        .iter()
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.clone())
    {
        Some(c) => c,
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
    if er.command.is_empty() {
        return Err(ApiError::bad_request(
            "you must specify at least one command for the container",
        ));
    }
    if !(er.stdin || er.stdout || er.stderr) {
        return Err(ApiError::bad_request(
            "you must specify at least 1 of stdin, stdout, stderr",
        ));
    }
    let phase = pod["status"]["phase"].as_str().unwrap_or("");
    if matches!(phase, "Succeeded" | "Failed") {
        return Err(ApiError::bad_request(format!(
            "cannot exec into a container in a completed pod; current phase is {phase}"
        )));
    }
    let handle = shared
        .pods
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(api::uid_of(&pod))
        .cloned();
    let target = handle
        .ok_or_else(|| ExecTargetError::NotRunning(container.clone(), name.to_string()))
        .and_then(|h| h.exec_target(&container))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let upgrade = req
        .headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(ApiError::bad_request(format!(
            "Upgrade request required: this emulator serves exec over WebSocket (v5.channel.k8s.io, v4.channel.k8s.io) only, got Upgrade: {upgrade:?}"
        )));
    }
    let key = req
        .headers()
        .get("sec-websocket-key")
        .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key header"))?
        .as_bytes()
        .to_vec();
    let offered: Vec<String> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_string()))
        .collect();
    let proto = if offered.iter().any(|p| p == Proto::V5.name()) {
        Proto::V5
    } else if offered.iter().any(|p| p == Proto::V4.name()) {
        Proto::V4
    } else {
        return Err(ApiError::bad_request(format!(
            "no supported exec subprotocol among {offered:?}; use v5.channel.k8s.io or v4.channel.k8s.io"
        )));
    };
    let cut = shared.faults.take_exec_cut();
    let delay = shared.faults.exec_delay();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    let shared2 = shared.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if !delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shared2.stopping.cancelled() => return,
            }
        }
        tokio::select! {
            () = session(ws, proto, er, target, cut) => {}
            () = shared2.stopping.cancelled() => {}
        }
    });
    let mut resp = Response::new(empty_body());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).map_err(|e| ApiError::internal(e.to_string()))?,
    );
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(proto.name()),
    );
    Ok(resp)
}

/// Go's json.Marshal escapes these; the status bytes match the apiserver's.
fn go_escape(s: &str) -> String {
    s.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

fn json_str(s: &str) -> String {
    go_escape(&Value::String(s.to_string()).to_string())
}

/// The channel-3 Status for an exit code, byte-compatible with the apiserver (v5) or kubelet (v4).
fn exit_status(proto: Proto, argv: &[String], code: i32) -> String {
    if code == 0 {
        return r#"{"metadata":{},"status":"Success"}"#.to_string();
    }
    let message = match proto {
        Proto::V5 => format!(
            "command terminated with non-zero exit code: command terminated with exit code {code}"
        ),
        Proto::V4 => format!(
            "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
            argv.join(" ")
        ),
    };
    format!(
        r#"{{"metadata":{{}},"status":"Failure","message":{},"reason":"NonZeroExitCode","details":{{"causes":[{{"reason":"ExitCode","message":"{code}"}}]}}}}"#,
        json_str(&message)
    )
}

fn internal_status(err: &str) -> String {
    format!(
        r#"{{"metadata":{{}},"status":"Failure","message":{},"reason":"InternalError","details":{{"causes":[{{"message":{}}}]}},"code":500}}"#,
        json_str(&format!("Internal error occurred: {err}")),
        json_str(err)
    )
}

fn frame(ch: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(ch);
    v.extend_from_slice(data);
    Message::Binary(Bytes::from(v))
}

/// Copies a pipe into the session; once the session is gone it keeps draining so that
/// background processes still holding the pipe never get SIGPIPE.
fn pump(
    mut r: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    ch: u8,
    tx: mpsc::Sender<(u8, Bytes)>,
) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        let mut live = true;
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if live
                        && tx
                            .send((ch, Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                    {
                        live = false;
                    }
                }
            }
        }
    });
}

#[allow(
    clippy::too_many_lines,
    reason = "one select loop over output, stdin and exit"
)]
async fn session(
    ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    proto: Proto,
    er: ExecRequest,
    target: ProcInfo,
    cut: Option<ExecFault>,
) {
    let (mut sink, mut stream) = ws.split();
    let first = if er.stdout {
        STDOUT
    } else if er.stderr {
        STDERR
    } else {
        STATUS
    };
    if sink
        .send(Message::Binary(Bytes::from(vec![first])))
        .await
        .is_err()
    {
        return;
    }
    let pid = target.init_pid.unwrap_or(0).to_string();
    let mut cmd = tokio::process::Command::new("nsenter");
    cmd.args([
        "-t",
        &pid,
        "-m",
        "-p",
        "-r",
        &format!("--wd={}", target.working_dir),
    ]);
    // The container's user, without root's capabilities or supplementary groups (nsenter drops
    // them with -G), as a runtime starts an exec.
    if let Some((uid, gid)) = target.user {
        cmd.args(["-S", &uid.to_string(), "-G", &gid.to_string()]);
    }
    cmd.arg("--");
    cmd.args(&er.command);
    cmd.env_clear().envs(target.env.iter().map(|(k, v)| (k, v)));
    cmd.stdin(if er.stdin {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    });
    cmd.stdout(if er.stdout {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    });
    cmd.stderr(if er.stderr || er.tty {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    });
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = sink
                .send(frame(
                    STATUS,
                    internal_status(&format!("error executing command in container: {e}"))
                        .as_bytes(),
                ))
                .await;
            let _ = sink.close().await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<(u8, Bytes)>(64);
    if let Some(out) = child.stdout.take() {
        pump(out, STDOUT, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        pump(err, if er.tty { STDOUT } else { STDERR }, tx.clone());
    }
    drop(tx);
    let mut stdin = child.stdin.take();
    let (stdin_tx, mut stdin_rx) = mpsc::channel::<Option<Bytes>>(64);
    let reader = tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Binary(b)) if !b.is_empty() => match b[0] {
                    STDIN if stdin_tx.send(Some(b.slice(1..))).await.is_err() => {
                        return;
                    }
                    CLOSE if b.get(1) == Some(&STDIN) => {
                        let _ = stdin_tx.send(None).await;
                    }
                    _ => {}
                },
                Ok(Message::Close(_)) | Err(_) => break,
                _ => {}
            }
        }
        let _ = stdin_tx.send(None).await;
    });
    let mut sent: u64 = 0;
    let mut exit: Option<i32> = None;
    let mut outputs_open = true;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        let deadline = drain_deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_hours(24));
        tokio::select! {
            item = rx.recv(), if outputs_open => match item {
                Some((ch, data)) => {
                    if let Some(fault) = cut {
                        let (ExecFault::Cut(limit) | ExecFault::Stall(limit)) = fault;
                        let room = limit.saturating_sub(sent);
                        if (data.len() as u64) >= room {
                            let part = data.slice(..usize::try_from(room).unwrap_or(usize::MAX).min(data.len()));
                            if !part.is_empty() {
                                let _ = sink.send(frame(ch, &part)).await;
                            }
                            // Abrupt cut: no status frame, no close frame.
                            reader.abort();
                            if matches!(fault, ExecFault::Stall(_)) {
                                // A dead peer: hold the socket open without a frame or a pong
                                // (bounded, so a forgotten session cannot outlive a test run).
                                tokio::time::sleep(STALL_HOLD).await;
                                drop(sink);
                            }
                            return;
                        }
                    }
                    sent += data.len() as u64;
                    if sink.send(frame(ch, &data)).await.is_err() {
                        reader.abort();
                        return;
                    }
                }
                None => outputs_open = false,
            },
            input = stdin_rx.recv(), if stdin.is_some() => match input {
                Some(Some(bytes)) => {
                    if let Some(w) = stdin.as_mut()
                        && w.write_all(&bytes).await.is_err()
                    {
                        stdin = None;
                    }
                }
                _ => stdin = None,
            },
            status = child.wait(), if exit.is_none() => {
                use std::os::unix::process::ExitStatusExt as _;
                exit = Some(match status {
                    Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9)),
                    Err(_) => 1,
                });
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_millis(300));
            }
            () = tokio::time::sleep_until(deadline), if drain_deadline.is_some() => outputs_open = false,
        }
        if exit.is_some() && !outputs_open {
            break;
        }
    }
    reader.abort();
    let code = exit.unwrap_or(1);
    let _ = sink
        .send(frame(
            STATUS,
            exit_status(proto, &er.command, code).as_bytes(),
        ))
        .await;
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_bytes_match_the_fixtures() {
        assert_eq!(
            exit_status(Proto::V5, &[], 0),
            r#"{"metadata":{},"status":"Success"}"#
        );
        assert_eq!(
            exit_status(Proto::V5, &[], 3),
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: command terminated with exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
        );
        let argv: Vec<String> = ["sh", "-c", "cat; echo oops >&2; exit 3"]
            .iter()
            .map(|s| (*s).to_string())
            .collect();
        assert_eq!(
            exit_status(Proto::V4, &argv, 3),
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c cat; echo oops \u003e\u00262; exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
        );
    }
}
