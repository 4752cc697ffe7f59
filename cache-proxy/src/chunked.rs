//! Incremental decoder for `Content-Encoding: aws-chunked` bodies, signed or unsigned, with trailers.
//!
//! aws-sdk-s3 sends file bodies as `STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER` over http, boto3 sends
//! `STREAMING-UNSIGNED-PAYLOAD-TRAILER` (reference/peers.md §0), so both framings are decoded here.

use bytes::{Buf, BytesMut};
use sha2::{Digest, Sha256};

use crate::sigv4;

/// Longest chunk header or trailer line we accept; real ones are under 200 bytes.
const MAX_LINE: usize = 4096;
/// Most trailer lines we accept. SDKs send one checksum plus, when signed, `x-amz-trailer-signature`;
/// without a cap, an endless trailer of `a:b` lines grew memory ~20x faster than it was sent (issue 16).
pub const MAX_TRAILERS: usize = 8;
/// Most trailer bytes (lines with their CRLF) we accept; a CRC64 checksum plus a signature is ~150.
pub const MAX_TRAILER_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkedError {
    #[error("malformed aws-chunked body: {0}")]
    Malformed(String),
    #[error("aws-chunked chunk signature does not match")]
    ChunkSignature,
    #[error("aws-chunked trailer signature is missing or does not match")]
    TrailerSignature,
    #[error("aws-chunked body has more than {limit} trailer lines")]
    TooManyTrailers { limit: usize },
    #[error("aws-chunked trailers exceed {limit} bytes")]
    TrailersTooLarge { limit: usize },
}

/// The signing context of a signed aws-chunked body (seed = the request's own signature).
#[derive(Clone)]
pub struct ChunkSigner {
    pub key: [u8; 32],
    pub amz_date: String,
    pub scope: String,
    pub seed_signature: String,
}

impl std::fmt::Debug for ChunkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys or signatures.
        f.debug_struct("ChunkSigner")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

#[derive(Debug)]
pub struct AwsChunkedDecoder {
    signer: Option<ChunkSigner>,
    /// The signature the next chunk's header must carry, chained from the previous one.
    prev_signature: String,
    expect_signed_trailer: bool,
    buf: BytesMut,
    state: State,
    chunk_hash: Sha256,
    chunk_sig: Option<String>,
    trailers: Vec<(String, String)>,
    trailer_sig: Option<String>,
    /// Trailer lines and bytes (with CRLF) seen so far, signature line included.
    trailer_lines: usize,
    trailer_bytes: usize,
    decoded_len: u64,
}

impl AwsChunkedDecoder {
    /// `signer = None` for `STREAMING-UNSIGNED-PAYLOAD-TRAILER`; `signed_trailer` for `...-PAYLOAD-TRAILER`.
    #[must_use]
    pub fn new(signer: Option<ChunkSigner>, signed_trailer: bool) -> Self {
        let prev_signature = signer
            .as_ref()
            .map(|s| s.seed_signature.clone())
            .unwrap_or_default();
        Self {
            signer,
            prev_signature,
            expect_signed_trailer: signed_trailer,
            buf: BytesMut::new(),
            state: State::Header,
            chunk_hash: Sha256::new(),
            chunk_sig: None,
            trailers: Vec::new(),
            trailer_sig: None,
            trailer_lines: 0,
            trailer_bytes: 0,
            decoded_len: 0,
        }
    }

    #[must_use]
    pub fn decoded_len(&self) -> u64 {
        self.decoded_len
    }

