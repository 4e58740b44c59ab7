"""A storage that cannot be used stops `uniter` at start-up, before any work: exit 2 and one paragraph
naming `storage.uri`, its value, what failed and what to do; never a traceback, never a secret."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from cli.main import main
from tests.conftest import S3_SECRET, free_port, write_config

COMMANDS = {"run": ["run", "ingest"], "status": ["status"], "sql": ["sql", "select 1"]}
needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux's /proc")


def uniter(capsys, tmp_path, storage: dict, command: str = "run") -> tuple[int, str]:
    """`uniter COMMAND -c cfg` in this process (as the console script runs it): exit code, stderr."""
    (tmp_path / "cc.tsv").write_text("a cat\thttp://example.org/1.jpg\n")
    cfg = write_config(tmp_path / "cfg.yaml", storage, [{"format": "cc", "path": "cc.tsv"}])
    code = main([*COMMANDS[command], "-c", str(cfg), "-q"])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, uri: str, *says: str) -> None:
    assert code == 2, err
    assert err.startswith(f"uniter: error: storage.uri {uri!r}") and err.count("\n") == 1, err  # one paragraph
    assert "Traceback" not in err and "unexpected" not in err
    for words in says:
        assert words in err, err


@needs_proc
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_folder_that_cannot_be_created(capsys, tmp_path, command):
    code, err = uniter(capsys, tmp_path, {"uri": "/proc/uniter-x"}, command)
    assert_refused(code, err, "/proc/uniter-x", "cannot create the folder /proc/uniter-x", "Use a folder")


@needs_proc
def test_a_folder_that_exists_but_cannot_be_written(capsys, tmp_path):
    """Even root cannot write in /proc/<pid>: the check writes a file instead of trusting access()."""
    code, err = uniter(capsys, tmp_path, {"uri": "/proc/self"})
    assert_refused(code, err, "/proc/self", f"cannot write in the folder /proc/{os.getpid()}", "Use a folder")


@pytest.mark.parametrize(
    ("below", "says"), [("data", "a folder on its path is a file"), ("", "is a file, not a folder")]
)
def test_a_regular_file_in_the_way(capsys, tmp_path, below, says):
    (tmp_path / "file").write_text("not a folder")
    uri = str(tmp_path / "file" / below).rstrip("/")
    code, err = uniter(capsys, tmp_path, {"uri": uri})
    assert_refused(code, err, uri, says)


@pytest.mark.parametrize(("below", "says"), [("data", "cannot create the folder"), ("", "cannot write in the folder")])
def test_a_folder_without_write_permission(capsys, tmp_path, below, says):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    uri = str(locked / below).rstrip("/")
    try:
        try:
            (locked / "probe").touch()
            pytest.skip("this user writes in read-only folders (root with CAP_DAC_OVERRIDE)")
        except PermissionError:
            pass
        code, err = uniter(capsys, tmp_path, {"uri": uri})
    finally:
        locked.chmod(0o700)
    assert_refused(code, err, uri, says, "Permission denied")


def test_s3_bucket_missing(capsys, tmp_path, s3_endpoint):
    uri = f"s3://uniter-missing-{uuid.uuid4().hex[:12]}/pipeline"
    code, err = uniter(capsys, tmp_path, {"uri": uri, "endpoint_url": s3_endpoint})
    bucket = uri.split("/")[2]
    assert_refused(code, err, uri, f"(storage.endpoint_url {s3_endpoint!r})", f"the bucket {bucket!r} does not exist")


def test_s3_bad_credentials(capsys, tmp_path, s3_endpoint, monkeypatch):
    """moto checks signatures only once told to (its INITIAL_NO_AUTH_ACTION_COUNT setting, read per
    request); the key below is known to no one, as a revoked or mistyped key would be."""
    import moto.settings

    wrong = "wrong-secret-that-must-never-be-printed"
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNITERWRONGKEY00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "wrong-session-token-never-printed")
    uri = "s3://uniter-any-bucket/pipeline"
    code, err = uniter(capsys, tmp_path, {"uri": uri, "endpoint_url": s3_endpoint})
    assert_refused(code, err, uri, "rejected the credentials (InvalidAccessKeyId", "AWS_SECRET_ACCESS_KEY")
    assert wrong not in err and "wrong-session-token" not in err and S3_SECRET not in err


def test_s3_endpoint_down(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the default, 10, waits up to ~26 s before giving up
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    uri = "s3://uniter-bucket/pipeline"
    code, err = uniter(capsys, tmp_path, {"uri": uri, "endpoint_url": endpoint})
    assert_refused(
        code,
        err,
        uri,
        f"no answer from {endpoint} (EndpointConnectionError; gave up after 2 attempts)",
        "server is running",
    )
