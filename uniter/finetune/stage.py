"""The finetune stage: a pretrained UNITER (or BERT, or nothing) + a downstream task's files and
image features → a fine-tuned model, its evaluation predictions and metrics, per task.

For each configured task (`tasks.py`: VQA, NLVR2, retrieval), in a worker process (DeepSpeed's
state lives and dies with it): the task's files joined with `task_features` (memory-mapped, via
`Corpus`) → its j-th micro-batch, a pure function of j → the DeepSpeed engine (head learning rate ×
head_lr_mult) → checkpoints on the storage (`<task>-ckpt-<step>` markers; a killed run resumes
from the newest) → evaluation with the official metric → `<task>-final`: metrics, the model
(`save_pretrained`), the files the evaluate stage re-scores.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from contract.artifact import Artifact
from contract.configbase import SectionConfig
from contract.errors import InputDataError
from contract.stage import StageContext
from uniter.data import build_features, load_tokenizer
from uniter.finetune.config import FinetuneConfig
from uniter.finetune.tasks import FINETUNE_TASKS
from uniter.runtime import (
    TrainJob,
    TrainState,
    build_model,
    create_engine,
    model_files,
    on_engine,
    resume,
    save_checkpoint,
    start_worker,
    train_micro_batch,
)

log = logging.getLogger(__name__)
KEEP_FP32 = ("targets",)  # the loss's targets (VQA's soft scores) stay at full precision


@dataclass(frozen=True)
class FinetuneJob(TrainJob):
    cfg: FinetuneConfig
    # the pretrain section (a PretrainConfig, not imported: one stage never imports another's code):
    # its tokenizer and region selection
    pretrain: SectionConfig
    model_files: list[str]  # storage keys of the pretrained model's files


def run_finetune(ctx: StageContext) -> None:
    cfg: FinetuneConfig = ctx.config
    if not cfg.tasks():
        log.warning("finetune: no task configured (finetune.vqa, …): nothing to train")
        return
    pretrained = ctx.inputs["pretrain"]
    pretrained_files = [
        Artifact(ctx.storage, "pretrain", pretrained.key).file_key(f"files/{name}")
        for name in sorted(pretrained.files)
        if name.startswith("model/")
    ]
    with tempfile.TemporaryDirectory(prefix="uniter-finetune-") as local:
        job = FinetuneJob.of(
            ctx, local, ("downstream", "task_features"), pretrain=ctx.extra["pretrain"], model_files=pretrained_files
        )
        torch.multiprocessing.start_processes(
            finetune_process, args=(cfg.processes, job), nprocs=cfg.processes, start_method="spawn"
        )
    ctx.done.update(ctx.output.done_shards())


def finetune_process(rank: int, world: int, job: FinetuneJob) -> None:
    start_worker(rank, world, job.port, job.cfg.device, "finetune")
    art = job.artifact()
    tokenizer = load_tokenizer(job.pretrain.tokenizer, job.pretrain.lowercase)
    feature_paths = [build_features(job.storage(), k, sha) for k, sha in job.feature_inputs]
    for name, task_cfg in job.cfg.tasks().items():
        if f"{name}-final" in art.done_shards():
            continue
        local = Path(job.local_dir) / name
        local.mkdir(parents=True, exist_ok=True)
        data = FINETUNE_TASKS[name].data(
            task_cfg, tokenizer, feature_paths, local, job.pretrain, job.cfg.max_txt_len, job.cfg.seed
        )
        train_task(job, art, name, task_cfg, data, rank, world)
        torch.distributed.barrier()  # every process sees the task's final shard before the next task
    torch.distributed.barrier()


# --- the loop ---------------------------------------------------------------------------------


def baseline_architecture(cfg, pretrain) -> tuple[str, dict[str, Any]]:
    """The model size and config overrides a `bert` / `scratch` run builds: its own when it names a
    size, else the pretrain section's (with its own overrides on top)."""
    if cfg.model is not None:
        return cfg.model, dict(cfg.model_overrides)
    return pretrain.model, {**pretrain.model_overrides, **cfg.model_overrides}


def build_task_model(job: FinetuneJob, tokenizer, cls, config_kw: dict[str, Any]):
    """`cls` from the pretrained artifact's model, from BERT, or from random weights."""
    cfg = job.cfg
    if cfg.init == "bert" and not cfg.bert:
        raise InputDataError("finetune.init is 'bert' but finetune.bert names no checkpoint")
    if cfg.init != "pretrained":
        size, overrides = baseline_architecture(cfg, job.pretrain)
        return build_model(
            cls, size, tokenizer, cfg.seed, cfg.bert if cfg.init == "bert" else None, **config_kw, **overrides
        )
    if not job.model_files:
        raise InputDataError("finetune.init is 'pretrained' but the pretrain artifact holds no model files")
    torch.manual_seed(cfg.seed)  # the new head's initial weights are part of the run's identity
    folder = Path(job.local_dir) / f"pretrained-{os.environ.get('RANK', '0')}"  # one per process: no race
    folder.mkdir(parents=True, exist_ok=True)
    for key in job.model_files:
        (folder / key.rsplit("/", 1)[-1]).write_bytes(job.storage().read_bytes(key))
    model = cls.from_pretrained(folder, **config_kw, **cfg.model_overrides)
    shutil.rmtree(folder, ignore_errors=True)
    return model


