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
import botocore.session
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as S3ConnectionError

from storage.base import StorageError, check_key

# NOTE: botocore retries connection errors, timeouts and 5xx with jittered exponential backoff from
# 50 ms (throttling: from 1 s, at most 20 s a wait); 10 attempts wait at most ~26 s in all before an
# operation fails as a StorageError. A server that drops packets costs CONNECT_TIMEOUT per attempt,
# not botocore's 60 s. AWS_MAX_ATTEMPTS (or max_attempts in ~/.aws/config) sets another count.
MAX_ATTEMPTS = 10
CONNECT_TIMEOUT = 5
FAILURES = (BotoCoreError, ClientError, S3UploadFailedError)
UNREACHABLE = (S3ConnectionError, HTTPClientError)
REJECTED_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}


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
        core = botocore.session.get_session()
        self.attempts = int(core.get_config_variable("max_attempts") or MAX_ATTEMPTS)
        self._session = boto3.session.Session(botocore_session=core, region_name=region)
        self.client = self._session.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                retries={"total_max_attempts": self.attempts, "mode": "adaptive"},
                connect_timeout=CONNECT_TIMEOUT,
                s3={"addressing_style": "path"},
            ),
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
        return StorageError(f"{self.url(key)}: {self._describe(exc)}")

    def _describe(self, exc: Exception) -> str:
        if isinstance(exc, UNREACHABLE):  # botocore's text repeats the object's URL
            endpoint = self.client.meta.endpoint_url
            return f"no answer from {endpoint} ({type(exc).__name__}; gave up after {self.attempts} attempts)"
        return str(exc)

    def check(self) -> None:
        # A one-key listing: it needs the endpoint, the bucket and credentials allowed to list it,
        # which every run needs anyway; unlike HEAD bucket, its error names the reason.
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except NoCredentialsError:
            raise StorageError(
                "no S3 credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, "
                "or run where an instance role provides them."
            ) from None
        except UNREACHABLE as exc:
            raise StorageError(
                f"{self._describe(exc)}. Check that the server is running and that the endpoint URL is right."
            ) from None
        except ClientError as exc:
            raise StorageError(self._refusal(exc)) from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot use S3: {exc}") from None

    def _refusal(self, exc: ClientError) -> str:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", "").rstrip(".")
        server = f" at {self.endpoint_url}" if self.endpoint_url else ""
        if code in ("NoSuchBucket", "404"):
            return (
                f"the bucket {self.bucket!r} does not exist{server}. Create it (`aws s3 mb s3://{self.bucket}`) "
                "or correct the bucket name."
            )
        if code in REJECTED_CREDENTIALS:
            return (
                f"the S3 server{server} rejected the credentials ({code}: {message}). Check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, or AWS_PROFILE and ~/.aws/credentials."
            )
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return (
                f"access denied to s3://{self.bucket}/{self.prefix} ({code}: {message}). The credentials must "
                "allow listing, reading, writing and deleting objects under it."
            )
        return f"the S3 server{server} answered {code}: {message or exc}"

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
        except FAILURES as exc:
            raise self._error(key, exc) from None

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except FAILURES as exc:
            raise self._error(key, exc) from None

    def put_file(self, key: str, local_path: Path, move: bool = False) -> None:
        try:
            self.client.upload_file(str(local_path), self.bucket, self._key(key))
        except FAILURES as exc:
            raise self._error(key, exc) from None

    def copy(self, source: str, key: str) -> None:
        try:
            # NOTE: copy_object (one request, up to 5 GB: a shard is far smaller), not the managed
            # copy, which HEADs first and may split into parts.
            self.client.copy_object(
                Bucket=self.bucket, Key=self._key(key), CopySource={"Bucket": self.bucket, "Key": self._key(source)}
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise StorageError(f"{self.url(source)}: no such object") from None
            raise self._error(key, exc) from None
        except FAILURES as exc:
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
        except FAILURES as exc:
            raise self._error(key, exc) from None

    def _head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(key, exc) from None
        except FAILURES as exc:
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
        except FAILURES as exc:
            raise self._error(prefix, exc) from None
        return sorted(keys)

    def remove(self, prefix: str) -> None:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            try:
                done = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except FAILURES as exc:
                raise self._error(prefix, exc) from None
            # Quiet mode lists the objects it could not delete in its answer; it raises nothing.
            if failed := done.get("Errors"):
                first = failed[0]
                raise StorageError(
                    f"s3://{self.bucket}/{first.get('Key')}: not removed ({first.get('Code')}: {first.get('Message')})"
                )

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
        try:
            body = self._s3.client.get_object(Bucket=self._s3.bucket, Key=self._key, Range=f"bytes={self._pos}-{end}")[
                "Body"
            ].read()
        except FAILURES as exc:
            raise StorageError(f"s3://{self._s3.bucket}/{self._key}: {self._s3._describe(exc)}") from None
        n = len(body)
        buffer[:n] = body
        self._pos += n
        return n
