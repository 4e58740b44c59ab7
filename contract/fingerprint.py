"""Content fingerprints (sha256) of input files and canonical JSON hashing for cache keys.

Hashing a multi-GB annotation file on every `uniter status` would be slow, so digests are memoized
per host keyed by (path, size, mtime_ns, inode). The key that reaches a cache is still the content
digest; the memo only decides whether the file must be read again. The memo keeps only files that
still exist, at most `MEMO_ENTRIES` of them: every stage of every run parses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_BLOCK = 4 << 20
# A scheduled rebuild's host fingerprinted its TSVs, test fixtures and benchmark files for months:
# the memo had grown to 6,912 entries (1.3 MB, 10-15 ms a parse, several parses per stage).
MEMO_ENTRIES = 10_000
_lock = threading.Lock()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _memo_path() -> Path:
    base = os.environ.get("UNITER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "uniter")
    return Path(base) / "fingerprints.json"


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the file's content, memoized while the file's stat is unchanged."""
    return file_fingerprints([path])[0]


def file_fingerprints(paths: Sequence[str | Path]) -> list[str]:
    """sha256 of each file's content, memoized while its stat is unchanged: one read of the memo and
    at most one write for the whole list (per file, the memo's parse made a set of N images cost
    N × the memo's size: 24 ms an image with 7,500 entries)."""
    files = [Path(p) for p in paths]
    stamps = [[st.st_size, st.st_mtime_ns, st.st_ino] for st in (f.stat() for f in files)]
    memo_file = _memo_path()
    with _lock:
        memo = _read_memo(memo_file)
    digests: list[str] = []
    fresh: dict[str, list] = {}
    for path, stamp in zip(files, stamps, strict=True):
        hit = memo.get(str(path))
        if hit and hit[:3] == stamp:
            digests.append(hit[3])
        else:
            digests.append(sha256_file(path))
            fresh[str(path)] = [*stamp, digests[-1]]
    if fresh:
        with _lock:
            memo = _read_memo(memo_file)  # what other processes added meanwhile is kept
            for name in fresh:  # re-inserted last: the newest entries are the ones a cap keeps
                memo.pop(name, None)
            memo.update(fresh)
            memo = {p: v for p, v in memo.items() if p in fresh or os.path.exists(p)}
            memo = dict(list(memo.items())[-MEMO_ENTRIES:])
            try:
                memo_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(memo))
                os.replace(tmp, memo_file)
            except OSError:
                pass  # the memo is an optimization: a read-only home only costs re-hashing
    return digests


def _read_memo(memo_file: Path) -> dict[str, list]:
    try:
        return json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def folder_files(folder: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files under `folder` (recursively) with one of `suffixes`, in a stable order."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def folder_fingerprint(folder: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> str:
    """sha256 over (relative path, content sha256) of every matching file. The per-file digests are
    memoized in one file per folder (a folder of 100k images must not rewrite a memo 100k times)."""
    folder = Path(folder)
    memo_file = _memo_path().with_name(f"folder-{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json")
    memo = _read_memo(memo_file)
    fresh, h = {}, hashlib.sha256()
    for path in folder_files(folder, suffixes):
        rel = path.relative_to(folder).as_posix()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = memo.get(rel)
        digest = hit[3] if hit and hit[:3] == stamp else sha256_file(path)
        fresh[rel] = [*stamp, digest]
        h.update(f"{rel}\0{digest}\n".encode())
    if fresh != memo:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(fresh))
        os.replace(tmp, memo_file)
    return h.hexdigest()
