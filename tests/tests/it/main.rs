//! Integration tests of the test kit.

mod chart_upgrade;
mod emulator_errors;
mod emulator_exec;
mod emulator_faults;
mod emulator_kube;
mod emulator_kubectl;
mod emulator_sched;
mod emulator_support;
mod harness;
mod helm;
mod image;
mod pipeline;
