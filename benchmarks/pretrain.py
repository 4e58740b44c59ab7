"""Pretraining throughput at UNITER-base shapes: the DeepSpeed training step, fp32 and bf16, next to
the data loader and a matmul peak measured in the same run.

A synthetic corpus with CC-like lengths (captions 6..40 word pieces, 10..100 regions with BUTD-like
confidences) is written as the pretrain stage's cache files (Arrow IPC, memory-mapped). Printed:

- padding fraction of the token-bucket sampler vs naive fixed-size batches of the same mean size
  (goal ≤ 5 % with token buckets);
- the training step (our Trainer's DeepSpeed engine, task mix MLM/ITM+WRA/MRFR/MRC-kl), per
  precision: examples/s, real (non-padding) tokens/s, achieved FLOP/s and its fraction of the
  measured matmul peak of that precision (goal ≥ 50 % of the bf16 peak on CPU);
- the data loader alone (collate in worker processes) in examples/s, as a multiple of what the
  fastest training step consumes (goal ≥ 5×).

    .venv/bin/python benchmarks/pretrain.py [--model base] [--batch-tokens 2048] [--steps 4]
    .venv/bin/python benchmarks/pretrain.py --model debug --steps 30   (the step overhead of a tiny model)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402


def make_corpus(folder: Path, images: int, captions_per_image: int, seed: int = 0):
    """Texts and features files in the layout `uniter.data.Corpus` reads."""
    from feature_extraction.schema import RegionFeatures, features_table
    from uniter.data import Corpus, write_ipc

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(images):
        n = int(rng.integers(10, 101))  # boxes kept: 10..100
        conf = np.sort(rng.uniform(0.05, 1.0, n)).astype(np.float32)[::-1]
        x1 = rng.uniform(0, 500, n)
        y1 = rng.uniform(0, 400, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(10, 140, n), y1 + rng.uniform(10, 80, n)], 1).astype(np.float32)
        soft = rng.dirichlet(np.full(1601, 0.05), n).astype(np.float16)
        rows.append(
            RegionFeatures(
                f"img{i:06d}",
                640,
                480,
                rng.standard_normal((n, 2048)).astype(np.float16),
                boxes,
                conf,
                soft,
                rng.integers(0, 1600, n).astype(np.int32),
                rng.integers(0, 400, n).astype(np.int32),
            )
        )
    feats = folder / "features.arrow"
    write_ipc(features_table(rows), feats)
    keys = [f"img{i // captions_per_image:06d}" for i in range(images * captions_per_image)]
    ids = [rng.integers(1000, 28000, int(rng.integers(6, 41))).astype(np.int32) for _ in keys]
    texts = folder / "texts.arrow"
    write_ipc(
        pa.table(
            {
                "pair_id": [f"p{i}" for i in range(len(keys))],
                "source": ["cc"] * len(keys),
                "image_key": keys,
                "input_ids": pa.array(ids, pa.list_(pa.int32())),
            }
        ),
        texts,
    )
    return Corpus(texts, [feats], conf_thresh=0.2, min_bb=10, max_bb=100, val_percent=0.0)


def padding(batches, lengths) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1 - real / padded


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def step_flops(config, batch: dict) -> float:
    """Forward + backward FLOPs of the encoder as computed (padded shapes): 6 · params · tokens for
    the linear layers, plus attention's QKᵀ and AV (12 · layers · L² · H per row), plus the heads."""
    b, length = batch["attn_masks"].shape
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_token = layers * (4 * h * h + 2 * h * inter)
    tokens = b * length
    flops = 6 * per_token * tokens + 12 * layers * length * length * h * b
    flops += 6 * b * batch["img_feat"].shape[1] * config.img_dim * h  # the image input Linear (2048 → H)
    return float(flops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base", choices=["debug", "base", "large"])
    ap.add_argument("--batch-tokens", type=int, default=2048, help="per micro-batch (the recipe: 10240 on a GPU)")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per precision")
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--loader-workers", type=int, default=1)
    args = ap.parse_args()
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", DS_ACCELERATOR="cpu"
    )
    import deepspeed

    from uniter.batch import Vocab
    from uniter.configuration_uniter import PRESETS
    from uniter.data import token_bucket_batches
    from uniter.modeling_uniter import UniterForPretraining
    from uniter.pretrain.config import PretrainConfig
    from uniter.pretrain.trainer import MicroBatches, Trainer

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    with tempfile.TemporaryDirectory(prefix="uniter-bench-pretrain-") as tmp:
        corpus = make_corpus(Path(tmp), args.images, 5)
        lengths = corpus.lengths
        ids = np.arange(len(corpus))
        print(
            f"corpus: {len(corpus)} pairs, {args.images} images, mean length {lengths.mean():.1f} (text + regions), "
            f"{torch.get_num_threads()} threads"
        )

        # --- padding ---
        buckets = token_bucket_batches(ids, lengths, args.batch_tokens, 8192, np.random.default_rng(0))
        size = max(1, round(np.mean([len(b) for b in buckets])))
        perm = np.random.default_rng(0).permutation(ids)
        naive = [perm[i : i + size] for i in range(0, len(perm), size)]
        print(
            f"padding: token buckets {padding(buckets, lengths):.1%}  vs  naive batches of {size}: "
            f"{padding(naive, lengths):.1%}   (budget {args.batch_tokens} tokens, mean {size} examples/batch)"
        )

        peaks = {name: matmul_peak(dt) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))

        vocab = Vocab(cls=101, sep=102, mask=103, pad=0, size=28996, random_start=999)
        consumed = 0.0
        for precision in ("fp32", "bf16"):
            cfg = PretrainConfig(
                model=args.model,
                init_from_bert=None,
                batch_tokens=args.batch_tokens,
                steps=args.steps + 1,
                warmup=1,
                val_percent=0,
                loader_workers=0,
                deepspeed={"bf16": {"enabled": precision == "bf16"}},
            )
            torch.manual_seed(0)
            model = UniterForPretraining(PRESETS[args.model](vocab_size=vocab.size))
            trainer = Trainer(cfg, corpus, vocab, model, rank=0, world=1)
            data = MicroBatches(trainer.plan, corpus, vocab, rank=0)
            t0 = time.perf_counter()
            items = [data[i] for i in range(args.steps + 1)]
            collate = (time.perf_counter() - t0) / len(items)  # building one micro-batch, in this process
            examples = real = flops = 0.0
            elapsed = 0.0
            parts = np.zeros(4)  # to device, forward, backward, optimizer step
            for k, item in enumerate(items):
                marks = [time.perf_counter()]
                batch_on = trainer._device_batch(item["batch"])
                marks.append(time.perf_counter())
                out = trainer.engine(batch_on, task=item["task"], ot_lambda=cfg.ot_lambda)
                marks.append(time.perf_counter())
                trainer.engine.backward(out.loss)
                marks.append(time.perf_counter())
                trainer.engine.step()
                marks.append(time.perf_counter())
                took = marks[-1] - marks[0]
                if k == 0:
                    continue  # warm-up
                parts += np.diff(marks)
                batch = item["batch"]
                elapsed += took
                examples += batch["attn_masks"].shape[0]
                real += float(batch["attn_masks"].sum())
                flops += step_flops(model.config, batch)
            rate = examples / elapsed
            consumed = max(consumed, rate)
            print(
                f"step {precision}: {rate:6.2f} examples/s  {real / elapsed:8.0f} real tokens/s  "
                f"{flops / elapsed / 1e9:7.1f} GFLOP/s = {flops / elapsed / peaks[precision]:.0%} "
                f"of the {precision} matmul peak"
                f"  ({elapsed / args.steps:.2f} s/step)"
            )
            step = elapsed / args.steps + collate  # what a step costs with its batch built in-process
            share = parts / args.steps / step
            print(
                f"  {1 / step:.2f} steps/s with the batch built in-process: forward {share[1]:.0%}, "
                f"backward {share[2]:.0%}, optimizer {share[3]:.0%} (together {share[1:].sum():.0%}; "
                f"goal ≥ 80 %), to device {share[0]:.0%}, building the batch {collate / step:.0%}"
            )
            del trainer, model

        # --- the data loader alone ---
        from torch.utils.data import DataLoader

        cfg = PretrainConfig(
            model=args.model, init_from_bert=None, batch_tokens=args.batch_tokens, steps=400, val_percent=0
        )
        from uniter.pretrain.trainer import BatchPlan

        plan = BatchPlan(cfg, corpus, world=1)
        data = MicroBatches(plan, corpus, vocab, rank=0)
        loader = DataLoader(
            data,
            batch_size=None,
            sampler=range(200),
            num_workers=args.loader_workers,
            prefetch_factor=4 if args.loader_workers else None,
            multiprocessing_context="forkserver" if args.loader_workers else None,
        )
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        start, n = time.perf_counter(), 0
        for item in it:
            n += item["batch"]["attn_masks"].shape[0]
        rate = n / (time.perf_counter() - start)
        print(
            f"data loader ({args.loader_workers} worker(s)): {rate:.0f} examples/s = {rate / consumed:.0f}× "
            f"what the fastest training step consumes"
        )


if __name__ == "__main__":
    main()
