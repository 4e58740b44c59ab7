"""Attention analysis (the paper's §4.4 / Fig. 3): per-layer, per-head attention maps of image-text
pairs, each head classified into one of six patterns from measurable properties of its map.

The properties of a map A (queries × keys over the real positions; text first, t tokens incl.
[CLS] and [SEP], then regions), each averaged over queries:
- special:  mass on [CLS] and [SEP]                                   (the "vertical" stripes)
- diagonal: mass within one position of the query (|i − j| ≤ 1)
- within:   mass on the query's own modality, [CLS]/[SEP] left out, as a share of the rest,
            averaged over text queries and over region queries separately (so the longer
            modality does not decide alone); block and reversed block need both sides to agree

The rules, in order (thresholds chosen on synthetic maps of each pattern, see the tests):
1. vertical + diagonal  special ≥ 0.25, diagonal ≥ 0.25 and special + diagonal ≥ 0.6
2. vertical             special ≥ 0.5
3. diagonal             diagonal ≥ 0.5
4. block                within ≥ 0.8 on both sides    (each modality attends to itself)
5. reversed block       within ≤ 0.3 on both sides    (each modality attends to the other)
6. heterogeneous        anything else

Pictures (matplotlib): `attention_example_NN.png`, one example's heatmaps per layer and head with
its tokens and `img k` regions on the axes, and `attention_summary.png`, each head's pattern on a
layer × head grid beside each layer's pattern shares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from contract.errors import InputDataError, MissingInputError
from uniter import modeling_uniter, plots
from uniter.batch import Vocab, pack
from uniter.data import Corpus

PATTERNS = ("vertical", "diagonal", "vertical+diagonal", "block", "heterogeneous", "reversed block")
SPECIAL_VD, SPECIAL_V, DIAG_D, WITHIN_BLOCK, WITHIN_REVERSED = 0.25, 0.5, 0.5, 0.8, 0.3


@dataclass(frozen=True)
class MapProperties:
    special: float
    diagonal: float
    within_text: float  # text queries' share on text keys
    within_image: float  # region queries' share on region keys


def properties(attn: np.ndarray, text_len: int) -> MapProperties:
    """attn: (n, n) rows summing to 1 over the real positions; text_len includes [CLS] and [SEP]."""
    n = attn.shape[0]
    special_cols = [0, text_len - 1]
    special = float(attn[:, special_cols].sum(1).mean())
    i, j = np.indices((n, n))
    diagonal = float((attn * (np.abs(i - j) <= 1)).sum(1).mean())
    is_text = np.arange(n) < text_len
    rest = attn.copy()
    rest[:, special_cols] = 0
    same = (rest * (is_text[:, None] == is_text[None, :])).sum(1)
    total = rest.sum(1)

    def share(side: np.ndarray) -> float:
        queries = [q for q in np.flatnonzero(side) if q not in special_cols and total[q] > 1e-9]
        return float(np.mean(same[queries] / total[queries])) if queries else 0.5

    return MapProperties(special, diagonal, share(is_text), share(~is_text))


def classify(p: MapProperties) -> str:
    if p.special >= SPECIAL_VD and p.diagonal >= SPECIAL_VD and p.special + p.diagonal >= 0.6:
        return "vertical+diagonal"
    if p.special >= SPECIAL_V:
        return "vertical"
    if p.diagonal >= DIAG_D:
        return "diagonal"
    if min(p.within_text, p.within_image) >= WITHIN_BLOCK:
        return "block"
    if max(p.within_text, p.within_image) <= WITHIN_REVERSED:
        return "reversed block"
    return "heterogeneous"


@torch.no_grad()
def attention_maps(model, batch: dict) -> list[torch.Tensor]:
    """Per layer, (B, heads, L, L) attention probabilities of `model` (anything with `.uniter`, or a
    UniterModel) on a packed batch. Recomputed from each layer's input by hooks, so the model's own
    forward keeps its fused attention kernel."""
    uniter = getattr(model, "uniter", model)
    maps: list[torch.Tensor] = []

    def hook(module, inputs, _output):
        x, key_mask = inputs
        b, length, _ = x.shape

        def heads(t):
            return t.view(b, length, module.num_heads, module.head_dim).transpose(1, 2)

        scores = heads(module.query(x)) @ heads(module.key(x)).transpose(-1, -2) / module.head_dim**0.5
        maps.append(F.softmax(scores.float().masked_fill(~key_mask, float("-inf")), dim=-1))

    handles = [layer.attention.self.register_forward_hook(hook) for layer in uniter.encoder.layer]
    try:
        uniter.eval()
        uniter.encode(batch)
    finally:
        for h in handles:
            h.remove()
    return maps


def classify_heads(maps: list[torch.Tensor], text_lens: list[int], lengths: list[int]) -> np.ndarray:
    """(layers, heads, examples) pattern indices into PATTERNS."""
    layers, heads = len(maps), maps[0].shape[1]
    out = np.zeros((layers, heads, len(text_lens)), dtype=np.int64)
    for layer, m in enumerate(maps):
        for e, (t, n) in enumerate(zip(text_lens, lengths, strict=True)):
            for h in range(heads):
                attn = m[e, h, :n, :n].numpy()
                out[layer, h, e] = PATTERNS.index(classify(properties(attn, t)))
    return out


# --- pictures (matplotlib, imported when drawing: `uniter.plots`) --------------------------------

PATTERN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")  # by PATTERNS index


def token_labels(tokenizer, text_ids, regions: int) -> list[str]:
    """A pair's map axis labels: its word pieces ([CLS] … [SEP]), then `img 1` … `img <regions>`."""
    words = tokenizer.convert_ids_to_tokens([int(i) for i in text_ids])
    return list(words) + [f"img {k + 1}" for k in range(regions)]


