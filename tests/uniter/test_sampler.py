"""The token-bucket sampler: every example once per epoch, budget respected, little padding; the
datasets' sampling shares."""

from __future__ import annotations

import numpy as np
import pytest

from uniter.data import token_bucket_batches
from uniter.finetune.tasks.common import Endless
from uniter.runtime import warmup_linear


def test_budget_and_coverage():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 140, size=5000)
    ids = np.arange(5000)
    batches = token_bucket_batches(ids, lengths, budget=2048, bucket_size=1024, rng=np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == ids.tolist()  # each example exactly once
    for b in batches:
        assert lengths[b].max() * len(b) <= 2048 or len(b) <= 8  # over budget only as a single step of 8
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    assert 1 - real / padded < 0.05  # padding under 5 %
    again = token_bucket_batches(ids, lengths, 2048, 1024, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))  # same seed, same batches


def test_endless_stream_is_a_function_of_the_batch_number():
    lengths = np.random.default_rng(0).integers(5, 60, size=300)
    stream = Endless(lengths, budget=512, seed=3)
    first = [stream(j) for j in range(100)]  # several epochs, in order
    epochs = [
        token_bucket_batches(np.arange(300), lengths, 512, 8192, np.random.default_rng([3, 7, e])) for e in range(6)
    ]
    expected = [b for e in epochs for b in e][:100]
    assert all(np.array_equal(a, b) for a, b in zip(first, expected, strict=True))
    assert len(epochs[0]) < 50  # (the 100 batches span epochs)
    resumed = Endless(lengths, budget=512, seed=3)  # a resumed run asks for a late batch first
    for j in (77, 3, 99, 50):
        assert np.array_equal(resumed(j), first[j])


def test_warmup_linear_schedule():
    assert warmup_linear(0, 10, 100) == 0.1 and warmup_linear(9, 10, 100) == 1.0
    assert (
        warmup_linear(10, 10, 100) == 1.0 and warmup_linear(55, 10, 100) == 0.5 and warmup_linear(100, 10, 100) == 0.0
    )
    assert warmup_linear(0, 0, 100) == 1.0


def test_dataset_families_give_the_reference_shares():
    """COCO 20 / VG 30 / CC 30 / SBU 20 by family (COCO from two files) over 10,000 updates: each
    family's share within 2 points; within COCO, each file by its examples."""
    from types import SimpleNamespace

    from uniter.pretrain.config import PretrainConfig
    from uniter.pretrain.trainer import BatchPlan

    sizes = {"coco_train": 1000, "karpathy_coco": 500, "vg": 2000, "cc": 3000, "sbu": 800}
    sources = sorted(sizes)
    source = np.concatenate([np.full(n, sources.index(s)) for s, n in sizes.items()])
    corpus = SimpleNamespace(
        sources=sources, source=source, is_train=np.ones(len(source), bool), lengths=np.full(len(source), 40)
    )
    cfg = PretrainConfig(
        tasks={"mlm": 1.0, "itm": 1.0},
        steps=10_000,
        dataset_weights={"coco": 20.0, "vg": 30.0, "cc": 30.0, "sbu": 20.0},
        dataset_families={"coco": ["coco_train", "karpathy_coco"]},
    )
    plan = BatchPlan(cfg, corpus, world=1)
    drawn = np.bincount([plan.pool[c][1] for c in plan.choice], minlength=len(sources)) / cfg.steps
    share = dict(zip(sources, drawn, strict=True))
    for name, expected in (("vg", 0.3), ("cc", 0.3), ("sbu", 0.2)):
        assert abs(share[name] - expected) < 0.02, (name, share[name])
    assert abs(share["coco_train"] + share["karpathy_coco"] - 0.2) < 0.02
    assert abs(share["coco_train"] / share["karpathy_coco"] - 2.0) < 0.3

    with pytest.raises(ValueError, match="'coco_train' has a weight and so has its family 'coco'"):
        PretrainConfig(dataset_weights={"coco": 1.0, "coco_train": 2.0}, dataset_families={"coco": ["coco_train"]})
    with pytest.raises(ValueError, match="'cc' is in both"):
        PretrainConfig(dataset_families={"a": ["cc"], "b": ["cc"]})
