"""The detectron2 backend's model side: decoded batches → BUTD detections → selected regions → rows.

Imports detectron2 (through butd.py); `featurize.extract_chunks` imports this module only when the
detectron2 backend runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from feature_extraction.butd import Detections, build_butd, butd_config, detect, init_random, optimize_for_inference
from feature_extraction.config import ExtractConfig
from feature_extraction.schema import RegionFeatures
from feature_extraction.select import Selection, select_caffe, select_lxmert36
from feature_extraction.weights import load_weights


class Detector:
    """The BUTD model plus box selection; `__call__` turns a decoded batch into RegionFeatures."""

    def __init__(self, cfg: ExtractConfig, device: str):
        d2cfg = butd_config(
            depth=cfg.depth,
            post_nms_topk=cfg.rpn_post_nms_topk,
            min_size=cfg.min_size,
            max_size=cfg.max_size,
            device=device,
        )
        model = build_butd(d2cfg)
        if cfg.weights == "random":
            init_random(model, seed=0)
        else:
            load_weights(model, cfg.weights)
        self.model = optimize_for_inference(model)
        self.cfg = cfg
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else None

    def __call__(self, batch: list[dict[str, Any]]) -> list[RegionFeatures]:
        cfg = self.cfg
        given = "boxes" in batch[0]  # a batch of ground-truth-box items (they are sharded apart)
        detections = detect(
            self.model, [b["tensor"] for b in batch], self.dtype, boxes=[b["boxes"] for b in batch] if given else None
        )
        out = []
        for b, det in zip(batch, detections, strict=True):
            det = _to_cpu(det)
            h, w = b["tensor"].shape[1:]
            if given:  # every given box, in the given order, confidence 1
                n = len(det.proposals)
                sel = Selection(torch.arange(n), det.proposals, torch.ones(n))
            elif cfg.selection == "caffe":
                sel = select_caffe(
                    det,
                    nms_iou=cfg.nms_iou,
                    conf_thresh=cfg.conf_thresh,
                    min_boxes=cfg.min_boxes,
                    max_boxes=cfg.max_boxes,
                    score_floor=cfg.score_floor,
                )
            else:
                sel = select_lxmert36(det, self.model.roi_heads.box_predictor.box2box_transform, (h, w))
            out.append(region_features(b, det, sel))
        return out


def _to_cpu(det: Detections) -> Detections:
    return Detections(
        *(t.detach().float().cpu() for t in (det.proposals, det.features, det.probs, det.deltas, det.attr_logits))
    )


def region_features(b: dict[str, Any], det: Detections, sel: Selection) -> RegionFeatures:
    """One image's row: the selected regions, boxes back in the original image's pixels."""
    item, (width, height), scale = b["item"], b["size"], b["scale"]
    boxes = (sel.boxes / scale).numpy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    probs = det.probs[sel.index]
    soft = torch.cat([probs[:, -1:], probs[:, :-1]], dim=1)  # background first: Caffe/UNITER order
    return RegionFeatures(
        image_key=item.key,
        image_w=width,
        image_h=height,
        features=det.features[sel.index].numpy().astype(np.float16),
        boxes=boxes.astype(np.float32),
        conf=sel.conf.numpy().astype(np.float32),
        soft_labels=soft.numpy().astype(np.float16),
        object_ids=probs[:, :-1].argmax(dim=1).numpy().astype(np.int32),
        attr_ids=det.attr_logits[sel.index][:, :-1].argmax(dim=1).numpy().astype(np.int32),
        backend="detectron2",
    )
