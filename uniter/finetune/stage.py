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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.artifact import Artifact
from pipeline.errors import InputDataError
from pipeline.stage import Stage, StageContext
from storage import Storage, open_storage
from uniter.data import build_features, load_tokenizer
from uniter.finetune.config import FinetuneConfig
from uniter.finetune.tasks import TASKS
from uniter.pretrain.config import PretrainConfig
from uniter.pretrain.stage import _free_port, model_files, resume, save_checkpoint, start_worker
from uniter.pretrain.trainer import deepspeed_config, mean_over_processes, warmup_linear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    cfg: FinetuneConfig
    pretrain: PretrainConfig  # its tokenizer and region selection
    storage_uri: str
    endpoint_url: str | None
    region: str | None
    stage: str
    key: str
    run_id: str
    feature_inputs: list[tuple[str, str]]  # (task_features shard key, sha256)
    model_files: list[str]  # storage keys of the pretrained model's files
    local_dir: str
    port: int

    def storage(self) -> Storage:
        return open_storage(self.storage_uri, endpoint_url=self.endpoint_url, region=self.region)


def run_finetune(ctx: StageContext) -> None:
    cfg: FinetuneConfig = ctx.config
    if not cfg.tasks():
        log.warning("finetune: no task configured (finetune.vqa, …): nothing to train")
        return
    features = ctx.inputs["downstream"].tables.get("task_features", [])
    pretrained = ctx.inputs["pretrain"]
    model_files = [Artifact(ctx.storage, "pretrain", pretrained.key).file_key(f"files/{name}")
                   for name in sorted(pretrained.files) if name.startswith("model/")]
    with tempfile.TemporaryDirectory(prefix="uniter-finetune-") as local:
        job = Job(cfg, ctx.extra["pretrain"], ctx.storage.uri, getattr(ctx.storage, "endpoint_url", None),
                  getattr(ctx.storage, "region", None), ctx.output.stage, ctx.output.key, ctx.run_id,
                  [(k, f.sha256) for k, f in zip(ctx.input_files("downstream", "task_features"), features, strict=True)],
                  model_files, local, _free_port())
        torch.multiprocessing.start_processes(finetune_process, args=(cfg.processes, job), nprocs=cfg.processes,
                                              start_method="spawn")
    ctx.done.update(ctx.output.done_shards())


def finetune_process(rank: int, world: int, job: Job) -> None:
    start_worker(rank, world, job.port, job.cfg.device, "finetune")
    art = Artifact(job.storage(), job.stage, job.key)
    tokenizer = load_tokenizer(job.pretrain.tokenizer, job.pretrain.lowercase)
    feature_paths = [build_features(job.storage(), k, sha) for k, sha in job.feature_inputs]
    for name, task_cfg in job.cfg.tasks().items():
        if f"{name}-final" in art.done_shards():
            continue
        local = Path(job.local_dir) / name
        local.mkdir(parents=True, exist_ok=True)
        data = TASKS[name](task_cfg, tokenizer, feature_paths, local, job.pretrain, job.cfg.max_txt_len, job.cfg.seed)
        train_task(job, art, name, task_cfg, data, rank, world)
        torch.distributed.barrier()  # every process sees the task's final shard before the next task
    torch.distributed.barrier()


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class TaskTrainer:
    """The resumable state of one task (what `save_checkpoint` / `resume` need: engine, step, state)."""

    engine: Any
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.history = state["step"], list(state["history"])


def build_model(job: Job, tokenizer, cls, config_kw: dict[str, Any]):
    """`cls` from the pretrained artifact's model, from BERT, or from random weights."""
    from uniter.configuration_uniter import PRESETS
    from uniter.init import load_bert

    cfg = job.cfg
    torch.manual_seed(cfg.seed)
    if cfg.init == "pretrained":
        if not job.model_files:
            raise InputDataError("finetune.init is 'pretrained' but the pretrain artifact holds no model files")
        folder = Path(job.local_dir) / f"pretrained-{os.environ.get('RANK', '0')}"  # one per process: no race
        folder.mkdir(parents=True, exist_ok=True)
        for key in job.model_files:
            (folder / key.rsplit("/", 1)[-1]).write_bytes(job.storage().read_bytes(key))
        model = cls.from_pretrained(folder, **config_kw, **cfg.model_overrides)
        shutil.rmtree(folder, ignore_errors=True)
        return model
    config = PRESETS[cfg.model](vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config_kw,
                                **cfg.model_overrides)
    model = cls(config)
    if cfg.init == "bert":
        if not cfg.bert:
            raise InputDataError("finetune.init is 'bert' but finetune.bert names no checkpoint")
        load_bert(model, cfg.bert)
    return model


