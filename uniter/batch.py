"""A model batch from token ids and regions — what pretraining, fine-tuning and the attention
analysis all feed the model: the vocabulary's special ids, and `pack` (padding and the gather index
that lays each row out as [text | regions | padding])."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uniter.data import Region


@dataclass(frozen=True)
class Vocab:
    cls: int
    sep: int
    mask: int
    pad: int
    size: int
    random_start: int  # random replacements are drawn from [random_start, size): no special tokens

    @classmethod
    def from_tokenizer(cls, tok) -> Vocab:
        start = tok.convert_tokens_to_ids("!")
        if start is None or start == tok.unk_token_id:
            start = max(tok.all_special_ids) + 1
        return cls(tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id, len(tok), start)


def pack(
    texts: list[np.ndarray],
    regions: list[Region],
    vocab: Vocab,
    img_masks=None,
    txt_labels=None,
    itm_targets=None,
    with_ot: bool = False,
) -> dict[str, torch.Tensor]:
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
