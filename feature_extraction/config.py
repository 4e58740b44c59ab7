"""The `extract` config section."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from contract.configbase import InputFile, InputFolder, SectionConfig


class WeightsFile(InputFile):
    """A weights file, or "random": the real model with deterministic random weights (tests, benchmarks)."""

    KEYWORDS = frozenset({"random"})


class ExtractConfig(SectionConfig):
    """Region features of every image of the clean corpus."""

    # Where and how fast: not part of the output's identity.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"batch_size", "loader_workers", "device", "processes"})

    backend: Literal["detectron2", "grid"] = "grid"
    # The BUTD detector's weights: a Detectron2 pickle ({"model": {name: array}}) or a torch state
    # dict. "random" builds the real model with deterministic random weights (tests, benchmarks).
    weights: WeightsFile | None = None
    depth: Literal[50, 101] = 101
    selection: Literal["caffe", "lxmert36"] = "caffe"
    conf_thresh: float = Field(default=0.2, ge=0, le=1)
    min_boxes: int = Field(default=10, ge=1)
    max_boxes: int = Field(default=100, ge=1)
    nms_iou: float = Field(default=0.3, gt=0, le=1)
    score_floor: float = Field(default=0.01, gt=0, le=1)  # see feature_extraction/select.py
    min_size: int = Field(default=600, ge=32)  # test scale: shorter side …
    max_size: int = Field(default=1000, ge=32)  # … longer side at most
    rpn_post_nms_topk: int = Field(default=300, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: backbone and res5 under autocast
    grid_rows: int = Field(default=6, ge=1, le=64)
    grid_cols: int = Field(default=6, ge=1, le=64)
    # Up to this many regions of one colour (objects, largest first) and the whole image before
    # the grid's cells; 0 (the default): the cells alone (feature_extraction/grid.py).
    grid_objects: int = Field(default=0, ge=0, le=100)
    shard_images: int = Field(default=256, ge=1)

    batch_size: int = Field(default=4, ge=1)
    loader_workers: int = Field(default=2, ge=0)  # processes decoding JPEGs ahead of the model
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    processes: int = Field(default=1, ge=1)  # one per GPU (device cuda → cuda:0..N-1)

    @model_validator(mode="after")
    def _detector_needs_weights(self) -> ExtractConfig:
        if self.backend == "detectron2" and self.weights is None:
            raise ValueError(
                "backend 'detectron2' needs weights: the path of the BUTD weights file "
                "(e.g. faster_rcnn_from_caffe_attr.pkl), or use backend: grid"
            )
        if self.min_boxes > self.max_boxes:
            raise ValueError(f"min_boxes ({self.min_boxes}) > max_boxes ({self.max_boxes})")
        return self


class DownstreamConfig(SectionConfig):
    """The downstream tasks' images (VQA, NLVR2, retrieval, RefCOCO), featurized with the extract
    section's detector settings: `images` maps a set name to a folder of image files. A feature row's
    key is `<set>/<file stem>` (COCO_val2014_000000000042, 1000092795, dev-850-0-img0)."""

    images: dict[str, InputFolder] = {}
    # Also the features of ground-truth boxes (referring expressions train on them): set name → a
    # COCO instances.json; for each of the set's images it annotates, a row `<set>/<stem>#gt` with
    # one region per annotation, in ascending annotation id.
    gt_boxes: dict[str, InputFile] = {}
    shard_images: int = Field(default=256, ge=1)

    @model_validator(mode="after")
    def _names(self) -> DownstreamConfig:
        bad = [n for n in self.images if not n or "/" in n]
        if bad:
            raise ValueError(f"image set names {bad}: expected non-empty names without '/'")
        unknown = sorted(set(self.gt_boxes) - set(self.images))
        if unknown:
            sets = ", ".join(sorted(self.images))
            raise ValueError(f"gt_boxes for {unknown}: not image sets of downstream.images ({sets})")
        return self
