//! Incremental content-defined chunking of classified runs: entry data and plain bodies get
//! `FastCDC` chunks, zip structure stays inline (small, per-object budget) or gets small chunks.
//! Cuts are the ones `fastcdc::v2020` makes on each run as a whole, whatever the feed sizes.

use bytes::{Bytes, BytesMut};

use super::manifest::INLINE_SEG_MAX;
use super::zipscan::Kind;

/// `FastCDC` (min, avg, max) for entry data and plain bodies.
pub const DATA_CDC: (u32, u32, u32) = (16 << 10, 64 << 10, 256 << 10);
/// Smaller chunks for zip structure too large to keep inline (a big central directory).
pub const META_CDC: (u32, u32, u32) = (1 << 10, 4 << 10, 16 << 10);
/// A run of zip structure up to this size lives inline in the manifest. The central directory holds
/// every entry's mtime and CRC, so with 5 % of files changed nearly every 4 KiB chunk of it changed
/// and was stored again (issue 5); inline it deflates to about a fifth. 8 MiB covers ~100k entries.
pub const INLINE_RUN_MAX: usize = 8 << 20;
/// Inline bytes per object: beyond this, structure is chunked too, so that no body (a zip of empty
/// entries separated by megabytes of junk, issue 16) makes a manifest that grows with the body.
pub const INLINE_TOTAL_MAX: u64 = 64 << 20;

/// What the chunker hands on, in body order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// At most `INLINE_SEG_MAX` bytes for the manifest itself.
    Inline(Bytes),
    /// A chunk to hash, deduplicate and store.
    Chunk(Bytes),
}

/// Chunks one run at a time; `push` per classified piece, `finish` at the end of the body.
#[derive(Debug)]
pub struct RunChunker {
    kind: Option<Kind>,
    buf: BytesMut,
    /// The current structure run is being chunked (too large, or over the object's budget).
    chunking: bool,
    inline_total: u64,
}

impl Default for RunChunker {
    fn default() -> Self {
        Self::new()
    }
}

fn params(kind: Kind) -> (u32, u32, u32) {
    match kind {
        Kind::Data => DATA_CDC,
        Kind::Structure => META_CDC,
    }
}

impl RunChunker {
    #[must_use]
    pub fn new() -> Self {
        Self {
            kind: None,
            buf: BytesMut::new(),
            chunking: false,
            inline_total: 0,
        }
    }

