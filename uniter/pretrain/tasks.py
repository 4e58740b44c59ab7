"""Pretraining tasks as collate functions: what each task masks, and the tensors the model reads.

Conditional masking (the reference's): an MLM batch masks text only, an MRFR / MRC / MRC-kl batch
masks regions only, an ITM batch masks nothing and swaps half the images. With `joint_masking` the
masked tasks corrupt both modalities at once (the ablation baseline). Every random draw comes from
the generator passed in, which the trainer seeds from (seed, dataset, batch position) — so a
batch is the same whichever process builds it, and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uniter.data import Corpus, Region

REGION_TASKS = ("mrfr", "mrc", "mrckl")


@dataclass(frozen=True)
class Vocab:
    cls: int
    sep: int
    mask: int
    pad: int
    size: int
    random_start: int  # random replacements are drawn from [random_start, size): no special tokens

    @classmethod
    def from_tokenizer(cls, tok) -> "Vocab":
        start = tok.convert_tokens_to_ids("!")
        if start is None or start == tok.unk_token_id:
            start = max(tok.all_special_ids) + 1
        return cls(tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id, len(tok), start)


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


def collate(corpus: Corpus, indices: np.ndarray, task: str, vocab: Vocab, rng: np.random.Generator, *,
            mlm_prob: float = 0.15, mrm_prob: float = 0.15, itm_neg_prob: float = 0.5, joint_masking: bool = False,
            with_ot: bool = False, negative_pool: np.ndarray | None = None) -> dict[str, torch.Tensor]:
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
    return pack(texts, regions, vocab, img_masks=img_masks if mask_img else None,
                txt_labels=txt_labels if mask_text else None, itm_targets=targets, with_ot=with_ot and task == "itm")


def pack(texts: list[np.ndarray], regions: list[Region], vocab: Vocab, img_masks=None, txt_labels=None,
         itm_targets=None, with_ot: bool = False) -> dict[str, torch.Tensor]:
    """Pad and pack: text block (B, T), region block (B, N), and the gather index that lays each row
    out as [text_i | regions_i | padding] (B, L) with L = max(t_i + n_i)."""
    b = len(texts)
    t_len = np.array([len(t) for t in texts])
    n_len = np.array([len(r.feat) for r in regions])
    T, N = int(t_len.max()), int(n_len.max())
    L = int((t_len + n_len).max())
    input_ids = np.full((b, T), vocab.pad, dtype=np.int64)
    img_feat = np.zeros((b, N, regions[0].feat.shape[1]), dtype=np.float32)
    img_pos = np.zeros((b, N, 7), dtype=np.float32)
    attn = np.zeros((b, L), dtype=np.int64)
    gather = np.tile(np.arange(L), (b, 1))
    for i in range(b):
        input_ids[i, : t_len[i]] = texts[i]
        img_feat[i, : n_len[i]] = regions[i].feat
        img_pos[i, : n_len[i]] = regions[i].pos
        attn[i, : t_len[i] + n_len[i]] = 1
        gather[i, t_len[i] : t_len[i] + n_len[i]] = T + np.arange(n_len[i])
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.arange(T).unsqueeze(0),
        "img_pos_feat": torch.from_numpy(img_pos),
        "attn_masks": torch.from_numpy(attn),
        "gather_index": torch.from_numpy(gather),
    }
    if txt_labels is not None:
        labels = np.full((b, T), -1, dtype=np.int64)
        for i, lab in enumerate(txt_labels):
            labels[i, : len(lab)] = lab
        batch["txt_labels"] = torch.from_numpy(labels)
    if img_masks is not None:
        masks = np.zeros((b, N), dtype=bool)
        packed = np.zeros((b, L), dtype=bool)
        for i, m in enumerate(img_masks):
            masks[i, : len(m)] = m
            packed[i, t_len[i] : t_len[i] + len(m)] = m
        batch["feat_targets"] = torch.from_numpy(img_feat[masks].copy())  # the unmasked originals
        softs = [r.soft for r in regions]
        if all(s is not None for s in softs):
            soft = np.zeros((b, N, softs[0].shape[1]), dtype=np.float32)
            for i, s in enumerate(softs):
                soft[i, : len(s)] = s
            batch["label_targets"] = torch.from_numpy(soft[masks])
        img_feat[masks] = 0.0  # masked features are zeroed; the model adds its learned mask vector
        batch["img_masks"] = torch.from_numpy(masks)
        batch["img_mask_packed"] = torch.from_numpy(packed)
    batch["img_feat"] = torch.from_numpy(img_feat)
    if itm_targets is not None:
        batch["targets"] = torch.from_numpy(itm_targets)
    if with_ot:  # undo the packing for WRA: text positions and region positions of each row
        txt_index = np.zeros((b, T), dtype=np.int64)
        img_index = np.zeros((b, N), dtype=np.int64)
        for i in range(b):
            txt_index[i, : t_len[i]] = np.arange(t_len[i])
            img_index[i, : n_len[i]] = t_len[i] + np.arange(n_len[i])
        batch["ot_txt_index"] = torch.from_numpy(txt_index)
        batch["ot_img_index"] = torch.from_numpy(img_index)
        batch["ot_txt_pad"] = torch.from_numpy(np.arange(T)[None, :] >= t_len[:, None])
        batch["ot_img_pad"] = torch.from_numpy(np.arange(N)[None, :] >= n_len[:, None])
    return batch
