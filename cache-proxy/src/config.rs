//! Configuration: one TOML file (`deny_unknown_fields`), overridden by env vars and flags (file < env < flag).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::bodyrate::MinRate;
use crate::store::s3::{S3Auth, S3Settings};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The TOML file as written by operators (see config/cache-proxy.example.toml).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    /// Address of the operations endpoints (`/metrics`, `/healthz`, `/readyz`); never the S3 port.
    pub ops_listen: Option<String>,
    pub region: Option<String>,
    pub buckets: Option<Vec<String>>,
    /// Buckets whose keys GC never expires or evicts (artifacts, packages, backups); the others
    /// are caches (`[gc] expire_unread_days` and `max_logical_bytes` apply to them only).
    #[serde(default)]
    pub durable_buckets: Vec<String>,
    pub spool_dir: Option<PathBuf>,
    pub max_object_bytes: Option<u64>,
    #[serde(default)]
    pub http: HttpFile,
    #[serde(default)]
    pub access_keys: Vec<AccessKeyFile>,
    pub store: Option<StoreFile>,
    #[serde(default)]
    pub gc: GcFile,
    /// TLS on the S3 listener (the ops listener stays plain HTTP for probes).
    pub tls: Option<TlsFile>,
}

/// `[tls]`: PEM files, re-read when they change (cert-manager renewals).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// How often a handshake may check the files for changes (default 10).
    pub reload_check_secs: Option<u64>,
}

/// An `[[access_keys]]` entry: the id and secret inline, or read from environment variables
/// (`id_env` / `secret_env`: Kubernetes Secrets reach the proxy as env, never through its config).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKeyFile {
    pub id: Option<String>,
    pub secret: Option<String>,
    pub id_env: Option<String>,
    pub secret_env: Option<String>,
    /// One bucket, or several with `buckets`; neither = every bucket.
    pub bucket: Option<String>,
    pub buckets: Option<Vec<String>>,
    pub prefix: Option<String>,
}

impl std::fmt::Debug for AccessKeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKeyFile")
            .field("id", &self.id.as_deref().map(crate::sigv4::access_key_hint))
            .field("id_env", &self.id_env)
            .field("secret_env", &self.secret_env)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A credential clients sign with, optionally confined to one bucket and key prefix.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccessKey {
    pub id: String,
    pub secret: String,
    /// The buckets this key may use; empty = all.
    pub buckets: Vec<String>,
    pub prefix: Option<String>,
}

impl std::fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ids are shown only by their last characters, like in the request log.
        f.debug_struct("AccessKey")
            .field("id", &crate::sigv4::access_key_hint(&self.id))
            .field("buckets", &self.buckets)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// `disk`, `s3` or `gcs`.
    pub kind: Option<String>,
    /// disk: root directory.
    pub path: Option<PathBuf>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub path_style: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// `keys` (`SigV4` with `access_key_id`/`secret_access_key`) or, for `gcs`, `gce-metadata`
    /// (bearer tokens from the metadata server: GKE Workload Identity). Default: `keys` when keys
    /// are set, else `gce-metadata` for `gcs`.
    pub credentials: Option<String>,
    /// `gce-metadata`: metadata server `host[:port]` (default `GCE_METADATA_HOST`, then
    /// `metadata.google.internal`).
    pub metadata_host: Option<String>,
    pub max_concurrency: Option<usize>,
    /// Seconds one backend request may take, body included, before it counts as unavailable.
    pub request_timeout_secs: Option<u64>,
}

impl std::fmt::Debug for StoreFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreFile")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcFile {
    /// Seconds between GC runs inside `serve`; 0 disables the timer.
    pub interval_secs: u64,
    /// Unreferenced packs younger than this are kept.
    pub grace_secs: u64,
    /// Keys neither written nor read for this many days are deleted; 0 = never.
    pub expire_unread_days: u64,
    /// Least recently used keys are deleted while the logical total exceeds this; 0 = no cap.
    pub max_logical_bytes: u64,
    /// Multipart uploads neither completed nor aborted for this many days are deleted with their
    /// parts (S3 lifecycle's `AbortIncompleteMultipartUpload`); 0 = never.
    pub expire_uploads_days: u64,
}

