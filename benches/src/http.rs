//! A plain HTTP/1.1 client for presigned URLs: the same client, connection reuse and body handling
//! for the proxy and for the direct baseline, so ratios compare servers, not clients.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// What a request returned.
#[derive(Debug, Clone)]
pub struct Done {
    pub status: u16,
    pub elapsed: Duration,
    pub body_len: u64,
    pub body_sha256: [u8; 32],
    /// The body when it is short (error documents, `/metrics`).
    pub small_body: String,
}

#[derive(Debug, Clone)]
pub struct Http {
    client: Client<HttpConnector, Body>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

/// A body from bytes in memory.
#[must_use]
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body sent as `stream` yields it.
pub fn streaming(stream: impl Stream<Item = Bytes> + Send + 'static) -> Body {
    StreamBody::new(stream.map(|b| Ok::<_, std::io::Error>(Frame::data(b)))).boxed_unsync()
}

impl Http {
    #[must_use]
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Send one request; the response body is read to the end and hashed.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        body: Body,
        content_length: u64,
    ) -> anyhow::Result<Done> {
        let mut req = http::Request::builder().method(method).uri(url);
        let mut seen: Vec<String> = Vec::new();
        for (k, v) in headers {
            let lower = k.to_ascii_lowercase();
            // The runner's header list carries the signed `host` and the metadata twice in two
            // spellings; HTTP/1.1 folds them into one header, so send each once.
            if lower == "host" || seen.contains(&lower) {
                continue;
            }
            req = req.header(lower.as_str(), v.as_str());
            seen.push(lower);
        }
        if method == "PUT" {
            req = req.header("content-length", content_length);
        }
        let req = req.body(body).context("building the request")?;
        let started = Instant::now();
        let resp = self
            .client
            .request(req)
            .await
            .with_context(|| format!("{method} {}", redact(url)))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut hasher = Sha256::new();
        let mut body_len = 0u64;
        let mut small = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.with_context(|| format!("reading {method} {}", redact(url)))?;
            if let Some(d) = frame.data_ref() {
                hasher.update(d);
                body_len += d.len() as u64;
                if small.len() < 64 << 10 {
                    small.extend_from_slice(&d[..d.len().min((64 << 10) - small.len())]);
                }
            }
        }
        Ok(Done {
            status,
            elapsed: started.elapsed(),
            body_len,
            body_sha256: hasher.finalize().into(),
            small_body: String::from_utf8_lossy(&small).into_owned(),
        })
    }

    /// Like `send`, failing unless the status is 2xx.
    pub async fn send_ok(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        body: Body,
        content_length: u64,
    ) -> anyhow::Result<Done> {
        let done = self
            .send(method, url, headers, body, content_length)
            .await?;
        if !(200..300).contains(&done.status) {
            bail!(
                "{method} {} answered {}: {}",
                redact(url),
                done.status,
                done.small_body.chars().take(400).collect::<String>()
            );
        }
        Ok(done)
    }
}

/// A URL without its query (presigned signatures stay out of messages).
#[must_use]
pub fn redact(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}
