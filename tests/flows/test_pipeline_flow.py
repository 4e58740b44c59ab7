"""The DAG as a Prefect flow (under Prefect's test harness: a real temporary API server): stage
tasks call the runner, whose content key is the one cache; re-runs are cached, changes re-run."""

from __future__ import annotations

import json

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from contract.artifact import Artifact
from flows.dag import full_pipeline, summary_markdown
from pipeline.config import config_document, load_config
from pipeline.runner import storage_for
from tests.conftest import S3_SECRET, write_config
from tests.fixtures import images as fx


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_full_pipeline_caches_by_content(tmp_path, storage_spec):
    images = fx.photo_pairs(tmp_path, 6, seed=500)
    cfg_path = write_config(
        tmp_path / "cfg.yaml", storage_spec, [{"format": "table", "path": "pairs.jsonl"}], shard_rows=4
    )
    doc = yaml.safe_load(cfg_path.read_text())
    doc["crawl"] = {"file_roots": [str(images)], "workers": 1}
    doc["extract"] = {"loader_workers": 0}
    cfg_path.write_text(yaml.safe_dump(doc))

    first = full_pipeline(config=str(cfg_path), until="extract")
    assert [(r["stage"], r["status"]) for r in first] == [
        ("ingest", "ran"),
        ("crawl", "ran"),
        ("dedup", "ran"),
        ("extract", "ran"),
    ]
    assert {o["table"]: o["rows"] for o in first[1]["outputs"]} == {"images": 6, "failures": 0}
    assert {o["table"]: o["rows"] for o in first[2]["outputs"]}["corpus_pairs"] == 6

    # One cache: the artifact is all there is on the storage — no Prefect result records beside it.
    cfg = load_config(cfg_path)
    storage = storage_for(cfg)
    art = Artifact(storage, "ingest", first[0]["key"])
    names = {k.rsplit("/", 1)[-1] for k in storage.list(art.prefix)}
    assert "_manifest.json" in names and not any("prefect" in n for n in names), names
    assert S3_SECRET not in storage.read_bytes(f"{art.prefix}/_manifest.json").decode()

    # the config as a flow parameter document (what deployments carry) is the same config: all cached
    second = full_pipeline(config=config_document(load_config(cfg_path)), until="extract")
    assert [r["status"] for r in second] == ["cached"] * 4
    assert [r["content_sha256"] for r in second] == [r["content_sha256"] for r in first]
    assert [r["built_seconds"] for r in second] == [r["built_seconds"] for r in first]  # the build's time, kept
    row = summary_markdown("t", second[:1], "s3://b", "c0ffee").splitlines()[6]
    assert row.startswith("| ingest | cached |")
    assert f"| {second[0]['seconds']:.1f} | {first[0]['built_seconds']:.1f} |" in row

    # A change upstream re-runs that stage and everything downstream of it, nothing else.
    doc["dedup"] = {"phash_max_distance": 2}
    cfg_path.write_text(yaml.safe_dump(doc))
    changed = full_pipeline(config=str(cfg_path), until="extract")
    assert [r["status"] for r in changed] == ["cached", "cached", "ran", "ran"]
    with open(tmp_path / "pairs.jsonl", "a") as f:
        f.write(json.dumps({"image_path": "images/0.jpg", "caption": "one more caption"}) + "\n")
    changed = full_pipeline(config=str(cfg_path), until="extract")
    assert [r["status"] for r in changed] == ["ran"] * 4 and changed[0]["key"] != first[0]["key"]
    # The rebuild says what changed: next to the artifacts, and as the flow run's artifact.
    diff = json.loads(storage.read_bytes(f"reports/corpus-diff/{changed[2]['key']}.json"))
    assert diff["previous"] is not None and diff["images"]["added"] == diff["images"]["removed"] == 0
    assert sum(p["added"] for p in diff["pairs"].values()) == 1
    assert changed[1]["counts"]["reuse"]["revalidated"] == 6  # local files: re-checked by stat, not read
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        published = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["uniter-corpus-diff"]))
        )
    assert any("Images: 0 added, 0 removed, 6 kept." in a.data for a in published)

    forced = full_pipeline(config=str(cfg_path), force=True, until="extract")
    assert [r["status"] for r in forced] == ["ran"] * 4
    assert [r["content_sha256"] for r in forced] == [r["content_sha256"] for r in changed]


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_sharded_stages_fan_out_on_the_task_runner(tmp_path, storage_spec, runner):
    """crawl and extract split into shard groups run as parallel Prefect tasks (threads, or a local
    Dask cluster), then publish once: the same artifacts as one task doing every shard."""
    images = fx.photo_pairs(tmp_path, 7, seed=600)
    contents = {}
    for fan in (1, 3):
        cfg_path = write_config(
            tmp_path / f"cfg{fan}.yaml",
            {"uri": str(tmp_path / f"data{fan}")},
            [{"format": "table", "path": "pairs.jsonl"}],
        )
        doc = yaml.safe_load(cfg_path.read_text())
        doc["crawl"] = {"file_roots": [str(images)], "workers": 1, "shard_images": 2}
        doc["extract"] = {"loader_workers": 0, "shard_images": 2}
        doc["orchestration"] = {"fan_out": fan, "task_runner": runner}
        cfg_path.write_text(yaml.safe_dump(doc))
        results = full_pipeline(config=str(cfg_path), until="extract")
        assert [r["status"] for r in results] == ["ran"] * 4
        cfg = load_config(cfg_path)
        storage = storage_for(cfg)
        contents[fan] = {r["stage"]: r["content_sha256"] for r in results}
        for r in results[1:4:2]:  # crawl, extract: 4 shards of ≤ 2 images
            markers = Artifact(storage, r["stage"], r["key"]).done_shards()
            assert len(markers) == 4
            writers = {rec.run_id for rec in markers.values()}
            assert len(writers) == (3 if fan == 3 else 1), (r["stage"], writers)  # one writer per shard group
    assert contents[1] == contents[3]