impl Default for GcFile {
    fn default() -> Self {
        Self {
            interval_secs: 3600,
            grace_secs: 3600,
            expire_unread_days: 30,
            max_logical_bytes: 0,
            expire_uploads_days: 7,
        }
    }
}

/// Limits on client connections: what a slow, oversized or flooding client can cost us.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpFile {
    /// Seconds a client has to send a request's complete header block.
    pub header_read_timeout_secs: u64,
    /// Seconds an upload body (or a download's reader) may make no progress before the request is cut.
    pub body_idle_timeout_secs: u64,
    /// Connections served at once; more wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// Largest request head (request line + headers) in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Connections still sending a request head (not yet authenticated) may hold at most this many
    /// of `max_connections`; beyond it the one waiting longest is closed. Default: a quarter.
    pub max_connections_awaiting_headers: Option<usize>,
    /// An upload body slower than this on average over `min_upload_rate_window_secs` gets 400
    /// `RequestTimeout`; 0 = no minimum.
    pub min_upload_bytes_per_sec: u64,
    pub min_upload_rate_window_secs: u64,
}

impl Default for HttpFile {
    fn default() -> Self {
        let d = HttpLimits::default();
        Self {
            header_read_timeout_secs: d.header_read_timeout.as_secs(),
            body_idle_timeout_secs: d.body_idle_timeout.as_secs(),
            max_connections: d.max_connections,
            max_header_bytes: d.max_header_bytes,
            max_connections_awaiting_headers: None,
            min_upload_bytes_per_sec: d.min_upload_rate.min_bytes_per_sec,
            min_upload_rate_window_secs: d.min_upload_rate.window.as_secs(),
        }
    }
}

/// Resolved connection limits (see [`HttpFile`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_connections_awaiting_headers: usize,
    pub min_upload_rate: MinRate,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_header_bytes: 64 << 10,
            max_connections_awaiting_headers: 256,
            // Apache's mod_reqtimeout defaults to MinRate=500 bytes/s for bodies; a runner on a
            // cluster network sends MB/s, so 1 KiB/s over 30 s only ever cuts a dribbling client.
            min_upload_rate: MinRate {
                min_bytes_per_sec: 1024,
                window: Duration::from_secs(30),
            },
        }
    }
}

/// S3's own limit for one PUT: the runner uploads a cache archive in one presigned PUT, so nothing
/// larger can come from it.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 5 << 30;
/// hyper's smallest read buffer.
const MIN_HEADER_BYTES: usize = 8 << 10;

/// Values from env vars and flags (clap fills both); `None` = not given.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub ops_listen: Option<String>,
    pub region: Option<String>,
    pub buckets: Option<Vec<String>>,
    pub store_dir: Option<PathBuf>,
    pub spool_dir: Option<PathBuf>,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
}

#[derive(Debug, Clone)]
pub enum StoreChoice {
    Disk(PathBuf),
    S3(S3Settings),
}

/// The resolved settings the program runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz` (unauthenticated, so not on the S3 port: issue 16).
    pub ops_listen: SocketAddr,
    pub region: String,
    pub buckets: Vec<String>,
    /// Buckets GC never expires or evicts.
    pub durable_buckets: Vec<String>,
    pub access_keys: Vec<AccessKey>,
    pub store: StoreChoice,
    pub spool_dir: PathBuf,
    /// Largest accepted object; bigger declared or received bodies get 400 `EntityTooLarge`.
    pub max_object_bytes: u64,
    pub http: HttpLimits,
    pub gc_interval: Option<Duration>,
    pub gc_grace: Duration,
    pub expire_unread: Option<Duration>,
    pub max_logical_bytes: Option<u64>,
    pub expire_uploads: Duration,
    pub tls: Option<crate::tls::TlsFiles>,
    pub tls_reload_check: Duration,
}

pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

pub fn parse_file(text: &str) -> Result<FileConfig, toml::de::Error> {
    toml::from_str(text)
}

