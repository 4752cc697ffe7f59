//! One command in a container over the API's exec (websocket): stdout to a sink as it arrives,
//! stderr collected, and how it ended; a stream that goes silent or ends without a status is
//! reported as dropped, never as success.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How one exec ended.
#[derive(Debug)]
pub enum ExecEnd {
    /// The command finished and reported its status (Some(true) = success).
    Finished { success: bool, stderr: Vec<u8> },
    /// The stream broke: no status, silence, or the connection failed.
    Dropped(String),
}

/// Runs a command in a container; stdout goes to `sink` as it arrives.
pub async fn exec(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
    silence: Duration,
    sink: &mut (dyn FnMut(&[u8]) + Send),
) -> ExecEnd {
    let ap = AttachParams::default()
        .container(container)
        .stdin(stdin.is_some())
        .stdout(true)
        .stderr(true)
        .max_stdout_buf_size(64 * 1024)
        .max_stderr_buf_size(16 * 1024)
        .max_stdin_buf_size(64 * 1024);
    let connect = tokio::time::timeout(silence, pods.exec(pod, argv, &ap)).await;
    let mut proc = match connect {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return ExecEnd::Dropped(format!("exec connect: {e}")),
        Err(_) => return ExecEnd::Dropped("exec connect timed out".into()),
    };
    let status = proc.take_status();
    let (Some(mut out), Some(mut err)) = (proc.stdout(), proc.stderr()) else {
        return ExecEnd::Dropped("exec streams missing".into());
    };
    let writer = match (stdin, proc.stdin()) {
        (Some(data), Some(mut w)) => Some(tokio::spawn(async move {
            let _ = w.write_all(&data).await;
            let _ = w.shutdown().await;
        })),
        _ => None,
    };
    let mut obuf = vec![0u8; 64 * 1024];
    let mut ebuf = vec![0u8; 8 * 1024];
    let mut stderr = Vec::new();
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        tokio::select! {
            r = out.read(&mut obuf), if out_open => match r {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => sink(&obuf[..n]),
            },
            r = err.read(&mut ebuf), if err_open => match r {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => stderr.extend_from_slice(&ebuf[..n]),
            },
            () = tokio::time::sleep(silence) => {
                proc.abort();
                return ExecEnd::Dropped(format!("exec stream silent for {} s", silence.as_secs()));
            }
        }
    }
    if let Some(w) = writer {
        w.abort();
    }
    let Some(status) = status else {
        return ExecEnd::Dropped("exec status channel missing".into());
    };
    match tokio::time::timeout(silence, status).await {
        Ok(Some(s)) => ExecEnd::Finished {
            success: s.status.as_deref() == Some("Success"),
            stderr,
        },
        // No status frame: the stream ended abnormally. Never read this as success.
        Ok(None) => ExecEnd::Dropped("exec stream ended without a status".into()),
        Err(_) => ExecEnd::Dropped("exec status did not arrive".into()),
    }
}
