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
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from contract.errors import InputDataError, MissingInputError
from uniter import modeling_uniter
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


# --- pictures (Pillow: no plotting library needed) -----------------------------------------------


def _heat(attn: np.ndarray, text_len: int, cell: int):  # → PIL image
    n = attn.shape[0]
    scaled = attn / max(float(attn.max()), 1e-9)
    pixels = (255 * (1 - scaled)).astype(np.uint8)  # dark = much attention
    img = Image.fromarray(np.kron(pixels, np.ones((cell, cell), dtype=np.uint8)), mode="L").convert("RGB")
    draw = ImageDraw.Draw(img)
    edge = text_len * cell  # the text / region boundary
    draw.line([(edge, 0), (edge, n * cell)], fill=(220, 30, 30))
    draw.line([(0, edge), (n * cell, edge)], fill=(220, 30, 30))
    return img


def heatmap_grid_png(
    maps: list[torch.Tensor], example: int, text_len: int, length: int, labels: np.ndarray, max_side: int = 160
) -> bytes:
    """One heatmap per (layer, head) of one example, boundary in red, the head's pattern below it."""
    cell = max(1, max_side // max(1, length))
    size = length * cell
    layers, heads = len(maps), maps[0].shape[1]
    pad, caption = 6, 14
    canvas = Image.new("RGB", (heads * (size + pad) + pad + 50, layers * (size + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for layer in range(layers):
        y = pad + layer * (size + caption + pad)
        draw.text((2, y + size // 2), f"L{layer + 1}", fill="black")
        for h in range(heads):
            x = 50 + pad + h * (size + pad)
            attn = maps[layer][example, h, :length, :length].numpy()
            canvas.paste(_heat(attn, text_len, cell), (x, y))
            draw.text((x, y + size + 1), PATTERNS[labels[layer, h, example]][:12], fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def summary_png(labels: np.ndarray, width: int = 640, height: int = 320) -> bytes:
    """Stacked bars per layer: how many (head, example) maps fall in each pattern."""
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    layers = labels.shape[0]
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, bottom, top = 40, height - 70, 10
    bar = (width - left - 20) / layers
    for layer in range(layers):
        counts = np.bincount(labels[layer].ravel(), minlength=len(PATTERNS))
        y = bottom
        for p, c in enumerate(counts):
            h = (bottom - top) * c / max(1, counts.sum())
            draw.rectangle([left + layer * bar + 2, y - h, left + (layer + 1) * bar - 2, y], fill=palette[p])
            y -= h
        draw.text((left + layer * bar + bar / 2 - 6, bottom + 4), str(layer + 1), fill="black")
    for p, name in enumerate(PATTERNS):  # legend
        x, y = left + 200 * (p % 3), bottom + 24 + 14 * (p // 3)
        draw.rectangle([x, y, x + 9, y + 9], fill=palette[p])
        draw.text((x + 13, y - 1), name, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


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
        grid = heatmap_grid_png(maps, e, text_lens[e], lengths[e], labels)
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
