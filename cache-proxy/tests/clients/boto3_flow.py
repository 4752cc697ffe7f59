"""boto3: managed multipart with concurrency, abort, delete_objects, paginated listings, presigned
response overrides, If-None-Match on PUT. Env: ENDPOINT, BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY."""
import filecmp
import os
import urllib.request

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

bucket = os.environ["BUCKET"]
s3 = boto3.client("s3", endpoint_url=os.environ["ENDPOINT"], region_name="us-east-1",
                  config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                retries={"max_attempts": 1}))

with open("big.bin", "wb") as f:
    f.write(os.urandom(23 << 20))
cfg = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20, max_concurrency=4)
s3.upload_file("big.bin", bucket, "boto/big.bin", Config=cfg)
assert s3.head_object(Bucket=bucket, Key="boto/big.bin")["ETag"].endswith('-5"')
s3.download_file(bucket, "boto/big.bin", "back.bin", Config=cfg)
assert filecmp.cmp("big.bin", "back.bin", shallow=False), "download differs"

up = s3.create_multipart_upload(Bucket=bucket, Key="boto/aborted")
s3.upload_part(Bucket=bucket, Key="boto/aborted", UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 100)
assert len(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
s3.abort_multipart_upload(Bucket=bucket, Key="boto/aborted", UploadId=up["UploadId"])
assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == [], "abort left an upload"

keys = [f"boto/list/{d}/{i:03d}" for d in ("a", "b", "c") for i in range(7)] + ["boto/list/top"]
for k in keys:
    s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
pages = s3.get_paginator("list_objects_v2").paginate(
    Bucket=bucket, Prefix="boto/list/", Delimiter="/", PaginationConfig={"PageSize": 2})
prefixes, contents = [], []
for p in pages:
    prefixes += [c["Prefix"] for c in p.get("CommonPrefixes", [])]
    contents += [c["Key"] for c in p.get("Contents", [])]
assert prefixes == ["boto/list/a/", "boto/list/b/", "boto/list/c/"], prefixes
assert contents == ["boto/list/top"], contents
flat = [c["Key"] for p in s3.get_paginator("list_objects_v2").paginate(
    Bucket=bucket, Prefix="boto/list/", PaginationConfig={"PageSize": 5}) for c in p.get("Contents", [])]
assert flat == sorted(keys), flat

r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": False})
assert sorted(d["Key"] for d in r["Deleted"]) == sorted(keys)
assert s3.list_objects_v2(Bucket=bucket, Prefix="boto/list/")["KeyCount"] == 0

url = s3.generate_presigned_url("get_object", Params={
    "Bucket": bucket, "Key": "boto/big.bin",
    "ResponseContentDisposition": 'attachment; filename="report.bin"',
    "ResponseContentType": "application/x-report"}, ExpiresIn=300)
with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=0-9"})) as resp:
    assert resp.headers["Content-Disposition"] == 'attachment; filename="report.bin"'
    assert resp.headers["Content-Type"] == "application/x-report"
    assert len(resp.read()) == 10

try:
    s3.put_object(Bucket=bucket, Key="boto/big.bin", Body=b"clobber", IfNoneMatch="*")
    raise AssertionError("If-None-Match: * overwrote an existing key")
except ClientError as e:
    assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 412, e.response
s3.put_object(Bucket=bucket, Key="boto/new", Body=b"fresh", IfNoneMatch="*")
print("boto3: all checks passed")
