"""Does the model look at the picture? The grounding benchmark of issue 13.

A synthetic picture world (tests/fixtures/world.py: flat shapes of six colours, three shapes, two
sizes on a 3 × 3 layout; captions that describe them; balanced VQA questions about colour, shape,
existence, counts and left/right relations) goes through the real stages: ingest (COCO captions)
→ crawl (the local folder) → dedup → extract (grid) → pretrain → downstream → finetune (VQA) on
one storage. Fine-tuning runs three ways per seed, with the same budget:

- pretrained: from the pretrain artifact;
- scratch: from random weights, the same architecture;
- blind: from the pretrain artifact, with the image features zeroed at fine-tuning and at test
  (`image_features: zeroed`): what the question alone gives — chance, on balanced questions.

It prints the held-out accuracy by question kind (mean and spread over seeds) and each stage's
wall time. Goals (issue 13), on attribute questions (colour and shape pooled): ≥ 90 %; the
pretrained model ≥ 20 points above blind; pretrained ≥ 3 points above scratch; the whole run ≤ 30
minutes on 2 cores. With `--grid-objects` it first prints a linear probe of the features: are
colour and shape in them at all?

The defaults are the best setting measured (docs/finetune.md): a 4-layer model (hidden 128; two
layers never learned to match the question's shape word to a region), the objects as regions of
their own (`grid_objects: 4`) beside a 2 × 2 grid, 600 pretraining steps at lr 1e-3, 1,000
fine-tuning steps without dropout (the answer comes in a late jump: earlier after pretraining,
later with dropout).

    .venv/bin/python benchmarks/grounding.py [--train 3000] [--val 400] [--seeds 3]
        [--pretrain-steps 600] [--finetune-steps 1000] [--layers 4] [--grid 2] [--grid-objects 4] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "pretrained": {"init": "pretrained"},
    "scratch": {"init": "scratch"},
    "blind": {"init": "pretrained", "image_features": "zeroed"},
}
KINDS = ("attribute", "colour", "shape", "exist", "count", "relation")  # attribute: colour + shape pooled


def config(folder: Path, world: dict, args, seed: int, variant: str) -> Path:
    from tests.fixtures.world import world_config

    ft = VARIANTS[variant]
    doc = world_config(
        folder,
        world,
        pretrain={
            "steps": args.pretrain_steps,
            "warmup": max(1, args.pretrain_steps // 10),
            "lr": args.pretrain_lr,
            "validate_every": args.pretrain_steps,
            "checkpoint_every": args.pretrain_steps,
            "log_every": max(1, args.pretrain_steps // 5),
            "seed": seed,
        },
        finetune={
            "init": ft["init"],
            # no dropout while fine-tuning: with it, a pretrained model's late jump came after step
            # 1,000 on some seeds (seed 2: attribute 84.1 % at step 1,000 with dropout 0.1, 99.5 %
            # without, 91.7 % already at 750), and a step is ~20 % cheaper
            "model_overrides": {
                "hidden_dropout_prob": args.finetune_dropout,
                "attention_probs_dropout_prob": args.finetune_dropout,
            },
            "seed": seed,
            "log_every": max(1, args.finetune_steps // 5),
            "checkpoint_every": args.finetune_steps,
        },
        vqa={
            "steps": args.finetune_steps,
            "warmup": max(1, args.finetune_steps // 20),
            "lr": args.finetune_lr,
            "loss": args.loss,
            "batch_tokens": 4096,
            "validate_every": args.finetune_steps,
            "image_features": ft.get("image_features", "real"),
        },
        extract={"grid_objects": args.grid_objects, "grid_rows": args.grid, "grid_cols": args.grid},
        layers=args.layers,
    )
    path = folder / f"{variant}-{seed}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def probe(pictures: int = 1500, objects: int = 4) -> dict[str, float]:
    """Are colour and shape in the grid features at all? A ridge-regression probe (linear) on the
    object regions of fresh pictures of the world, stored as JPEG as crawl stores them: 80 % of the
    regions fit it, the rest are held out; each region is labelled with the thing drawn nearest its
    centre. Held-out accuracy by attribute (chance: 1/6 colours, 1/3 shapes)."""
    import io

    import numpy as np
    from PIL import Image

    from feature_extraction.grid import box_vectors, object_boxes, project
    from tests.fixtures.world import COLOURS, SHAPES, box, draw, scene

    rng = np.random.default_rng(1)
    feats, colours, shapes = [], [], []
    for _ in range(pictures):
        things = scene(rng)
        buf = io.BytesIO()
        draw(things).save(buf, "JPEG", quality=95)
        image = Image.open(buf).convert("RGB")
        found = object_boxes(image, objects)
        if not len(found):
            continue
        for f, (x0, y0, x1, y1) in zip(project(box_vectors(image, found)).astype(np.float32), found, strict=True):

            def gap(t, cx=(x0 + x1) / 2, cy=(y0 + y1) / 2):
                b = box(t)
                return ((b[0] + b[2]) / 2 - cx) ** 2 + ((b[1] + b[3]) / 2 - cy) ** 2

            nearest = min(things, key=gap)
            feats.append(f)
            colours.append(list(COLOURS).index(nearest.colour))
            shapes.append(SHAPES.index(nearest.shape))
    x = np.stack(feats)
    fit = np.arange(len(x)) < int(0.8 * len(x))
    out = {}
    for name, labels, classes in (("colour", colours, len(COLOURS)), ("shape", shapes, len(SHAPES))):
        y = np.eye(classes)[labels]
        a = x[fit]
        w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ y[fit])
        out[name] = 100.0 * float(((x[~fit] @ w).argmax(1) == np.asarray(labels)[~fit]).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=1000)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--loss", choices=["bce", "softmax"], default="softmax")
    parser.add_argument("--finetune-dropout", type=float, default=0.0, help="the model's dropout while fine-tuning")
    parser.add_argument("--layers", type=int, default=4, help="the model's layers (hidden 128)")
    parser.add_argument("--grid", type=int, default=2, help="grid rows = columns")
    parser.add_argument("--grid-objects", type=int, default=4, help="object regions (0: the grid alone)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    from contract.artifact import Artifact
    from pipeline.config import load_config
    from pipeline.runner import run_stage, storage_for
    from tests.fixtures.world import accuracy_by_kind, write_world

    if args.grid_objects:
        held = probe(objects=args.grid_objects)
        probed = ", ".join(f"{k} {v:.1f} %" for k, v in held.items())
        print(f"linear probe on the grid's object regions, held out: {probed}", flush=True)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="uniter-grounding-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    world = write_world(folder / "world", args.train, args.val, seed=0)
    stage_seconds: dict[str, list[float]] = defaultdict(list)
    scores: dict[str, list[dict[str, float]]] = defaultdict(list)
    try:
        for seed in range(args.seeds):
            for variant in VARIANTS:
                cfg = load_config(config(folder, world, args, seed, variant))
                for stage in ("ingest", "crawl", "dedup", "extract", "pretrain", "downstream", "finetune"):
                    t0 = time.perf_counter()
                    result = run_stage(stage, cfg)
                    if result.status == "ran":
                        stage_seconds[stage].append(time.perf_counter() - t0)
                storage = storage_for(cfg)
                art = Artifact(storage, "finetune", result.manifest.key)
                results = json.loads(storage.read_bytes(art.file_key("files/vqa/results.json")))
                acc = accuracy_by_kind(results, world["vqa"]["val"][1])
                scores[variant].append(acc)
                print(f"seed {seed} {variant:10s} " + "  ".join(f"{k} {acc.get(k, 0):5.1f}" for k in KINDS), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    print(f"\naccuracy on {args.val} held-out pictures, mean ± spread over {args.seeds} seeds")
    print("| variant | " + " | ".join(KINDS) + " |\n|---|" + "---|" * len(KINDS))
    mean = {}
    for variant, runs in scores.items():
        cells = []
        for k in KINDS:
            values = [r.get(k, 0.0) for r in runs]
            mean[(variant, k)] = statistics.fmean(values)
            cells.append(f"{mean[(variant, k)]:.1f} ± {(max(values) - min(values)) / 2:.1f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    print("\nstage wall time, s (each build): " + ", ".join(
        f"{s} {statistics.fmean(v):.0f}×{len(v)}" for s, v in stage_seconds.items()))  # fmt: skip
    total = time.perf_counter() - started
    print(f"whole benchmark: {total / 60:.1f} min (goal ≤ 30)")
    # the goals are on attribute questions (colour and shape pooled); each kind is shown too
    for k in ("attribute", "colour", "shape"):
        seeing, blind, scratch = (mean[(v, k)] for v in ("pretrained", "blind", "scratch"))
        print(
            f"{k}: pretrained {seeing:.1f} (goal ≥ 90), − blind {seeing - blind:+.1f} (goal ≥ +20), "
            f"− scratch {seeing - scratch:+.1f} (goal ≥ +3)"
        )
    seeing, blind, scratch = (mean[(v, "attribute")] for v in ("pretrained", "blind", "scratch"))
    met = seeing >= 90 and seeing - blind >= 20 and seeing - scratch >= 3
    print(f"accuracy goals on attribute questions: {'met' if met else 'NOT met'}; time goal: "
          f"{'met' if total <= 30 * 60 else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
