"""The GPU check: what only a CUDA machine can measure, in one run of at most 8 minutes.

1. Region features: the Detectron2 BUTD R101-C4 (random weights; 600 / 1000 test sizing) through
   the extract stage's own loop on 640×480 photos, images/s at batch 1, 4, 8 and 16, fp32 and bf16
   (the stage's precisions; goal ≥ 30 images/s on one H100/H200).
2. Pretraining: UNITER-base, the Trainer's DeepSpeed engine in bf16 with ZeRO-1, micro-batches of
   10,240 tokens from a corpus with CC-like lengths: examples/s, achieved TFLOP/s and MFU against
   the GPU's dense bf16 peak (goal ≥ 40 %), and the scaled-dot-product-attention kernel PyTorch
   picks for the model's masked attention.
3. WRA's optimal transport: batched IPOT on the GPU against POT's exact solver per pair on the CPU,
   at UNITER's sizes (goal ≥ 10×).
4. The peak GPU memory of each part.

Each part has a time budget and its own error line: one failure does not hide the others.
Without CUDA it says so and exits 0. `--device cpu` runs every part tiny on the CPU (a check of
the script, not a measurement).

    make bench-gpu      # or: .venv/bin/python benchmarks/gpu.py [--budget 480]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) by device name; others use a measured matmul peak.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def nominal_peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def measured_peak(device: str, n: int = 8192, seconds: float = 3.0) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: str) -> str:
    if device != "cuda":
        return "n/a on CPU"
    gib = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return f"{gib:.1f} GiB"


# --- 1. region features ------------------------------------------------------------------------


def extraction(device: str, images: int, batches: list[int], deadline: float) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from feature_extraction.config import ExtractConfig
    from feature_extraction.featurize import Item, StorageSpec, extract_chunks
    from tests.fixtures.images import jpeg, synthetic_photo

    with tempfile.TemporaryDirectory(prefix="uniter-bench-gpu-") as tmp:
        data = [jpeg(synthetic_photo(70_000 + i, (640, 480)), 90) for i in range(images)]
        pq.write_table(pa.table({"bytes": pa.array(data, pa.binary())}), Path(tmp) / "crawl.parquet")
        items = []
        for i, d in enumerate(data):
            w, h = Image.open(io.BytesIO(d)).size
            items.append(Item(f"img{i:04d}", "crawl.parquet", i, w, h))
        print(f"1. BUTD R101-C4 extraction, random weights, {images} photos of 640×480 (600/1000 sizing)")
        for precision in ("fp32", "bf16"):
            for batch in batches:
                if time.perf_counter() > deadline:
                    print("   (time budget spent: the remaining sizes are skipped)")
                    return
                cfg = ExtractConfig(
                    backend="detectron2", weights="random", batch_size=batch, loader_workers=2, device=device,
                    precision=precision,
                )  # fmt: skip
                spec = StorageSpec(tmp, None, None)
                list(extract_chunks(cfg, device, spec, [items[: 2 * batch]], [0]))  # warm-up: kernels, workers
                sync(device)
                t0 = time.perf_counter()
                boxes = sum(r.num_boxes for _, rows in extract_chunks(cfg, device, spec, [items], [0]) for r in rows)
                sync(device)
                seconds = time.perf_counter() - t0
                print(
                    f"   {precision} batch {batch:2d}: {images / seconds:7.1f} images/s  "
                    f"({boxes / images:.0f} boxes/image; peak GPU memory {peak_memory(device)})"
                    + ("   goal ≥ 30: " + ("met" if images / seconds >= 30 else "NOT met") if device == "cuda" else "")
                )


# --- 2. pretraining ----------------------------------------------------------------------------


def sdpa_kernel_used(device: str, heads: int, head_dim: int, length: int, batch: int) -> str:
    """The first SDPA kernel, in PyTorch's order of preference, that accepts the model's call: a
    boolean key-padding mask broadcast over heads and queries."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)
    mask = torch.ones(batch, 1, 1, length, device=device, dtype=torch.bool)
    mask[:, :, :, -3:] = False
    for name, backend in (
        ("flash attention", SDPBackend.FLASH_ATTENTION),
        ("memory-efficient attention", SDPBackend.EFFICIENT_ATTENTION),
        ("cuDNN attention", SDPBackend.CUDNN_ATTENTION),
        ("math (unfused)", SDPBackend.MATH),
    ):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
            return name
        except RuntimeError:
            continue
    return "none"


