"""The one storage interface: every stage, the artifact layer and the catalog depend only on this."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable


class StorageError(Exception):
    """A storage operation failed; the message names the URI and what went wrong."""


@runtime_checkable
class Storage(Protocol):
    """Objects addressed by relative POSIX keys (``artifacts/ingest/<key>/pairs/x.parquet``).

    Contract shared by every implementation:
    - ``put`` / ``put_file`` are atomic: a reader sees the old object (or none) or the whole new one.
    - ``list`` never returns an object that is still being written.
    - Every failure of the medium (a disk error, an unreachable or refusing server) is a
      `StorageError` naming the object, never the backend's own exception.
    """

    uri: str  # the root: an absolute local directory or ``s3://bucket/prefix``

    def url(self, key: str) -> str:
        """Full address of ``key`` as DuckDB and users see it (absolute path or ``s3://…``)."""

    def check(self) -> None:
        """Fail fast, once at start-up: the root can be used (a local folder is created and written
        in; on S3 one listing tries the endpoint, the bucket and the credentials). Raises
        `StorageError` saying what failed and what to do."""

    def open(self, key: str) -> BinaryIO:
        """A seekable, buffered binary reader over the object."""

    def read_bytes(self, key: str) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, local_path: Path, move: bool = False) -> None:
        """Publish a finished local file under ``key`` (atomic). ``move=True`` lets the storage
        take the file instead of copying it (the caller must not need it afterwards)."""

    def copy(self, source: str, key: str) -> None:
        """Publish a copy of the object ``source`` under ``key`` (atomic), without bringing its
        bytes here where the medium can help: a hard link on a local disk, a server-side copy on
        S3. Objects are never changed in place, so a link is a copy; removing either name leaves
        the other whole (what `uniter gc` relies on)."""

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if no object is there, atomically (one winner among racing writers):
        True if this call created it, False if it existed. For leases."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """Keys of all objects under ``prefix`` (a folder-like prefix), sorted."""

    def remove(self, prefix: str) -> None:
        """Remove the object ``prefix`` or everything under it; missing is not an error."""


def check_key(key: str) -> str:
    """Reject keys that could escape the root or are ambiguous (``..``, absolute, empty parts)."""
    if not key or key.startswith("/") or "\\" in key:
        raise StorageError(f"invalid storage key {key!r}: expected a relative POSIX path")
    norm = posixpath.normpath(key)
    if norm != key.rstrip("/") or norm.startswith("..") or "/../" in f"/{norm}/":
        raise StorageError(f"invalid storage key {key!r}: expected a normalized relative path")
    return norm
