//! The container image (Containerfile), built offline and run from its own root filesystem.
//!
//! No registry and no Docker engine are reachable where this runs, so the image is built from the
//! release binaries `./test.sh` builds (`--target prebuilt`, the same `base` stage as the published
//! image) with Debian's buildah (chroot isolation, vfs storage in a temporary root), exported as an
//! OCI layout and unpacked with umoci. Its binaries then run with `chroot --userspec` as the image's
//! user: no host library, no host file, no root.
//!
//! Needs buildah, umoci and busybox-static (apt, `.ci/install`), helm on PATH, and the static
//! release binaries (`cargo build --profile dist --locked --target <arch>-unknown-linux-musl -p
//! spotrun-executor -p spotrun-cache-proxy -p spotrun-launch`, which `./test.sh` runs first). Anything missing fails.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use serde_yaml::Value;
use spotrun_testkit::harness::CacheConfig;
use spotrun_testkit::logcapture;

use super::helm::{documents, render, repo_root};

/// Where the project publishes its image (the chart's default `spotrun.image.repository`).
const PUBLISHED_REPOSITORY: &str = "registry.gitlab.com/spotrun/spotrun";
/// The image's user and group (Containerfile `USER`, image/etc/passwd).
const IMAGE_UID: u32 = 65532;
/// The compressed size budget of all layers together.
const SIZE_BUDGET: u64 = 40 << 20;
/// The programs the image ships, in /usr/local/bin.
const BINARIES: [&str; 3] = ["spotrun-executor", "spotrun-cache-proxy", "spotrun-launch"];
/// Any single external command (buildah, umoci, a binary in the image) gets this long.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The crate version every artifact carries (`[workspace.package] version`).
pub(crate) fn workspace_version() -> String {
    let text = std::fs::read_to_string(repo_root().join("Cargo.toml")).expect("read Cargo.toml");
    let manifest: toml::Table = toml::from_str(&text).expect("Cargo.toml parses");
    manifest["workspace"]["package"]["version"]
        .as_str()
        .expect("[workspace.package] version is a string")
        .to_owned()
}

fn musl_target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

/// The static release binary `name`; fails saying how to build it.
fn release_binary(name: &str) -> PathBuf {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    let path = target_dir.join(musl_target()).join("dist").join(name);
    assert!(
        path.is_file(),
        "{} is missing: the image test runs the static release binaries; build them with \
         `cargo build --profile dist --locked --target {} -p spotrun-executor -p spotrun-cache-proxy -p spotrun-launch` \
         (./test.sh does this before the tests)",
        path.display(),
        musl_target()
    );
    path
}

/// Whether an ELF file names a program interpreter (`PT_INTERP`), i.e. needs a dynamic loader and
/// libraries, which a `scratch` image does not have. 64-bit little-endian ELF only.
fn is_dynamic(path: &Path) -> bool {
    let elf = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        elf.len() > 64 && elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([elf[o], elf[o + 1]]));
    let u64_at = |o: usize| {
        usize::try_from(u64::from_le_bytes(
            elf[o..o + 8].try_into().expect("8 bytes"),
        ))
        .expect("offset fits")
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes")) == 3
    })
}

/// A program on PATH (e.g. `buildah`), or a failure saying where it comes from.
fn host_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not on PATH: the image test needs buildah, umoci and busybox-static (`bash .ci/install` installs them)")
        })
}

