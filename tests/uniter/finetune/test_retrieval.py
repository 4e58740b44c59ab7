"""R@K on a score matrix worked out by hand, and the blocked score matrix."""

from __future__ import annotations

import numpy as np
import pytest

from uniter.finetune.tasks.retrieval import recall_at_k, score_matrix


def test_recall_on_a_known_matrix():
    # 4 texts (t0, t1 of image 0; t2 of image 1; t3 of image 2), 3 images
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # t0 → image 0 first                 IR rank 0
            [0.3, 0.8, 0.5],  # t1 → image 0 third                 IR rank 2
            [0.4, 0.3, 0.7],  # t2 → image 1 third                 IR rank 2
            [0.1, 0.2, 0.6],  # t3 → image 2 first                 IR rank 0
        ]
    )
    txt2img = np.array([0, 0, 1, 2])
    r = recall_at_k(scores, txt2img, ks=(1, 2, 3))
    assert r["ir_r1"] == 50.0 and r["ir_r2"] == 50.0 and r["ir_r3"] == 100.0
    # TR: image 0's column (0.9, 0.3, 0.4, 0.1): t0 first → rank 0
    #     image 1's column (0.1, 0.8, 0.3, 0.2): t2 (0.3) second → rank 1
    #     image 2's column (0.2, 0.5, 0.7, 0.6): t3 (0.6) second → rank 1
    assert r["tr_r1"] == pytest.approx(100 / 3) and r["tr_r2"] == 100.0 and r["tr_r3"] == 100.0
    assert r["r_mean"] == pytest.approx(np.mean([50, 50, 100, 100 / 3, 100, 100]))


def test_ties_count_against_the_ground_truth():
    scores = np.array([[0.5, 0.5]])
    assert recall_at_k(scores, np.array([0]), ks=(1,))["ir_r1"] == 0.0


def test_bad_ground_truth_is_an_error():
    with pytest.raises(ValueError, match="image index"):
        recall_at_k(np.zeros((2, 2)), np.array([0, 2]))


def test_blocked_score_matrix_equals_the_full_product():
    rng = np.random.default_rng(0)
    t, i = rng.standard_normal((37, 8)), rng.standard_normal((11, 8))
    calls = []

    def block(txt, img):
        calls.append((len(txt), len(img)))
        return t[txt] @ i[img].T

    out = score_matrix(block, 37, 11, block_txt=10, block_img=4)
    assert np.allclose(out, t @ i.T, atol=1e-5)
    assert max(a for a, _ in calls) == 10 and max(b for _, b in calls) == 4 and len(calls) == 4 * 3
