"""Content fingerprints (sha256) of input files and canonical JSON hashing for cache keys.

Hashing a multi-GB annotation file on every `uniter status` would be slow, so digests are memoized
per host keyed by (path, size, mtime_ns, inode). The key that reaches a cache is still the content
digest; the memo only decides whether the file must be read again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

_BLOCK = 4 << 20
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
    path = Path(path)
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    memo_file = _memo_path()
    with _lock:
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
        hit = memo.get(str(path))
        if hit and hit[:3] == stamp:
            return hit[3]
    digest = sha256_file(path)
    with _lock:
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
        memo[str(path)] = [*stamp, digest]
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_file)
        except OSError:
            pass  # the memo is an optimization: a read-only home only costs re-hashing
    return digest