/// The backend credentials `store` asks for (see `StoreFile::credentials`).
fn backend_auth(
    sf: &StoreFile,
    gcs: bool,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
) -> Result<S3Auth, ConfigError> {
    let keys_given = access_key_id.is_some() || secret_access_key.is_some();
    let mode = match sf.credentials.as_deref() {
        Some(m) => m,
        None if gcs && !keys_given => "gce-metadata",
        None => "keys",
    };
    match mode {
        "keys" => Ok(S3Auth::Keys {
            access_key_id: access_key_id.ok_or_else(|| {
                invalid(
                    "store.access_key_id",
                    "not set and AWS_ACCESS_KEY_ID is empty",
                )
            })?,
            secret_access_key: secret_access_key.ok_or_else(|| {
                invalid(
                    "store.secret_access_key",
                    "not set and AWS_SECRET_ACCESS_KEY is empty",
                )
            })?,
        }),
        "gce-metadata" if !gcs => Err(invalid(
            "store.credentials",
            "\"gce-metadata\" only works with kind = \"gcs\"",
        )),
        "gce-metadata" if sf.access_key_id.is_some() || sf.secret_access_key.is_some() => {
            Err(invalid(
                "store.credentials",
                "\"gce-metadata\" signs with metadata-server tokens: remove access_key_id and secret_access_key",
            ))
        }
        "gce-metadata" => Ok(S3Auth::GceMetadata {
            host: sf.metadata_host.clone(),
        }),
        other => Err(invalid(
            "store.credentials",
            format!("{other:?}: expected \"keys\" or \"gce-metadata\""),
        )),
    }
}

