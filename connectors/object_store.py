"""Checkpoints on S3 or an S3-compatible store (MinIO, Ceph, GCS's XML API): copy in, copy out, list, delete, read headers.

Why it exists: EKS and GKE block storage offer no ReadWriteMany volume, so the base, each round's deployed
candidate and the main line live under one URL prefix, `s3://bucket/prefix` (CPTD_CHECKPOINT_URL), that vLLM
streams from with the Run:ai model streamer. The daemon copies what a job reads into local scratch and copies
what a round publishes out; jobs never touch the store. Endpoint, region and credentials follow the AWS
conventions boto3 reads itself (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, web
identity, instance roles), the same variables vLLM's streamer reads, so one Secret serves both.

Every copy is whole-or-nothing: a download lands in a tmp directory renamed into place, and an upload writes
`.complete` last, so a reader never takes a half-copied checkpoint for a checkpoint. No decisions here.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEME = "s3://"
COMPLETE = ".complete"  # written last by an upload; a prefix without it is a copy cut short


def is_object_url(ref: str | None) -> bool:
    return bool(ref) and str(ref).startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix"), no trailing slash."""
    if not is_object_url(url):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, key = url[len(SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket")
    return bucket, key.strip("/")


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


@dataclass
class ObjectStore:
    """One S3 client (boto3) for every call; thread-safe as boto3 clients are."""

    client: Any

    @classmethod
    def connect(cls, endpoint_url: str | None = None) -> ObjectStore:
        import boto3
        from botocore.config import Config

        # path-style addressing: MinIO, moto and most self-hosted stores have no per-bucket DNS names
        config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"})
        return cls(boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None, config=config))

    # --- listing ---------------------------------------------------------------
    def objects(self, url: str) -> Iterator[tuple[str, int]]:
        """(key relative to `url`, size) of every object under the prefix `url`/."""
        bucket, prefix = split_url(url)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        for page in pages:
            for o in page.get("Contents", []):
                yield o["Key"][len(prefix) + 1 if prefix else 0 :], int(o["Size"])

    def children(self, url: str) -> list[str]:
        """The names of the `directories` directly under `url` (S3 common prefixes)."""
        bucket, prefix = split_url(url)
        out = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", Delimiter="/")
        for page in pages:
            out += [p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in page.get("CommonPrefixes", [])]
        return out

    def complete(self, url: str) -> bool:
        return self.size(join(url, COMPLETE)) is not None

    def size(self, url: str) -> int | None:
        from botocore.exceptions import ClientError

        bucket, key = split_url(url)
        try:
            return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    # --- reading ---------------------------------------------------------------
    def read(self, url: str, start: int | None = None, length: int | None = None) -> bytes:
        """An object, or `length` bytes of it from `start` (one ranged GET)."""
        bucket, key = split_url(url)
        kw = {"Range": f"bytes={start}-{start + length - 1}"} if start is not None and length else {}
        return bytes(self.client.get_object(Bucket=bucket, Key=key, **kw)["Body"].read())

    def safetensors_header(self, url: str) -> tuple[dict[str, Any], int, int]:
        """(header, header length, object size) of a safetensors object from two ranged GETs: the 8-byte length,
        then the JSON header. The tensors are never read."""
        size = self.size(url)
        if size is None:
            raise FileNotFoundError(url)
        n = int.from_bytes(self.read(url, 0, 8), "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"header length {n} exceeds object size {size}")
        return json.loads(self.read(url, 8, n)), n, size

    # --- copies ----------------------------------------------------------------
    def upload_dir(self, local: str | Path, url: str) -> int:
        """Copy a directory's files (recursively) under `url`/, then `.complete`; returns the bytes sent. Files already
        there with the same size are skipped, so a copy cut short is finished by the next call."""
        src = Path(local)
        bucket, prefix = split_url(url)
        there = dict(self.objects(url))
        sent = 0
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = f.relative_to(src).as_posix()
            if there.get(rel) == f.stat().st_size:
                continue
            self.client.upload_file(str(f), bucket, f"{prefix}/{rel}")
            sent += f.stat().st_size
        self.client.put_object(Bucket=bucket, Key=f"{prefix}/{COMPLETE}", Body=b"")
        return sent

    def download_dir(self, url: str, local: str | Path) -> Path:
        """Copy every object under `url`/ into `local` (made whole or not at all: tmp directory, then rename). A
        prefix without `.complete` is refused: it is an upload cut short, not a checkpoint."""
        dst = Path(local)
        if dst.is_dir():
            return dst
        if not self.complete(url):
            raise FileNotFoundError(f"{url} holds no complete checkpoint (no {COMPLETE} marker)")
        bucket, prefix = split_url(url)
        tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, _ in self.objects(url):
            if rel == COMPLETE:
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(bucket, f"{prefix}/{rel}", str(target))
        tmp.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dst)
        return dst

    def delete_prefix(self, url: str) -> int:
        """Delete every object under `url`/ (1,000 per request); returns how many."""
        bucket, prefix = split_url(url)
        keys = [f"{prefix}/{rel}" for rel, _ in self.objects(url)]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)


@dataclass
class ObjectFiles:
    """A checkpoint directory on the store, read as the pre-swap checks read a local one (connectors/vllm.py)."""

    store: ObjectStore
    url: str

    def name(self) -> str:
        return self.url

    def read(self, name: str) -> bytes | None:
        if self.store.size(join(self.url, name)) is None:
            return None
        return self.store.read(join(self.url, name))

    def safetensors(self) -> list[str]:
        return sorted(rel for rel, _ in self.store.objects(self.url) if "/" not in rel and rel.endswith(".safetensors"))

    def header(self, name: str) -> tuple[dict[str, Any], int, int]:
        return self.store.safetensors_header(join(self.url, name))
