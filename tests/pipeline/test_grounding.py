"""The CI-sized grounding check (issue 13): the picture world (tests/fixtures/world.py) through the
real stages — ingest, crawl, dedup, extract (grid), pretrain, downstream, finetune (VQA) — once
with the pictures and once image-blind (`image_features: zeroed`, the question-only baseline), at
the same budget. Answers are balanced per question, so the blind model is at chance on colours; a
pipeline that stops getting the picture to the model (features lost, zeroed, misaligned with
their questions) fails here. `benchmarks/grounding.py` is the full-size version."""

from __future__ import annotations

import json

import yaml

from contract.artifact import Artifact
from pipeline.config import load_config
from pipeline.runner import run_stage, storage_for
from tests.fixtures.world import accuracy_by_kind, world_config, write_world

STAGES = ("ingest", "crawl", "dedup", "extract", "pretrain", "downstream", "finetune")


def test_the_vqa_model_answers_from_the_picture(tmp_path):
    # one or two things per picture on the 3 × 3 layout, a grid cell each: small enough to learn in
    # a few hundred CPU steps, with the same questions as the benchmark's. The model is the
    # benchmark's (hidden 128): at hidden 64 colour was still at chance after these 300 steps.
    # Margin, not luck: with 10 pretraining steps and grid cells only, held-out colour after 300
    # VQA steps swung with the fine-tuning seed (seeds 0, 1, 2: 30.6, 16.7, 44.4 %) and with which
    # near-identical pictures dedup merged. With the objects as regions of their own (a colour is
    # one region's feature) and 200 pretraining steps on the world's captions it was 75.0, 68.1 and
    # 55.6 % (the blind model 16.7 %): the test's 30-point bar is then 9 points under the worst seed.
    world = write_world(tmp_path / "world", 500, 100, seed=1, things=(1, 2))
    accuracy = {}
    for image_features in ("real", "zeroed"):
        doc = world_config(
            tmp_path,
            world,
            pretrain={
                "steps": 200,
                "warmup": 1,
                "validate_every": 200,
                "checkpoint_every": 200,
                "log_every": 50,
            },
            finetune={"init": "pretrained", "seed": 0, "log_every": 50, "checkpoint_every": 1000},
            vqa={
                "steps": 300,
                "warmup": 20,
                "lr": 1e-3,
                "loss": "softmax",
                "batch_tokens": 1500,
                "validate_every": 300,
                "image_features": image_features,
            },
            extract={"grid_rows": 3, "grid_cols": 3, "grid_objects": 2},
            # with one or two things, many pictures repeat exactly (dedup rightly merges them)
            dedup={"max_removed_fraction": 1.0},
            # one or two things: two layers learn it here, at half the cost of the benchmark's four
            layers=2,
        )
        path = tmp_path / f"{image_features}.yaml"
        path.write_text(yaml.safe_dump(doc))
        cfg = load_config(path)
        for stage in STAGES:
            result = run_stage(stage, cfg)
        storage = storage_for(cfg)
        results = Artifact(storage, "finetune", result.manifest.key).file_key("files/vqa/results.json")
        accuracy[image_features] = accuracy_by_kind(json.loads(storage.read_bytes(results)), world["vqa"]["val"][1])
    seeing, blind = accuracy["real"], accuracy["zeroed"]
    print("held-out accuracy by question kind:", json.dumps(accuracy))
    # six balanced colours: chance is 16.7 %, and the blind model cannot do better
    assert blind["colour"] < 30, accuracy
    assert seeing["colour"] >= blind["colour"] + 30, accuracy
