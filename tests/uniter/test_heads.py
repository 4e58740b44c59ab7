"""Downstream heads: each overfits a tiny batch; they load a pretraining checkpoint by name; the
rank head starts as the ITM head's match score."""

from __future__ import annotations

import numpy as np
import torch

from uniter.batch import Vocab, pack
from uniter.configuration_uniter import debug
from uniter.data import Region
from uniter.modeling_uniter import (
    UniterForImageTextRetrieval,
    UniterForNlvr2,
    UniterForPretraining,
    UniterForReferringExpression,
    UniterForVqa,
)

VOCAB = Vocab(cls=1, sep=2, mask=3, pad=0, size=60, random_start=5)


def _batch(n: int, seed: int = 0, regions: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    texts = [np.concatenate([[1], rng.integers(5, 60, int(rng.integers(3, 8))), [2]]) for _ in range(n)]
    regs = [
        Region(rng.standard_normal((k, 2048)).astype(np.float16), rng.random((k, 7)).astype(np.float32), None)
        for k in rng.integers(3, regions + 1, n)
    ]
    return pack(texts, regs, VOCAB, with_ot=True)


def _overfit(model, batch, steps: int = 40) -> tuple[float, float]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(steps):
        loss = model(batch).loss
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, float(model(batch).loss.detach())


def _config(**kw):
    return debug(vocab_size=60, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def test_vqa_head_overfits():
    torch.manual_seed(0)
    model = UniterForVqa(_config(num_answers=12))
    batch = _batch(6)
    targets = torch.zeros(6, 12)
    targets[torch.arange(6), torch.arange(6)] = 1.0
    targets[0, 7] = 2 / 3
    batch["targets"] = targets
    first, last = _overfit(model, batch)
    assert last < first / 5, (first, last)
    assert model(batch).logits.argmax(1).tolist() == list(range(6))


def test_vqa_softmax_loss_is_cross_entropy_against_the_normalized_scores():
    torch.manual_seed(0)
    model = UniterForVqa(_config(num_answers=5, vqa_loss="softmax")).eval()
    batch = _batch(3)
    targets = torch.tensor([[0, 1.0, 0, 0, 0], [0, 0.3, 0.6, 0, 0], [0, 0, 0, 0, 0]])  # row 2: no answer in vocab
    batch["targets"] = targets
    out = model(batch)
    logp = torch.log_softmax(out.logits, -1)
    expected = -(logp[0, 1] + (logp[1, 1] / 3 + logp[1, 2] * 2 / 3)) / 2  # the answerless row adds nothing
    assert torch.allclose(out.loss, expected, atol=1e-5), (out.loss, expected)
    first, last = _overfit(UniterForVqa(_config(num_answers=5, vqa_loss="softmax")), batch)
    floor = -(1 / 3 * np.log(1 / 3) + 2 / 3 * np.log(2 / 3)) / 2  # row 1's scores are a real distribution
    assert first > 1.0 and last < floor + 0.02, (first, last, floor)


def test_nlvr2_heads_overfit():
    for head in ("pair", "pair-biattn"):
        torch.manual_seed(0)
        model = UniterForNlvr2(_config(nlvr2_head=head))
        model.grow_type_embeddings()
        batch = _batch(8)  # 4 statements × (left, right)
        types = torch.ones(batch["img_feat"].shape[:2], dtype=torch.long)
        types[1::2] = 2
        batch["img_type_ids"] = types
        batch["targets"] = torch.tensor([0, 1, 1, 0])
        first, last = _overfit(model, batch)
        assert last < first / 5, (head, first, last)
        assert model.uniter.embeddings.token_type_embeddings.num_embeddings == 3


def test_nlvr2_heads_are_the_references():
    """Parameter counts by the reference's layers (model/nlvr2.py): `pair` Linear(2H, 2); `pair-biattn`
    two attention modules (4H² + 4H each), fc Linear(2H, H), pooling Linear(H, 1), output Linear(2H, 2)."""
    for head, formula in (("pair", lambda h: 4 * h + 2), ("pair-biattn", lambda h: 10 * h * h + 14 * h + 3)):
        model = UniterForNlvr2(_config(nlvr2_head=head))
        h = model.config.hidden_size
        own = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("uniter."))
        assert own == formula(h), (head, own, formula(h))
    assert model.attn1 is not model.attn2 and isinstance(model.fc[2], torch.nn.Dropout)
    assert isinstance(model.attn_pool.fc[1], torch.nn.ReLU)


def test_retrieval_head_starts_from_itm_and_overfits(tmp_path):
    torch.manual_seed(0)
    pretrained = UniterForPretraining(_config())
    pretrained.save_pretrained(tmp_path)
    model = UniterForImageTextRetrieval.from_pretrained(tmp_path)
    model.init_rank_from_itm()
    batch = _batch(8)
    with torch.no_grad():
        itm = pretrained.eval()(dict(batch, targets=torch.zeros(8, dtype=torch.long)), task="itm").logits[:, 1]
        rank = model.eval()(batch).logits
    assert torch.allclose(itm, rank, atol=1e-5)  # the same score before fine-tuning
    model.train()
    batch["group_size"] = 4  # 2 queries × (positive + 3 negatives)
    first, last = _overfit(model, batch, steps=60)
    assert last < first / 3, (first, last)


def test_referring_expression_head_overfits():
    torch.manual_seed(0)
    model = UniterForReferringExpression(_config())
    batch = _batch(5)
    batch["region_index"], batch["region_pad"] = batch["ot_img_index"], batch["ot_img_pad"]
    batch["targets"] = torch.tensor([0, 1, 2, 1, 0])
    first, last = _overfit(model, batch)
    assert last < first / 5, (first, last)
    logits = model(batch).logits
    assert (logits[batch["region_pad"]] == -1e4).all()
