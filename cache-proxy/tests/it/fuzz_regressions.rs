//! Inputs the fuzz targets (fuzz/) found crashing, kept as regression tests.

use spotrun_cache_proxy::dedup::manifest::ManifestV1;

#[test]
fn manifest_with_a_huge_inline_length_is_malformed_not_an_overflow() {
    // fuzz/artifacts/manifest/crash-c06a5717…: the manifest target prefixes its input with the magic.
    let input = include_bytes!("manifest-overflow.bin");
    let data = [b"SRM\x01".as_slice(), input].concat();
    assert!(ManifestV1::decode(&data).is_err());
    assert!(ManifestV1::decode(input).is_err());
}
