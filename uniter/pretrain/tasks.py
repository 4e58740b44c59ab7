"""Pretraining tasks as collate functions: what each task masks, and the tensors the model reads.

Conditional masking (the reference's): an MLM batch masks text only, an MRFR / MRC / MRC-kl batch
masks regions only, an ITM batch masks nothing and swaps half the images. With `joint_masking` the
masked tasks corrupt both modalities at once (the ablation baseline). Every random draw comes from
the generator passed in, which the trainer seeds from (seed, dataset, batch position) — so a
batch is the same whichever process builds it, and after a resume.
"""

from __future__ import annotations

import numpy as np
import torch

from uniter.batch import Vocab, pack
from uniter.data import Corpus

REGION_TASKS = ("mrfr", "mrc", "mrckl")


def mask_words(ids: np.ndarray, vocab: Vocab, prob: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT's 80/10/10 on word pieces; labels −1 where not selected. At least one token is masked."""
    selected = rng.random(len(ids)) < prob
    if not selected.any():
        selected[0] = True  # as the reference: an example always contributes
    labels = np.where(selected, ids, -1)
    action = rng.random(len(ids))
    out = ids.copy()
    out[selected & (action < 0.8)] = vocab.mask
    rand = selected & (action >= 0.8) & (action < 0.9)
    out[rand] = rng.integers(vocab.random_start, vocab.size, size=int(rand.sum()))
    return out, labels


def mask_regions(n: int, prob: float, rng: np.random.Generator) -> np.ndarray:
    """15 % of regions, at least one."""
    masked = rng.random(n) < prob
    if not masked.any():
        masked[rng.integers(n)] = True
    return masked


def collate(
    corpus: Corpus,
    indices: np.ndarray,
    task: str,
    vocab: Vocab,
    rng: np.random.Generator,
    *,
    mlm_prob: float = 0.15,
    mrm_prob: float = 0.15,
    itm_neg_prob: float = 0.5,
    joint_masking: bool = False,
    with_ot: bool = False,
    negative_pool: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """One micro-batch of `task` from the corpus examples `indices`."""
    texts = [corpus.text(int(i)) for i in indices]
    regions = [corpus.example_region(int(i)) for i in indices]
    targets = None
    if task == "itm":
        # Negatives: the image replaced by another image of the pool (same source), never its own.
        targets = (rng.random(len(indices)) >= itm_neg_prob).astype(np.int64)
        pool = negative_pool if negative_pool is not None else np.arange(len(corpus))
        for b, i in enumerate(indices):
            if targets[b] == 0:
                own = (corpus.img_file[i], corpus.img_row[i])
                for _ in range(16):
                    j = int(pool[rng.integers(len(pool))])
                    if (corpus.img_file[j], corpus.img_row[j]) != own:
                        regions[b] = corpus.example_region(j)
                        break
                else:
                    targets[b] = 1  # a pool of one image has no negative to offer
    mask_text = task == "mlm" or (joint_masking and task in REGION_TASKS)
    mask_img = task in REGION_TASKS or (joint_masking and task == "mlm")

    txt_labels = []
    for b, ids in enumerate(texts):
        if mask_text:
            ids, labels = mask_words(ids, vocab, mlm_prob, rng)
            txt_labels.append(np.concatenate([[-1], labels, [-1]]))
        texts[b] = np.concatenate([[vocab.cls], ids, [vocab.sep]])
    img_masks = [mask_regions(len(r.feat), mrm_prob, rng) if mask_img else np.zeros(len(r.feat), bool) for r in regions]
    return pack(
        texts,
        regions,
        vocab,
        img_masks=img_masks if mask_img else None,
        txt_labels=txt_labels if mask_text else None,
        itm_targets=targets,
        with_ot=with_ot and task == "itm",
    )
