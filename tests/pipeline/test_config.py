"""Config validation: every problem names the file, the key path and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.errors import ConfigError
from contract.fingerprint import sha256_json
from pipeline.config import config_document, config_from_parameter, load_config
from pipeline.runner import key_payload

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "ann.tsv").write_text("a cat\thttp://x.org/1.jpg\n")
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return str(exc.value)


def test_shipped_configs_are_valid():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.storage.uri == str(ROOT / "data")  # relative to the config file, not the CWD
    assert [s.source_name for s in demo.ingest.sources] == ["coco", "vg", "cc", "sbu", "karpathy_coco", "karpathy_f30k"]


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    path = _write(tmp_path, "storage: {uri: out}\ningest:\n  sources: [{format: cc, path: ann.tsv}]\n")
    monkeypatch.chdir("/")
    cfg = load_config(path)
    assert cfg.storage.uri == str(tmp_path / "out")
    assert cfg.ingest.sources[0].path == str(tmp_path / "ann.tsv")


def test_unknown_key_names_path_and_allowed_keys(tmp_path):
    msg = _error(_write(tmp_path, "ingest:\n  sources: [{format: cc, path: ann.tsv, captions_col: 2}]\n"))
    assert str(tmp_path / "cfg.yaml") in msg
    assert "ingest.sources[0].captions_col: unknown key" in msg
    assert "allowed here: name, split, format, path" in msg


def test_unknown_top_level_section(tmp_path):
    msg = _error(_write(tmp_path, "ingest:\n  sources: [{format: cc, path: ann.tsv}]\nstorge: {uri: x}\n"))
    assert (
        "storge: unknown key (allowed here: storage, ingest, crawl, dedup, extract, downstream, pretrain, "
        "finetune, ablation, orchestration)" in msg
    )


def test_wrong_type(tmp_path):
    msg = _error(_write(tmp_path, "ingest:\n  shard_rows: many\n  sources: [{format: cc, path: ann.tsv}]\n"))
    assert "ingest.shard_rows:" in msg and "valid integer" in msg and "'many'" in msg


def test_missing_file_names_the_resolved_path(tmp_path):
    msg = _error(_write(tmp_path, "ingest:\n  sources: [{format: coco, path: nope.json}]\n"))
    assert f"ingest.sources[0].path: file not found: {tmp_path / 'nope.json'}" in msg


def test_missing_required_key(tmp_path):
    msg = _error(_write(tmp_path, "ingest:\n  sources: [{format: sbu, urls: ann.tsv}]\n"))
    assert "ingest.sources[0].captions: required key is missing" in msg
    assert "ingest: required key is missing" in _error(_write(tmp_path, "storage: {uri: x}\n"))


def test_unknown_format(tmp_path):
    msg = _error(_write(tmp_path, "ingest:\n  sources: [{format: laion, path: ann.tsv}]\n"))
    assert "ingest.sources[0]" in msg and "'laion'" in msg and "'coco'" in msg


def test_cross_field_rules(tmp_path):
    msg = _error(_write(tmp_path, "ingest:\n  sources: [{format: karpathy, dataset: flickr30k, path: ann.tsv}]\n"))
    assert "needs image_root" in msg
    msg = _error(_write(tmp_path, "ingest:\n  sources: [{format: cc, path: ann.tsv}, {format: cc, path: ann.tsv}]\n"))
    assert "two sources are named 'cc'" in msg


def test_bad_storage_uri(tmp_path):
    msg = _error(_write(tmp_path, "storage: {uri: 'gs://b/x'}\ningest:\n  sources: [{format: cc, path: ann.tsv}]\n"))
    assert "storage.uri: unsupported storage URI" in msg
    msg = _error(_write(tmp_path, "storage: {uri: 's3://ab'}\ningest:\n  sources: [{format: cc, path: ann.tsv}]\n"))
    assert "3+ characters" in msg


def test_not_yaml_or_not_a_mapping(tmp_path):
    assert "invalid YAML at line 2, column 18" in _error(_write(tmp_path, "ingest:\n  sources: {a: [b}\n"))
    assert "expected a mapping of sections" in _error(_write(tmp_path, "- just\n- a list\n"))
    assert "config file not found" in _error(tmp_path / "absent.yaml")


def test_example_full_config_is_valid_but_for_the_missing_datasets():
    """The commented example is structurally valid; only the dataset files are absent here."""
    msg = _error(ROOT / "configs" / "example-full.yaml")
    problems = [line for line in msg.splitlines() if line.startswith("  - ")]
    # 19 annotation files, the detector weights, 3 downstream image folders, 11 downstream files
    assert len(problems) == 34
    assert all("file not found" in p or "folder not found" in p for p in problems), problems


def test_overrides_are_validated_like_the_file(tmp_path):
    path = _write(tmp_path, "ingest:\n  sources:\n    - {format: cc, path: ann.tsv}\n")
    (tmp_path / "edited").mkdir()
    edited = tmp_path / "edited" / "cfg.yaml"
    edited.write_text(
        "ingest:\n  shard_rows: 7\n  sources:\n    - {format: cc, path: ../ann.tsv}\npretrain: {steps: 3}\n"
    )
    assert load_config(path, ["ingest.shard_rows=7", "pretrain.steps=3"]) == load_config(edited)
    for bad, expected in [
        ("pretrain.steps=many", "pretrain.steps: Input should be a valid integer"),
        ("pretrain.stepz=3", "pretrain.stepz: unknown key"),
        ("pretrain", "override 'pretrain': expected key.path=value"),
        ("ingest.sources.x=1", "override 'ingest.sources.x=1': ingest.sources is not a section"),
    ]:
        with pytest.raises(ConfigError) as exc:
            load_config(path, [bad])
        assert str(path) in str(exc.value) and expected in str(exc.value), str(exc.value)


def test_a_config_document_is_the_same_config_anywhere(tmp_path, monkeypatch):
    """What a deployment carries as its `config` parameter: JSON with absolute paths, validated again
    on the worker into the same config (whatever the worker's working directory)."""
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    document = json.loads(json.dumps(config_document(cfg)))
    monkeypatch.chdir(tmp_path)
    assert config_from_parameter(document) == cfg
    # the same cache keys too: equal values of another type (3 vs 3.0) would change a key
    for section in type(cfg).model_fields:
        payloads = [sha256_json(key_payload(getattr(c, section), {})) for c in (cfg, config_from_parameter(document))]
        assert payloads[0] == payloads[1], section
    assert config_from_parameter(str(ROOT / "configs" / "demo.yaml")) == cfg
    with pytest.raises(ConfigError, match="the flow run's config parameter: invalid config"):
        config_from_parameter({**document, "storge": {}})


def test_a_fine_tuning_update_is_sized_per_task(tmp_path):
    (tmp_path / "q.json").write_text("{}")
    vqa = "vqa: {train: [{questions: q.json, annotations: q.json}], val: {questions: q.json, annotations: q.json}"
    base = f"ingest:\n  sources: [{{format: cc, path: ann.tsv}}]\nfinetune:\n  {vqa}"
    msg = _error(_write(tmp_path, base + "}\n  deepspeed: {gradient_accumulation_steps: 4}\n"))
    assert "finetune: deepspeed.gradient_accumulation_steps: set per task instead" in msg
    msg = _error(_write(tmp_path, base + ", accumulation: 6}\n  processes: 4\n"))
    assert "vqa.accumulation (6) must be a multiple of processes (4)" in msg
    cfg = load_config(_write(tmp_path, base + "}\n  processes: 4\n"))
    assert (cfg.finetune.vqa.accumulation, cfg.finetune.vqa.grad_clip) == (20, 2.0)  # the reference's 5 × 4 GPUs
