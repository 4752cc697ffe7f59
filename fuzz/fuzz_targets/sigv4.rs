//! SigV4 canonicaliser and verifier: arbitrary queries, credentials, Authorization headers and dates
//! never panic; canonicalisation is stable; forged requests are never authenticated.
#![no_main]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use spotrun_cache_proxy::auth::{RequestParts, authenticate};
use spotrun_cache_proxy::config::AccessKey;
use spotrun_cache_proxy::sigv4;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Layout: query \n authorization \n header lines...
    let mut lines = text.split('\n');
    let query = lines.next().unwrap_or("");
    let auth = lines.next().unwrap_or("");
    let _ = sigv4::percent_decode(query);
    let _ = sigv4::Credential::parse(auth);
    let _ = sigv4::AuthHeader::parse(auth);
    let _ = sigv4::parse_amz_date(auth);
    let _ = sigv4::canonical_header_value(auth);
    let Ok(pairs) = sigv4::parse_query(query) else {
        return;
    };
    let canonical = sigv4::canonical_query(&pairs);
    // Canonical form is a fixed point: re-parsing it gives the same canonical string.
    let reparsed = sigv4::parse_query(&canonical).expect("canonical query parses");
    assert_eq!(sigv4::canonical_query(&reparsed), canonical);

    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(auth) {
        headers.insert("authorization", v);
    }
    headers.insert("host", HeaderValue::from_static("127.0.0.1:9000"));
    for line in lines {
        if let Some((k, v)) = line.split_once(':')
            && let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.trim().as_bytes()), HeaderValue::from_str(v.trim()))
        {
            headers.append(k, v);
        }
    }
    let keys = [AccessKey {
        id: "fuzz-key".into(),
        secret: "fuzz-secret".into(),
        buckets: Vec::new(),
        prefix: None,
    }];
    let req = RequestParts {
        method: "GET",
        path: b"/runner-cache/key",
        query: &pairs,
        headers: &headers,
        bucket: "runner-cache",
        key: "key",
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_689_600); // 2025-01-01
    // The fuzzer does not know the secret: any success would be a forged signature.
    assert!(authenticate(&keys, "us-east-1", &req, now).is_err());
});
