"""Attention analysis: the classifier on synthetic maps of each of the six patterns; the maps are
the model's real attention (they reproduce its attention output); the pictures label their axes
with the pair's tokens, name each head's pattern, and have a colour bar and a legend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures.pictures import check_png
from uniter.analysis import (
    PATTERNS,
    attention_maps,
    classify,
    classify_heads,
    heatmap_grid_figure,
    heatmap_grid_png,
    properties,
    summary_png,
    token_labels,
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
    tokens = [f"w{i}" for i in range(text_lens[0])] + [f"img {k + 1}" for k in range(lengths[0] - text_lens[0])]
    check_png(heatmap_grid_png(maps, 0, text_lens[0], lengths[0], labels, tokens))
    check_png(summary_png(labels))


SYNTHETIC = (vertical, diagonal, vertical_diagonal, block, reversed_block, heterogeneous)


def _synthetic_maps(layers: int = 2, heads: int = 3) -> list[torch.Tensor]:
    """(1, heads, N, N) per layer, head (layer, h) drawn as one of the six patterns in turn."""
    return [
        torch.tensor(np.stack([_rows(SYNTHETIC[(layer * heads + h) % 6]) for h in range(heads)])[None])
        for layer in range(layers)
    ]


def test_heatmaps_show_tokens_patterns_and_a_colour_bar():
    maps = _synthetic_maps()
    labels = classify_heads(maps, [T], [N])
    tokens = ["[CLS]", *(f"word{i}" for i in range(1, T - 1)), "[SEP]"] + [f"img {k + 1}" for k in range(N - T)]
    fig = heatmap_grid_figure(maps, 0, T, N, labels, tokens)
    axes = fig.axes[:-1]  # the last is the colour bar's
    assert len(axes) == 6 and fig.axes[-1].get_ylabel() == "attention probability"
    bottom, left = axes[3:], axes[::3]
    assert all([t.get_text() for t in ax.get_xticklabels()] == tokens for ax in bottom)
    assert all([t.get_text() for t in ax.get_yticklabels()] == tokens for ax in left)
    titles = [ax.get_title() for ax in axes]
    assert titles[0] == "layer 1, head 1: vertical" and titles[5] == "layer 2, head 3: heterogeneous"
    assert [t.split(": ")[1] for t in titles] == list(PATTERNS[:3]) + ["block", "reversed block", "heterogeneous"]
    check_png(heatmap_grid_png(maps, 0, T, N, labels, tokens))
    with pytest.raises(ValueError, match="token labels"):
        heatmap_grid_png(maps, 0, T, N, labels, tokens[:-1])


def test_summary_is_a_layer_by_head_grid_of_patterns():
    labels = np.random.default_rng(0).integers(0, len(PATTERNS), size=(4, 3, 5))
    image = check_png(summary_png(labels))
    # the six patterns' colours (legend, grid and bars), axes and text: far from one flat colour
    assert len(image.getcolors(image.width * image.height)) > 50


def test_token_labels_are_the_word_pieces_then_the_regions(tmp_path):
    from uniter.data import load_tokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "##s", "run"]) + "\n")
    tokenizer = load_tokenizer(str(vocab), lowercase=True)
    ids = tokenizer("a dogs run")["input_ids"]
    assert token_labels(tokenizer, np.asarray(ids), 2) == ["[CLS]", "a", "dog", "##s", "run", "[SEP]", "img 1", "img 2"]
