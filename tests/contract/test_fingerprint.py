"""File digests memoized per host: one memo read and at most one write per list of files."""

from __future__ import annotations

import json
import os

from contract.fingerprint import _memo_path, file_fingerprint, file_fingerprints, sha256_file


def test_a_list_of_files_is_hashed_against_one_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITER_CACHE_DIR", str(tmp_path / "cache"))
    memo = _memo_path()
    memo.parent.mkdir(parents=True)
    memo.write_text(json.dumps({"/elsewhere/a.jpg": [1, 2, 3, "ab" * 32]}))  # another run's entry
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(bytes([i]) * (100 + i))
    assert file_fingerprints(files) == [sha256_file(f) for f in files]
    stored = json.loads(memo.read_text())
    assert set(stored) == {"/elsewhere/a.jpg", *map(str, files)}  # merged, nothing lost

    # a hit is served from the memo: a stored digest that no longer matches the content is returned
    # as long as the file's stat is unchanged (the stat is the memo's key)
    stored[str(files[0])][3] = "0" * 64
    memo.write_text(json.dumps(stored))
    assert file_fingerprint(files[0]) == "0" * 64
    files[0].write_bytes(b"changed")  # size and mtime change: hashed again
    os.utime(files[0], ns=(1, 1))
    assert file_fingerprint(files[0]) == sha256_file(files[0])
