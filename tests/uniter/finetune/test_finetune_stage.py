"""The finetune stage on VQA: from the pretrained artifact (and from scratch), on DeepSpeed (CPU),
with the official results file; cached on a second run; resumed exactly after SIGKILL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tests.fixtures.images as fx
from contract.artifact import Artifact
from pipeline.config import load_config
from pipeline.runner import Planner, run_stage, storage_for
from tests.conftest import read_table
from tests.feature_extraction.test_extract_stage import build_upstream
from tests.fixtures.kill import kill_stage_when
from tests.uniter.test_pretrain_stage import make

ROOT = Path(__file__).resolve().parents[3]
COLORS = ["red", "green", "blue", "yellow"]


def vqa_files(tmp_path: Path, split: str, image_ids: list[int]) -> tuple[Path, Path]:
    """Two questions per image; the answer to the first is the image's 'color' (its id mod 4)."""
    questions, annotations = [], []
    for image_id in image_ids:
        for k, (text, answer) in enumerate(
            [("what color is the thing?", COLORS[image_id % 4]), ("is there a table?", "yes" if image_id % 2 else "no")]
        ):
            qid = image_id * 10 + k
            questions.append({"question_id": qid, "image_id": image_id, "question": text})
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": "what",
                    "answer_type": "other" if k == 0 else "yes/no",
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
                }
            )
    q = tmp_path / f"v2_OpenEnded_mscoco_{split}2014_questions.json"
    a = tmp_path / f"v2_mscoco_{split}2014_annotations.json"
    q.write_text(json.dumps({"questions": questions, "data_subtype": f"{split}2014"}))
    a.write_text(json.dumps({"annotations": annotations, "data_subtype": f"{split}2014"}))
    return q, a


