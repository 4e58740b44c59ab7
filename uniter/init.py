"""Initialise UNITER's text side from a BERT checkpoint (the reference starts from bert-base-cased).

BERT's weights map one to one: `bert.X` → `uniter.X` (embeddings, encoder, pooler) and the MLM
head `cls.predictions.*` as is; the original format's LayerNorm `gamma`/`beta` are read as
`weight`/`bias`. The image side and the other heads keep their fresh init.
Checkpoints are read from a local folder (model.safetensors, or pytorch_model.bin with
`weights_only=True`) — or a hub name already in the local cache; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from torch import nn

from contract.errors import ConfigError
from uniter.data import resolve


def read_bert_state_dict(spec: str) -> dict[str, torch.Tensor]:
    path = Path(resolve(spec))
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return load_file(str(path / "model.safetensors"))
        if (path / "pytorch_model.bin").is_file():
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        raise ConfigError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
    try:
        folder = snapshot_download(spec, local_files_only=True, allow_patterns=["*.safetensors", "*.bin", "*.json"])
    except Exception:  # noqa: BLE001 — any failure here means "not available offline"
        raise ConfigError(
            f"BERT checkpoint {spec!r}: not a local folder and not in the local hub cache (no model hub is "
            "reached at run time). Give a folder with model.safetensors, or pkg://<package>/<folder>"
        ) from None
    return read_bert_state_dict(folder)


def modern_name(name: str) -> str:
    """A weight's name as transformers writes it. Checkpoints converted from the original
    TensorFlow BERT (and the UNITER release's own BERT files) call LayerNorm's scale and shift
    `gamma` and `beta`; transformers calls them `weight` and `bias`."""
    head, _, last = name.rpartition(".")
    if head.endswith("LayerNorm") and last in _OLD_LAYERNORM:
        return f"{head}.{_OLD_LAYERNORM[last]}"
    return name


_OLD_LAYERNORM = {"gamma": "weight", "beta": "bias"}


def load_bert(model: nn.Module, spec: str) -> list[str]:
    """Copy BERT weights into `model` (a UniterModel or a model with `.uniter`); returns the names
    loaded. Every text-side weight of the model must be in the checkpoint, with the same shape."""
    state = read_bert_state_dict(spec)
    prefix = "uniter." if hasattr(model, "uniter") else ""
    mapped = {}
    for name, value in state.items():
        key = modern_name(name).removeprefix("bert.")
        if key.startswith(("embeddings.", "encoder.", "pooler.")):
            mapped[prefix + key] = value
        elif key.startswith("cls.predictions.") and prefix and not key.endswith("decoder.weight"):
            mapped[key] = value  # the decoder weight is the (tied) word embedding matrix
    own = model.state_dict()
    text_side = [k for k in own if k.startswith(tuple(prefix + p for p in ("embeddings.", "encoder.", "pooler.")))]
    missing = [k for k in text_side if k not in mapped]
    if missing:
        raise ConfigError(
            f"{spec}: the checkpoint lacks {len(missing)} text-side weights, e.g. {', '.join(missing[:4])}"
        )
    wrong = [k for k, v in mapped.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            f"{spec}: {k} is {tuple(mapped[k].shape)} in the checkpoint but {tuple(own[k].shape)} in the model — "
            "the UNITER config (hidden size, layers, vocabulary) must match the BERT checkpoint"
        )
    loaded = {k: v for k, v in mapped.items() if k in own}
    model.load_state_dict(loaded, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return sorted(loaded)
