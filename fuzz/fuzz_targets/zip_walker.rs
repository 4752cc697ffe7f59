//! Zip classification: arbitrary archives never panic. The seekable walker's spans cover `0..size`
//! exactly, in order; the streaming scanner's runs, fed in pieces of any size, concatenate to the
//! input and are the same whatever the piece size (the chunker relies on both).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spotrun_cache_proxy::dedup::zip::zip_spans;
use spotrun_cache_proxy::dedup::zipscan::{Kind, ZipScanner};

fn runs(data: &[u8], step: usize) -> Vec<(Kind, Vec<u8>)> {
    let mut out: Vec<(Kind, Vec<u8>)> = Vec::new();
    let mut emit = |k: Kind, b: &[u8]| -> Result<(), ()> {
        match out.last_mut() {
            Some((last, bytes)) if *last == k => bytes.extend_from_slice(b),
            _ => out.push((k, b.to_vec())),
        }
        Ok(())
    };
    let mut s = ZipScanner::new();
    for piece in data.chunks(step) {
        s.feed(piece, &mut emit).unwrap();
    }
    s.finish(&mut emit).unwrap();
    out
}

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    if let Ok(spans) = zip_spans(&mut std::io::Cursor::new(data), size) {
        let mut pos = 0u64;
        for s in &spans {
            assert_eq!(s.offset, pos, "spans are contiguous");
            pos = s.offset.checked_add(s.len).expect("no overflow");
        }
        assert_eq!(pos, size, "spans cover the whole body");
    }
    let whole = runs(data, data.len().max(1));
    let joined: Vec<u8> = whole.iter().flat_map(|(_, b)| b.clone()).collect();
    assert_eq!(joined, data, "runs cover the body in order");
    let step = 1 + usize::from(data.first().copied().unwrap_or(0)) % 17;
    assert_eq!(runs(data, step), whole, "runs do not depend on feed sizes");
});
