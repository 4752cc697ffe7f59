//! TLS for the S3 listener: a PEM certificate chain and key (cert-manager's `tls.crt`/`tls.key`),
//! re-read when either file changes, so a renewed certificate is served without a restart. A
//! renewal that fails to load is logged and the previous certificate stays in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// How often a handshake may look at the files' modification times.
pub const RELOAD_CHECK: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("TLS key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("TLS key {key} does not match certificate {cert}: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

/// Where the certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(Iterator::collect)
        .map_err(|e| TlsError::Cert {
            path: files.cert.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: files.cert.clone(),
            message: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        message: e.to_string(),
    })?;
    let ck = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        message: e.to_string(),
    })?;
    Ok(Arc::new(ck))
}

fn mtimes(files: &TlsFiles) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(&files.cert), m(&files.key))
}

/// The certificate in use, re-read when the files change (checked at most every `check`).
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    check: Duration,
    #[allow(clippy::type_complexity)] // (checked at, file times, key)
    state: Mutex<(
        Instant,
        (Option<SystemTime>, Option<SystemTime>),
        Arc<CertifiedKey>,
    )>,
}

impl ReloadingCert {
    /// Load the files now (a bad certificate fails start-up, naming the file).
    pub fn new(files: TlsFiles, check: Duration) -> Result<Self, TlsError> {
        let times = mtimes(&files);
        let key = load(&files)?;
        Ok(Self {
            files,
            check,
            state: Mutex::new((Instant::now(), times, key)),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut st = self.state.lock().expect("tls state lock");
        if st.0.elapsed() >= self.check {
            st.0 = Instant::now();
            let times = mtimes(&self.files);
            if times != st.1 {
                match load(&self.files) {
                    Ok(k) => {
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                        st.2 = k;
                        st.1 = times;
                    }
                    // cert-manager writes both files; a half-written pair loads on a later check.
                    Err(e) => tracing::warn!(error = %e, "keeping the previous TLS certificate"),
                }
            }
        }
        st.2.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A TLS acceptor serving the (reloading) certificate, HTTP/1.1 only.
pub fn acceptor(files: TlsFiles, check: Duration) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let resolver = Arc::new(ReloadingCert::new(files, check)?);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        let e = load(&files).unwrap_err();
        assert!(e.to_string().contains("tls.crt"), "{e}");
        std::fs::write(&files.cert, "not pem").unwrap();
        let e = load(&files).unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    }
}