    /// Feed raw body bytes; decoded payload bytes are handed to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut dyn FnMut(&[u8])) -> Result<(), ChunkedError> {
        self.buf.extend_from_slice(input);
        loop {
            match self.state {
                State::Header => {
                    let Some(line) = self.take_line()? else {
                        return Ok(());
                    };
                    self.start_chunk(&line)?;
                }
                State::Data(remaining) => {
                    if self.buf.is_empty() {
                        return Ok(());
                    }
                    let n = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(self.buf.len());
                    let data = self.buf.split_to(n);
                    self.chunk_hash.update(&data);
                    self.decoded_len += n as u64;
                    out(&data);
                    let left = remaining - n as u64;
                    if left == 0 {
                        self.verify_chunk()?;
                        self.state = State::DataEnd;
                    } else {
                        self.state = State::Data(left);
                    }
                }
                State::DataEnd => {
                    if self.buf.len() < 2 {
                        return Ok(());
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err(ChunkedError::Malformed(
                            "chunk data not followed by CRLF".into(),
                        ));
                    }
                    self.buf.advance(2);
                    self.state = State::Header;
                }
                State::Trailer => {
                    let Some(line) = self.take_line()? else {
                        return Ok(());
                    };
                    if line.is_empty() {
                        self.state = State::Done;
                        continue;
                    }
                    self.count_trailer_line(line.len())?;
                    let (name, value) = line.split_once(':').ok_or_else(|| {
                        ChunkedError::Malformed(format!("bad trailer line {line:?}"))
                    })?;
                    let name = name.trim().to_ascii_lowercase();
                    if name == "x-amz-trailer-signature" {
                        self.trailer_sig = Some(value.trim().to_owned());
                    } else {
                        self.trailers.push((name, value.trim().to_owned()));
                    }
                }
                State::Done => {
                    if self.buf.iter().any(|b| !b.is_ascii_whitespace()) {
                        return Err(ChunkedError::Malformed("data after the final chunk".into()));
                    }
                    self.buf.clear();
                    return Ok(());
                }
            }
        }
    }

    /// Call at end of body: checks framing completeness and the trailer signature; returns the trailers.
    pub fn finish(mut self) -> Result<Vec<(String, String)>, ChunkedError> {
        if self.state == State::Trailer && self.buf.is_empty() {
            // Some encoders omit the final empty line when there are no trailers.
            self.state = State::Done;
        }
        if self.state != State::Done {
            return Err(ChunkedError::Malformed(
                "body ended before the final chunk".into(),
            ));
        }
        if let Some(signer) = &self.signer
            && (self.expect_signed_trailer || self.trailer_sig.is_some())
        {
            let got = self
                .trailer_sig
                .as_deref()
                .ok_or(ChunkedError::TrailerSignature)?;
            let want = sigv4::trailer_signature(
                &signer.key,
                &signer.amz_date,
                &signer.scope,
                &self.prev_signature,
                &self.trailers,
            );
            if !sigv4::signatures_equal(got, &want) {
                return Err(ChunkedError::TrailerSignature);
            }
        }
        Ok(self.trailers)
    }

    /// Enforce [`MAX_TRAILERS`] and [`MAX_TRAILER_BYTES`] before a trailer line is kept.
    fn count_trailer_line(&mut self, len: usize) -> Result<(), ChunkedError> {
        self.trailer_lines += 1;
        self.trailer_bytes += len + 2;
        if self.trailer_lines > MAX_TRAILERS {
            return Err(ChunkedError::TooManyTrailers {
                limit: MAX_TRAILERS,
            });
        }
        if self.trailer_bytes > MAX_TRAILER_BYTES {
            return Err(ChunkedError::TrailersTooLarge {
                limit: MAX_TRAILER_BYTES,
            });
        }
        Ok(())
    }

    fn take_line(&mut self) -> Result<Option<String>, ChunkedError> {
        let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") else {
            if self.buf.len() > MAX_LINE {
                return Err(ChunkedError::Malformed("chunk header line too long".into()));
            }
            return Ok(None);
        };
        if pos > MAX_LINE {
            return Err(ChunkedError::Malformed("chunk header line too long".into()));
        }
        let line = self.buf.split_to(pos);
        self.buf.advance(2);
        String::from_utf8(line.to_vec())
            .map(Some)
            .map_err(|_| ChunkedError::Malformed("chunk header is not UTF-8".into()))
    }

    fn start_chunk(&mut self, line: &str) -> Result<(), ChunkedError> {
        let (size, ext) = line.split_once(';').unwrap_or((line, ""));
        let size = u64::from_str_radix(size.trim(), 16)
            .map_err(|_| ChunkedError::Malformed(format!("bad chunk size {size:?}")))?;
        self.chunk_sig = ext
            .trim()
            .strip_prefix("chunk-signature=")
            .map(str::to_owned);
        if self.signer.is_some() && self.chunk_sig.is_none() {
            return Err(ChunkedError::ChunkSignature);
        }
        self.chunk_hash = Sha256::new();
        if size == 0 {
            self.verify_chunk()?;
            self.state = State::Trailer;
        } else {
            self.state = State::Data(size);
        }
        Ok(())
    }

    fn verify_chunk(&mut self) -> Result<(), ChunkedError> {
        let Some(signer) = &self.signer else {
            return Ok(());
        };
        let digest = hex::encode(std::mem::take(&mut self.chunk_hash).finalize());
        let want = sigv4::chunk_signature(
            &signer.key,
            &signer.amz_date,
            &signer.scope,
            &self.prev_signature,
            &digest,
        );
        let got = self.chunk_sig.take().unwrap_or_default();
        if !sigv4::signatures_equal(&got, &want) {
            return Err(ChunkedError::ChunkSignature);
        }
        self.prev_signature = want;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(
        dec: &mut AwsChunkedDecoder,
        input: &[u8],
        step: usize,
    ) -> Result<Vec<u8>, ChunkedError> {
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            dec.feed(piece, &mut |d| out.extend_from_slice(d))?;
        }
        Ok(out)
    }

    #[test]
    fn unsigned_with_trailer_in_odd_pieces() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:DUoRhQ==\r\n\r\n";
        for step in [1, 3, 7, body.len()] {
            let mut dec = AwsChunkedDecoder::new(None, false);
            assert_eq!(decode_all(&mut dec, body, step).unwrap(), b"hello world");
            assert_eq!(
                dec.finish().unwrap(),
                vec![("x-amz-checksum-crc32".into(), "DUoRhQ==".into())]
            );
        }
    }

    /// Regression (issue 16): `a:b` trailer lines were kept without limit.
    #[test]
    fn trailer_flood_is_cut_at_the_line_limit() {
        let mut dec = AwsChunkedDecoder::new(None, false);
        let mut body = b"0\r\n".to_vec();
        body.extend(b"a:b\r\n".repeat(MAX_TRAILERS));
        decode_all(&mut dec, &body, 7).unwrap();
        assert_eq!(
            decode_all(&mut dec, b"a:b\r\n", 7),
            Err(ChunkedError::TooManyTrailers {
                limit: MAX_TRAILERS
            })
        );
        let mut dec = AwsChunkedDecoder::new(None, false);
        let long = format!("0\r\nx-amz-meta:{}\r\n", "v".repeat(MAX_LINE - 20));
        decode_all(&mut dec, long.as_bytes(), 64).unwrap();
        assert_eq!(
            decode_all(&mut dec, &long.as_bytes()[3..], 64),
            Err(ChunkedError::TrailersTooLarge {
                limit: MAX_TRAILER_BYTES
            })
        );
        assert_eq!(
            ChunkedError::TooManyTrailers { limit: 8 }.to_string(),
            "aws-chunked body has more than 8 trailer lines"
        );
    }

    #[test]
    fn truncated_body_is_rejected() {
        let mut dec = AwsChunkedDecoder::new(None, false);
        decode_all(&mut dec, b"5\r\nhel", 2).unwrap();
        assert!(matches!(dec.finish(), Err(ChunkedError::Malformed(_))));
    }

    fn signer() -> ChunkSigner {
        let cred =
            sigv4::Credential::parse("AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request")
                .unwrap();
        ChunkSigner {
            key: sigv4::signing_key("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", &cred),
            amz_date: "20130524T000000Z".into(),
            scope: cred.scope(),
            seed_signature: "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
                .into(),
        }
    }

    /// Build a signed body the way the SDK does, then decode it and tamper with it.
    fn signed_body(data: &[&[u8]], trailer: Option<(&str, &str)>) -> Vec<u8> {
        let s = signer();
        let mut prev = s.seed_signature.clone();
        let mut body = Vec::new();
        for d in data.iter().chain(std::iter::once(&&b""[..])) {
            let sig =
                sigv4::chunk_signature(&s.key, &s.amz_date, &s.scope, &prev, &sigv4::sha256_hex(d));
            body.extend_from_slice(format!("{:X};chunk-signature={sig}\r\n", d.len()).as_bytes());
            if !d.is_empty() {
                body.extend_from_slice(d);
                body.extend_from_slice(b"\r\n");
            }
            prev = sig;
        }
        if let Some((k, v)) = trailer {
            let ts = sigv4::trailer_signature(
                &s.key,
                &s.amz_date,
                &s.scope,
                &prev,
                &[(k.into(), v.into())],
            );
            body.extend_from_slice(
                format!("{k}:{v}\r\nx-amz-trailer-signature:{ts}\r\n").as_bytes(),
            );
        }
        body.extend_from_slice(b"\r\n");
        body
    }

    #[test]
    fn signed_chain_and_trailer_verify() {
        let body = signed_body(
            &[b"hello", b" world"],
            Some(("x-amz-checksum-crc32", "DUoRhQ==")),
        );
        let mut dec = AwsChunkedDecoder::new(Some(signer()), true);
        assert_eq!(decode_all(&mut dec, &body, 5).unwrap(), b"hello world");
        assert_eq!(dec.finish().unwrap().len(), 1);
    }

    #[test]
    fn tampered_chunk_data_fails_chunk_signature() {
        let mut body = signed_body(
            &[b"hello", b" world"],
            Some(("x-amz-checksum-crc32", "DUoRhQ==")),
        );
        let pos = body.windows(5).position(|w| w == b"hello").unwrap();
        body[pos] = b'j';
        let mut dec = AwsChunkedDecoder::new(Some(signer()), true);
        assert_eq!(
            decode_all(&mut dec, &body, 64),
            Err(ChunkedError::ChunkSignature)
        );
    }

    #[test]
    fn tampered_trailer_fails_trailer_signature() {
        let body = signed_body(&[b"hello"], Some(("x-amz-checksum-crc32", "DUoRhQ==")));
        let body = String::from_utf8(body)
            .unwrap()
            .replace("DUoRhQ==", "AAAAAA==");
        let mut dec = AwsChunkedDecoder::new(Some(signer()), true);
        decode_all(&mut dec, body.as_bytes(), 64).unwrap();
        assert_eq!(dec.finish(), Err(ChunkedError::TrailerSignature));
    }

    #[test]
    fn signed_without_trailer() {
        let body = signed_body(&[b"abc"], None);
        let mut dec = AwsChunkedDecoder::new(Some(signer()), false);
        assert_eq!(decode_all(&mut dec, &body, 1).unwrap(), b"abc");
        assert!(dec.finish().unwrap().is_empty());
    }
}
