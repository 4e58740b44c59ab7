"""`uniter recipe`: the example config is the reference's UNITER-base all-data run, every
difference explained; a changed setting is flagged with the effective value it gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli.main import main
from contract.artifact import Artifact
from contract.errors import ConfigError
from pipeline.config import load_config
from pipeline.recipe import recipe, sampling_shares
from pipeline.runner import Planner, run_stage, storage_for

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "example-full.yaml"


def test_the_example_config_is_the_reference_recipe(capsys):
    assert main(["recipe", "-c", str(EXAMPLE), "--strict", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["differs"] == 0
    lines = {(r["stage"], r["setting"]): r for r in report["lines"]}
    explained = sorted(k for k, r in lines.items() if r["status"] == "explained")
    assert explained == [
        ("nlvr2", "precision"), ("pretrain", "precision"), ("refcoco", "micro-batch"), ("refcoco", "precision"),
        ("retrieval", "precision"), ("vqa", "precision"),
    ]  # fmt: skip
    assert all(lines[k]["why"] for k in explained)
    assert lines[("pretrain", "tokens per update")]["ours"] == "491,520"  # 10,240 × 6 × 8 GPUs
    assert lines[("vqa", "micro-batches per update")]["ours"] == "20"  # 5 × 4 GPUs
    assert lines[("retrieval", "micro-batches per update")]["ours"] == "128"  # 8 × 16 GPUs
    assert lines[("ablation", "retrieval split")]["ours"] == "val"
    shares = {k[1]: r["ours"] for k, r in lines.items() if k[1].startswith("sampling share")}
    assert shares == {
        f"sampling share: {d} (%)": v for d, v in (("cc", "30"), ("coco", "20"), ("sbu", "20"), ("vg", "30"))
    }


def test_a_changed_setting_is_flagged_with_its_effective_value(tmp_path, capsys):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["pretrain"]["processes"] = 4  # half the GPUs, twice the accumulation: the same update
    doc["pretrain"]["deepspeed"]["gradient_accumulation_steps"] = 12
    del doc["pretrain"]["dataset_weights"]["karpathy_f30k"]  # Flickr30K now weighs 1 of 101
    doc["finetune"]["vqa"]["accumulation"] = 5  # 5 micro-batches an update: a quarter of the reference's
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(doc))
    lines = {(line.stage, line.setting): line for line in recipe(load_config(path, check_paths=False))}
    assert lines[("pretrain", "tokens per update")].status == "same"
    assert lines[("pretrain", "accumulation")].status == "explained"
    assert lines[("pretrain", "accumulation")].why == "the same tokens per update"
    assert lines[("vqa", "micro-batches per update")].status == "differs"
    flickr = lines[("pretrain", "sampling share: karpathy_f30k (%)")]
    assert (flickr.ours, flickr.reference, flickr.status) == ("0.99", "0", "differs")
    assert lines[("pretrain", "sampling share: coco (%)")].ours == "19.8"
    # a validation-only source never trains: it takes no share
    assert "cc_val" not in sampling_shares(load_config(path, check_paths=False))

    assert main(["recipe", "-c", str(path), "--strict", "--set", "pretrain.lr=1e-4"]) == 1
    out = capsys.readouterr()
    assert "pretrain peak lr" in out.out and "DIFFERS" in out.out
    # lr, VQA accumulation, and five shares (Flickr30K takes 0.99 % from the four datasets)
    assert "7 unexplained difference(s) from the reference" in out.err


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_epochs_per_source_match_what_the_trainer_samples(tmp_path, storage_spec, vocab, capsys):
    """`--corpus`: from the built corpus, each source's examples per update and epochs; checked
    against the trainer's own batch plan drawing 4,000 updates on the same corpus."""
    from tests.feature_extraction.test_extract_stage import build_upstream, corpus
    from tests.uniter.test_pretrain_stage import pretrain_cfg
    from uniter.data import Corpus, build_features, build_texts, load_tokenizer
    from uniter.pretrain.trainer import BatchPlan

    path = corpus(tmp_path, storage_spec, 16, {"loader_workers": 0})
    extra = [{"image_path": f"images/{i:04d}.jpg", "caption": f"another photo {i} of a thing"} for i in range(8)]
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    doc = yaml.safe_load(path.read_text())
    doc["ingest"]["sources"].append({"format": "table", "path": "extra.jsonl", "name": "extra"})
    doc["pretrain"] = pretrain_cfg(vocab, steps=4000, dataset_weights={"extra": 3.0})
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="build dedup and extract for this config first"):
        recipe(cfg, corpus=True)
    build_upstream(cfg)
    run_stage("extract", cfg)

    assert main(["recipe", "-c", str(path), "--corpus", "--json"]) == 0
    lines = {(r["stage"], r["setting"]): r["ours"] for r in json.loads(capsys.readouterr().out)["lines"]}
    assert float(lines[("corpus extra", "share of updates (%)")]) == pytest.approx(75.0)

    storage = storage_for(cfg)
    planner = Planner(cfg, storage)
    dedup, extract = planner.manifest("dedup"), planner.manifest("extract")
    texts = build_texts(
        storage, [Artifact(storage, "dedup", dedup.key).file_key(f.path) for f in dedup.tables["corpus_pairs"]],
        dedup.table_sha256("corpus_pairs"), load_tokenizer(vocab), cfg.pretrain.max_txt_len,
    )  # fmt: skip
    feats = [
        build_features(storage, Artifact(storage, "extract", extract.key).file_key(f.path), f.sha256)
        for f in extract.tables["features"]
    ]
    pre = cfg.pretrain
    real = Corpus(
        texts, feats, pre.conf_thresh, pre.min_bb, pre.max_bb, pre.val_percent, ("train", "restval"), ("val",)
    )
    plan = BatchPlan(pre, real, world=1)
    drawn = np.zeros(len(real.sources))
    for i in range(pre.steps * plan.accum):
        _, _, d, position = plan.micro(i, 0)
        drawn[d] += len(plan.batch(d, position))
    for d, source in enumerate(real.sources):
        epochs = drawn[d] / len(plan.ids[d])
        assert float(lines[(f"corpus {source}", "epochs")]) == pytest.approx(epochs, rel=0.1), (source, epochs)
        assert lines[(f"corpus {source}", "training examples")] == str(len(plan.ids[d]))