def setup(tmp_path: Path, storage: dict, vocab_path: str, name: str = "cfg.yaml", **vqa) -> Path:
    path = make(tmp_path, storage, vocab_path, name, steps=4, checkpoint_every=100, validate_every=100)
    coco = tmp_path / "coco"
    coco.mkdir(exist_ok=True)
    for image_id in range(1, 13):
        f = coco / f"COCO_train2014_{image_id:012d}.jpg"
        if not f.exists():
            f.write_bytes(fx.jpeg(fx.synthetic_photo(500 + image_id % 4, (120, 90))))
    train = vqa_files(tmp_path, "train", list(range(1, 9)))
    val = vqa_files(tmp_path, "val", list(range(9, 13)))
    doc = yaml.safe_load(path.read_text())
    doc["downstream"] = {"images": {"coco": str(coco)}}
    doc["finetune"] = {
        "vqa": {
            "train": [{"questions": str(train[0]), "annotations": str(train[1])}],
            "val": {"questions": str(val[0]), "annotations": str(val[1])},
            "answers": 6,
            "steps": 30,
            "warmup": 3,
            "lr": 5e-4,
            "batch_tokens": 512,
            "accumulation": 1,
            "validate_every": 15,
            **vqa,
        },
        "log_every": 5,
        "checkpoint_every": 10,
        "loader_workers": 0,
        "model_overrides": {"hidden_dropout_prob": 0.0},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def upstream(cfg) -> None:
    build_upstream(cfg)
    for stage in ("extract", "downstream", "pretrain"):
        run_stage(stage, cfg)


def metrics(cfg, result) -> list[tuple]:
    return [
        (r["step"], r["name"], r["value"])
        for r in read_table(storage_for(cfg), result.manifest, "finetune_metrics").to_pylist()
    ]


# S3 only: the model files and checkpoints go through the object store; the scratch test runs local
@pytest.mark.parametrize("storage_spec", ["s3"], indirect=True)
def test_vqa_from_the_pretrained_model(tmp_path, storage_spec, vocab):
    # test-dev questions (no annotations), one of them about an image without features
    test_q = json.loads(vqa_files(tmp_path, "test", [9, 10])[0].read_text())
    test_q["questions"].append({"question_id": 990, "image_id": 99, "question": "what color is the thing?"})
    (tmp_path / "test-dev.json").write_text(json.dumps(test_q))
    cfg = load_config(setup(tmp_path, storage_spec, vocab, test_questions=str(tmp_path / "test-dev.json")))
    upstream(cfg)
    result = run_stage("finetune", cfg)
    counts = result.manifest.counts["vqa"]
    assert counts["steps"] == 30 and counts["skipped"] == 0
    assert 0 <= counts["val"]["vqa_overall"] <= 100 and {"vqa_other", "vqa_yes/no"} <= set(counts["val"])
    rows = metrics(cfg, result)
    losses = [v for _, n, v in rows if n == "loss/vqa"]
    assert len(losses) == 30 and sum(losses[-5:]) < 0.9 * sum(losses[:5])  # it learns (the head starts cold)
    assert [s for s, n, _ in rows if n == "val/vqa_overall"] == [15, 30]
    storage = storage_for(cfg)
    art = Artifact(storage, "finetune", result.manifest.key)
    results = json.loads(storage.read_bytes(art.file_key("files/vqa/results.json")))
    assert sorted(r["question_id"] for r in results) == sorted(i * 10 + k for i in range(9, 13) for k in (0, 1))
    answers = json.loads(storage.read_bytes(art.file_key("files/vqa/answers.json")))
    assert set(answers) == set(COLORS) | {"yes", "no"} and all(r["answer"] in answers for r in results)
    assert "vqa/model/model.safetensors" in result.manifest.files
    # the official server's upload file: every test question answered, in the file's order
    upload = json.loads(storage.read_bytes(art.file_key("files/vqa/test_upload.json")))
    assert [r["question_id"] for r in upload] == [90, 91, 100, 101, 990]
    assert all(r["answer"] in answers for r in upload) and upload[-1]["answer"] == answers[0]
    assert run_stage("finetune", cfg).status == "cached"

    # evaluate re-scores the results file against the val annotations: the same accuracy
    ev = run_stage("evaluate", cfg)
    ev_art = Artifact(storage, "evaluate", ev.manifest.key)
    report = json.loads(storage.read_bytes(ev_art.file_key("files/report.json")))
    row = report["runs"][0]
    assert row["scores"]["vqa"] == pytest.approx(counts["val"]["vqa_overall"], abs=1e-3)
    assert row["complete"] is False and row["meta_sum"] == pytest.approx(row["scores"]["vqa"])
    assert sum(sum(r.values()) for r in row["details"]["vqa"]["answer_type_confusion"].values()) == 8
    md = storage.read_bytes(ev_art.file_key("files/report.md")).decode()
    assert "| run | VQA | IR R@1 | TR R@1 | NLVR2 | RefCOCO+ | Meta-Sum |" in md and "(partial)" in md
    assert storage.read_bytes(ev_art.file_key("files/meta_sum.png")).startswith(b"\x89PNG")
    assert "<table>" in storage.read_bytes(ev_art.file_key("files/report.html")).decode()


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_vqa_from_scratch_and_sigkill_resume(tmp_path, storage_spec, vocab):
    kw = {"steps": 40, "validate_every": 40}
    cfg_path = setup(tmp_path, storage_spec, vocab, **kw)
    doc = yaml.safe_load(cfg_path.read_text())
    # no finetune.model: scratch builds the pretrained architecture (debug), as the clean run names it
    doc["finetune"].update(init="scratch", checkpoint_every=5)
    cfg_path.write_text(yaml.safe_dump(doc))
    cfg = load_config(cfg_path)
    upstream(cfg)
    storage = storage_for(cfg)
    art = Artifact(storage, "finetune", Planner(cfg, storage).plan("finetune").key)
    kill_stage_when("finetune", cfg_path, art, lambda done: any(s.startswith("vqa-ckpt-00000010") for s in done), 300)
    assert art.manifest() is None
    resumed = run_stage("finetune", cfg)
    assert resumed.resumed_shards >= 2

    clean_path = setup(tmp_path, {"uri": str(tmp_path / "clean")}, vocab, "clean.yaml", **kw)
    doc = yaml.safe_load(clean_path.read_text())
    doc["finetune"].update(init="scratch", model="debug", checkpoint_every=5)
    clean_path.write_text(yaml.safe_dump(doc))
    clean = load_config(clean_path)
    upstream(clean)
    assert metrics(cfg, resumed) == metrics(clean, run_stage("finetune", clean))

    # the image-blind baseline: one answer per question text, whatever the picture
    doc["finetune"]["vqa"]["image_features"] = "zeroed"
    clean_path.write_text(yaml.safe_dump(doc))
    blind = run_stage("finetune", load_config(clean_path))
    storage = storage_for(clean)
    results = json.loads(
        storage.read_bytes(Artifact(storage, "finetune", blind.manifest.key).file_key("files/vqa/results.json"))
    )
    by_question = {}
    for r in results:
        by_question.setdefault(r["question_id"] % 10, set()).add(r["answer"])
    assert len(results) == 8 and all(len(answers) == 1 for answers in by_question.values()), by_question


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_two_processes_equal_one_at_the_same_accumulation(tmp_path, storage_spec, vocab):
    runs = {}
    for name, processes in (("one", 1), ("two", 2)):  # the same update: 2 micro-batches, however many processes
        path = setup(
            tmp_path, {"uri": str(tmp_path / name)}, vocab, f"{name}.yaml", steps=6, validate_every=6, accumulation=2
        )
        doc = yaml.safe_load(path.read_text())
        doc["finetune"].update(processes=processes, checkpoint_every=3)
        path.write_text(yaml.safe_dump(doc))
        cfg = load_config(path)
        upstream(cfg)
        runs[name] = [
            (s, n, v) for s, n, v in metrics(cfg, run_stage("finetune", cfg)) if n.startswith(("loss/", "val/"))
        ]
    assert [r[:2] for r in runs["one"]] == [r[:2] for r in runs["two"]]
    for (_, _, a), (_, _, b) in zip(runs["one"], runs["two"], strict=True):
        assert abs(a - b) < 1e-4 * max(1, abs(a)), runs
