"""The token-bucket sampler: every example once per epoch, budget respected, little padding."""

from __future__ import annotations

import numpy as np

from uniter.data import token_bucket_batches
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


def test_warmup_linear_schedule():
    assert warmup_linear(0, 10, 100) == 0.1 and warmup_linear(9, 10, 100) == 1.0
    assert (
        warmup_linear(10, 10, 100) == 1.0 and warmup_linear(55, 10, 100) == 0.5 and warmup_linear(100, 10, 100) == 0.0
    )
    assert warmup_linear(0, 0, 100) == 1.0
