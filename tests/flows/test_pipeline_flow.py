"""The DAG as a Prefect flow (under Prefect's test harness: a real temporary API server):
stage tasks are keyed by content, results persist on the pipeline's storage, re-runs are cached."""

from __future__ import annotations

import json

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import full_pipeline
from flows.stages import RESULT_NAME
from pipeline.artifact import Artifact
from pipeline.config import load_config
from pipeline.runner import storage_for
from tests.conftest import S3_SECRET, write_config


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_full_pipeline_caches_by_content(tmp_path, storage_spec):
    (tmp_path / "cc.tsv").write_text("".join(f"caption {i}\thttp://example.org/{i}.jpg\n" for i in range(30)))
    cfg_path = write_config(tmp_path / "cfg.yaml", storage_spec, [{"format": "cc", "path": "cc.tsv"}], shard_rows=10)

    first = full_pipeline(config_path=str(cfg_path))
    assert [(r["stage"], r["status"]) for r in first] == [("ingest", "ran")]
    assert first[0]["outputs"][0]["rows"] == 30

    # The task's result record lives inside the artifact it describes, on the pipeline's storage.
    cfg = load_config(cfg_path)
    storage = storage_for(cfg)
    record_key = f"{Artifact(storage, 'ingest', first[0]['key']).prefix}/{RESULT_NAME}"
    record = storage.read_bytes(record_key).decode()
    assert first[0]["content_sha256"] in record and S3_SECRET not in record
    json.loads(record)  # a JSON result record, not a pickle

    second = full_pipeline(config_path=str(cfg_path))
    assert [(r["stage"], r["status"]) for r in second] == [("ingest", "cached")]
    assert second[0]["content_sha256"] == first[0]["content_sha256"]

    forced = full_pipeline(config_path=str(cfg_path), force=True)
    assert forced[0]["status"] == "ran" and forced[0]["content_sha256"] == first[0]["content_sha256"]

    # A content change is a new key: the stage runs again.
    with open(tmp_path / "cc.tsv", "a") as f:
        f.write("one more\thttp://example.org/x.jpg\n")
    changed = full_pipeline(config_path=str(cfg_path))
    assert changed[0]["status"] == "ran" and changed[0]["key"] != first[0]["key"]
