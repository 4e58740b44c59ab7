"""Fixtures shared by the model, pretraining and fine-tuning tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def vocab(tmp_path_factory) -> str:
    """A small WordPiece vocabulary trained on the fixture captions (no model hub here)."""
    from tokenizers import BertWordPieceTokenizer

    folder = tmp_path_factory.mktemp("vocab")
    captions = [f"photo {i} of a thing on the table near a window" for i in range(200)]
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(captions, vocab_size=120, min_frequency=1)
    tok.save_model(str(folder))
    return str(folder / "vocab.txt")