def heatmap_grid_figure(
    maps: list[torch.Tensor], example: int, text_len: int, length: int, labels: np.ndarray, tokens: list[str]
):  # → matplotlib Figure
    """One heatmap per (layer, head) of one example: the tokens on both axes (queries down, keys
    across), the text/region boundary in red, each head's pattern in its title, one colour bar."""
    from matplotlib.colors import PowerNorm  # noqa: PLC0415 -- matplotlib: only when drawing

    if len(tokens) != length:
        raise ValueError(f"{len(tokens)} token labels for a map of {length} positions")
    layers, heads = len(maps), maps[0].shape[1]
    attn = [[maps[layer][example, h, :length, :length].numpy() for h in range(heads)] for layer in range(layers)]
    # each map's side in inches: room for a label per position, the whole picture at most ~32 in
    side = min(max(2.8, 0.12 * length + 1.0), 32 / max(layers, heads))
    labels_in = 1.2  # the token labels' room, left and below
    fig = plots.figure(
        int(plots.DPI * (heads * side + labels_in + 1.3)), int(plots.DPI * (layers * (side + 0.3) + labels_in + 0.5))
    )
    axes = fig.subplots(layers, heads, squeeze=False)
    # NOTE: one colour scale for all maps (the colour bar's), square-root spaced: a head's mass is
    # mostly on a few keys, and a linear scale would show the rest of the map as empty.
    norm = PowerNorm(0.5, vmin=0.0, vmax=max(float(a.max()) for row in attn for a in row))
    font = min(8.0, max(3.0, 0.75 * 72 * side / length))
    image = None
    for layer in range(layers):
        for h in range(heads):
            ax = axes[layer, h]
            image = ax.imshow(attn[layer][h], cmap="viridis", norm=norm, interpolation="nearest")
            ax.axhline(text_len - 0.5, color="red", linewidth=0.8)
            ax.axvline(text_len - 0.5, color="red", linewidth=0.8)
            ax.set_title(f"layer {layer + 1}, head {h + 1}: {PATTERNS[labels[layer, h, example]]}", fontsize=9)
            # the token labels once per row and column (ticks on every map cost seconds per picture)
            if layer == layers - 1:
                ax.set_xticks(range(length), tokens, rotation=90, fontsize=font)
                ax.set_xlabel("key")
            else:
                ax.set_xticks([])
            if h == 0:
                ax.set_yticks(range(length), tokens, fontsize=font)
                ax.set_ylabel("query")
            else:
                ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    fig.suptitle(
        f"example {example}: attention per layer and head ({text_len} text tokens, {length - text_len} image "
        "regions; red: the text / image boundary)"
    )
    return fig


def heatmap_grid_png(
    maps: list[torch.Tensor], example: int, text_len: int, length: int, labels: np.ndarray, tokens: list[str]
) -> bytes:
    return plots.png_bytes(heatmap_grid_figure(maps, example, text_len, length, labels, tokens))


