"""Storage on S3 or any S3-compatible server (boto3); credentials come only from the environment.

Objects are written with single PUTs or multipart uploads, both of which become visible
all at once, so readers never see half an object.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from storage.base import StorageError, check_key


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"invalid S3 URI {uri!r}: expected s3://bucket[/prefix]")
    return parsed.netloc, parsed.path.strip("/")


class S3Storage:
    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        # NOTE: the session reads credentials from the standard chain (env, ~/.aws, instance
        # role). We never store or log them; only the endpoint and region are ours.
        self._session = boto3.session.Session(region_name=region)
        self.client = self._session.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 8, "mode": "adaptive"}, s3={"addressing_style": "path"}),
        )

    def credentials(self):
        """Frozen credentials for tools that cannot use boto3's chain themselves (DuckDB httpfs)."""
        creds = self._session.get_credentials()
        return creds.get_frozen_credentials() if creds else None

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _error(self, key: str, exc: Exception) -> StorageError:
        return StorageError(f"{self.url(key)}: {exc}")

    def open(self, key: str) -> BinaryIO:
        head = self._head(key)
        if head is None:
            raise StorageError(f"{self.url(key)}: no such object")
        return io.BufferedReader(_RangeReader(self, self._key(key), head["ContentLength"]), buffer_size=1 << 20)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise StorageError(f"{self.url(key)}: no such object") from None
            raise self._error(key, exc) from None

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            raise self._error(key, exc) from None

    def put_file(self, key: str, local_path: Path, move: bool = False) -> None:
        try:
            self.client.upload_file(str(local_path), self.bucket, self._key(key))
        except Exception as exc:
            raise self._error(key, exc) from None

    def create(self, key: str, data: bytes) -> bool:
        # NOTE: a conditional PUT (If-None-Match: *), which S3 and the moto server decide atomically;
        # a HEAD then PUT would let two writers both win.
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise self._error(key, exc) from None

    def _head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(key, exc) from None

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        strip = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    # A prefix "a/b" must not match "a/bc": only the object itself or its children.
                    if k == full or k.startswith(full + "/"):
                        keys.append(k[len(strip) :])
        except Exception as exc:
            raise self._error(prefix, exc) from None
        return sorted(keys)

    def remove(self, prefix: str) -> None:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r}, endpoint_url={self.endpoint_url!r})"


class _RangeReader(io.RawIOBase):
    """Seekable raw reader over one S3 object using ranged GETs (Parquet readers seek to the footer)."""

    def __init__(self, storage: S3Storage, key: str, size: int):
        self._s3, self._key, self._size, self._pos = storage, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        if self._pos >= self._size:
            return 0
        end = min(self._pos + len(buffer), self._size) - 1
        body = self._s3.client.get_object(Bucket=self._s3.bucket, Key=self._key, Range=f"bytes={self._pos}-{end}")[
            "Body"
        ].read()
        n = len(body)
        buffer[:n] = body
        self._pos += n
        return n
