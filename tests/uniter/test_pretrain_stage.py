"""The pretrain stage on DeepSpeed (CPU, gloo): trains and publishes a loadable model; 2 processes
equal 1 process with twice the accumulation; SIGKILL + resume repeats an uninterrupted run exactly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from contract.artifact import Artifact
from pipeline.config import load_config
from pipeline.runner import Planner, run_stage, storage_for
from tests.conftest import read_table
from tests.feature_extraction.test_extract_stage import build_upstream, corpus
from tests.fixtures.kill import kill_stage_when
from tests.fixtures.pictures import check_png

ROOT = Path(__file__).resolve().parents[2]


def pretrain_cfg(vocab: str, **kw) -> dict:
    base = {
        "model": "debug",
        "init_from_bert": None,
        "tokenizer": vocab,
        "steps": 12,
        "warmup": 2,
        "lr": 1e-3,
        "batch_tokens": 256,
        "bucket_size": 64,
        "val_percent": 20,
        "validate_every": 6,
        "checkpoint_every": 4,
        "log_every": 4,
        "loader_workers": 0,
        "deepspeed": {"gradient_accumulation_steps": 2},
    }
    base.update(kw)
    return base


def make(tmp_path: Path, storage: dict, vocab: str, name: str = "cfg.yaml", **pretrain) -> Path:
    path = corpus(tmp_path, storage, 16, {"loader_workers": 0}, name)
    doc = yaml.safe_load(path.read_text())
    doc["pretrain"] = pretrain_cfg(vocab, **pretrain)
    path.write_text(yaml.safe_dump(doc))
    return path


def history(cfg, result) -> list[tuple]:
    rows = read_table(storage_for(cfg), result.manifest, "metrics").to_pylist()
    return [(r["step"], r["name"], r["value"]) for r in rows]


# S3 only: checkpoints and the model go through the object store; the resume tests run local
@pytest.mark.parametrize("storage_spec", ["s3"], indirect=True)
def test_pretrain_trains_and_publishes_a_model(tmp_path, storage_spec, vocab, capfd):
    # NOTE: the validation images are drawn by a hash of their key, which holds the (temporary) path:
    # at 20 % of 16 images, 1 run in 36 drew none and logged no validation metric; at 50 %, 1 in 65,000
    cfg = load_config(make(tmp_path, storage_spec, vocab, val_percent=50))
    build_upstream(cfg)
    run_stage("extract", cfg)
    result = run_stage("pretrain", cfg)
    counts = result.manifest.counts
    assert counts["steps"] == 12 and counts["tasks_off"] == {"mrc": 1, "mrckl": 1}  # grid features: no soft labels
    rows = history(cfg, result)
    assert {n for _, n, _ in rows} >= {
        "loss/itm",
        "loss/mlm",
        "loss/mrfr",
        "lr",
        "val/mlm_acc",
        "val/itm_acc",
        "val/ot_pos",
    }
    assert [s for s, n, _ in rows if n.startswith("loss/")] == list(range(12))  # one task per step
    assert [s for s, n, _ in rows if n == "lr"] == [0, 4, 8]
    # every `log_every` steps one line with each task's mean loss since the last line
    lines = re.findall(r"step (\d+)/12 ((?:\w+ \d+\.\d{4} ?)+) \(", capfd.readouterr().err)
    assert [int(s) for s, _ in lines] == [4, 8, 12]
    assert {t for _, losses in lines for t in re.findall(r"(\w+) \d", losses)} == {"itm", "mlm", "mrfr"}
    events = storage_for(cfg).list(Artifact(storage_for(cfg), "pretrain", result.manifest.key).file_key("tensorboard"))
    assert events and all("tfevents" in k for k in events)
    assert "model/config.json" in result.manifest.files and "model/model.safetensors" in result.manifest.files
    storage = storage_for(cfg)
    art = Artifact(storage, "pretrain", result.manifest.key)
    check_png(storage.read_bytes(art.file_key("files/loss_curves.png")))  # drawn from the metrics table
    local = tmp_path / "model"
    local.mkdir()
    for name in ("config.json", "model.safetensors"):
        (local / name).write_bytes(storage.read_bytes(art.file_key(f"files/model/{name}")))
    from uniter.modeling_uniter import UniterForPretraining

    model = UniterForPretraining.from_pretrained(local)
    assert model.config.hidden_size == 64 and model.config.vocab_size <= 130
    assert run_stage("pretrain", cfg).status == "cached"


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_two_processes_equal_one_with_double_accumulation(tmp_path, storage_spec, vocab, launcher):
    one = load_config(
        make(
            tmp_path,
            {"uri": str(tmp_path / "d1")},
            vocab,
            "one.yaml",
            steps=6,
            deepspeed={"gradient_accumulation_steps": 2},
            checkpoint_every=100,
        )
    )
    # ZeRO-1 shards the optimizer state: each process writes its own part of the checkpoint at step 4
    two = load_config(
        make(
            tmp_path,
            {"uri": str(tmp_path / "d2")},
            vocab,
            "two.yaml",
            steps=6,
            processes=2,
            launcher=launcher,
            checkpoint_every=4,
            deepspeed={"gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1}},
        )
    )
    for cfg in (one, two):
        build_upstream(cfg)
        run_stage("extract", cfg)
    a, b = history(one, run_stage("pretrain", one)), history(two, run_stage("pretrain", two))
    losses_a = [(s, n, v) for s, n, v in a if n.startswith("loss/")]
    losses_b = [(s, n, v) for s, n, v in b if n.startswith("loss/")]
    assert [x[:2] for x in losses_a] == [x[:2] for x in losses_b]  # same task at every step
    for (_, _, va), (_, _, vb) in zip(losses_a, losses_b, strict=True):
        assert abs(va - vb) < 1e-4 * max(1, abs(va)), (losses_a, losses_b)
    art = Artifact(storage_for(two), "pretrain", Planner(two, storage_for(two)).plan("pretrain").key)
    parts = storage_for(two).list(art.file_key("checkpoints/ckpt-00000004"))
    assert sum("optim_states" in k for k in parts) == 2, parts  # both processes' optimizer shards stored


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_sigkill_then_resume_repeats_the_run_exactly(tmp_path, storage_spec, vocab):
    cfg_path = make(tmp_path, storage_spec, vocab, steps=40, checkpoint_every=5, validate_every=20, log_every=5)
    cfg = load_config(cfg_path)
    build_upstream(cfg)
    run_stage("extract", cfg)
    storage = storage_for(cfg)
    art = Artifact(storage, "pretrain", Planner(cfg, storage).plan("pretrain").key)
    kill_stage_when("pretrain", cfg_path, art, lambda done: any(s.startswith("ckpt-00000010") for s in done), 300)
    assert art.manifest() is None
    resumed = run_stage("pretrain", cfg)
    assert resumed.resumed_shards >= 2  # it continued from a checkpoint

    clean = load_config(
        make(
            tmp_path,
            {"uri": str(tmp_path / "clean")},
            vocab,
            "clean.yaml",
            steps=40,
            checkpoint_every=5,
            validate_every=20,
            log_every=5,
        )
    )
    build_upstream(clean)
    run_stage("extract", clean)
    assert history(cfg, resumed) == history(clean, run_stage("pretrain", clean))  # exactly, step by step


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_ablation_switches(tmp_path, storage_spec, vocab):
    cfg = load_config(
        make(
            tmp_path,
            storage_spec,
            vocab,
            steps=4,
            tasks={"mlm": 1},
            joint_masking=True,
            ot_lambda=0,
            checkpoint_every=100,
            validate_every=100,
        )
    )
    build_upstream(cfg)
    run_stage("extract", cfg)
    result = run_stage("pretrain", cfg)
    names = {n for _, n, _ in history(cfg, result)}
    assert {n for n in names if n.startswith("loss/")} == {"loss/mlm"}  # the other tasks are off
    assert result.manifest.counts["steps"] == 4


def test_launch_entry_outside_a_launcher_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(
        [sys.executable, "-m", "uniter.pretrain.launch", str(tmp_path / "job.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "run it under torchrun or deepspeed" in done.stderr