def summary_png(labels: np.ndarray) -> bytes:
    """Left: the layer × head grid, each head coloured by its most frequent pattern over the
    examples (the cell says how often). Right: per layer, each pattern's share of the maps."""
    from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: PLC0415 -- matplotlib: only when drawing
    from matplotlib.patches import Patch  # noqa: PLC0415

    layers, heads, examples = labels.shape
    counts = np.stack([(labels == k).sum(2) for k in range(len(PATTERNS))], axis=-1)  # (layers, heads, patterns)
    top, share = counts.argmax(-1), counts.max(-1) / examples
    fig = plots.figure(max(900, 60 * heads + 620), max(480, 40 * layers + 200))
    grid, bars = fig.subplots(1, 2, width_ratios=[max(heads, 3), 4], sharey=True)
    cmap = ListedColormap(PATTERN_COLOURS)
    grid.imshow(top, cmap=cmap, norm=BoundaryNorm(np.arange(len(PATTERNS) + 1) - 0.5, cmap.N), aspect="auto")
    for layer in range(layers):
        for h in range(heads):
            grid.text(h, layer, f"{share[layer, h]:.0%}", ha="center", va="center", color="white", fontsize=8)
    grid.set_xticks(range(heads), [str(h + 1) for h in range(heads)])
    grid.set_yticks(range(layers), [str(layer + 1) for layer in range(layers)])
    grid.set_xticks(np.arange(heads + 1) - 0.5, minor=True)  # white lines between the heads
    grid.set_yticks(np.arange(layers + 1) - 0.5, minor=True)
    grid.grid(which="minor", color="white", linewidth=2)
    grid.tick_params(which="minor", length=0)
    grid.set_xlabel("head")
    grid.set_ylabel("layer")
    grid.set_title(f"each head's most frequent pattern ({examples} examples)", fontsize=10)
    left = np.zeros(layers)
    per_layer = counts.sum(1) / (heads * examples)  # (layers, patterns)
    for k in range(len(PATTERNS)):
        bars.barh(range(layers), per_layer[:, k], left=left, color=PATTERN_COLOURS[k], height=0.8)
        left += per_layer[:, k]
    bars.set_xlim(0, 1)
    bars.set_xlabel("share of the layer's maps")
    bars.set_title("patterns per layer", fontsize=10)
    handles = [Patch(color=c, label=name) for c, name in zip(PATTERN_COLOURS, PATTERNS, strict=True)]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(PATTERNS), fontsize=9)
    fig.suptitle("attention patterns per layer and head")
    return plots.png_bytes(fig)


# --- the command: `uniter analyze attention` ---------------------------------------------------


def load_encoder(folder: Path):
    """Any UNITER checkpoint folder (pretraining or a fine-tuned head): its `uniter` encoder."""
    arch = (json.loads((folder / "config.json").read_text()).get("architectures") or ["UniterModel"])[0]
    cls = getattr(modeling_uniter, arch, None)
    if cls is None or not arch.startswith("Uniter"):
        raise InputDataError(f"{folder}/config.json: architecture {arch!r} is not a UNITER model of this project")
    return cls.from_pretrained(folder)


def analyze_attention(corpus: Corpus, tokenizer, model, n: int, out: Path, examples_png: int = 4) -> dict:
    """Attention maps of `n` pairs of `corpus` (validation pairs first) under `model`, each head
    classified; pictures and `attention.json` written into `out`."""
    order = np.concatenate([np.flatnonzero(corpus.is_val), np.flatnonzero(~corpus.is_val)])[:n]
    if not len(order):
        raise MissingInputError("the corpus has no image-text pairs with features to analyze")
    vocab = Vocab.from_tokenizer(tokenizer)
    texts = [np.concatenate([[vocab.cls], corpus.text(int(i)), [vocab.sep]]) for i in order]
    batch = pack(texts, [corpus.example_region(int(i)) for i in order], vocab)
    maps = attention_maps(model, batch)
    text_lens = [len(t) for t in texts]
    lengths = batch["attn_masks"].sum(1).tolist()
    labels = classify_heads(maps, text_lens, lengths)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_summary.png").write_bytes(summary_png(labels))
    for e in range(min(examples_png, len(order))):
        tokens = token_labels(tokenizer, texts[e], lengths[e] - text_lens[e])
        grid = heatmap_grid_png(maps, e, text_lens[e], lengths[e], labels, tokens)
        (out / f"attention_example_{e:02d}.png").write_bytes(grid)
    per_layer = [
        {name: int((labels[layer] == k).sum()) for k, name in enumerate(PATTERNS)} for layer in range(labels.shape[0])
    ]
    summary = {
        "examples": len(order),
        "layers": labels.shape[0],
        "heads": labels.shape[1],
        "per_layer": per_layer,
        "overall": {name: int((labels == k).sum()) for k, name in enumerate(PATTERNS)},
        "out": str(out.resolve()),
    }
    (out / "attention.json").write_text(json.dumps(summary, indent=2))
    return summary
