//! Test kit for spotrun: a Kubernetes API emulator that runs pods for real, a gitlab-runner
//! harness that drives a custom executor exactly as gitlab-runner does, an S3 peer launcher
//! and a TCP fault proxy.

pub mod emulator;
pub mod faultproxy;
pub mod harness;
pub mod s3peer;
