"""The storage interface, on a local folder and on a real S3-protocol server (moto, loopback)."""

from __future__ import annotations

import re
import threading
import time
import uuid
from urllib.parse import urlparse

import pytest

from storage import StorageError
from storage.local import LocalStorage
from storage.s3 import S3Storage
from tests.conftest import free_port, make_bucket
from tests.fixtures.proxy import TcpProxy


def test_put_read_exists_list_remove(storage):
    storage.put("a/b/one.json", b"1")
    storage.put("a/b/two.json", b"22")
    storage.put("a/bc/three.json", b"333")
    assert storage.read_bytes("a/b/two.json") == b"22"
    assert storage.exists("a/b/one.json")
    assert not storage.exists("a/b/none.json")
    assert storage.list("a/b") == ["a/b/one.json", "a/b/two.json"]  # not a/bc
    assert storage.list("a") == ["a/b/one.json", "a/b/two.json", "a/bc/three.json"]
    assert storage.list("nothing/here") == []

    storage.remove("a/b")
    assert storage.list("a") == ["a/bc/three.json"]
    storage.remove("a/bc/three.json")
    storage.remove("a/bc/three.json")  # missing is not an error
    assert storage.list("a") == []


def test_put_file_and_seekable_open(storage, tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB: several reads through the buffer
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    storage.put_file("x/blob.bin", local)
    assert local.exists(), "put_file must not consume the caller's file"
    with storage.open("x/blob.bin") as f:
        f.seek(-10, 2)
        assert f.read() == data[-10:]
        f.seek(1000)
        assert f.read(5) == data[1000:1005]
        f.seek(0)
        assert f.read() == data


def test_missing_object_errors_name_the_uri(storage):
    with pytest.raises(StorageError, match="no such object") as exc:
        storage.read_bytes("not/there.json")
    assert "not/there.json" in str(exc.value)
    with pytest.raises(StorageError, match="no such object"):
        storage.open("not/there.json")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", "a/./b", ""])
def test_keys_cannot_escape_the_root(storage, key):
    with pytest.raises(StorageError, match="invalid storage key"):
        storage.put(key, b"x")


def test_local_put_is_atomic_and_hides_temporaries(tmp_path):
    """Readers racing a writer see the old or the new object, never a torn one."""
    store = LocalStorage(tmp_path)
    old, new = b"o" * 1_000_000, b"n" * 2_000_000
    store.put("obj", old)
    seen: set[int] = set()
    listed: set[tuple[str, ...]] = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(len(store.read_bytes("obj")))
            listed.add(tuple(store.list("obj")))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(20):
        store.put("obj", new)
        store.put("obj", old)
    stop.set()
    t.join()
    assert seen <= {len(old), len(new)}
    assert listed == {("obj",)}
    # An interrupted writer's temporary file is never listed.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".x.parquet.tmp-123").write_bytes(b"partial")
    (tmp_path / "d" / "x.json").write_bytes(b"{}")
    assert store.list("d") == ["d/x.json"]


def test_create_has_exactly_one_winner(storage):
    """`create` is the lease's only primitive: among racing writers exactly one wins, and the
    object holds the winner's bytes whole (local: a link; S3: a conditional PUT)."""
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        if storage.create("leases/x/00000001.json", f"writer {i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert storage.read_bytes("leases/x/00000001.json") == f"writer {wins[0]}".encode()
    assert storage.create("leases/x/00000001.json", b"late") is False
    assert storage.list("leases/x") == ["leases/x/00000001.json"]  # no temporary left behind


def test_local_failures_are_storage_errors_naming_the_object(tmp_path):
    """An OSError is a StorageError naming the object (`uniter` exits 2 with it, not 1)."""
    store = LocalStorage(tmp_path)
    store.put("x", b"a file")
    for write in (store.put, store.create):
        with pytest.raises(StorageError, match=f"^{re.escape(str(tmp_path / 'x' / 'y'))}: File exists"):
            write("x/y", b"its folder would be the file x")  # create must not answer "already there"
    store.put("d/e", b"1")
    with pytest.raises(StorageError, match=f"^{re.escape(str(tmp_path / 'd'))}: Is a directory"):
        store.read_bytes("d")


def test_s3_failures_are_storage_errors_naming_the_object(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    down = S3Storage("s3://uniter-bucket/p", endpoint_url=f"http://127.0.0.1:{free_port()}")
    (tmp_path / "f").write_bytes(b"x")
    calls = {
        "put": lambda: down.put("a/b", b"x"),
        "put_file": lambda: down.put_file("a/b", tmp_path / "f"),
        "create": lambda: down.create("a/b", b"x"),
        "read_bytes": lambda: down.read_bytes("a/b"),
        "open": lambda: down.open("a/b"),
        "exists": lambda: down.exists("a/b"),
        "list": lambda: down.list("a"),
        "remove": lambda: down.remove("a"),
    }
    for name, call in calls.items():
        with pytest.raises(StorageError, match=r"^s3://uniter-bucket/p/a\S*: no answer from .* after 2 attempts"):
            call()
            pytest.fail(f"{name} did not fail")
    missing = S3Storage(f"s3://uniter-missing-{uuid.uuid4().hex[:8]}/p", endpoint_url=s3_endpoint)
    with pytest.raises(StorageError, match="NoSuchBucket"):
        missing.put("a/b", b"x")


def test_s3_retries_an_endpoint_that_comes_back_and_reports_one_that_does_not(s3_endpoint, monkeypatch):
    """Connection errors are retried with backoff (10 attempts, at most ~26 s of waiting): an endpoint
    back within a fraction of a second loses nothing; a read whose endpoint stays away fails cleanly."""
    bucket = make_bucket(s3_endpoint)
    with TcpProxy(urlparse(s3_endpoint).port) as proxy:
        store = S3Storage(f"s3://{bucket}/p", endpoint_url=proxy.url)
        proxy.stop()
        threading.Timer(0.3, proxy.start).start()
        started = time.time()
        store.put("a/b", b"written once the endpoint is back")
        assert time.time() - started >= 0.3
        assert store.read_bytes("a/b") == b"written once the endpoint is back"

        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        store = S3Storage(f"s3://{bucket}/p", endpoint_url=proxy.url)
        reader = store.open("a/b")  # a HEAD now; the bytes come with the first read
        proxy.stop()
        with pytest.raises(StorageError, match=f"^s3://{bucket}/p/a/b: no answer from {re.escape(proxy.url)}"):
            reader.read()


def test_copy_is_a_whole_second_object(storage):
    storage.put("a/one.bin", b"x" * 1000)
    storage.copy("a/one.bin", "b/two.bin")
    assert storage.read_bytes("b/two.bin") == b"x" * 1000
    # A new object under either name never changes the other (locally the copy is a hard link,
    # and a put replaces the name, never the file's bytes).
    storage.put("b/two.bin", b"new")
    assert storage.read_bytes("a/one.bin") == b"x" * 1000
    storage.copy("a/one.bin", "b/two.bin")  # onto an existing name: replaced whole
    storage.remove("a/one.bin")  # removing the source leaves the copy whole (what `uniter gc` relies on)
    assert storage.read_bytes("b/two.bin") == b"x" * 1000
    with pytest.raises(StorageError, match=r"a/none\.bin: no such object"):
        storage.copy("a/none.bin", "b/three.bin")
    assert storage.list("b") == ["b/two.bin"]
