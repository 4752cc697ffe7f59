//! Benchmark bodies: incompressible unique bytes, copies with a share of blocks replaced, streams
//! of unique bytes too large to hold in memory, and zip archives of many small files.

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

/// `n` pseudo-random (incompressible, never repeating across seeds) bytes.
#[must_use]
pub fn unique_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0; n];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

/// A copy of `base` with `percent` % of its `block`-sized blocks (spread evenly, phase by `seed`)
/// replaced by new unique bytes: the rest is content the store already knows.
#[must_use]
pub fn with_changed_blocks(base: &[u8], percent: u32, block: usize, seed: u64) -> Vec<u8> {
    let mut out = base.to_vec();
    let blocks = base.len().div_ceil(block);
    let changed = (blocks * percent as usize).div_ceil(100).max(1);
    let stride = blocks / changed;
    let phase = usize::try_from(seed).unwrap_or(0) % stride.max(1);
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xC0FF_EE00);
    for k in 0..changed {
        let start = ((k * stride + phase) * block).min(base.len());
        let end = (start + block).min(base.len());
        rng.fill_bytes(&mut out[start..end]);
    }
    out
}

/// A stream of `total` unique bytes in pieces of `piece` bytes, generated as it is sent.
pub fn unique_stream(
    total: u64,
    piece: usize,
    seed: u64,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    let rng = SmallRng::seed_from_u64(seed);
    futures::stream::unfold((rng, total), move |(mut rng, left)| async move {
        if left == 0 {
            return None;
        }
        let n = usize::try_from(left.min(piece as u64)).expect("piece fits usize");
        let mut buf = vec![0; n];
        rng.fill_bytes(&mut buf);
        Some((Bytes::from(buf), (rng, left - n as u64)))
    })
}

/// A zip of `entries` small stored files (~60 bytes each, unique to `seed` and the entry), named like
/// a `node_modules` tree. The proxy chunks each entry's data on its own, so every entry is one chunk
/// of its own: such archives fill a store with many chunks cheaply, and stand in for a cache of
/// many files.
#[must_use]
pub fn small_files_zip(entries: usize, seed: u64) -> Vec<u8> {
    use std::io::Write as _;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::with_capacity(entries * 200)));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..entries {
        w.start_file(format!("node_modules/pkg-{}/lib/file-{i}.js", i / 12), opts)
            .expect("zip entry header in memory");
        write!(
            w,
            "// generated {seed:x}/{i}\nmodule.exports = {{ id: {i}, seed: {seed} }};\n"
        )
        .expect("zip entry data in memory");
    }
    w.finish().expect("zip in memory").into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_blocks_touch_the_asked_share() {
        let base = unique_bytes(100 * 1024, 1);
        let b = with_changed_blocks(&base, 5, 1024, 7);
        let differing = base
            .chunks(1024)
            .zip(b.chunks(1024))
            .filter(|(x, y)| x != y)
            .count();
        assert_eq!(differing, 5);
        assert_ne!(unique_bytes(64, 1), unique_bytes(64, 2));
    }

    #[test]
    fn small_files_zip_has_every_entry_with_unique_content() {
        // Past 65,535 entries the archive needs zip64 end records.
        let z = small_files_zip(70_000, 3);
        let mut a = zip::ZipArchive::new(std::io::Cursor::new(&z)).unwrap();
        assert_eq!(a.len(), 70_000);
        let crcs: std::collections::HashSet<u32> = (0..a.len())
            .map(|i| a.by_index_raw(i).unwrap().crc32())
            .collect();
        assert!(crcs.len() > 69_000, "{} distinct CRCs", crcs.len());
        assert_ne!(small_files_zip(10, 1), small_files_zip(10, 2));
    }
}
