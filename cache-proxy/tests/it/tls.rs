//! TLS on the S3 listener: clients that verify the certificate (the aws CLI and curl with a test CA,
//! as a runner with `Insecure = false` does) round-trip objects, plain HTTP is refused, and a
//! renewed certificate (cert-manager rewriting the files) is served without a restart.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{AK, BUCKET, Backend, Proxy, SK, noise};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (installed by .ci/install)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA, and a server certificate for 127.0.0.1 signed by it (serial `serial`).
fn issue(dir: &Path, serial: &str) {
    if !dir.join("ca.pem").exists() {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=spotrun test CA",
            ],
        );
    }
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "new.key",
            "-out",
            "new.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "new.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            serial,
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "new.crt",
        ],
    );
    // Like a Secret volume update: each file replaced whole.
    std::fs::rename(dir.join("new.key"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("new.crt"), dir.join("tls.crt")).unwrap();
}

/// The serial of the certificate the server presents now.
fn served_serial(addr: std::net::SocketAddr) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_verifies_round_trips_and_reloads() {
    let certs = tempfile::tempdir().unwrap();
    issue(certs.path(), "0x1001");
    let files = spotrun_cache_proxy::tls::TlsFiles {
        cert: certs.path().join("tls.crt"),
        key: certs.path().join("tls.key"),
    };
    let proxy = Proxy::start_with(Backend::Disk, move |s| {
        s.tls = Some(files);
        s.tls_reload_check = Duration::from_millis(200);
    })
    .await;
    let endpoint = format!("https://{}", proxy.addr);
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("in.bin"), noise(3 << 20, 8)).unwrap();
    let ca = certs.path().join("ca.pem");
    let aws = |args: &[&str]| {
        let mut c = Command::new("/usr/bin/aws");
        c.args([
            "--endpoint-url",
            &endpoint,
            "--region",
            "us-east-1",
            "--ca-bundle",
        ])
        .arg(&ca)
        .args(args)
        .current_dir(work.path())
        .env("AWS_ACCESS_KEY_ID", AK)
        .env("AWS_SECRET_ACCESS_KEY", SK)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
        c
    };
    let run = |mut c: Command| tokio::task::spawn_blocking(move || c.output().unwrap());
    let out = run(aws(&[
        "s3",
        "cp",
        "in.bin",
        &format!("s3://{BUCKET}/tls/in.bin"),
    ]))
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(aws(&[
        "s3",
        "cp",
        &format!("s3://{BUCKET}/tls/in.bin"),
        "out.bin",
    ]))
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(work.path().join("in.bin")).unwrap(),
        std::fs::read(work.path().join("out.bin")).unwrap()
    );
    // A presigned GET over https, verified against the CA (the runner's helper fetches these).
    let out = run(aws(&[
        "s3",
        "presign",
        &format!("s3://{BUCKET}/tls/in.bin"),
    ]))
    .await
    .unwrap();
    let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mut curl = Command::new("curl");
    curl.args(["-fsS", "--max-time", "30", "--cacert"])
        .arg(&ca)
        .args(["-o", "/dev/null", "-w", "%{http_code}", &url]);
    let out = run(curl).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    // Without the CA the certificate is refused; plain HTTP gets no S3 answer.
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "-o", "/dev/null", &url]);
    let out = run(curl).await.unwrap();
    assert!(
        !out.status.success(),
        "an unknown CA must fail verification"
    );
    let plain = url.replacen("https://", "http://", 1);
    let mut curl = Command::new("curl");
    curl.args([
        "-s",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &plain,
    ]);
    let out = run(curl).await.unwrap();
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200");

    // Renewal: new files, same listener.
    let addr = proxy.addr;
    assert_eq!(served_serial(addr), "serial=1001");
    issue(certs.path(), "0x2002");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let serial = tokio::task::spawn_blocking(move || served_serial(addr))
            .await
            .unwrap();
        if serial == "serial=2002" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still serving {serial} 20 s after renewal"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut curl = Command::new("curl");
    curl.args(["-fsS", "--max-time", "30", "--cacert"])
        .arg(&ca)
        .args(["-o", "/dev/null", "-w", "%{http_code}", &url]);
    let out = run(curl).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "after renewal");
    proxy.stop().await;
}