    pub fn push<E>(
        &mut self,
        kind: Kind,
        bytes: &[u8],
        out: &mut impl FnMut(Piece) -> Result<(), E>,
    ) -> Result<(), E> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.kind != Some(kind) {
            self.end_run(out)?;
            self.kind = Some(kind);
            self.chunking = kind == Kind::Data;
        }
        self.buf.extend_from_slice(bytes);
        if !self.chunking
            && (self.buf.len() > INLINE_RUN_MAX
                || self.inline_total + self.buf.len() as u64 > INLINE_TOTAL_MAX)
        {
            self.chunking = true;
        }
        if self.chunking {
            let (min, avg, max) = params(kind);
            while self.buf.len() >= max as usize {
                let cut = fastcdc::v2020::FastCDC::new(&self.buf, min, avg, max)
                    .next()
                    .map_or(self.buf.len(), |c| c.length);
                out(Piece::Chunk(self.buf.split_to(cut).freeze()))?;
            }
        }
        Ok(())
    }

    /// The body ended.
    pub fn finish<E>(&mut self, out: &mut impl FnMut(Piece) -> Result<(), E>) -> Result<(), E> {
        self.end_run(out)?;
        self.kind = None;
        Ok(())
    }

    fn end_run<E>(&mut self, out: &mut impl FnMut(Piece) -> Result<(), E>) -> Result<(), E> {
        let Some(kind) = self.kind else {
            return Ok(());
        };
        let rest = self.buf.split().freeze();
        if rest.is_empty() {
            return Ok(());
        }
        if self.chunking {
            let (min, avg, max) = params(kind);
            for c in fastcdc::v2020::FastCDC::new(&rest, min, avg, max) {
                out(Piece::Chunk(rest.slice(c.offset..c.offset + c.length)))?;
            }
        } else {
            self.inline_total += rest.len() as u64;
            let mut at = 0;
            while at < rest.len() {
                let n = (rest.len() - at).min(INLINE_SEG_MAX);
                out(Piece::Inline(rest.slice(at..at + n)))?;
                at += n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6_364_136_223_846_793_005) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    fn pieces(runs: &[(Kind, &[u8])], step: usize) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut c = RunChunker::new();
        let mut sink = |p| -> Result<(), ()> {
            out.push(p);
            Ok(())
        };
        for (kind, bytes) in runs {
            for part in bytes.chunks(step) {
                c.push(*kind, part, &mut sink).unwrap();
            }
        }
        c.finish(&mut sink).unwrap();
        out
    }

    #[test]
    fn data_cuts_match_fastcdc_on_the_whole_run_for_any_feed_size() {
        let body = noise(3 << 20, 9);
        let want: Vec<Piece> = fastcdc::v2020::FastCDC::new(&body, 16 << 10, 64 << 10, 256 << 10)
            .map(|c| Piece::Chunk(Bytes::copy_from_slice(&body[c.offset..c.offset + c.length])))
            .collect();
        for step in [1000, 65_536, 300_001, 3 << 20] {
            assert_eq!(pieces(&[(Kind::Data, &body)], step), want, "step {step}");
        }
    }

    #[test]
    fn a_run_change_forces_a_cut_and_small_structure_stays_inline() {
        let (a, b) = (noise(100_000, 1), noise(50_000, 2));
        let got = pieces(
            &[
                (Kind::Structure, b"PK\x03\x04hdr"),
                (Kind::Data, &a),
                (Kind::Structure, b"desc"),
                (Kind::Data, &b),
            ],
            4096,
        );
        assert_eq!(got[0], Piece::Inline(Bytes::from_static(b"PK\x03\x04hdr")));
        let mut data_a = Vec::new();
        let mut i = 1;
        while let Piece::Chunk(c) = &got[i] {
            data_a.extend_from_slice(c);
            i += 1;
        }
        assert_eq!(data_a, a, "entry a's chunks end where its data ends");
        assert_eq!(got[i], Piece::Inline(Bytes::from_static(b"desc")));
    }

    #[test]
    fn large_structure_is_chunked_and_inline_segments_are_bounded() {
        let big = noise(INLINE_RUN_MAX + 10, 3);
        let got = pieces(&[(Kind::Structure, &big)], 1 << 20);
        assert!(
            got.iter()
                .all(|p| matches!(p, Piece::Chunk(c) if c.len() <= 16 << 10))
        );
        let mid = noise(3 << 20, 4);
        let got = pieces(&[(Kind::Structure, &mid)], 1 << 16);
        assert_eq!(got.len(), 3, "split into 1 MiB inline segments");
        assert!(
            got.iter()
                .all(|p| matches!(p, Piece::Inline(b) if b.len() <= INLINE_SEG_MAX))
        );
    }

    #[test]
    fn the_inline_budget_per_object_is_never_exceeded() {
        let gap = noise(INLINE_RUN_MAX, 5);
        let data = [7u8; 10];
        let mut runs = Vec::new();
        for _ in 0..10 {
            runs.push((Kind::Structure, &gap[..]));
            runs.push((Kind::Data, &data[..]));
        }
        let inline: u64 = pieces(&runs, 1 << 20)
            .iter()
            .map(|p| match p {
                Piece::Inline(b) => b.len() as u64,
                Piece::Chunk(_) => 0,
            })
            .sum();
        assert!(inline <= INLINE_TOTAL_MAX, "{inline}");
        assert!(
            inline >= INLINE_TOTAL_MAX - INLINE_RUN_MAX as u64,
            "{inline}"
        );
    }
}
