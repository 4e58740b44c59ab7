"""Which regions of an image become its features.

`caffe` (default) is the reference rule of bottom-up-attention's generate_tsv.py, used by UNITER:
the *proposal* boxes; NMS at IoU 0.3 within each of the 1600 classes; each proposal's confidence is
its best score among the classes where it survives; keep confidence ≥ 0.2, at least 10 and at most
100, sorted by confidence. The 1600 per-class NMS calls of the reference are one `batched_nms`
here. Only (proposal, class) pairs scoring ≥ `score_floor` enter it: NMS suppresses a box only by
higher-scoring boxes of its class, so dropping lower pairs changes no surviving score above the
floor — the confidences of all proposals whose confidence is ≥ `score_floor` are exact.

`lxmert36` is the LXMERT port's variant: regressed class-specific boxes; class-aware NMS with
scores ≥ 0.2 at IoU 0.5, 0.6 … 0.9 until 36 distinct proposals survive; exactly 36 boxes (topped up
with the best remaining proposals when NMS leaves fewer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms, nms

from feature_extraction.butd import Detections


@dataclass
class Selection:
    index: torch.Tensor  # (N,) proposal indices, by descending confidence
    boxes: torch.Tensor  # (N, 4) xyxy, resized-image coordinates
    conf: torch.Tensor  # (N,)


def select_caffe(
    det: Detections,
    *,
    nms_iou: float = 0.3,
    conf_thresh: float = 0.2,
    min_boxes: int = 10,
    max_boxes: int = 100,
    score_floor: float = 0.01,
) -> Selection:
    boxes, scores = det.proposals, det.probs[:, :-1]  # drop background (last in Detectron2's order)
    rois, classes = torch.nonzero(scores >= score_floor, as_tuple=True)
    pair_scores = scores[rois, classes]
    keep = batched_nms(boxes[rois].float(), pair_scores.float(), classes, nms_iou)
    max_conf = torch.zeros(len(boxes), dtype=scores.dtype, device=scores.device)
    max_conf.scatter_reduce_(0, rois[keep], pair_scores[keep], reduce="amax", include_self=True)
    order = torch.sort(max_conf, descending=True, stable=True).indices
    n = int((max_conf >= conf_thresh).sum())
    n = min(max(n, min_boxes), max_boxes, len(boxes))
    index = order[:n]
    return Selection(index, boxes[index], max_conf[index])


def select_lxmert36(
    det: Detections, box_transform, image_size: tuple[int, int], *, num_boxes: int = 36, score_thresh: float = 0.2
) -> Selection:
    scores = det.probs[:, :-1]
    num_classes = scores.shape[1]
    regressed = box_transform.apply_deltas(det.deltas, det.proposals).view(-1, num_classes, 4)
    h, w = image_size
    regressed[..., 0::2] = regressed[..., 0::2].clamp(0, w)
    regressed[..., 1::2] = regressed[..., 1::2].clamp(0, h)
    rois, classes = torch.nonzero(scores > score_thresh, as_tuple=True)
    pair_scores = scores[rois, classes]
    chosen: list[int] = []
    chosen_cls: dict[int, int] = {}
    for iou in (0.5, 0.6, 0.7, 0.8, 0.9):
        keep = batched_nms(regressed[rois, classes], pair_scores, classes, iou)  # sorted by score
        chosen, chosen_cls = [], {}
        for k in keep.tolist():
            r = int(rois[k])
            if r not in chosen_cls:
                chosen.append(r)
                chosen_cls[r] = int(classes[k])
                if len(chosen) == num_boxes:
                    break
        if len(chosen) >= num_boxes:
            break
    if len(chosen) < num_boxes:  # top up with the best remaining proposals by their top class
        best, best_cls = scores.max(dim=1)
        for r in torch.sort(best, descending=True, stable=True).indices.tolist():
            if r not in chosen_cls:
                chosen.append(r)
                chosen_cls[r] = int(best_cls[r])
                if len(chosen) == min(num_boxes, len(scores)):
                    break
    index = torch.tensor(chosen, dtype=torch.long, device=scores.device)
    cls = torch.tensor([chosen_cls[r] for r in chosen], dtype=torch.long, device=scores.device)
    return Selection(index, regressed[index, cls], scores[index, cls])


def select_caffe_reference(
    det: Detections, *, nms_iou: float = 0.3, conf_thresh: float = 0.2, min_boxes: int = 10, max_boxes: int = 100
) -> Selection:
    """The reference's literal loop over 1600 classes (for tests and the per-image benchmark baseline)."""
    boxes, scores = det.proposals, det.probs[:, :-1]
    max_conf = torch.zeros(len(boxes), dtype=scores.dtype)
    for c in range(scores.shape[1]):
        keep = nms(boxes, scores[:, c], nms_iou)
        max_conf[keep] = torch.maximum(max_conf[keep], scores[keep, c])
    order = torch.sort(max_conf, descending=True, stable=True).indices
    n = min(max(int((max_conf >= conf_thresh).sum()), min_boxes), max_boxes, len(boxes))
    index = order[:n]
    return Selection(index, boxes[index], max_conf[index])
