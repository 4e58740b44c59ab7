"""Shared fixtures: a real S3-protocol server (moto's server mode on 127.0.0.1), storage over local
disk and S3, and helpers to write pipeline configs."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
import yaml
from tokenizers import BertWordPieceTokenizer

# Fake credentials for the local moto server only; set before boto3 is imported anywhere.
S3_KEY_ID = "AKIAUNITERTESTKEY000"
S3_SECRET = "uniter-test-secret-never-logged-0123456789"
os.environ.update(
    AWS_ACCESS_KEY_ID=S3_KEY_ID,
    AWS_SECRET_ACCESS_KEY=S3_SECRET,
    AWS_DEFAULT_REGION="us-east-1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
)
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session", autouse=True)
def _fingerprint_cache(tmp_path_factory):
    os.environ["UNITER_CACHE_DIR"] = str(tmp_path_factory.mktemp("uniter-cache"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A moto S3 server on a free loopback port for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def make_bucket(endpoint: str) -> str:
    import boto3

    bucket = f"uniter-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["local", "s3"])
def storage_spec(request, tmp_path) -> dict:
    """``{"uri", "endpoint_url"}`` of a fresh storage root: a local folder or a new S3 bucket."""
    if request.param == "local":
        return {"uri": str(tmp_path / "data")}
    endpoint = request.getfixturevalue("s3_endpoint")
    return {"uri": f"s3://{make_bucket(endpoint)}/pipeline", "endpoint_url": endpoint}


@pytest.fixture
def storage(storage_spec):
    from storage import open_storage

    return open_storage(storage_spec["uri"], endpoint_url=storage_spec.get("endpoint_url"))


def write_config(path: Path, storage: dict, sources: list[dict], **ingest) -> Path:
    """A pipeline config file at ``path`` with the given storage and ingest sources."""
    doc = {"storage": storage, "ingest": {"sources": sources, **ingest}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def read_table(storage, manifest, table: str):
    """An artifact's table as one Arrow table, read through the storage interface."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from contract.artifact import Artifact

    art = Artifact(storage, manifest.stage, manifest.key)
    parts = []
    for f in manifest.tables[table]:
        with storage.open(art.file_key(f.path)) as fh:
            parts.append(pq.read_table(fh))
    return pa.concat_tables(parts)


def run_ingest(tmp_path: Path, *sources: dict, storage: dict | None = None, **ingest):
    """Run the ingest stage on ``sources``; returns (pairs rows, rejects rows, StageRun)."""
    from pipeline.config import load_config
    from pipeline.runner import run_stage, storage_for

    storage = storage or {"uri": str(tmp_path / "data")}
    cfg = load_config(write_config(tmp_path / "pipeline.yaml", storage, list(sources), **ingest))
    result = run_stage("ingest", cfg)
    store = storage_for(cfg)
    pairs = read_table(store, result.manifest, "pairs").to_pylist()
    rejects = read_table(store, result.manifest, "rejects").to_pylist()
    return pairs, rejects, result


def demo_config(tmp_path: Path, storage_uri: str | None = None, quick: bool = False) -> tuple[Path, dict]:
    """configs/demo.yaml with its paths made absolute and its storage under tmp_path; `quick`: a few
    training steps (for tests of orchestration, not of what the model learns)."""
    import yaml

    configs = Path(__file__).resolve().parents[1] / "configs"
    doc = yaml.safe_load((configs / "demo.yaml").read_text())
    doc["storage"]["uri"] = storage_uri or str(tmp_path / "data")

    def absolute(section):
        for k in ("path", "image_data", "region_descriptions", "urls", "captions", "image_root", "refs", "instances"):
            if k in section:
                section[k] = str((configs / section[k]).resolve())

    for src in doc["ingest"]["sources"]:
        absolute(src)
    for ev in doc["dedup"]["eval_sets"]:
        absolute(ev)
    doc["crawl"]["file_roots"] = [str((configs / r).resolve()) for r in doc["crawl"]["file_roots"]]
    doc["downstream"]["images"] = {k: str((configs / v).resolve()) for k, v in doc["downstream"]["images"].items()}
    for files in [*doc["finetune"]["vqa"]["train"], doc["finetune"]["vqa"]["val"]]:
        for k in ("questions", "annotations"):
            files[k] = str((configs / files[k]).resolve())
    if quick:
        doc["pretrain"].update(steps=20, warmup=2, validate_every=10, checkpoint_every=10, log_every=10)
        doc["finetune"]["vqa"].update(steps=10, warmup=1, validate_every=10)
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    return cfg, doc


@pytest.fixture(scope="session")
def vocab(tmp_path_factory) -> str:
    """A small WordPiece vocabulary trained on the fixture captions (no model hub here)."""
    folder = tmp_path_factory.mktemp("vocab")
    captions = [f"photo {i} of a thing on the table near a window" for i in range(200)]
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(captions, vocab_size=120, min_frequency=1)
    tok.save_model(str(folder))
    return str(folder / "vocab.txt")