/// Merge file < overrides and validate; `env` reads backend credentials from the environment.
#[allow(clippy::too_many_lines)] // every setting's precedence and validation in one place
pub fn resolve(
    file: FileConfig,
    over: Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    let listen_s = over
        .listen
        .or(file.listen)
        .unwrap_or_else(|| "0.0.0.0:9000".into());
    let listen: SocketAddr = listen_s
        .parse()
        .map_err(|e| invalid("listen", format!("{listen_s:?}: {e}")))?;
    let ops_s = over
        .ops_listen
        .or(file.ops_listen)
        .unwrap_or_else(|| "0.0.0.0:9090".into());
    let ops_listen: SocketAddr = ops_s
        .parse()
        .map_err(|e| invalid("ops_listen", format!("{ops_s:?}: {e}")))?;
    if ops_listen == listen && listen.port() != 0 {
        return Err(invalid(
            "ops_listen",
            "must differ from `listen`: the S3 port serves no operations endpoints",
        ));
    }
    let region = over
        .region
        .or(file.region)
        .unwrap_or_else(|| "us-east-1".into());
    let buckets = over
        .buckets
        .or(file.buckets)
        .unwrap_or_else(|| vec!["runner-cache".into()]);
    if buckets.is_empty() || buckets.iter().any(|b| b.is_empty() || b.contains('/')) {
        return Err(invalid(
            "buckets",
            "need at least one bucket name, without '/'",
        ));
    }
    if let Some(b) = file.durable_buckets.iter().find(|b| !buckets.contains(b)) {
        return Err(invalid(
            "durable_buckets",
            format!("{b:?} is not in `buckets`"),
        ));
    }
    let durable_buckets = file.durable_buckets;
    let mut access_keys = Vec::with_capacity(file.access_keys.len());
    for (i, k) in file.access_keys.into_iter().enumerate() {
        let pick = |inline: Option<String>, var: Option<String>, what: &str| match (inline, var) {
            (Some(v), None) => Ok(v),
            (None, Some(var)) => env(&var).filter(|v| !v.is_empty()).ok_or_else(|| {
                invalid(
                    "access_keys",
                    format!(
                        "entry {}: environment variable {var} ({what}) is not set",
                        i + 1
                    ),
                )
            }),
            _ => Err(invalid(
                "access_keys",
                format!("entry {}: give exactly one of {what} and {what}_env", i + 1),
            )),
        };
        let buckets = match (k.bucket, k.buckets) {
            (Some(b), None) => vec![b],
            (None, Some(bs)) => bs,
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "access_keys",
                    format!("entry {}: give bucket or buckets, not both", i + 1),
                ));
            }
        };
        access_keys.push(AccessKey {
            id: pick(k.id, k.id_env, "id")?,
            secret: pick(k.secret, k.secret_env, "secret")?,
            buckets,
            prefix: k.prefix,
        });
    }
    match (over.access_key, over.secret_key) {
        (Some(id), Some(secret)) => access_keys.insert(
            0,
            AccessKey {
                id,
                secret,
                buckets: Vec::new(),
                prefix: None,
            },
        ),
        (None, None) => {}
        _ => {
            return Err(invalid(
                "access_keys",
                "--access-key and --secret-key must be given together",
            ));
        }
    }
    if access_keys.is_empty() {
        return Err(invalid(
            "access_keys",
            "no access keys: add [[access_keys]] or pass --access-key/--secret-key",
        ));
    }
    for k in &access_keys {
        if k.id.is_empty() || k.secret.is_empty() {
            return Err(invalid("access_keys", "id and secret must not be empty"));
        }
        if let Some(b) = k.buckets.iter().find(|b| !buckets.contains(b)) {
            return Err(invalid(
                "access_keys.bucket",
                format!("{b:?} is not in `buckets`"),
            ));
        }
    }
    let sf = file.store.unwrap_or_default();
    let store = if let Some(dir) = over.store_dir {
        StoreChoice::Disk(dir)
    } else {
        match sf.kind.as_deref().unwrap_or("disk") {
            "disk" => StoreChoice::Disk(sf.path.clone().ok_or_else(|| {
                invalid(
                    "store.path",
                    "the disk store needs a directory (or pass --store DIR)",
                )
            })?),
            kind @ ("s3" | "gcs") => {
                let gcs = kind == "gcs";
                let endpoint = sf
                    .endpoint
                    .clone()
                    .or_else(|| gcs.then(|| "https://storage.googleapis.com".into()));
                let endpoint = endpoint
                    .ok_or_else(|| invalid("store.endpoint", "required for kind = \"s3\""))?;
                let access_key_id = sf
                    .access_key_id
                    .clone()
                    .or_else(|| env("AWS_ACCESS_KEY_ID"));
                let secret_access_key = sf
                    .secret_access_key
                    .clone()
                    .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
                StoreChoice::S3(S3Settings {
                    endpoint,
                    region: sf.region.clone().unwrap_or_else(|| {
                        if gcs {
                            "auto".into()
                        } else {
                            "us-east-1".into()
                        }
                    }),
                    bucket: sf
                        .bucket
                        .clone()
                        .ok_or_else(|| invalid("store.bucket", "required for S3/GCS stores"))?,
                    prefix: sf.prefix.clone().unwrap_or_default(),
                    // GCS interop wants path style (reference/cache.md §3).
                    path_style: gcs || sf.path_style.unwrap_or(true),
                    auth: backend_auth(&sf, gcs, access_key_id, secret_access_key)?,
                    max_concurrency: sf.max_concurrency.unwrap_or(32),
                    request_timeout: Duration::from_secs(
                        sf.request_timeout_secs.unwrap_or(120).max(1),
                    ),
                })
            }
            other => {
                return Err(invalid(
                    "store.kind",
                    format!("{other:?}: expected \"disk\", \"s3\" or \"gcs\""),
                ));
            }
        }
    };
    let spool_dir = over
        .spool_dir
        .or(file.spool_dir)
        .unwrap_or_else(|| match &store {
            StoreChoice::Disk(d) => d.join(".spool"),
            StoreChoice::S3(_) => std::env::temp_dir().join("spotrun-cache-spool"),
        });
    let gc = file.gc;
    if gc.grace_secs < 60 {
        return Err(invalid(
            "gc.grace_secs",
            "must be at least 60 (in-flight uploads and downloads rely on it)",
        ));
    }
    let h = file.http;
    if h.header_read_timeout_secs == 0 || h.body_idle_timeout_secs == 0 {
        return Err(invalid(
            "http.*_timeout_secs",
            "timeouts must be at least 1 second",
        ));
    }
    if h.max_connections == 0 {
        return Err(invalid("http.max_connections", "must be at least 1"));
    }
    if h.max_header_bytes < MIN_HEADER_BYTES {
        return Err(invalid(
            "http.max_header_bytes",
            format!("must be at least {MIN_HEADER_BYTES}"),
        ));
    }
    let max_awaiting = h
        .max_connections_awaiting_headers
        .unwrap_or((h.max_connections / 4).max(1));
    if max_awaiting == 0 || max_awaiting > h.max_connections {
        return Err(invalid(
            "http.max_connections_awaiting_headers",
            "must be between 1 and http.max_connections",
        ));
    }
    if h.min_upload_bytes_per_sec > 0 && h.min_upload_rate_window_secs == 0 {
        return Err(invalid(
            "http.min_upload_rate_window_secs",
            "must be at least 1 second while http.min_upload_bytes_per_sec is set",
        ));
    }
    let max_object_bytes = file.max_object_bytes.unwrap_or(DEFAULT_MAX_OBJECT_BYTES);
    if max_object_bytes == 0 {
        return Err(invalid("max_object_bytes", "must be positive"));
    }
    Ok(Settings {
        listen,
        ops_listen,
        region,
        buckets,
        durable_buckets,
        access_keys,
        store,
        spool_dir,
        max_object_bytes,
        http: HttpLimits {
            header_read_timeout: Duration::from_secs(h.header_read_timeout_secs),
            body_idle_timeout: Duration::from_secs(h.body_idle_timeout_secs),
            max_connections: h.max_connections,
            max_header_bytes: h.max_header_bytes,
            max_connections_awaiting_headers: max_awaiting,
            min_upload_rate: MinRate {
                min_bytes_per_sec: h.min_upload_bytes_per_sec,
                window: Duration::from_secs(h.min_upload_rate_window_secs),
            },
        },
        gc_interval: (gc.interval_secs > 0).then(|| Duration::from_secs(gc.interval_secs)),
        gc_grace: Duration::from_secs(gc.grace_secs),
        expire_unread: (gc.expire_unread_days > 0)
            .then(|| Duration::from_secs(gc.expire_unread_days * 86_400)),
        max_logical_bytes: (gc.max_logical_bytes > 0).then_some(gc.max_logical_bytes),
        tls_reload_check: file
            .tls
            .as_ref()
            .and_then(|t| t.reload_check_secs)
            .map_or(crate::tls::RELOAD_CHECK, Duration::from_secs),
        tls: file.tls.map(|t| crate::tls::TlsFiles {
            cert: t.cert_file,
            key: t.key_file,
        }),
        expire_uploads: if gc.expire_uploads_days == 0 {
            Duration::MAX
        } else {
            Duration::from_secs(gc.expire_uploads_days * 86_400)
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn example_file_parses_and_resolves() {
        let text = include_str!("../../config/cache-proxy.example.toml");
        let file = parse_file(text).unwrap();
        let s = resolve(file, Overrides::default(), &no_env).unwrap();
        assert_eq!(s.buckets[0], "runner-cache");
        assert_eq!(s.buckets.len(), 6);
        assert!(
            !s.durable_buckets.contains(&s.buckets[0]),
            "the cache expires"
        );
        assert!(s.durable_buckets.iter().all(|b| s.buckets.contains(b)));
        assert_eq!(s.access_keys.len(), 3);
        assert!(matches!(s.store, StoreChoice::Disk(_)));
        assert_eq!(s.max_object_bytes, 20 << 30);
        assert_eq!(s.ops_listen, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(
            s.http,
            HttpLimits {
                header_read_timeout: Duration::from_secs(30),
                body_idle_timeout: Duration::from_secs(60),
                max_connections: 1024,
                max_header_bytes: 65536,
                max_connections_awaiting_headers: 256,
                min_upload_rate: MinRate {
                    min_bytes_per_sec: 1024,
                    window: Duration::from_secs(30),
                },
            }
        );
    }

    #[test]
    fn access_keys_from_the_environment() {
        let file = parse_file(
            "buckets = [\"c\", \"gitlab-backups\"]\n[[access_keys]]\nid_env = \"BK_ID\"\nsecret_env = \"BK_SECRET\"\nbucket = \"gitlab-backups\"\n[store]\npath = \"/x\"\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "BK_ID" => Some("backup-id".to_owned()),
            "BK_SECRET" => Some("backup-secret".to_owned()),
            _ => None,
        };
        let s = resolve(file.clone(), Overrides::default(), &env).unwrap();
        assert_eq!(s.access_keys[0].id, "backup-id");
        assert_eq!(s.access_keys[0].secret, "backup-secret");
        let err = resolve(file, Overrides::default(), &no_env).unwrap_err();
        assert!(err.to_string().contains("BK_ID"), "{err}");
        let both = parse_file(
            "[[access_keys]]\nid = \"a\"\nid_env = \"A\"\nsecret = \"s\"\n[store]\npath = \"/x\"\n",
        )
        .unwrap();
        let err = resolve(both, Overrides::default(), &no_env).unwrap_err();
        assert!(
            err.to_string().contains("exactly one of id and id_env"),
            "{err}"
        );
    }

    #[test]
    fn durable_buckets_must_be_served() {
        let base = "[[access_keys]]\nid = \"a\"\nsecret = \"s\"\n[store]\npath = \"/x\"\n";
        let file = parse_file(&format!(
            "buckets = [\"c\", \"d\"]\ndurable_buckets = [\"e\"]\n{base}"
        ))
        .unwrap();
        let err = resolve(file, Overrides::default(), &no_env).unwrap_err();
        assert!(err.to_string().contains("`durable_buckets`"), "{err}");
        assert!(err.to_string().contains("\"e\""), "{err}");
    }

    #[test]
    fn http_limits_are_validated() {
        let base = "[[access_keys]]\nid = \"a\"\nsecret = \"s\"\n[store]\npath = \"/x\"\n";
        let file = parse_file(&format!("{base}[http]\nmax_header_bytes = 100\n")).unwrap();
        let err = resolve(file, Overrides::default(), &no_env).unwrap_err();
        assert!(err.to_string().contains("`http.max_header_bytes`"), "{err}");
        let file = parse_file(&format!("{base}[http]\nmax_connections = 0\n")).unwrap();
        let err = resolve(file, Overrides::default(), &no_env).unwrap_err();
        assert!(err.to_string().contains("`http.max_connections`"), "{err}");
        let file = parse_file(&format!(
            "{base}[http]\nmax_connections = 8\nmax_connections_awaiting_headers = 9\n"
        ))
        .unwrap();
        let err = resolve(file, Overrides::default(), &no_env).unwrap_err();
        assert!(
            err.to_string()
                .contains("`http.max_connections_awaiting_headers`"),
            "{err}"
        );
        let file = parse_file(&format!("{base}[http]\nmax_connections = 8\n")).unwrap();
        let s = resolve(file, Overrides::default(), &no_env).unwrap();
        assert_eq!(s.http.max_connections_awaiting_headers, 2, "a quarter");
        let file = parse_file(&format!("{base}[http]\nmin_upload_rate_window_secs = 0\n")).unwrap();
        let err = resolve(file, Overrides::default(), &no_env).unwrap_err();
        assert!(
            err.to_string()
                .contains("`http.min_upload_rate_window_secs`"),
            "{err}"
        );
        let file = parse_file(&format!("ops_listen = \"0.0.0.0:9000\"\n{base}")).unwrap();
        let err = resolve(file, Overrides::default(), &no_env).unwrap_err();
        assert!(err.to_string().contains("`ops_listen`"), "{err}");
        let s = resolve(parse_file(base).unwrap(), Overrides::default(), &no_env).unwrap();
        assert_eq!(s.max_object_bytes, DEFAULT_MAX_OBJECT_BYTES);
        assert_eq!(s.http, HttpLimits::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse_file("listen = \"127.0.0.1:1\"\nlisen = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
        let err = parse_file("[gc]\ngrace = 5\n").unwrap_err().to_string();
        assert!(err.contains("grace"), "{err}");
    }

    #[test]
    fn flags_override_file_and_gcs_preset_fills_endpoint() {
        let file = parse_file(
            "listen = \"127.0.0.1:1\"\n[[access_keys]]\nid = \"a\"\nsecret = \"s\"\n[store]\nkind = \"gcs\"\nbucket = \"x\"\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("GOOG1".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("sek".to_string()),
            _ => None,
        };
        let over = Overrides {
            listen: Some("127.0.0.1:2".into()),
            ..Overrides::default()
        };
        let s = resolve(file, over, &env).unwrap();
        assert_eq!(s.listen.port(), 2);
        let StoreChoice::S3(s3) = s.store else {
            panic!("gcs preset")
        };
        assert_eq!(s3.endpoint, "https://storage.googleapis.com");
        assert!(s3.path_style);
    }

    /// GCS without keys uses the metadata server; asking for it elsewhere, mixing it with keys, or
    /// an unknown mode is an error naming `store.credentials`.
    #[test]
    fn backend_credentials_modes() {
        let base =
            "listen = \"127.0.0.1:1\"\n[[access_keys]]\nid = \"a\"\nsecret = \"s\"\n[store]\n";
        let no_env = |_: &str| None;
        let resolve_str = |store: &str| {
            resolve(
                parse_file(&format!("{base}{store}")).unwrap(),
                Overrides::default(),
                &no_env,
            )
        };
        let s = resolve_str("kind = \"gcs\"\nbucket = \"x\"\nmetadata_host = \"127.0.0.1:9\"\n")
            .unwrap();
        let StoreChoice::S3(s3) = s.store else {
            panic!("gcs")
        };
        assert!(
            matches!(&s3.auth, S3Auth::GceMetadata { host: Some(h) } if h == "127.0.0.1:9"),
            "gcs without keys defaults to the metadata server"
        );
        let s = resolve_str(
            "kind = \"gcs\"\nbucket = \"x\"\naccess_key_id = \"GOOG1\"\nsecret_access_key = \"k\"\n",
        )
        .unwrap();
        let StoreChoice::S3(s3) = s.store else {
            panic!("gcs")
        };
        assert!(
            matches!(s3.auth, S3Auth::Keys { .. }),
            "HMAC keys when given"
        );
        for (store, want) in [
            (
                "kind = \"s3\"\nendpoint = \"http://127.0.0.1:1\"\nbucket = \"x\"\ncredentials = \"gce-metadata\"\n",
                "only works with kind = \"gcs\"",
            ),
            (
                "kind = \"gcs\"\nbucket = \"x\"\ncredentials = \"gce-metadata\"\naccess_key_id = \"a\"\n",
                "remove access_key_id",
            ),
            (
                "kind = \"gcs\"\nbucket = \"x\"\ncredentials = \"oauth\"\n",
                "expected \"keys\" or \"gce-metadata\"",
            ),
        ] {
            let err = resolve_str(store).unwrap_err().to_string();
            assert!(
                err.contains("store.credentials") && err.contains(want),
                "{err}"
            );
        }
        let err = resolve_str("kind = \"gcs\"\nbucket = \"x\"\ncredentials = \"keys\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.access_key_id"), "{err}");
    }

    #[test]
    fn missing_keys_and_bad_kind_are_named() {
        let err = resolve(
            FileConfig::default(),
            Overrides {
                store_dir: Some("/x".into()),
                ..Overrides::default()
            },
            &no_env,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`access_keys`"), "{err}");
        let file =
            parse_file("[[access_keys]]\nid = \"a\"\nsecret = \"s\"\n[store]\nkind = \"ftp\"\n")
                .unwrap();
        let err = resolve(file, Overrides::default(), &no_env).unwrap_err();
        assert!(err.to_string().contains("`store.kind`"), "{err}");
    }
}
