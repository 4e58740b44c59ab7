"""Detector weights from a local file — never downloaded.

Two formats:
- the Detectron2 pickle `{"model": {name: ndarray}, ...}` that the community BUTD port publishes
  (`faster_rcnn_from_caffe_attr.pkl`). A pickle can run code when loaded, so it is read with an
  unpickler that resolves only NumPy's array-reconstruction globals and builtin containers;
- a torch state dict (`.pt`/`.pth`/`.bin`), loaded with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from contract.errors import InputDataError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refuses global {module}.{name}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: detector weights not found (set extract.weights, or use backend: grid)")
    if path.suffix == ".pkl":
        try:
            with open(path, "rb") as f:
                data = _ArraysOnly(io.BufferedReader(f), encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as exc:
            raise InputDataError(f"{path}: not a Detectron2 weights pickle of NumPy arrays ({exc})") from None
        model = data.get("model", data) if isinstance(data, dict) else None
        if not isinstance(model, dict):
            raise InputDataError(f"{path}: expected {{'model': {{name: array}}}}, found {type(data).__name__}")
        return {k: torch.as_tensor(np.asarray(v)) for k, v in model.items() if isinstance(v, np.ndarray)}
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unreadable file gets the same clear message
        raise InputDataError(f"{path}: not a torch state dict loadable with weights_only=True ({exc})") from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    return dict(data)


def _needed(name: str) -> bool:
    """Whether a model entry must come from the file: not the normalization constants (set by the
    config) nor BatchNorm's step counter. FrozenBN's statistics (running_mean/var) must."""
    return not name.endswith("num_batches_tracked") and name not in ("pixel_mean", "pixel_std")


def expected_weights(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every weight the file must hold, by Detectron2 name, with its shape."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if _needed(k)}


def check_weights(model: nn.Module, path: str | Path) -> dict:
    """What `uniter check-weights` reports before any extraction: the weights ``model`` needs that
    the file lacks, those the file has that the model does not use, and shape mismatches."""
    state = read_state_dict(path)
    own = expected_weights(model)
    wrong = {
        k: {"file": list(state[k].shape), "model": list(shape)}
        for k, shape in own.items()
        if k in state and tuple(state[k].shape) != shape
    }
    missing = sorted(k for k in own if k not in state)
    return {
        "file": str(path),
        "expected": len(own),
        "matched": len(own) - len(missing) - len(wrong),
        "missing": missing,
        "wrong_shape": wrong,
        "unexpected": sorted(k for k in state if k not in own and _needed(k)),
        "ok": not missing and not wrong,
    }


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy weights into ``model`` by Detectron2 name; every model weight must be present."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and _needed(k)]
    if missing:
        raise InputDataError(f"{path}: {len(missing)} weights missing, e.g. {', '.join(missing[:5])}")
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise InputDataError(f"{path}: {k} has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own if k in state}, strict=False)
    return model


def save_detectron2_pickle(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s weights as the community port does: ``{"model": {name: ndarray}}``."""
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "uniter-pipeline"}, f)