def pretraining(device: str, model_size: str, batch_tokens: int, steps: int, images: int, deadline: float) -> None:
    import deepspeed
    import numpy as np
    from pretrain import make_corpus, step_flops

    from uniter.batch import Vocab
    from uniter.configuration_uniter import PRESETS
    from uniter.modeling_uniter import UniterForPretraining
    from uniter.pretrain.config import PretrainConfig
    from uniter.pretrain.trainer import MicroBatches, Trainer

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
    with tempfile.TemporaryDirectory(prefix="uniter-bench-gpu-") as tmp:
        corpus = make_corpus(Path(tmp), images, 5)
        vocab = Vocab(cls=101, sep=102, mask=103, pad=0, size=28996, random_start=999)
        cfg = PretrainConfig(
            model=model_size, init_from_bert=None, batch_tokens=batch_tokens, steps=steps + 2, warmup=1,
            val_percent=0, loader_workers=0, device=device,
            deepspeed={"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}},
        )  # fmt: skip
        torch.manual_seed(0)
        model = UniterForPretraining(PRESETS[model_size](vocab_size=vocab.size))
        trainer = Trainer(cfg, corpus, vocab, model, rank=0, world=1)
        data = MicroBatches(trainer.plan, corpus, vocab, rank=0)
        items = [data[i] for i in range(steps + 2)]
        examples = flops = elapsed = 0.0
        timed = 0
        for k, item in enumerate(items):
            if time.perf_counter() > deadline:
                print("   (time budget spent: fewer steps timed)")
                break
            batch = trainer._device_batch(item["batch"])
            sync(device)
            t0 = time.perf_counter()
            out = trainer.engine(batch, task=item["task"], ot_lambda=cfg.ot_lambda)
            trainer.engine.backward(out.loss)
            trainer.engine.step()
            sync(device)
            if k < 2:
                continue  # warm-up: kernel selection, allocator
            elapsed += time.perf_counter() - t0
            examples += item["batch"]["attn_masks"].shape[0]
            flops += step_flops(model.config, item["batch"])
            timed += 1
        config = model.config
        length = int(np.mean([it["batch"]["attn_masks"].shape[1] for it in items]))
        kernel = sdpa_kernel_used(
            device, config.num_attention_heads, config.hidden_size // config.num_attention_heads, length, 8
        )
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        peak = nominal_peak(name) or measured_peak(device)
        source = "nominal dense bf16" if nominal_peak(name) else "measured bf16 matmul"
        achieved = flops / elapsed if elapsed else 0.0
        print(
            f"2. UNITER-{model_size} pretraining step, bf16, DeepSpeed ZeRO-1, {batch_tokens} tokens a micro-batch, "
            f"{timed} steps timed"
        )
        print(
            f"   {examples / max(elapsed, 1e-9):.1f} examples/s, {achieved / 1e12:.1f} TFLOP/s = "
            f"{achieved / peak:.1%} MFU ({source} peak {peak / 1e12:.0f} TFLOP/s on {name}); attention kernel: "
            f"{kernel}; peak GPU memory {peak_memory(device)}"
            + ("   goal ≥ 40 %: " + ("met" if achieved / peak >= 0.4 else "NOT met") if device == "cuda" else "")
        )


# --- 3. optimal transport ----------------------------------------------------------------------


def transport(device: str, batch: int, repeat: int) -> None:
    from ipot import best_of, exact_per_pair, problems

    from uniter.ot import optimal_transport_distance

    x, y, x_pad, y_pad, m_len, n_len = problems(batch, 60, 100, 768)
    t_pot = best_of(lambda: exact_per_pair(x, y, m_len, n_len), max(1, repeat // 4))
    xd, yd, xpd, ypd = (t.to(device) for t in (x, y, x_pad, y_pad))

    def ours():
        with torch.no_grad():
            optimal_transport_distance(xd, yd, xpd, ypd)
        sync(device)

    t_ours = best_of(ours, repeat)
    print(f"3. WRA optimal transport, {batch} problems of ≤60×100, hidden 768")
    print(
        f"   POT ot.emd2 per pair (CPU) {t_pot * 1e3:.1f} ms, batched IPOT (β 0.5, 50 it., {device}) "
        f"{t_ours * 1e3:.2f} ms = {t_pot / t_ours:.1f}×; peak GPU memory {peak_memory(device)}"
        + ("   goal ≥ 10×: " + ("met" if t_pot / t_ours >= 10 else "NOT met") if device == "cuda" else "")
    )


def part(name: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 — one part failing must not hide the others' figures
        print(f"   {name} FAILED:\n" + "".join("     " + line for line in traceback.format_exc().splitlines(True)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole run")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (run `make bench-gpu` on a GPU machine)")
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29541")
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        print("CPU smoke run: every part at a tiny size, a check of this script and not a measurement")
    else:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    start = time.perf_counter()
    gpu = args.device == "cuda"
    # the budget: extraction 40 %, pretraining 40 %, the rest for optimal transport
    part("extraction", extraction, args.device, 256 if gpu else 2, [1, 4, 8, 16] if gpu else [1],
         start + 0.4 * args.budget)  # fmt: skip
    part("pretraining", pretraining, args.device, "base" if gpu else "debug", 10240 if gpu else 512,
         20 if gpu else 2, 3000 if gpu else 40, start + 0.8 * args.budget)  # fmt: skip
    part("optimal transport", transport, args.device, 32 if gpu else 4, 20 if gpu else 2)
    print(f"whole run: {time.perf_counter() - start:.0f} s (budget {args.budget:.0f} s)")


if __name__ == "__main__":
    main()
