//! Integration tests of spotrun-cache-proxy: the real aws-sdk-s3 client, boto3 presigning, raw HTTP,
//! both backends (local disk and s3s-fs), dedup on zip histories and fault injection.

// Reason: scenarios read top to bottom like the runner's sequence; test sizes fit every integer type.
#![allow(
    clippy::too_many_lines,
    clippy::type_complexity,
    clippy::many_single_char_names,
    clippy::format_push_string,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap
)]

mod backend_faults;
mod binproxy;
mod clients;
mod common;
mod concurrency;
mod conformance;
mod crash;
mod dedup;
mod faults;
mod fuzz_regressions;
mod gcs_metadata;
mod hostile;
mod hot_keys;
mod object_storage;
mod presign_boto3;
mod replicas;
mod runner_sequence;
mod side_channels;
mod soak;
mod tls;
