//! Integration tests of spotrun-cache-proxy: the real aws-sdk-s3 client, boto3 presigning, raw HTTP,
//! both backends (local disk and s3s-fs), dedup on zip histories and fault injection.

mod common;
mod conformance;
mod dedup;
mod faults;
mod presign_boto3;
mod runner_sequence;