def train_task(job: FinetuneJob, art: Artifact, name: str, recipe, data, rank: int = 0, world: int = 1) -> None:
    cfg = job.cfg
    cls, config_kw = data.model_class()
    model = build_task_model(job, job_tokenizer(job), cls, config_kw)
    if hasattr(data, "prepare"):
        data.prepare(model, cfg.init == "pretrained")
    update = {"gradient_accumulation_steps": recipe.accumulation // world, "gradient_clipping": recipe.grad_clip}
    engine, scheduler = create_engine(
        model, {**cfg.deepspeed, **update}, recipe.lr, recipe.warmup, recipe.steps, recipe.head_lr_mult
    )
    accum = engine.gradient_accumulation_steps()
    state, prefix, score = TrainState(), f"{name}-ckpt", scorer(engine)
    resume(engine, state, art, job, rank, rank, prefix)
    started = time.time()
    engine.train()
    files: dict[str, bytes] = {}
    while state.step < recipe.steps:
        losses = []
        for a in range(accum):
            j = (state.step * accum + a) * world + rank  # this process's share of the one stream
            batch = data.train_batch(j, score)  # (retrieval mines its negatives with the current model)
            seed = int(np.random.default_rng([cfg.seed, 9, j]).integers(2**62))
            losses.append(train_micro_batch(engine, batch, seed, KEEP_FP32))
        logged = state.step % cfg.log_every == 0
        if logged:
            log.info("%s step %d/%d loss %.4f", name, state.step, recipe.steps, losses[-1])
        state.end_step(f"loss/{name}", losses, world, scheduler.get_last_lr()[0] if logged else None)
        if state.step % recipe.validate_every == 0 or state.step == recipe.steps:
            files = validate(state, name, data, score)
        if state.step % cfg.checkpoint_every == 0 and state.step < recipe.steps:
            save_checkpoint(engine, state, art, job, rank, rank, prefix)
    if not files:  # resumed at the very end: score the final model
        files = validate(state, name, data, score)
    if hasattr(data, "final_files"):  # what only the final model makes (VQA's test-dev upload)
        files = files | data.final_files(score)
    if rank == 0:
        publish_task(state, engine.module, art, job, name, files, started, data.skipped)


def scorer(engine):
    """A forward without gradients in eval mode (the engine's mode restored after): what the task's
    evaluation and hard-negative mining call."""

    def score(batch: dict):
        was_training = engine.training
        engine.eval()
        with torch.no_grad():
            out = engine(on_engine(engine, batch, KEEP_FP32))
        if was_training:
            engine.train()
        return out

    return score


def validate(state: TrainState, name: str, data, score) -> dict[str, bytes]:
    # NOTE: every process scores the whole split (the same weights, the same numbers): under
    # ZeRO-3 a forward needs all of them, and the history in every checkpoint stays identical.
    metrics, files = data.evaluate(score)
    for metric, value in sorted(metrics.items()):
        state.record(f"val/{metric}", round(float(value), 4))
    log.info(
        "%s step %d validation: %s", name, state.step, ", ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items()))
    )
    return files


def job_tokenizer(job: FinetuneJob):
    return load_tokenizer(job.pretrain.tokenizer, job.pretrain.lowercase)


def publish_task(
    state: TrainState,
    module,
    art: Artifact,
    job: FinetuneJob,
    name: str,
    files: dict[str, bytes],
    started: float,
    skipped: int,
) -> None:
    rows = state.history
    metrics = pa.table(
        {
            "task": pa.array([name] * len(rows), pa.string()),
            "step": pa.array([r["step"] for r in rows], pa.int64()),
            "name": pa.array([r["name"] for r in rows], pa.string()),
            "value": pa.array([float(r["value"]) for r in rows], pa.float64()),
        }
    )
    extras = files | model_files(module, f"{name}/model")
    final = {
        r["name"].removeprefix("val/"): r["value"]
        for r in rows
        if r["name"].startswith("val/") and r["step"] == state.step
    }
    stats = {name: {"steps": state.step, "val": final, "skipped": skipped, "seconds": round(time.time() - started, 1)}}
    art.write_shard(f"{name}-final", {"finetune_metrics": metrics}, stats, job.run_id, started, extras=extras)
