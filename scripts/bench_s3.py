#!/usr/bin/env python3
"""boto3 helpers for scripts/bench-purge.

  bench_s3.py upload       --endpoint URL --bucket B --prefix P --count N [--size BYTES]
  bench_s3.py batch-delete --endpoint URL --bucket B --prefix P   (prints seconds)
  bench_s3.py count        --endpoint URL --bucket B --prefix P   (prints the key count)
"""
import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config


def client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(max_pool_connections=32, retries={"max_attempts": 3}),
    )


def keys(s3, bucket, prefix):
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield obj["Key"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=["upload", "batch-delete", "count"])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--size", type=int, default=1024)
    a = p.parse_args()
    s3 = client(a.endpoint)

    if a.action == "upload":
        body = b"m" * a.size
        names = [f"{a.prefix}{i:06d}.jpg" for i in range(a.count)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: s3.put_object(Bucket=a.bucket, Key=k, Body=body), names))
    elif a.action == "batch-delete":
        # The common hand-written purge: list everything, then delete 1,000 keys per request.
        started = time.monotonic()
        found = list(keys(s3, a.bucket, a.prefix))
        for i in range(0, len(found), 1000):
            chunk = [{"Key": k} for k in found[i : i + 1000]]
            s3.delete_objects(Bucket=a.bucket, Delete={"Objects": chunk, "Quiet": True})
        print(f"{time.monotonic() - started:.3f}")
    else:
        print(sum(1 for _ in keys(s3, a.bucket, a.prefix)))


if __name__ == "__main__":
    main()
