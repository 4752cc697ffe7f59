#!/usr/bin/env bash
# s3cmd: multipart put, ls, get (it checks the MD5 it stored in metadata), del.
set -euo pipefail
fail() { echo "FAIL: $*" >&2; exit 1; }
host=${ENDPOINT#http://}
cat > s3cfg <<CFG
[default]
access_key = $AWS_ACCESS_KEY_ID
secret_key = $AWS_SECRET_ACCESS_KEY
host_base = $host
host_bucket = $host
use_https = False
signature_v2 = False
bucket_location = us-east-1
CFG
s3() { s3cmd -c s3cfg --no-progress "$@"; }
s3cmd --version >&2
head -c $((12 << 20)) /dev/urandom > f.bin
s3 put --multipart-chunk-size-mb=5 f.bin "s3://$BUCKET/s3cmd/f.bin"
listing=$(s3 ls "s3://$BUCKET/s3cmd/")  # captured: a pipe into grep -q can fail with EPIPE
grep -q "s3://$BUCKET/s3cmd/f.bin" <<<"$listing" || fail "ls"
s3 get "s3://$BUCKET/s3cmd/f.bin" back.bin
cmp f.bin back.bin || fail "get differs"
s3 del "s3://$BUCKET/s3cmd/f.bin"
[ -z "$(s3 ls "s3://$BUCKET/s3cmd/")" ] || fail "del"
echo "s3cmd: all checks passed"
