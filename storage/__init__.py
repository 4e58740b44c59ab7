"""One storage interface over a local directory and S3, chosen in one place: `open_storage`."""

from __future__ import annotations

from storage.base import Storage, StorageError, check_key
from storage.local import LocalStorage


def open_storage(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Storage:
    """The storage for ``uri``: ``s3://bucket/prefix`` → S3, anything else → a local directory."""
    if uri.startswith("s3://"):
        from storage.s3 import S3Storage  # noqa: PLC0415 — boto3 loads only for S3 storage

        return S3Storage(uri, endpoint_url=endpoint_url, region=region)
    if "://" in uri:
        raise StorageError(f"unsupported storage URI {uri!r}: expected a local path or s3://bucket/prefix")
    return LocalStorage(uri)


__all__ = ["LocalStorage", "Storage", "StorageError", "check_key", "open_storage"]
