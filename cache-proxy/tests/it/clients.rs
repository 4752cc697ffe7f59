//! Real S3 clients against the proxy, as users run them: the aws CLI, rclone, s3cmd and boto3
//! (installed by `.ci/install`). Each drives a script in `tests/clients/` that exits non-zero
//! naming the first check that failed.

use std::path::Path;
use std::time::Duration;

use crate::common::{AK, BUCKET, Backend, Proxy, SK};

async fn run_client(program: &str, script: &str, backend: Backend) {
    let proxy = Proxy::start(backend).await;
    let work = tempfile::tempdir().unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(&path)
        .current_dir(work.path())
        .env("ENDPOINT", proxy.endpoint())
        .env("BUCKET", BUCKET)
        .env("AWS_ACCESS_KEY_ID", AK)
        .env("AWS_SECRET_ACCESS_KEY", SK)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("HOME", work.path())
        // A CA bundle for TLS is irrelevant on loopback HTTP, and rclone refuses to start with one.
        .env_remove("AWS_CA_BUNDLE")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(150), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within 150 s"))
        .unwrap_or_else(|e| panic!("{program} {script}: {e} (installed by .ci/install)"));
    assert!(
        out.status.success(),
        "{script} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_everyday_commands() {
    run_client("bash", "aws.sh", Backend::Disk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rclone_multipart_copy_check_delete() {
    run_client("bash", "rclone.sh", Backend::Disk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3cmd_multipart_put_get_ls_del() {
    run_client("bash", "s3cmd.sh", Backend::Disk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_transfers_listings_and_conditions() {
    run_client("python3", "boto3_flow.py", Backend::S3s).await;
}