def param_groups(model: torch.nn.Module, head_mult: float, weight_decay: float = 0.01) -> list[dict[str, Any]]:
    """As pretraining (no decay on biases and LayerNorms), and the new head at lr × head_mult."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (not name.startswith("uniter."), "bias" in name or "LayerNorm" in name)
            groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if no_decay else weight_decay, "lr_mult": head_mult if head else 1.0}
            for (head, no_decay), ps in sorted(groups.items())]


def train_task(job: Job, art: Artifact, name: str, recipe, data, rank: int = 0, world: int = 1) -> None:
    import deepspeed

    cfg = job.cfg
    cls, config_kw = data.model_class()
    model = build_model(job, job_tokenizer(job), cls, config_kw)
    if hasattr(data, "prepare"):
        data.prepare(model, cfg.init == "pretrained")
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "lr_mult"} | {"lr": recipe.lr * g["lr_mult"]}
                                   for g in param_groups(model, recipe.head_lr_mult)],
                                  lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_linear(s, recipe.warmup, recipe.steps))
    ds_cfg = deepspeed_config(cfg.deepspeed)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
    accum = int(ds_cfg["gradient_accumulation_steps"])
    trainer = TaskTrainer(engine)
    prefix = f"{name}-ckpt"
    resume(trainer, art, job, rank, rank, prefix=prefix)

    def device_batch(batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(engine.device)
                v = v.to(dtype) if dtype is not None and v.is_floating_point() and k != "targets" else v
            out[k] = v
        return out

    def score(batch: dict):
        was_training = engine.training
        engine.eval()
        with torch.no_grad():
            out = engine(device_batch(batch))
        if was_training:
            engine.train()
        return out

    def validate() -> dict[str, bytes]:
        # NOTE: every process scores the whole split (the same weights, the same numbers): under
        # ZeRO-3 a forward needs all of them, and the history in every checkpoint stays identical.
        metrics, files = data.evaluate(score)
        for metric, value in sorted(metrics.items()):
            trainer.history.append({"step": trainer.step, "name": f"val/{metric}", "value": round(float(value), 4)})
        log.info("%s step %d validation: %s", name, trainer.step, ", ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items())))
        return files

    started = time.time()
    engine.train()
    files: dict[str, bytes] = {}
    while trainer.step < recipe.steps:
        losses = []
        for a in range(accum):
            j = (trainer.step * accum + a) * world + rank  # this process's share of the one stream
            batch = data.train_batch(j, score)  # (retrieval mines its negatives with the current model)
            torch.manual_seed(int(np.random.default_rng([cfg.seed, 9, j]).integers(2**62)))  # dropout: a function of j
            out = engine(device_batch(batch))
            engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss.detach().float()))
        trainer.history.append({"step": trainer.step, "name": f"loss/{name}", "value": round(mean_over_processes(sum(losses) / len(losses), world), 6)})
        if trainer.step % cfg.log_every == 0:
            trainer.history.append({"step": trainer.step, "name": "lr", "value": scheduler.get_last_lr()[0]})
            log.info("%s step %d/%d loss %.4f", name, trainer.step, recipe.steps, losses[-1])
        trainer.step += 1
        if trainer.step % recipe.validate_every == 0 or trainer.step == recipe.steps:
            files = validate()
        if trainer.step % cfg.checkpoint_every == 0 and trainer.step < recipe.steps:
            save_checkpoint(trainer, art, job, rank, rank, prefix=prefix)
    if not files:  # resumed at the very end: score the final model
        files = validate()
    if rank == 0:
        publish_task(trainer, art, job, name, files, started, data.skipped)



def job_tokenizer(job: Job):
    return load_tokenizer(job.pretrain.tokenizer, job.pretrain.lowercase)


def publish_task(trainer: TaskTrainer, art: Artifact, job: Job, name: str, files: dict[str, bytes], started: float,
                 skipped: int) -> None:
    rows = trainer.history
    metrics = pa.table({
        "task": pa.array([name] * len(rows), pa.string()),
        "step": pa.array([r["step"] for r in rows], pa.int64()),
        "name": pa.array([r["name"] for r in rows], pa.string()),
        "value": pa.array([float(r["value"]) for r in rows], pa.float64()),
    })
    extras = files | model_files(trainer.engine.module, f"{name}/model")
    final = {r["name"].removeprefix("val/"): r["value"] for r in rows if r["name"].startswith("val/") and r["step"] == trainer.step}
    stats = {name: {"steps": trainer.step, "val": final, "skipped": skipped, "seconds": round(time.time() - started, 1)}}
    art.write_shard(f"{name}-final", {"finetune_metrics": metrics}, stats, job.run_id, started, extras=extras)


FINETUNE = Stage(
    name="finetune",
    version=1,
    run=run_finetune,
    inputs=("downstream", "pretrain"),
    tables=("finetune_metrics",),
    description="fine-tune on the downstream tasks (VQA, NLVR2, retrieval) from the pretrained model, BERT or scratch",
    extra_config=("pretrain",),
)
