"""File digests memoized per host: one memo read and at most one write per list of files."""

from __future__ import annotations

import json
import os

import contract.fingerprint
from contract.fingerprint import _memo_path, file_fingerprint, file_fingerprints, sha256_file


def test_a_list_of_files_is_hashed_against_one_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITER_CACHE_DIR", str(tmp_path / "cache"))
    memo = _memo_path()
    memo.parent.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere.jpg"
    elsewhere.write_bytes(b"x")
    memo.write_text(json.dumps({str(elsewhere): [1, 2, 3, "ab" * 32]}))  # another run's entry
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(bytes([i]) * (100 + i))
    assert file_fingerprints(files) == [sha256_file(f) for f in files]
    stored = json.loads(memo.read_text())
    assert set(stored) == {str(elsewhere), *map(str, files)}  # merged, nothing lost

    # a hit is served from the memo: a stored digest that no longer matches the content is returned
    # as long as the file's stat is unchanged (the stat is the memo's key)
    stored[str(files[0])][3] = "0" * 64
    memo.write_text(json.dumps(stored))
    assert file_fingerprint(files[0]) == "0" * 64
    files[0].write_bytes(b"changed")  # size and mtime change: hashed again
    os.utime(files[0], ns=(1, 1))
    assert file_fingerprint(files[0]) == sha256_file(files[0])


def test_the_memo_forgets_files_that_are_gone_and_keeps_the_newest(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(contract.fingerprint, "MEMO_ENTRIES", 3)
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(str(i))
    file_fingerprints(files[:2])
    files[0].unlink()
    file_fingerprint(files[2])
    assert list(json.loads(_memo_path().read_text())) == [str(files[1]), str(files[2])]  # 0 is gone
    file_fingerprints(files[3:])
    # at most MEMO_ENTRIES, the newest: the entry written first goes
    assert list(json.loads(_memo_path().read_text())) == [str(files[2]), str(files[3]), str(files[4])]
    assert file_fingerprint(files[1]) == sha256_file(files[1])  # a forgotten file is hashed again
    assert str(files[1]) in json.loads(_memo_path().read_text())
