#!/usr/bin/env bash
# The main job: an emulated GKE cluster and the cache proxy, running a real job end to end.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v bwrap >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap
fi
cargo build --locked --quiet --bins
exec target/debug/spotrun-demo "$@"
