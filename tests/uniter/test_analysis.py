"""Attention analysis: the classifier on synthetic maps of each of the six patterns; the maps are
the model's real attention (they reproduce its attention output)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniter.analysis import (
    PATTERNS,
    attention_maps,
    classify,
    classify_heads,
    heatmap_grid_png,
    properties,
    summary_png,
)

T, N = 12, 36  # 12 text positions ([CLS] at 0, [SEP] at 11), then 24 regions


def _rows(fn) -> np.ndarray:
    a = np.zeros((N, N))
    for i in range(N):
        fn(i, a[i])
        a[i] /= a[i].sum()
    return a


TEXT = list(range(1, T - 1))
IMAGE = list(range(T, N))


def vertical(i, r):
    r[[0, T - 1]] = 0.45
    r += 0.1 / N


def diagonal(i, r):
    r[max(0, i - 1) : i + 2] = 1


def vertical_diagonal(i, r):
    r[[0, T - 1]] = 0.2
    r[max(0, i - 1) : i + 2] += 0.5 / len(range(max(0, i - 1), min(N, i + 2)))
    r += 0.1 / N


def block(i, r):
    r[TEXT if i < T else IMAGE] = 1


def reversed_block(i, r):
    r[IMAGE if i < T else TEXT] = 1


def heterogeneous(i, r):
    r[:] = np.random.default_rng(i).dirichlet(np.ones(N))


@pytest.mark.parametrize(
    "fn, expected",
    [
        (vertical, "vertical"),
        (diagonal, "diagonal"),
        (vertical_diagonal, "vertical+diagonal"),
        (block, "block"),
        (reversed_block, "reversed block"),
        (heterogeneous, "heterogeneous"),
    ],
)
def test_each_pattern_is_recognised(fn, expected):
    p = properties(_rows(fn), T)
    assert classify(p) == expected, p


def test_maps_are_the_models_attention():
    from tests.uniter.test_heads import _batch, _config
    from uniter.modeling_uniter import UniterModel

    torch.manual_seed(0)
    model = UniterModel(_config()).eval()
    batch = _batch(3)
    captured = {}
    layer = model.encoder.layer[1].attention.self
    layer.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0], out=out))
    maps = attention_maps(model, batch)
    assert len(maps) == 2 and maps[0].shape == (3, 2, batch["attn_masks"].shape[1], batch["attn_masks"].shape[1])
    x = captured["x"]
    b, length, h = x.shape
    v = layer.value(x).view(b, length, 2, h // 2).transpose(1, 2)
    recomputed = (maps[1] @ v).transpose(1, 2).reshape(b, length, h)
    assert torch.allclose(recomputed, captured["out"], atol=1e-5)  # the maps reproduce the layer's output
    pad = ~batch["attn_masks"].bool()
    assert float(maps[0].masked_select(pad[:, None, None, :].expand_as(maps[0])).abs().sum()) == 0.0
    text_lens = [int((batch["input_ids"][i] != 0).sum()) for i in range(3)]
    lengths = batch["attn_masks"].sum(1).tolist()
    labels = classify_heads(maps, text_lens, lengths)
    assert labels.shape == (2, 2, 3) and labels.max() < len(PATTERNS)
    assert heatmap_grid_png(maps, 0, text_lens[0], lengths[0], labels).startswith(b"\x89PNG")
    assert summary_png(labels).startswith(b"\x89PNG")
