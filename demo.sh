#!/usr/bin/env bash
# The main job: an emulated GKE cluster and the cache proxy, running a real job end to end.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v bwrap >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap
fi
cargo build --locked --quiet --bins
# The in-pod launcher runs in job images of any libc: the static (musl) build, as the image has it.
rustup target add "$(uname -m)-unknown-linux-musl" >/dev/null 2>&1 || true
cargo build --locked --quiet --profile dist --target "$(uname -m)-unknown-linux-musl" -p spotrun-launch
exec target/debug/spotrun-demo "$@"
