#!/bin/sh
# Renders gitlab-runner's config.toml from the ConfigMap template, replacing the @@NAME@@ placeholders
# with secrets from the environment (TOML-escaped), into a memory-backed volume; then runs the runner.
set -eu
template="${SPOTRUN_CONFIG_TEMPLATE:-/configmaps/config.toml}"
config="${SPOTRUN_CONFIG_FILE:-/home/gitlab-runner/.gitlab-runner/config.toml}"

if [ -z "${RUNNER_TOKEN:-}" ]; then
  echo "spotrun: RUNNER_TOKEN is empty: put the runner authentication token (glrt-...) in the Secret named by runners.secret, key runner-token" >&2
  exit 1
fi
if grep -q '@@CACHE_S3_' "$template"; then
  if [ -z "${CACHE_S3_ACCESS_KEY:-}" ] || [ -z "${CACHE_S3_SECRET_KEY:-}" ]; then
    echo "spotrun: CACHE_S3_ACCESS_KEY or CACHE_S3_SECRET_KEY is empty: check keys accesskey and secretkey of the Secret named by runners.cache.secretName" >&2
    exit 1
  fi
fi

umask 077
# index()/substr() only: no regex or replacement metacharacters, so any secret value is safe.
awk '
function esc(s,   out, i, c) {
  out = ""
  for (i = 1; i <= length(s); i++) {
    c = substr(s, i, 1)
    if (c == "\\" || c == "\"") out = out "\\"
    out = out c
  }
  return out
}
function subst(line, ph, value,   p, out) {
  out = ""
  while ((p = index(line, ph)) > 0) {
    out = out substr(line, 1, p - 1) value
    line = substr(line, p + length(ph))
  }
  return out line
}
BEGIN {
  token = esc(ENVIRON["RUNNER_TOKEN"])
  access = esc(ENVIRON["CACHE_S3_ACCESS_KEY"])
  secret = esc(ENVIRON["CACHE_S3_SECRET_KEY"])
}
{
  line = subst($0, "@@RUNNER_TOKEN@@", token)
  line = subst(line, "@@CACHE_S3_ACCESS_KEY@@", access)
  line = subst(line, "@@CACHE_S3_SECRET_KEY@@", secret)
  print line
}
' "$template" > "$config.tmp"
mv "$config.tmp" "$config"

if [ "$#" -eq 0 ]; then
  set -- run
fi
exec gitlab-runner "$@" --config "$config"
