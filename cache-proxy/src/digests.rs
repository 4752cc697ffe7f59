//! Whole-body digests of an upload — MD5 (the `ETag`, and `Content-MD5`), the payload's SHA-256 when
//! the request signs it, and any `x-amz-checksum-*` it asks for — computed beside the ingest, off
//! the request task.
//!
//! MD5 cannot be split over cores (each block needs the previous one's state) and runs at about
//! half a GB/s per core, the slowest per-byte step of a PUT. On the request task it sat in series
//! with reading the socket, and a mostly known body (nothing to store, only to hash) arrived no
//! faster than that one thread could both read and hash it. Here the request task only hands each
//! frame on (a reference count, no copy) and a blocking-pool thread hashes the frames while they
//! keep arriving: a thread is held only while there are bytes to hash, never while the client is
//! silent.

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

/// Frames queued for hashing.
const QUEUE: usize = 16;

/// A requested `x-amz-checksum-*` header name and its running checksum.
pub type NamedChecksum = (String, Box<dyn aws_smithy_checksums::http::HttpChecksum>);

/// The running digests of one body.
pub struct Digests {
    pub md5: md5::Md5,
    /// The payload's SHA-256, when the request signed it.
    pub sha256: Option<Sha256>,
    pub checksums: Vec<NamedChecksum>,
}

impl Digests {
    #[must_use]
    pub fn new(sha256: bool, checksums: Vec<NamedChecksum>) -> Self {
        Self {
            md5: <md5::Md5 as md5::Digest>::new(),
            sha256: sha256.then(Sha256::new),
            checksums,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        md5::Digest::update(&mut self.md5, data);
        if let Some(s) = self.sha256.as_mut() {
            s.update(data);
        }
        for (_, c) in &mut self.checksums {
            c.update(data);
        }
    }
}

/// The digest stage of one upload; dropping it stops the hashing.
pub struct DigestStage {
    tx: Option<mpsc::Sender<Bytes>>,
    task: Option<tokio::task::JoinHandle<Option<Box<Digests>>>>,
}

impl Drop for DigestStage {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The stage stopped before the body ended (a hashing thread panicked).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the body digest stage stopped")]
pub struct DigestStopped;

impl DigestStage {
    #[must_use]
    pub fn start(digests: Digests) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            tx: Some(tx),
            task: Some(tokio::spawn(run(rx, Box::new(digests)))),
        }
    }

    /// Queue the next body bytes (waits while `QUEUE` frames are waiting).
    pub async fn write(&mut self, data: Bytes) -> Result<(), DigestStopped> {
        let tx = self.tx.as_ref().ok_or(DigestStopped)?;
        tx.send(data).await.map_err(|_| DigestStopped)
    }

    /// The body is complete: the digests of all of it.
    pub async fn finish(mut self) -> Result<Digests, DigestStopped> {
        self.tx = None;
        let task = self.task.take().ok_or(DigestStopped)?;
        match task.await {
            Ok(Some(d)) => Ok(*d),
            _ => Err(DigestStopped),
        }
    }
}

/// Hashes on the blocking pool for as long as frames keep arriving, and hands the thread back as
/// soon as the queue is empty: a steady body is hashed by one thread without a hand-off per frame,
/// a silent client holds no thread.
async fn run(mut rx: mpsc::Receiver<Bytes>, mut state: Box<Digests>) -> Option<Box<Digests>> {
    while let Some(first) = rx.recv().await {
        (state, rx) = tokio::task::spawn_blocking(move || {
            state.update(&first);
            while let Ok(f) = rx.try_recv() {
                state.update(&f);
            }
            (state, rx)
        })
        .await
        .ok()?;
    }
    Some(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_shot(data: &[u8]) -> ([u8; 16], [u8; 32], String) {
        let mut d = Digests::new(true, crc32());
        d.update(data);
        finish(d)
    }

    fn crc32() -> Vec<NamedChecksum> {
        let alg: aws_smithy_checksums::ChecksumAlgorithm = "crc32".parse().expect("known");
        vec![("x-amz-checksum-crc32".into(), alg.into_impl())]
    }

    fn finish(d: Digests) -> ([u8; 16], [u8; 32], String) {
        let crc = d
            .checksums
            .into_iter()
            .map(|(_, c)| String::from_utf8_lossy(c.header_value().as_bytes()).into_owned())
            .collect();
        (
            md5::Digest::finalize(d.md5).into(),
            d.sha256.expect("asked for").finalize().into(),
            crc,
        )
    }

    #[tokio::test]
    async fn frames_hashed_in_batches_give_the_digests_of_the_whole_body() {
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut stage = DigestStage::start(Digests::new(true, crc32()));
        // Uneven frames, some empty, more than a batch's worth.
        let mut at = 0;
        for (i, n) in [1usize, 0, 65_536, 3, 1 << 20, 700_001]
            .iter()
            .cycle()
            .enumerate()
        {
            if at >= body.len() || i > 1000 {
                break;
            }
            let end = (at + n).min(body.len());
            stage
                .write(Bytes::copy_from_slice(&body[at..end]))
                .await
                .expect("stage runs");
            at = end;
        }
        assert_eq!(at, body.len());
        let got = finish(stage.finish().await.expect("finishes"));
        assert_eq!(got, one_shot(&body));
    }

    #[tokio::test]
    async fn an_empty_body_has_the_empty_digests() {
        let stage = DigestStage::start(Digests::new(true, crc32()));
        let (md5, sha, _) = finish(stage.finish().await.expect("finishes"));
        assert_eq!(hex::encode(md5), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(
            hex::encode(sha),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
