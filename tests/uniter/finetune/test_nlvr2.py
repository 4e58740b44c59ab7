"""NLVR2: reading the jsonl format, accuracy and consistency."""

from __future__ import annotations

import json

import pytest

from contract.errors import InputDataError
from uniter.finetune.tasks.nlvr2 import official_scores, read_nlvr2


def _row(ident, label="True", sentence="The left image contains two dogs."):
    return json.dumps(
        {
            "identifier": ident,
            "sentence": sentence,
            "label": label,
            "left_url": "http://x/l.jpg",
            "right_url": "http://x/r.jpg",
            "writer": "103",
            "validation": {},
            "synset": "dog",
        }
    )


def test_reader_and_metrics(tmp_path):
    path = tmp_path / "dev.json"
    # sentence 0 of set 850 with pairs 0..3, sentence 1 of set 850 with pair 0
    path.write_text(
        "\n".join(
            [
                _row("dev-850-0-0"),
                _row("dev-850-1-0", "False"),
                _row("dev-850-2-0"),
                _row("dev-850-3-0", "False"),
                _row("dev-850-0-1", "True", "Another."),
            ]
        )
        + "\n"
    )
    st = read_nlvr2(path)
    assert st[0].images == ("dev-850-0-img0", "dev-850-0-img1") and st[1].label is False
    assert {s.sentence_group for s in st} == {"dev-850-0", "dev-850-1"}
    truth = {s.identifier: s.label for s in st}
    assert official_scores(truth, st) == {"accuracy": 100.0, "consistency": 100.0}
    one_wrong = dict(truth, **{"dev-850-2-0": False})
    assert official_scores(one_wrong, st) == {"accuracy": 80.0, "consistency": 50.0}


def test_reader_errors_name_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(_row("dev-850-0-0") + "\n" + _row("dev-850-0") + "\n")
    with pytest.raises(InputDataError, match=r"train.json:2: .*split-set_id-pair_id-sentence_id"):
        read_nlvr2(path)
    path.write_text(_row("dev-850-0-0", "maybe") + "\n")
    with pytest.raises(InputDataError, match=r"train.json:1: .*label 'maybe'"):
        read_nlvr2(path)
    path.write_text("{not json\n")
    with pytest.raises(InputDataError, match=r"train.json:1: not a JSON object"):
        read_nlvr2(path)