def test_the_flow_summary_says_what_a_rebuild_reused():
    from flows.dag import summary_markdown

    run = {
        "stage": "crawl", "status": "ran", "key": "k" * 64, "seconds": 1.0, "built_seconds": 1.0, "outputs": [],
        "counts": {"images": 5250, "failure_reasons": {"http_404": 50}, "reuse": {"reused": 5000, "fetched": 250}},
    }  # fmt: skip
    md = summary_markdown("corpus rebuild", [run], "/data", "c" * 64)
    assert "images 5250, reuse.fetched 250, reuse.reused 5000 |" in md


@pytest.mark.parametrize("storage_spec", ["s3"], indirect=True)
def test_no_prefect_artifact_or_log_holds_a_credential(tmp_path, storage_spec):
    """A flow run over URLs with a password in them (directly and behind a redirect), on S3 storage
    whose secret key is in the environment: every artifact and log line Prefect keeps is searched."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    from tests.fixtures import server as srv

    secret = "hunter2-flow-artifact-secret"
    photo = fx.jpeg(fx.synthetic_photo(4, (120, 90)))
    with srv.ImageServer({"/photo.jpg": srv.serve(photo)}) as server:
        server.routes["/cred.jpg"] = srv.redirect(server.base.replace("://", f"://u:{secret}@") + "/photo.jpg")
        rows = [
            {"image_url": server.url("/photo.jpg"), "caption": "a photo"},
            {"image_url": server.url("/cred.jpg"), "caption": "a redirect to a credential"},
            {"image_url": server.url("/photo.jpg").replace("://", f"://u:{secret}@"), "caption": "a credential"},
        ]
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg_path = write_config(tmp_path / "cfg.yaml", storage_spec, [{"format": "table", "path": "t.jsonl"}])
        doc = yaml.safe_load(cfg_path.read_text())
        doc["crawl"] = {"allow_private_networks": True, "retries": 0, "workers": 1}
        cfg_path.write_text(yaml.safe_dump(doc))
        results = full_pipeline(config=str(cfg_path), until="dedup")
    assert [r["status"] for r in results] == ["ran"] * 3
    assert {o["table"]: o["rows"] for o in results[1]["outputs"]} == {"images": 1, "failures": 1}
    assert results[0]["counts"]["reject_reasons"] == {"credentials_in_url": 1}

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        logs = client.read_logs(LogFilter())
    texts = [json.dumps(a.data) for a in artifacts] + [log.message for log in logs]
    assert any("crawl" in t for t in texts) and len(logs) > 0  # the search found what there is to search
    for text in texts:
        assert secret not in text and S3_SECRET not in text
