"""`uniter run ablation`: a row per variant, variants sharing a pretraining key train it once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from contract.errors import ConfigError
from pipeline.ablation import architecture, check_same_architecture, variant_config
from pipeline.config import load_config
from pipeline.runner import storage_for
from tests.fixtures.pictures import check_png
from tests.uniter.finetune.test_finetune_stage import ROOT, setup


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_ablation_table(tmp_path, storage_spec, vocab):
    path = setup(tmp_path, storage_spec, vocab, steps=10, validate_every=10)
    doc = yaml.safe_load(path.read_text())
    doc["ablation"] = {
        "variants": [
            {"name": "full"},
            {"name": "full, again", "pretrain": {}},  # the same pretraining and fine-tuning: both cached
            {"name": "MLM only", "pretrain": {"tasks": {"mlm": 1}}},
            {"name": "L1 (no pretraining)", "pretrain": "none"},
        ]
    }
    path.write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [sys.executable, "-m", "cli", "run", "ablation", "-c", str(path), "--json", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    rows = {r["variant"]: r for r in summary["variants"]}
    assert list(rows) == ["full", "full, again", "MLM only", "L1 (no pretraining)"]
    assert [rows[v]["pretrain"]["status"] for v in rows] == ["ran", "cached", "ran", "cached"]
    assert summary["pretrain_runs"] == 2
    assert rows["full"]["finetune"]["key"] == rows["full, again"]["finetune"]["key"]
    assert rows["full, again"]["finetune"]["status"] == "cached"
    assert len({rows[v]["finetune"]["key"] for v in ("full", "MLM only", "L1 (no pretraining)")}) == 3
    assert all("vqa" in r["scores"] for r in rows.values())
    cfg = load_config(path)
    storage = storage_for(cfg)
    md = storage.read_bytes(f"artifacts/ablation/{summary['key']}/report.md").decode()
    assert "| MLM only |" in md and "| L1 (no pretraining) |" in md
    for name in ("meta_sum.png", "ablation.png", "finetune_curves.png"):  # beside the report, and inline in it
        check_png(storage.read_bytes(f"artifacts/ablation/{summary['key']}/{name}"))
    page = storage.read_bytes(f"artifacts/ablation/{summary['key']}/report.html").decode()
    assert page.count("<img src='data:image/png;base64,") == 3


def test_bad_variant_is_a_config_error(tmp_path, vocab):
    path = setup(tmp_path, {"uri": str(tmp_path / "d")}, vocab)
    cfg = load_config(path)
    from uniter.finetune.config import AblationVariant

    with pytest.raises(ConfigError, match=r"ablation variant 'x': pretrain.tasks"):
        variant_config(cfg, AblationVariant(name="x", pretrain={"tasks": {"nope": 1}}))


def test_variants_must_fine_tune_the_same_model(tmp_path, vocab):
    """A baseline that builds another size than the pretrained model is no baseline: the L1 row
    follows the pretrain section unless finetune.model says otherwise, and then the table refuses."""
    from uniter.finetune.config import AblationVariant

    path = setup(tmp_path, {"uri": str(tmp_path / "d")}, vocab)
    variants = [AblationVariant(name="full"), AblationVariant(name="L1", pretrain="none")]
    cfg = load_config(path)
    assert architecture(variant_config(cfg, variants[1])) == architecture(variant_config(cfg, variants[0]))
    assert architecture(variant_config(cfg, variants[1]))[0] == cfg.pretrain.model == "debug"
    check_same_architecture(cfg, variants)
    doc = yaml.safe_load(path.read_text())
    doc["finetune"]["model"] = "base"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"variants fine-tune different models \(full: debug .*L1: base"):
        check_same_architecture(load_config(path), variants)
