"""RefCOCO-family reading (safe unpickling) and the IoU hit rule."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from contract.errors import InputDataError
from uniter.finetune.tasks.refcoco import iou, is_hit, load_pickle_data, read_refer


def test_iou_hand_computed():
    # 10×10 at (0,0) and 10×10 at (5,0): pixels 0..9 and 5..14 → overlap 5×10 = 50, union 150
    assert iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    # exactly 0.5 is not a hit: 10×10 vs 10×20 at the same corner → 100 / 200
    assert iou([0, 0, 10, 10], [0, 0, 10, 20]) == 0.5
    assert not is_hit(np.array([0, 0, 10, 10]), np.array([0, 0, 10, 20]))
    assert is_hit(np.array([0, 0, 10, 10]), np.array([0, 0, 10, 19]))
    # broadcast: one truth against several predictions
    hits = is_hit(np.array([[0, 0, 10, 10], [5, 0, 10, 10], [1, 0, 10, 10]]), np.array([0, 0, 10, 10]))
    assert hits.tolist() == [True, False, True]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_the_unpickler_refuses_code(tmp_path):
    bad = tmp_path / "refs(unc).p"
    bad.write_bytes(pickle.dumps([{"ref_id": 1, "payload": _Evil()}]))
    with pytest.raises(InputDataError, match=r"refused to load (posix|os)\.system"):
        load_pickle_data(bad)
    good = tmp_path / "ok.p"
    good.write_bytes(pickle.dumps([{"a": [1, 2.5, "x", None, True, (1, 2)], "b": b"raw"}], protocol=2))
    assert load_pickle_data(good) == [{"a": [1, 2.5, "x", None, True, (1, 2)], "b": b"raw"}]
    (tmp_path / "trunc.p").write_bytes(good.read_bytes()[:10])
    with pytest.raises(InputDataError, match="trunc.p"):
        load_pickle_data(tmp_path / "trunc.p")


def _write(tmp_path, refs, anns):
    r, i = tmp_path / "refs(unc).p", tmp_path / "instances.json"
    r.write_bytes(pickle.dumps(refs, protocol=2))
    i.write_text(json.dumps({"images": [{"id": 7}], "annotations": anns, "categories": []}))
    return r, i


def test_reader_gives_one_expression_per_sentence(tmp_path):
    refs = [
        {
            "ref_id": 3,
            "ann_id": 100,
            "image_id": 7,
            "split": "val",
            "category_id": 1,
            "sent_ids": [1, 2],
            "sentences": [
                {"sent_id": 1, "sent": "man on left", "raw": "Man on left", "tokens": []},
                {"sent_id": 2, "sent": "guy in red", "raw": "guy in red!", "tokens": []},
            ],
        }
    ]
    anns = [
        {"id": 100, "image_id": 7, "bbox": [1, 2, 30, 40], "category_id": 1},
        {"id": 101, "image_id": 7, "bbox": [50, 2, 30, 40], "category_id": 1},
    ]
    exprs, per_image = read_refer(*_write(tmp_path, refs, anns))
    assert [(e.sent_id, e.sentence, e.box, e.split) for e in exprs] == [
        (1, "man on left", (1.0, 2.0, 30.0, 40.0), "val"),
        (2, "guy in red", (1.0, 2.0, 30.0, 40.0), "val"),
    ]
    assert [a for a, _ in per_image[7]] == [100, 101]


def test_reader_errors_name_the_record(tmp_path):
    refs = [{"ref_id": 3, "ann_id": 999, "image_id": 7, "split": "val", "sentences": []}]
    anns = [{"id": 100, "image_id": 7, "bbox": [1, 2, 30, 40]}]
    with pytest.raises(InputDataError, match=r"refs\[0\].*ann_id 999 is not in instances.json"):
        read_refer(*_write(tmp_path, refs, anns))
    with pytest.raises(InputDataError, match=r"annotations\[0\]: expected id, image_id and bbox"):
        read_refer(*_write(tmp_path, refs, [{"id": 100, "image_id": 7, "bbox": [1, 2]}]))
