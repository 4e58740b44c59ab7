"""Storage on a local directory (the embedded default): atomic writes by rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from storage.base import StorageError, check_key

# Temporary files carry this marker so `list` can hide them from readers.
TMP_MARKER = ".tmp-"

_USE_A_FOLDER = "Use a folder this user can create and write to."


def _raise(exc: OSError) -> None:
    raise exc


def _write_synced(path: Path, data: bytes) -> None:
    """Write and fsync: a file published by rename or link is whole even after a power cut."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class LocalStorage:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def url(self, key: str) -> str:
        return str(self._path(key))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise StorageError(f"{self.root} is a file, not a folder. {_USE_A_FOLDER}") from None
        except NotADirectoryError:
            raise StorageError(
                f"cannot create the folder {self.root}: a folder on its path is a file. {_USE_A_FOLDER}"
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot create the folder {self.root} ({exc.strerror}). {_USE_A_FOLDER}") from None
        # NOTE: a real write, not os.access(): access() answers from the permission bits, which an NFS
        # server (root squashing) or a security module can overrule. `list` hides the probe's name.
        probe = self.root / f".write-check{TMP_MARKER}{uuid.uuid4().hex}"
        try:
            probe.touch(exist_ok=False)
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"cannot write in the folder {self.root} ({exc.strerror}). {_USE_A_FOLDER}") from None

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """OSErrors (a full disk, a folder made read-only) as StorageErrors naming the object."""
        try:
            yield
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) != self.url(key) else ""
            raise StorageError(f"{self.url(key)}: {exc.strerror or exc}{where}") from None

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise StorageError(f"{self.url(key)}: no such object") from None
        except OSError as exc:
            raise StorageError(f"{self.url(key)}: {exc.strerror or exc}") from None

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def _tmp_for(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}{TMP_MARKER}{uuid.uuid4().hex}")

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._errors(key):
            tmp = self._tmp_for(path)
            try:
                _write_synced(tmp, data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def put_file(self, key: str, local_path: Path, move: bool = False) -> None:
        path = self._path(key)
        with self._errors(key):
            tmp = self._tmp_for(path)
            try:
                # NOTE: into a temporary name beside the target, then rename: atomic only within one
                # filesystem, so the caller's file is moved there only if it is ours to take and
                # already on the same device; otherwise copied.
                if move and os.stat(local_path).st_dev == os.stat(tmp.parent).st_dev:
                    os.replace(local_path, tmp)
                else:
                    shutil.copyfile(local_path, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def copy(self, source: str, key: str) -> None:
        src, path = self._path(source), self._path(key)
        with self._errors(source):
            if not src.is_file():
                raise StorageError(f"{self.url(source)}: no such object")
            tmp = self._tmp_for(path)
            try:
                try:
                    os.link(src, tmp)  # the published file never changes: a second name suffices
                except OSError:
                    shutil.copyfile(src, tmp)  # another filesystem, or one without hard links
                    with open(tmp, "rb+") as f:
                        os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        with self._errors(key):
            tmp = self._tmp_for(path)
            try:
                _write_synced(tmp, data)
                # NOTE: link() fails if the name exists, and the file it publishes is already whole.
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        with self._errors(key):
            return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        with self._errors(prefix):
            if base.is_file():
                return [check_key(prefix)]
            if not base.is_dir():
                return []
            keys = []
            # An unreadable folder is an error, not an empty one (os.walk skips it silently).
            for dirpath, _dirs, files in os.walk(base, onerror=_raise):
                for name in files:
                    if TMP_MARKER in name:
                        continue
                    keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def remove(self, prefix: str) -> None:
        path = self._path(prefix)
        with self._errors(prefix):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"
