//! What the runner manager does for `[runners.cache] Type = "s3"`: presign GET/HEAD/PUT URLs for a
//! cache object (path style, `x-id` like aws-sdk-go-v2) with a signer we did not write (aws-sigv4),
//! and hand the PUT's signed headers to `cache-archiver --header`.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;

use super::runner::CachePresigner;

/// `[runners.cache.s3]`: where and how the runner signs cache URLs.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `ServerAddress`, e.g. `127.0.0.1:9000` (the runner uses `http://` when `Insecure = true`).
    pub server_address: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// `BucketLocation`.
    pub region: String,
    /// The URL lifetime (the runner uses the job timeout).
    pub expires: Duration,
}

impl CacheConfig {
    /// Presign `method` (`GET`, `HEAD`, `PUT`) for `object`; returns the URL and, for PUT, the
    /// signed headers the archiver must send (`host` and `x-amz-meta-cachekey`, both spellings).
    #[must_use]
    pub fn presign(&self, method: &str, object: &str) -> (String, Vec<(String, String)>) {
        let cache_key = object.rsplit('/').next().unwrap_or(object).to_owned();
        let x_id = match method {
            "GET" => Some("GetObject"),
            "PUT" => Some("PutObject"),
            _ => None,
        };
        let mut url = format!("http://{}/{}/{}", self.server_address, self.bucket, object);
        if let Some(x) = x_id {
            url.push_str(&format!("?x-id={x}"));
        }
        let mut headers = vec![("host".to_owned(), self.server_address.clone())];
        if method == "PUT" {
            headers.push(("x-amz-meta-cachekey".to_owned(), cache_key.clone()));
        }
        let identity =
            Credentials::new(&self.access_key, &self.secret_key, None, None, "runner").into();
        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(self.expires);
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .expect("signing params")
            .into();
        let signable = SignableRequest::new(
            method,
            url.clone(),
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::UnsignedPayload,
        )
        .expect("signable request");
        let (instructions, _) = sign(signable, &params).expect("sign").into_parts();
        let mut req = http::Request::builder()
            .method(method)
            .uri(&url)
            .body(())
            .expect("request");
        instructions.apply_to_request_http1x(&mut req);
        let mut out_headers = headers;
        if method == "PUT" {
            out_headers.push(("X-Amz-Meta-Cachekey".to_owned(), cache_key));
        }
        (req.uri().to_string(), out_headers)
    }

    /// A presigner for [`crate::harness::Runner::cache`].
    #[must_use]
    pub fn presigner(self) -> CachePresigner {
        std::sync::Arc::new(move |method: &str, object: &str| self.presign(method, object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presigned_put_carries_the_runner_query_and_headers() {
        let cfg = CacheConfig {
            server_address: "127.0.0.1:9000".into(),
            bucket: "runner-cache".into(),
            access_key: "AKEXAMPLE".into(),
            secret_key: "secret".into(),
            region: "us-east-1".into(),
            expires: Duration::from_secs(3600),
        };
        let (url, headers) = cfg.presign("PUT", "runner/abc/project/1/main-protected");
        assert!(
            url.starts_with(
                "http://127.0.0.1:9000/runner-cache/runner/abc/project/1/main-protected?"
            ),
            "{url}"
        );
        for p in [
            "X-Amz-Algorithm=AWS4-HMAC-SHA256",
            "X-Amz-Expires=3600",
            "x-id=PutObject",
            "X-Amz-SignedHeaders=host%3Bx-amz-meta-cachekey",
            "X-Amz-Signature=",
        ] {
            assert!(url.contains(p), "{p} missing in {url}");
        }
        assert_eq!(headers.len(), 3);
        let (head, _) = cfg.presign("HEAD", "runner/abc/project/1/main-protected");
        assert!(head.contains("X-Amz-SignedHeaders=host&"), "{head}");
        assert!(!head.contains("x-id="));
    }
}
