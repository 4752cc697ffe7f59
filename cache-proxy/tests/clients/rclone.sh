#!/usr/bin/env bash
# rclone (which lists with ListObjects V1 and keeps MD5s of multipart uploads in metadata).
set -euo pipefail
fail() { echo "FAIL: $*" >&2; exit 1; }
export RCLONE_CONFIG_PX_TYPE=s3 RCLONE_CONFIG_PX_PROVIDER=Other RCLONE_CONFIG_PX_ENDPOINT="$ENDPOINT" \
  RCLONE_CONFIG_PX_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" RCLONE_CONFIG_PX_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
  RCLONE_CONFIG_PX_REGION=us-east-1 RCLONE_CONFIG_PX_FORCE_PATH_STYLE=true RCLONE_CONFIG_PX_LIST_VERSION=1 \
  RCLONE_CONFIG=/dev/null
rc() { rclone --retries 1 --low-level-retries 2 "$@"; }
rclone version >&2  # all of it: `| head -1` under pipefail fails by chance with SIGPIPE (141)
mkdir up
head -c $((200 << 20)) /dev/urandom > up/big.bin
# 200 MiB in 16 MiB parts (above the 16 MiB cutoff: multipart).
rc copy --s3-chunk-size 16M --s3-upload-cutoff 16M up px:"$BUCKET"/rc/
rc check up px:"$BUCKET"/rc/ || fail "check"
[ "$(rc lsf px:"$BUCKET"/rc/)" = big.bin ] || fail "lsf"
rc copyto px:"$BUCKET"/rc/big.bin back.bin
cmp up/big.bin back.bin || fail "download differs"
rc deletefile px:"$BUCKET"/rc/big.bin
[ -z "$(rc lsf px:"$BUCKET"/rc/)" ] || fail "deletefile"
echo "rclone: all checks passed"
