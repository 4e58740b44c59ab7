"""VQA: normalization, the official 10-choose-9 accuracy, soft targets, the file readers."""

from __future__ import annotations

import json

import pytest

from contract.errors import InputDataError
from uniter.finetune.tasks.vqa import (
    answer_vocab,
    normalize_answer,
    official_scores,
    read_answer_vocab,
    read_vqa,
    soft_targets,
    vqa_accuracy,
    write_results,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("Yes!", "yes"),
        ("3.5", "3.5"),
        ("dont", "don't"),
        ("red,white", "red white"),  # a comma between words separates them
        ("1,000", "1000"),  # between digits it is dropped
        ("a man's hat", "man's hat"),
        ("  An apple\t", "apple"),
        ("left / right", "left right"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_accuracy_is_the_mean_over_ten_choose_nine():
    answers = ["yes"] * 3 + ["no"] * 7
    # leaving out one of the 3 "yes": 2 matches → 2/3; leaving out a "no": 3 matches → 1
    assert vqa_accuracy("yes", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("no", answers) == 1.0
    one = ["two"] + ["cat"] * 9
    assert vqa_accuracy("2", one) == pytest.approx(9 * (1 / 3) / 10)  # normalized: "two" == "2"
    assert vqa_accuracy("dog", answers) == 0.0


def test_soft_targets():
    vocab = {"yes": 0, "no": 1, "2": 2, "red": 3}
    answers = ["yes", "Yes", "no", "two", "two", "two", "two", "maybe", "no", "yes", "red"]
    # the reference's (bottom-up attention) scores: 1, 2, 3 humans → 0.3, 0.6, 0.9; 4 or more → 1
    assert soft_targets(answers, vocab) == {0: 0.9, 1: 0.6, 2: 1.0, 3: 0.3}  # "maybe" is not in the vocabulary
    thirds = soft_targets(answers, vocab, "thirds")
    assert thirds == {0: 1.0, 1: pytest.approx(2 / 3), 2: 1.0, 3: pytest.approx(1 / 3)}


def test_given_answer_vocabulary(tmp_path):
    ans2label = tmp_path / "ans2label.json"
    ans2label.write_text(json.dumps({"no": 1, "yes": 0, "Two": 2}))
    assert read_answer_vocab(ans2label) == ["yes", "no", "2"]  # label order, normalized
    listed = tmp_path / "answers.json"
    listed.write_text(json.dumps(["yes", "no"]))
    assert read_answer_vocab(listed) == ["yes", "no"]
    for bad, message in (
        ({"yes": 0, "no": 2}, "labels 0..1, each once"),
        ({"yes": 0, "no": "1"}, "labels 0..1, each once"),
        (["two", "2"], "several answers normalize to '2'"),
        ({"answers": 3}, "labels 0..0"),
        (3, "expected an answer → label object"),
    ):
        ans2label.write_text(json.dumps(bad))
        with pytest.raises(InputDataError, match=message) as err:
            read_answer_vocab(ans2label)
        assert str(ans2label) in str(err.value)


def _files(tmp_path, questions, annotations):
    q, a = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "v2_mscoco_val2014_annotations.json"
    q.write_text(json.dumps({"questions": questions}))
    a.write_text(json.dumps({"annotations": annotations}))
    return q, a


def _ann(qid, answers, atype="other"):
    return {
        "question_id": qid,
        "image_id": 1,
        "answer_type": atype,
        "question_type": "what",
        "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(answers)],
    }


def test_reader_joins_questions_and_answers_and_scores(tmp_path):
    qs = [
        {"question_id": 10, "image_id": 1, "question": "Is it red?"},
        {"question_id": 11, "image_id": 2, "question": "How many?"},
    ]
    q, a = _files(tmp_path, qs, [_ann(10, ["yes"] * 10, "yes/no"), _ann(11, ["2"] * 4 + ["3"] * 6, "number")])
    questions = read_vqa(q, a)
    assert [(x.question_id, x.image_id, x.answer_type) for x in questions] == [(10, 1, "yes/no"), (11, 2, "number")]
    assert answer_vocab(questions, 2) == ["yes", "3"]
    scores = official_scores({10: "yes", 11: "2"}, questions)
    assert scores["yes/no"] == 100.0 and scores["number"] == pytest.approx(100 * (4 * 1 + 6 * 1) / 10)
    assert scores["overall"] == pytest.approx((100 + scores["number"]) / 2)
    out = tmp_path / "results.json"
    write_results({11: "2", 10: "yes"}, out)
    assert json.loads(out.read_text()) == [{"question_id": 10, "answer": "yes"}, {"question_id": 11, "answer": "2"}]
    test_split = read_vqa(q)  # test splits have no annotations
    assert test_split[0].answers == ()


def test_reader_errors_name_the_file_and_record(tmp_path):
    q, a = _files(tmp_path, [{"question_id": 10, "image_id": 1}], [])
    with pytest.raises(InputDataError, match=r"questions\[0\]: expected question_id, image_id and question"):
        read_vqa(q)
    q.write_text(json.dumps({"questions": [{"question_id": 10, "image_id": 1, "question": "?"}]}))
    with pytest.raises(InputDataError, match="no annotation for question_id 10"):
        read_vqa(q, a)
    a.write_text(json.dumps({"annotations": [{"question_id": 10}]}))
    with pytest.raises(InputDataError, match=r"annotations\[0\]: expected question_id and answers"):
        read_vqa(q, a)
    a.write_text('{"annotations": [')
    with pytest.raises(InputDataError, match=str(a.name)):
        read_vqa(q, a)
    q.write_text(json.dumps([1, 2]))
    with pytest.raises(InputDataError, match='expected a JSON object with a "questions" list'):
        read_vqa(q)
