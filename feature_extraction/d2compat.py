"""The one place where detectron2 v0.6 is bridged to this environment; import detectron2 through here.

We install `pb1-detectron2==0.6` (upstream v0.6's Python files, without the C++ sources, so no
compiled `detectron2._C`). Faster R-CNN C4 needs none of it — RoIPool, RoIAlign and NMS come from
torchvision — but v0.6 has two import-time snags, bridged here and nowhere else:

1. `detectron2/layers/deform_conv.py` (and the rotated-box ops, COCO fast-eval) do
   `from detectron2 import _C` at import time. When no compiled `_C` exists we register a stand-in
   module whose every attribute raises a clear error: deformable convolution, rotated boxes and
   the C++ COCO evaluator are unavailable, nothing else changes.
2. Pillow ≥ 10 removed `Image.LINEAR` (an alias of `BILINEAR`), which v0.6 uses as a default
   argument. We restore the alias when missing (we never pin Pillow < 10: the crawler decodes
   untrusted images).

With upstream detectron2 built with its compiled ops (GPU users: see docs/features.md) the real
`_C` imports and the stand-in is never installed.
"""

from __future__ import annotations

import importlib
import sys
import types

import PIL.Image


class _MissingOps(types.ModuleType):
    """Any op looked up here exists, and raises a clear error when called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*_args, **_kwargs):
            raise RuntimeError(
                f"detectron2._C.{name} is not available: this detectron2 has no compiled ops "
                "(deformable convolution, rotated boxes, C++ COCO eval). The BUTD feature extractor "
                "does not need them; for models that do, build upstream detectron2 with its C++/CUDA ops."
            )

        return unavailable


def import_detectron2() -> types.ModuleType:
    """Import detectron2 (bridged if needed) and return the package."""
    if not hasattr(PIL.Image, "LINEAR"):
        PIL.Image.LINEAR = PIL.Image.Resampling.BILINEAR  # type: ignore[attr-defined]
    if "detectron2._C" not in sys.modules:
        try:
            importlib.import_module("detectron2._C")
        except ImportError:
            sys.modules["detectron2._C"] = _MissingOps("detectron2._C")
    return importlib.import_module("detectron2")
