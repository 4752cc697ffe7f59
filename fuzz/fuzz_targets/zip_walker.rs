//! Zip walker: arbitrary archives never panic, and any span list returned covers `0..size` exactly,
//! in order, without gaps or overlaps (the chunker relies on it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spotrun_cache_proxy::dedup::zip::zip_spans;

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
});
