//! Test kit for spotrun: a Kubernetes API emulator that runs pods for real, a gitlab-runner
//! harness that drives a custom executor exactly as gitlab-runner does, an S3 peer launcher,
//! a TCP fault proxy, log capture for the secrets check, and generated cache archives.

pub mod emulator;
pub mod faultproxy;
pub mod harness;
pub mod logcapture;
pub mod rootfs;
pub mod s3peer;
pub mod ziptree;
