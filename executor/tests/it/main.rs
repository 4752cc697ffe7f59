//! Integration tests of spotrun-executor: the real binary driven by the runner harness against
//! the Kubernetes API emulator (containers run for real in bwrap).

mod classification;
mod job_images;
mod jobs;
mod non_root;
mod overrides;
mod parity;
mod pull;
mod rbac;
mod resilience;
mod services;
mod support;
