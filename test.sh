#!/usr/bin/env bash
# The test command: installs prerequisites (idempotent), then formatting, lints and every test.
set -euo pipefail
cd "$(dirname "$0")"
# Each step's start, in seconds since this script began (CI has a 90-minute limit).
step() { echo "[test.sh] ${SECONDS}s: $*" >&2; }
step install
eval "$(bash .ci/install)"
step fmt
cargo fmt --all --check
step clippy
cargo clippy --workspace --all-targets --locked -- -D warnings
# Every proxy and executor log the tests produce is captured here, then scanned for secrets.
SPOTRUN_LOG_CAPTURE_DIR="$(mktemp -d -t spotrun-logs.XXXXXX)"
export SPOTRUN_LOG_CAPTURE_DIR
# The static release binaries the image test (tests/tests/it/image.rs) builds its image from; the
# emulator's job pods run the static in-pod launcher (tests/src/rootfs.rs).
step "dist build"
cargo build --profile dist --locked --target "$(uname -m)-unknown-linux-musl" -p spotrun-executor -p spotrun-cache-proxy -p spotrun-launch
# cargo-nextest: each test in its own process, each bounded by .config/nextest.toml (a hang fails
# naming its test); then the doc tests, which nextest does not run.
step nextest
cargo nextest run --workspace --locked
step "doc tests"
cargo test --doc --workspace --locked
step "log scan"
# The scanner nextest built with the suite (a `cargo run -p` would rebuild with other features).
"${CARGO_TARGET_DIR:-target}/debug/spotrun-log-scan" "$SPOTRUN_LOG_CAPTURE_DIR"
# Each fuzz target for 60 s (SPOTRUN_FUZZ_SECS); SPOTRUN_SKIP_FUZZ=1 skips it locally.
step fuzz
[ "${SPOTRUN_SKIP_FUZZ:-0}" = 1 ] || bash .ci/fuzz
step done
