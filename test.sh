#!/usr/bin/env bash
# The test command: installs prerequisites (idempotent), then formatting, lints and every test.
set -euo pipefail
cd "$(dirname "$0")"
eval "$(bash .ci/install)"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
