//! aws-chunked decoder: arbitrary bodies fed in arbitrary pieces never panic; the decoded length it
//! reports equals the bytes it handed out; signed bodies with made-up signatures are rejected.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spotrun_cache_proxy::chunked::{AwsChunkedDecoder, ChunkSigner};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((&split, body)) = rest.split_first() else {
        return;
    };
    let signer = (mode & 1 == 1).then(|| ChunkSigner {
        key: [7; 32],
        amz_date: "20250101T000000Z".into(),
        scope: "20250101/us-east-1/s3/aws4_request".into(),
        seed_signature: "0".repeat(64),
    });
    let signed = signer.is_some();
    let mut dec = AwsChunkedDecoder::new(signer, mode & 2 == 2);
    let mut out = 0u64;
    // Feed in pieces of a size chosen by the input, so every split point is exercised.
    let piece = usize::from(split).max(1);
    let mut ok = true;
    for part in body.chunks(piece) {
        if dec.feed(part, &mut |d| out += d.len() as u64).is_err() {
            ok = false;
            break;
        }
    }
    assert_eq!(dec.decoded_len(), out);
    if ok && let Ok(trailers) = dec.finish() {
        // Without the key, a fuzzer cannot produce valid chunk signatures for non-empty data.
        let _ = trailers;
        if signed {
            assert_eq!(out, 0, "a forged signed body was accepted");
        }
    }
});
