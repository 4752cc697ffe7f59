#!/bin/sh
# A minimal custom executor that runs every stage on the host, for the harness's own tests.
# FAKE_STATE (a dir) records calls; FAKE_PREPARE_FAILURES makes the first N prepares exit 2.
set -u
echo "$*" >> "$FAKE_STATE/calls"
case "$1" in
config)
  printf '{"builds_dir":"%s/builds","cache_dir":"%s/cache","builds_dir_is_shared":false,"driver":{"name":"fake","version":"0.1"}}\n' "$FAKE_STATE" "$FAKE_STATE"
  echo "config on stderr" >&2 ;;
prepare)
  n=$(cat "$FAKE_STATE/prepares" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$FAKE_STATE/prepares"
  if [ "$n" -le "${FAKE_PREPARE_FAILURES:-0}" ]; then echo "prepare attempt $n fails"; exit "$SYSTEM_FAILURE_EXIT_CODE"; fi
  echo "prepared with $CUSTOM_ENV_CI_JOB_IMAGE" ;;
run)
  bash "$2" & child=$!
  trap 'kill -TERM $child 2>/dev/null; wait $child; echo "stage $3 terminated"; exit $SYSTEM_FAILURE_EXIT_CODE' TERM
  wait $child; rc=$?
  if [ "$rc" -ne 0 ]; then
    if [ "${FAKE_SYSTEM_FAIL_STAGE:-}" = "$3" ]; then exit "$SYSTEM_FAILURE_EXIT_CODE"; fi
    echo "$rc" > "$BUILD_EXIT_CODE_FILE"; exit "$BUILD_FAILURE_EXIT_CODE"
  fi ;;
cleanup)
  echo "cleaned up" ;;
esac
