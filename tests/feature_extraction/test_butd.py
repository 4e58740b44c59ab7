"""The BUTD detector built from the real config with random weights: shapes, selection rules,
weight loading in both formats, and the inference optimizations changing nothing."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from contract.errors import InputDataError
from feature_extraction.butd import build_butd, butd_config, detect, init_random, optimize_for_inference
from feature_extraction.detector import region_features
from feature_extraction.featurize import Item
from feature_extraction.select import select_caffe, select_caffe_reference, select_lxmert36
from feature_extraction.weights import load_weights, save_detectron2_pickle


@pytest.fixture(scope="module")
def model():
    return init_random(build_butd(butd_config(post_nms_topk=60, min_size=128, max_size=192)), seed=0)


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, 256, (3, 128, 192), generator=gen, dtype=torch.uint8),
        torch.randint(0, 256, (3, 160, 128), generator=gen, dtype=torch.uint8),
    ]


@pytest.fixture(scope="module")
def detections(model, images):
    return detect(model, images)


def test_state_dict_uses_detectron2_names(model):
    keys = set(model.state_dict())
    expected = {
        "backbone.stem.conv1.weight",
        "backbone.res2.0.conv1.weight",
        "backbone.res4.22.conv3.norm.weight",
        "proposal_generator.rpn_head.conv.weight",
        "proposal_generator.rpn_head.objectness_logits.weight",
        "proposal_generator.rpn_head.anchor_deltas.weight",
        "roi_heads.res5.2.conv2.weight",
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_embedding.weight",
        "roi_heads.box_predictor.fc_attr.weight",
        "roi_heads.box_predictor.attr_score.weight",
    }
    assert expected <= keys
    sd = model.state_dict()
    assert sd["proposal_generator.rpn_head.conv.weight"].shape == (512, 1024, 3, 3)  # the 512-channel RPN conv
    assert sd["roi_heads.box_predictor.cls_score.weight"].shape == (1601, 2048)
    assert sd["roi_heads.box_predictor.bbox_pred.weight"].shape == (6400, 2048)
    assert sd["roi_heads.box_predictor.fc_attr.weight"].shape == (512, 2304)
    assert sd["roi_heads.box_predictor.attr_score.weight"].shape == (401, 512)
    res5 = model.roi_heads.res5[0]
    assert res5.conv1.stride == (1, 1) and res5.conv2.dilation == (2, 2) and res5.shortcut.stride == (1, 1)


def test_detection_shapes(detections):
    for det in detections:
        r = len(det.proposals)
        assert 0 < r <= 60
        assert det.features.shape == (r, 2048) and det.probs.shape == (r, 1601)
        assert det.deltas.shape == (r, 6400) and det.attr_logits.shape == (r, 401)
        assert torch.allclose(det.probs.sum(1), torch.ones(r), atol=1e-5)


def test_caffe_selection_matches_the_reference_loop(detections):
    for det in detections:
        fast = select_caffe(det, score_floor=1e-6)
        slow = select_caffe_reference(det)
        assert torch.equal(fast.index, slow.index)
        assert torch.allclose(fast.conf, slow.conf)
        assert 10 <= len(fast.index) <= 100
        assert torch.all(fast.conf[:-1] >= fast.conf[1:])  # sorted by confidence


def test_selection_bounds(detections):
    det = detections[0]
    assert len(select_caffe(det, min_boxes=20, conf_thresh=1.0).index) == 20  # nobody passes: the best 20
    assert len(select_caffe(det, max_boxes=5, conf_thresh=0.0).index) == 5


def test_lxmert36_gives_36_distinct_regressed_boxes(model, detections, images):
    det = detections[0]
    sel = select_lxmert36(det, model.roi_heads.box_predictor.box2box_transform, tuple(images[0].shape[1:]))
    assert len(sel.index) == 36 and len(set(sel.index.tolist())) == 36
    h, w = images[0].shape[1:]
    assert float(sel.boxes[:, 0::2].max()) <= w and float(sel.boxes[:, 1::2].max()) <= h and float(sel.boxes.min()) >= 0


def test_region_features_rows(detections, images):
    det = detections[1]
    sel = select_caffe(det)
    scale = 0.5  # as if the original image were twice the test size
    b = {"item": Item("k", "f", 0, 256, 320), "size": (256, 320), "scale": scale, "tensor": images[1]}
    row = region_features(b, det, sel)
    n = row.num_boxes
    assert row.features.shape == (n, 2048) and row.features.dtype == np.float16
    assert row.soft_labels.shape == (n, 1601) and row.soft_labels.dtype == np.float16
    assert np.allclose(row.soft_labels.astype(np.float32).sum(1), 1.0, atol=2e-2)
    # background moved to column 0 (Caffe/UNITER order)
    assert np.allclose(row.soft_labels[:, 0], det.probs[sel.index, -1].numpy(), atol=1e-3)
    nb = row.norm_bb
    assert nb.shape == (n, 7) and nb.min() >= 0 and nb.max() <= 1
    assert np.allclose(nb[:, 0] * 256, row.boxes[:, 0], atol=1e-3) and np.allclose(
        nb[:, 3] * 320, row.boxes[:, 3], atol=1e-3
    )
    assert np.allclose(nb[:, 6], nb[:, 4] * nb[:, 5])
    assert np.allclose(row.boxes, sel.boxes.numpy() / scale, atol=1e-3)
    assert row.object_ids.max() < 1600 and row.attr_ids.max() < 400


def test_weights_round_trip_in_both_formats(model, images, tmp_path):
    ref = detect(model, images[:1])[0]
    pkl = tmp_path / "butd.pkl"
    save_detectron2_pickle(model, pkl)
    fresh = build_butd(butd_config(post_nms_topk=60, min_size=128, max_size=192))
    load_weights(fresh, pkl)
    assert torch.equal(detect(fresh, images[:1])[0].features, ref.features)

    pt = tmp_path / "butd.pth"
    torch.save(model.state_dict(), pt)
    fresh2 = load_weights(build_butd(butd_config(post_nms_topk=60, min_size=128, max_size=192)), pt)
    assert torch.equal(detect(fresh2, images[:1])[0].features, ref.features)


def test_bad_weight_files_are_refused(tmp_path):
    fresh = build_butd(butd_config(post_nms_topk=10, min_size=128, max_size=192))

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": {"x": Evil()}}))
    with pytest.raises(InputDataError, match="refuses global"):
        load_weights(fresh, tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "partial.pkl").write_bytes(
        pickle.dumps({"model": {"backbone.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}})
    )
    with pytest.raises(InputDataError, match="weights missing"):
        load_weights(fresh, tmp_path / "partial.pkl")
    with pytest.raises(InputDataError, match="not found"):
        load_weights(fresh, tmp_path / "absent.pkl")


def test_check_weights_names_what_does_not_fit(model, tmp_path, capsys):
    """`uniter check-weights`: a file with a FrozenBN statistic missing, one weight misshapen and one
    extra is reported name by name (exit 2); the model's own weights check clean (exit 0)."""
    import json

    from cli.main import main

    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"model": arrays}))
    del arrays["backbone.res3.1.conv2.norm.running_var"]
    arrays["roi_heads.box_predictor.attr_score.weight"] = np.zeros((400, 512), np.float32)
    arrays["roi_heads.box_predictor.extra.weight"] = np.zeros(3, np.float32)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"model": arrays}))
    capsys.readouterr()

    assert main(["check-weights", str(bad), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["missing"] == ["backbone.res3.1.conv2.norm.running_var"]
    attr = {"file": [400, 512], "model": [401, 512]}
    assert report["wrong_shape"] == {"roi_heads.box_predictor.attr_score.weight": attr}
    assert report["unexpected"] == ["roi_heads.box_predictor.extra.weight"]
    assert report["matched"] == report["expected"] - 2 and not report["ok"]
    assert main(["check-weights", str(good)]) == 0
    assert f"{report['expected']} of {report['expected']} weights match" in capsys.readouterr().err
    assert main(["check-weights", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == report["expected"] and "backbone.stem.conv1.norm.running_mean [64]" in listed


def test_inference_optimizations_change_nothing(model, images):
    ref = detect(model, images[:1])[0]
    opt = detect(optimize_for_inference(copy.deepcopy(model)), images[:1])[0]
    assert torch.allclose(opt.proposals, ref.proposals, atol=1e-2)  # pixels: float rounding only
    assert torch.allclose(opt.features, ref.features, rtol=1e-4, atol=1e-4 * float(ref.features.abs().max()))


def test_bf16_autocast_runs(model, images):
    dets = detect(model, images[:1], autocast_dtype=torch.bfloat16)
    assert dets[0].features.dtype == torch.float32 and torch.isfinite(dets[0].features).all()
