#!/usr/bin/env bash
# The aws CLI's everyday commands against the proxy (issue 15's acceptance list). Env: ENDPOINT,
# BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; runs in the current (scratch) directory.
set -euo pipefail
fail() { echo "FAIL: $*" >&2; exit 1; }
# Debian's aws CLI v2 (installed by .ci/install); v1 needs botocore[crt] for CRC32C.
AWS_BIN=${AWS_BIN:-/usr/bin/aws}
aws() { "$AWS_BIN" --endpoint-url "$ENDPOINT" --region us-east-1 "$@"; }
aws --version >&2
export AWS_PAGER=''
head -c $((1 << 20)) /dev/urandom > small.bin
head -c $((100 << 20)) /dev/urandom > big.bin
aws s3 cp --only-show-errors small.bin "s3://$BUCKET/cli/small.bin"
# 100 MiB is above the CLI's 8 MiB multipart threshold: 13 parts, uploaded concurrently.
aws s3 cp --only-show-errors big.bin "s3://$BUCKET/cli/big.bin"
etag=$(aws s3api head-object --bucket "$BUCKET" --key cli/big.bin --query ETag --output text)
[[ $etag == *-13* ]] || fail "multipart ETag $etag"
aws s3 cp --only-show-errors "s3://$BUCKET/cli/big.bin" back.bin
cmp big.bin back.bin || fail "big file differs"
aws s3 cp --only-show-errors "s3://$BUCKET/cli/small.bin" back-small.bin
cmp small.bin back-small.bin || fail "small file differs"
# Listings are captured before matching: `aws ... | grep -q` under pipefail fails by chance when
# grep exits at its match and the CLI gets EPIPE writing the rest.
listing=$(aws s3 ls "s3://$BUCKET/cli/")
grep -q ' big.bin$' <<<"$listing" || fail "ls lacks big.bin"
listing=$(aws s3 ls "s3://$BUCKET/cl")
grep -q 'PRE cli/' <<<"$listing" || fail "ls lacks the cli/ prefix"

# sync twice: the second run finds everything in place and uploads nothing.
mkdir -p tree/sub
for i in $(seq 1 25); do head -c $((i * 1000)) /dev/urandom > "tree/f$i"; done
cp small.bin tree/sub/
# sync uploads a file whose mtime is newer than the object's LastModified, which S3 (and we) give in
# whole seconds: a file written in the same second as its upload looks newer on the second run.
find tree -type f -exec touch -d '2 minutes ago' {} +
aws s3 sync --only-show-errors tree "s3://$BUCKET/sync/"
second=$(aws s3 sync tree "s3://$BUCKET/sync/")
[ -z "$second" ] || fail "second sync uploaded: $second"
[ "$(aws s3 ls --recursive "s3://$BUCKET/sync/" | wc -l)" = 26 ] || fail "sync listing"

aws s3api copy-object --bucket "$BUCKET" --key cli/copy.bin --copy-source "$BUCKET/cli/small.bin" >/dev/null
aws s3 cp --only-show-errors "s3://$BUCKET/cli/copy.bin" copy.bin
cmp small.bin copy.bin || fail "copy differs"
if aws s3api head-object --bucket "$BUCKET" --key cli/small.bin --if-match '"00000000000000000000000000000000"' 2>err.txt; then
  fail "head-object --if-match with a wrong ETag succeeded"
fi
grep -q 412 err.txt || fail "wrong ETag: $(cat err.txt)"
aws s3api get-object --bucket "$BUCKET" --key cli/small.bin --range bytes=100-199 part.bin >/dev/null
cmp <(tail -c +101 small.bin | head -c 100) part.bin || fail "ranged get"

for alg in CRC32C SHA256; do
  aws s3api put-object --bucket "$BUCKET" --key "cli/sum-$alg" --body small.bin --checksum-algorithm "$alg" >/dev/null
done
if aws s3api put-object --bucket "$BUCKET" --key cli/bad-sum --body small.bin --checksum-crc32-c AAAAAA== 2>err.txt; then
  fail "a wrong CRC32C was accepted"
fi
grep -q BadDigest err.txt || fail "wrong checksum: $(cat err.txt)"
if aws s3api head-object --bucket "$BUCKET" --key cli/bad-sum 2>/dev/null; then fail "bad-sum was stored"; fi

aws s3 rm --only-show-errors "s3://$BUCKET/cli/small.bin"
if aws s3 ls "s3://$BUCKET/cli/small.bin" >/dev/null; then fail "rm left the key"; fi
aws s3 rm --only-show-errors --recursive "s3://$BUCKET/sync/"
[ -z "$(aws s3 ls --recursive "s3://$BUCKET/sync/" || true)" ] || fail "rm --recursive"
echo "aws: all checks passed"
