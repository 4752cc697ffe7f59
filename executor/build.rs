//! Links `spotrun-executor` as a position-dependent executable on Linux.
//!
//! gitlab-runner starts this binary once per stage, so its start-up is on every stage's critical
//! path (P9 in BENCHMARKS.md). As a PIE the dynamic loader applies ~29,000 relative relocations
//! and touches every page of `.data.rel.ro` before `main`; linked with `-no-pie` the linker
//! resolves them once, at build time (measured: 2.1 → 1.6 ms for `spotrun-executor config`).
//!
//! Also sets what `--version` prints (revision and target; `buildinfo/version_env.rs`).
include!("../buildinfo/version_env.rs");

fn main() {
    emit_version_env();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    // Not for musl: its static-pie start files relocate the binary themselves (no dynamic
    // loader), and the same objects linked with -no-pie crash before `main` (measured: SIGSEGV
    // on `--version`).
    if os == "linux" && env != "musl" {
        println!("cargo:rustc-link-arg-bin=spotrun-executor=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../buildinfo/version_env.rs");
}