/// Runs `cmd` to completion within `limit`, killing it past that; panics unless it succeeds.
fn run_ok(cmd: &mut Command, limit: Duration) -> Output {
    let out = run(cmd, limit);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` within `limit` (killed and failed past it), collecting its output.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    // Pipes are drained on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout piped");
    let mut stderr = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

/// A command run inside the image's root filesystem as its user, with an empty environment
/// (what the image sets, `PATH` and `SSL_CERT_FILE`, is added from its config).
fn in_image(rootfs: &Path, image_env: &[String], program: &str) -> Command {
    let mut cmd = Command::new(host_tool("chroot"));
    cmd.arg(format!("--userspec={IMAGE_UID}:{IMAGE_UID}"))
        .arg(rootfs)
        .arg(program)
        .env_clear();
    for kv in image_env {
        let (k, v) = kv.split_once('=').expect("image Env entries are KEY=value");
        cmd.env(k, v);
    }
    cmd
}

/// Where the container runtime finds `program` in the image: as given when it has a slash, else
/// through the image's PATH.
fn image_program(rootfs: &Path, env: &[String], program: &str) -> PathBuf {
    if program.contains('/') {
        return rootfs.join(program.trim_start_matches('/'));
    }
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .expect("the image sets PATH");
    path.split(':')
        .map(|dir| rootfs.join(dir.trim_start_matches('/')).join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not on the image's PATH {path}"))
}

/// The image built once for all checks: its OCI layout, unpacked root filesystem and config.
struct BuiltImage {
    _dir: tempfile::TempDir,
    rootfs: PathBuf,
    /// The manifest's digest: equal for equal inputs (reproducible build).
    digest: String,
    manifest: Json,
    config: Json,
}

/// Builds the `prebuilt` target of the Containerfile from the release binaries, exports it as an
/// OCI layout and unpacks it.
fn build_image(version: &str) -> BuiltImage {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctx = dir.path().join("context");
    // The build context: the Containerfile, image/ and rootfs/ (the root filesystem's programs and
    // data, as the `build` stage lays them out in /out).
    let dist = ctx.join("rootfs");
    for d in ["usr/local/bin", "bin", "etc/ssl/certs", "tmp"] {
        std::fs::create_dir_all(dist.join(d)).expect("mkdir dist");
    }
    std::fs::set_permissions(dist.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod tmp");
    for name in BINARIES {
        assert!(
            !is_dynamic(&release_binary(name)),
            "{name} needs a dynamic loader, which the image does not have"
        );
        std::fs::copy(release_binary(name), dist.join("usr/local/bin").join(name))
            .expect("copy binary");
    }
    // busybox-static as /bin/cp, as the build stage does (the chart's init container runs `cp`).
    let busybox = host_tool("busybox");
    assert!(
        !is_dynamic(&busybox),
        "{} is linked dynamically: install busybox-static (.ci/install)",
        busybox.display()
    );
    std::fs::copy(busybox, dist.join("bin/cp")).expect("copy busybox");
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        dist.join("etc/ssl/certs/ca-certificates.crt"),
    )
    .expect("copy the CA bundle (Debian ca-certificates)");
    std::fs::create_dir_all(ctx.join("image/etc")).expect("mkdir image/etc");
    for f in ["passwd", "group"] {
        std::fs::copy(
            repo_root().join("image/etc").join(f),
            ctx.join("image/etc").join(f),
        )
        .expect("copy image/etc");
    }
    std::fs::copy(repo_root().join("Containerfile"), ctx.join("Containerfile"))
        .expect("copy Containerfile");

    // A private buildah store (vfs: no overlay mounts left behind), removed with the tempdir.
    let buildah = |args: &[&str]| {
        let mut cmd = Command::new(host_tool("buildah"));
        cmd.arg("--root")
            .arg(dir.path().join("storage"))
            .arg("--runroot")
            .arg(dir.path().join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("TMPDIR", dir.path())
            .env("BUILDAH_ISOLATION", "chroot");
        cmd
    };
    let tag = "localhost/spotrun:image-test";
    run_ok(
        buildah(&["bud", "--isolation", "chroot", "--target", "prebuilt"])
            .args(["--timestamp", "0"])
            .args(["--build-arg", &format!("VERSION={version}")])
            .args(["--build-arg", "REVISION=0123456789abcdef"])
            .args(["-t", tag, "-f"])
            .arg(ctx.join("Containerfile"))
            .arg(&ctx),
        STEP_TIMEOUT,
    );
    let layout = dir.path().join("oci");
    run_ok(
        buildah(&["push", tag]).arg(format!("oci:{}:{version}", layout.display())),
        STEP_TIMEOUT,
    );
    run_ok(
        Command::new(host_tool("umoci"))
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:{version}", layout.display()))
            .arg(dir.path().join("bundle")),
        STEP_TIMEOUT,
    );

    let blob = |digest: &str| -> Json {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).expect("read blob");
        serde_json::from_slice(&bytes).expect("blob is JSON")
    };
    let index: Json =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index.json parses");
    let entry = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == version)
        .expect("the layout holds the tag");
    let manifest = blob(entry["digest"].as_str().expect("digest"));
    let config = blob(
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    );
    BuiltImage {
        digest: entry["digest"].as_str().expect("digest").to_owned(),
        rootfs: dir.path().join("bundle/rootfs"),
        _dir: dir,
        manifest,
        config,
    }
}

/// The proxy, started from the image; killed on drop.
struct ImageProxy {
    child: Child,
    s3: SocketAddr,
}

impl Drop for ImageProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One HTTP/1.1 exchange on loopback (`Connection: close`): status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("send head");
    s.write_all(body).expect("send body");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read response");
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response has a header block");
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("chunk size");
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// The config's `Env` (`KEY=value` strings).
fn image_env(config: &Json) -> Vec<String> {
    config["config"]["Env"]
        .as_array()
        .expect("config.Env")
        .iter()
        .map(|v| v.as_str().expect("Env entry").to_owned())
        .collect()
}

/// What `git rev-parse --short HEAD` says (the revision `--version` names), or `unknown`.
fn expected_revision() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The spotrun containers `helm template` renders with default values: (image, command).
fn chart_spotrun_containers() -> Vec<(String, Vec<String>)> {
    let docs = documents(&render(&[]));
    let mut found = Vec::new();
    for doc in &docs {
        // A Pod (the helm test) is its own spec; Deployments and Jobs keep the pod under
        // spec.template, CronJobs one level deeper.
        let pod = match doc["kind"].as_str() {
            Some("Pod") => &doc["spec"],
            Some("CronJob") => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => &doc["spec"]["template"]["spec"],
        };
        for list in ["initContainers", "containers"] {
            for c in pod[list].as_sequence().into_iter().flatten() {
                let image = c["image"].as_str().unwrap_or("").to_owned();
                if image.starts_with(&format!("{PUBLISHED_REPOSITORY}:")) {
                    let command = c["command"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .map(|a| a.as_str().unwrap_or("").to_owned())
                        .collect();
                    found.push((image, command));
                }
            }
        }
    }
    found
}

#[test]
fn image_builds_offline_and_its_binaries_run_from_its_rootfs_as_its_user() {
    assert_eq!(
        std::fs::metadata("/proc/self")
            .expect("stat /proc/self")
            .uid(),
        0,
        "the image test runs buildah (chroot isolation) and chroot --userspec, which need root \
         (CI runs as root)"
    );
    let version = workspace_version();
    let image = build_image(&version);
    let rootfs = &image.rootfs;
    // Reproducible: a second build from a freshly assembled context (new file times) in a new
    // store is the same image, digest for digest.
    assert_eq!(
        build_image(&version).digest,
        image.digest,
        "two builds of the same binaries differ"
    );

    // The image's config: the non-root user, the entrypoint, the OCI labels, the build time.
    let cfg = &image.config["config"];
    assert_eq!(cfg["User"], "65532:65532");
    assert_eq!(
        cfg["Entrypoint"],
        serde_json::json!(["/usr/local/bin/spotrun-cache-proxy"])
    );
    assert_eq!(cfg["Cmd"], serde_json::json!(["serve"]));
    let labels = &cfg["Labels"];
    for (key, want) in [
        (
            "org.opencontainers.image.source",
            "https://gitlab.com/spotrun/spotrun",
        ),
        ("org.opencontainers.image.version", version.as_str()),
        ("org.opencontainers.image.revision", "0123456789abcdef"),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
    ] {
        assert_eq!(labels[key], want, "label {key} in {labels}");
    }
    assert_eq!(
        image.config["created"], "1970-01-01T00:00:00Z",
        "--timestamp sets the build time"
    );
    assert_eq!(
        image.config["architecture"],
        match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        }
    );
    let passwd =
        std::fs::read_to_string(rootfs.join("etc/passwd")).expect("/etc/passwd in the image");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("spotrun:x:65532:65532:")),
        "{passwd}"
    );

    // Size budget: compressed layers, what a node pulls.
    let layers = image.manifest["layers"].as_array().expect("layers");
    let compressed: u64 = layers
        .iter()
        .map(|l| l["size"].as_u64().expect("layer size"))
        .sum();
    for l in layers {
        assert!(
            l["mediaType"].as_str().unwrap_or("").ends_with("tar+gzip"),
            "{l}"
        );
    }
    eprintln!(
        "image: {} layers, {:.1} MiB compressed (budget {} MiB)",
        layers.len(),
        f64::from(u32::try_from(compressed).expect("under 4 GiB")) / f64::from(1 << 20),
        SIZE_BUDGET >> 20
    );
    assert!(
        compressed <= SIZE_BUDGET,
        "image is {compressed} bytes compressed, budget {SIZE_BUDGET}"
    );

    // The CA bundle the TLS clients read (SSL_CERT_FILE): present and a real bundle.
    let env = image_env(&image.config);
    assert!(
        env.contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".to_owned()),
        "{env:?}"
    );
    let bundle = std::fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt"))
        .expect("CA bundle");
    assert!(
        bundle.matches("BEGIN CERTIFICATE").count() > 100,
        "CA bundle has too few certificates"
    );

    // --version of each program, from the image, as its user.
    let rev = expected_revision();
    for name in BINARIES {
        let out = run_ok(
            in_image(rootfs, &env, &format!("/usr/local/bin/{name}")).arg("--version"),
            STEP_TIMEOUT,
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{name} {version} (rev {rev}, {})\n", musl_target()),
            "{name} --version (a stale release build? ./test.sh rebuilds it)"
        );
    }

    // Every command the chart runs from this image exists in it; the chart's image is this one.
    let containers = chart_spotrun_containers();
    assert!(
        containers.len() >= 2,
        "the chart runs the spotrun image: {containers:?}"
    );
    for (img, command) in &containers {
        assert_eq!(img, &format!("{PUBLISHED_REPOSITORY}:{version}"));
        let program = image_program(rootfs, &env, &command[0]);
        let mode = std::fs::metadata(&program)
            .unwrap_or_else(|_| {
                panic!(
                    "the chart runs {command:?} but the image has no {}",
                    command[0]
                )
            })
            .permissions()
            .mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not executable for others: {mode:o}",
            command[0]
        );
    }
    // `helm test` starts each program of the image with --version: the same commands, here.
    let version_checks: Vec<&Vec<String>> = containers
        .iter()
        .map(|(_, c)| c)
        .filter(|c| c.len() == 2 && c[1] == "--version")
        .collect();
    assert_eq!(version_checks.len(), BINARIES.len(), "{containers:?}");
    for c in version_checks {
        run_ok(in_image(rootfs, &env, &c[0]).arg(&c[1]), STEP_TIMEOUT);
    }
    // The manager's init container, exactly as rendered: it copies the executor into a volume.
    let (_, install) = containers
        .iter()
        .find(|(_, c)| c.first().is_some_and(|p| p == "cp"))
        .expect("the chart's install-executor init container runs cp");
    let volume = rootfs.join(
        Path::new(&install[2])
            .parent()
            .expect("target dir")
            .strip_prefix("/")
            .expect("absolute"),
    );
    std::fs::create_dir_all(&volume).expect("mkdir the init container's volume");
    std::os::unix::fs::chown(&volume, Some(IMAGE_UID), Some(IMAGE_UID)).expect("chown volume");
    run_ok(
        in_image(rootfs, &env, &install[0]).args(&install[1..]),
        STEP_TIMEOUT,
    );
    let copied = run_ok(
        in_image(rootfs, &env, &install[2]).arg("--version"),
        STEP_TIMEOUT,
    );
    assert!(String::from_utf8_lossy(&copied.stdout).starts_with("spotrun-executor "));

    // The executor's config stage with the chart's executor.toml.
    executor_config_stage(rootfs, &env, &version);
    // The proxy: a PUT and a byte-identical GET on its disk store.
    proxy_round_trip(rootfs, &env);
}

/// `spotrun-executor --config /etc/spotrun/executor.toml config` as gitlab-runner calls it.
fn executor_config_stage(rootfs: &Path, env: &[String], version: &str) {
    let docs = documents(&render(&[]));
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["executor.toml"].is_string())
        .expect("the chart renders executor.toml");
    let etc = rootfs.join("etc/spotrun");
    std::fs::create_dir_all(&etc).expect("mkdir /etc/spotrun");
    std::fs::write(
        etc.join("executor.toml"),
        cm["data"]["executor.toml"].as_str().unwrap(),
    )
    .expect("write executor.toml");
    let out = run_ok(
        in_image(rootfs, env, "/usr/local/bin/spotrun-executor")
            .args(["--config", "/etc/spotrun/executor.toml", "config"])
            .env("CUSTOM_ENV_CI_JOB_ID", "4242")
            .env("CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN", "t0ken123")
            .env("CUSTOM_ENV_CI_CONCURRENT_ID", "3"),
        STEP_TIMEOUT,
    );
    let json: Json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "config printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(json["driver"]["name"], "spotrun", "{json}");
    assert_eq!(json["driver"]["version"], version, "{json}");
    assert!(
        json["builds_dir"]
            .as_str()
            .is_some_and(|d| d.starts_with('/')),
        "{json}"
    );
    assert!(
        json["hostname"]
            .as_str()
            .is_some_and(|h| h.contains("4242")),
        "{json}"
    );
}

fn proxy_round_trip(rootfs: &Path, env: &[String]) {
    let store = rootfs.join("var/lib/spotrun-cache");
    std::fs::create_dir_all(&store).expect("mkdir store");
    std::os::unix::fs::chown(&store, Some(IMAGE_UID), Some(IMAGE_UID)).expect("chown store");
    let (access_key, secret_key) = (
        "AKIMAGETEST",
        format!("image-test-secret-{:016x}", rand::random::<u64>()),
    );
    logcapture::register_secret(&secret_key);
    let s3 = SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
    let ops = SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
    let log_file = tempfile::NamedTempFile::new().expect("log file");
    let child = in_image(rootfs, env, "/usr/local/bin/spotrun-cache-proxy")
        .arg("serve")
        .env("SPOTRUN_CACHE_LISTEN", s3.to_string())
        .env("SPOTRUN_CACHE_OPS_LISTEN", ops.to_string())
        .env("SPOTRUN_CACHE_STORE", "/var/lib/spotrun-cache")
        .env("SPOTRUN_CACHE_REGION", "us-east-1")
        .env("SPOTRUN_CACHE_BUCKETS", "runner-cache")
        .env("SPOTRUN_CACHE_ACCESS_KEY", access_key)
        .env("SPOTRUN_CACHE_SECRET_KEY", &secret_key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file.reopen().expect("reopen log"))
        .spawn()
        .expect("start the proxy");
    let mut proxy = ImageProxy { child, s3 };
    let log = || std::fs::read_to_string(log_file.path()).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = proxy.child.try_wait().expect("wait") {
            panic!(
                "the proxy exited ({status}) before it was ready:\n{}",
                log()
            );
        }
        let ready = TcpStream::connect_timeout(&ops, Duration::from_secs(1)).is_ok()
            && http(ops, "GET", "/readyz", &[], b"").0 == 200;
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy was not ready within 30 s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let cache = CacheConfig {
        server_address: proxy.s3.to_string(),
        bucket: "runner-cache".into(),
        access_key: access_key.into(),
        secret_key: secret_key.clone(),
        region: "us-east-1".into(),
        expires: Duration::from_secs(600),
    };
    // 3 MiB: random halves around a repeated block, so chunking and dedup both have work.
    let mut body: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
    let block: Vec<u8> = (0..1 << 19).map(|_| rand::random::<u8>()).collect();
    body.extend_from_slice(&block);
    body.extend_from_slice(&block);
    body.extend((0..1 << 20).map(|_| rand::random::<u8>()));
    let object = "project/1/image-test-protected";
    let (put_url, put_headers) = cache.presign("PUT", object);
    // The archiver sends the cache-key header once; keep the first spelling of each name.
    let mut headers: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (k, v) in put_headers {
        headers.entry(k.to_ascii_lowercase()).or_insert((k, v));
    }
    let headers: Vec<(String, String)> = headers.into_values().collect();
    let (status, resp) = http(proxy.s3, "PUT", &target_of(&put_url), &headers, &body);
    assert_eq!(
        status,
        200,
        "PUT: {}\n{}",
        String::from_utf8_lossy(&resp),
        log()
    );
    let (get_url, _) = cache.presign("GET", object);
    let (status, got) = http(proxy.s3, "GET", &target_of(&get_url), &[], b"");
    assert_eq!(
        status,
        200,
        "GET: {}\n{}",
        String::from_utf8_lossy(&got),
        log()
    );
    assert!(
        got == body,
        "GET returned {} bytes, not the {} bytes put",
        got.len(),
        body.len()
    );

    // Written by the image's user into the store it was given.
    let mut owners = Vec::new();
    walk(&store, &mut |p| {
        owners.push((p.to_path_buf(), std::fs::metadata(p).expect("stat").uid()));
    });
    assert!(owners.len() > 1, "the store is empty after a PUT");
    assert!(
        owners.iter().all(|(_, uid)| *uid == IMAGE_UID),
        "files not owned by {IMAGE_UID}: {owners:?}"
    );
    drop(proxy);
    logcapture::write("image-cache-proxy", log().as_bytes());
}

/// The request target (path and query) of a URL.
fn target_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.find('/')
        .map_or_else(|| "/".to_owned(), |i| rest[i..].to_owned())
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        f(&p);
        if p.is_dir() {
            walk(&p, f);
        }
    }
}

/// The chart and the crates carry one version: Chart.yaml `version` and `appVersion` equal the
/// workspace version, and the chart's default image is what the project publishes, tagged with it.
#[test]
fn chart_version_app_version_and_default_image_follow_the_crate_version() {
    let version = workspace_version();
    let chart: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("helm/spotrun/Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    assert_eq!(
        chart["version"].as_str(),
        Some(version.as_str()),
        "Chart.yaml version"
    );
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(version.as_str()),
        "Chart.yaml appVersion"
    );
    let values: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("helm/spotrun/values.yaml"))
            .expect("values.yaml"),
    )
    .expect("values.yaml parses");
    let image = &values["spotrun"]["image"];
    assert_eq!(image["repository"].as_str(), Some(PUBLISHED_REPOSITORY));
    let tag = image["tag"]
        .as_str()
        .expect("spotrun.image.tag is a string");
    assert!(
        tag.is_empty() || tag == version,
        "spotrun.image.tag {tag:?}: empty (= appVersion) or {version}"
    );
    // And what the templates make of it, in every pod that runs the spotrun image.
    let containers = chart_spotrun_containers();
    assert!(containers.len() >= 3, "{containers:?}");
    for (img, _) in containers {
        assert_eq!(img, format!("{PUBLISHED_REPOSITORY}:{version}"));
    }
    // CHANGELOG.md has the version's section, or Unreleased while it is being worked on.
    let changelog =
        std::fs::read_to_string(repo_root().join("CHANGELOG.md")).expect("CHANGELOG.md");
    assert!(
        changelog.contains(&format!("## [{version}]")) || changelog.contains("## [Unreleased]"),
        "CHANGELOG.md has neither `## [{version}]` nor `## [Unreleased]`"
    );
}
