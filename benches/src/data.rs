//! Benchmark bodies: incompressible unique bytes, copies with a share of blocks replaced, and streams
//! of unique bytes too large to hold in memory.

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
}
