"""Image-text retrieval: the full score matrix of a split, built in bounded blocks, and R@K both ways.

IR (text → image): a text's hit at K is its image ranked in the top K of all images.
TR (image → text): an image's hit at K is any of its captions in the top K of all texts.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def score_matrix(score_block: Callable[[np.ndarray, np.ndarray], np.ndarray], n_txt: int, n_img: int,
                 block_txt: int = 256, block_img: int = 64) -> np.ndarray:
    """(n_txt, n_img) scores from `score_block(text_ids, image_ids) → (len(text_ids), len(image_ids))`,
    one block at a time, so memory is the matrix plus one block (5k × 25k float32 is 500 MB)."""
    out = np.empty((n_txt, n_img), dtype=np.float32)
    for t in range(0, n_txt, block_txt):
        txt = np.arange(t, min(t + block_txt, n_txt))
        for i in range(0, n_img, block_img):
            img = np.arange(i, min(i + block_img, n_img))
            out[t : t + len(txt), i : i + len(img)] = score_block(txt, img)
    return out


def recall_at_k(scores: np.ndarray, txt2img: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K in % both ways and their mean, from scores (n_txt, n_img) and each text's image index.
    Ties count against the ground truth (a tie with a wrong item ranks it first)."""
    scores = np.asarray(scores, dtype=np.float64)
    txt2img = np.asarray(txt2img)
    n_txt, n_img = scores.shape
    if txt2img.shape != (n_txt,) or txt2img.min(initial=0) < 0 or txt2img.max(initial=-1) >= n_img:
        raise ValueError(f"txt2img must give an image index in [0, {n_img}) for each of the {n_txt} texts")
    # IR: rank of the true image among all images, per text
    true = scores[np.arange(n_txt), txt2img]
    ir_rank = (scores >= true[:, None]).sum(1) - 1  # other images scoring at least as high
    # TR: per image, the best rank of any of its captions among all texts
    tr_rank = np.full(n_img, np.iinfo(np.int64).max)
    for img in range(n_img):
        caps = np.flatnonzero(txt2img == img)
        if len(caps):
            col = scores[:, img]
            ranks = (col[None, :] >= col[caps][:, None]).sum(1) - 1
            tr_rank[img] = ranks.min()
    has_caption = tr_rank < np.iinfo(np.int64).max
    out = {}
    for k in ks:
        out[f"ir_r{k}"] = 100 * float((ir_rank < k).mean())
        out[f"tr_r{k}"] = 100 * float((tr_rank[has_caption] < k).mean())
    out["r_mean"] = float(np.mean([out[f"{d}_r{k}"] for d in ("ir", "tr") for k in ks]))
    return out
