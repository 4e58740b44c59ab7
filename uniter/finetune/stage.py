"""The finetune stage: a pretrained UNITER (or BERT, or nothing) + a downstream task's files and
image features → a fine-tuned model, its validation predictions and metrics, per task.

For each configured task, in a worker process (DeepSpeed's state lives and dies with it):
read the task's files → questions joined with `task_features` (memory-mapped, via `Corpus`) →
token-bucket micro-batches → the DeepSpeed engine (head learning rate × head_lr_mult) →
checkpoints on the storage (`<task>-ckpt-<step>` markers; a killed run resumes from the newest)
→ validation with the official metric → `<task>-final`: metrics, the model (`save_pretrained`),
the official results file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
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
from uniter.data import Corpus, _write_ipc, build_features, load_tokenizer, token_bucket_batches
from uniter.finetune import vqa
from uniter.finetune.config import FinetuneConfig
from uniter.pretrain.config import PretrainConfig
from uniter.pretrain.stage import _free_port, resume, save_checkpoint
from uniter.pretrain.tasks import Vocab, pack
from uniter.pretrain.trainer import deepspeed_config, warmup_linear

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
        torch.multiprocessing.start_processes(finetune_process, args=(job,), nprocs=1, start_method="spawn")
    ctx.done.update(ctx.output.done_shards())


def finetune_process(rank: int, job: Job) -> None:
    os.dup2(2, 1)  # stdout belongs to the parent's --json summary
    sys.stdout = sys.stderr
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job.port))
    if job.cfg.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    logging.basicConfig(level=logging.INFO, format="[finetune] %(message)s")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if job.cfg.device == "cpu" else "nccl", verbose=False)
    art = Artifact(job.storage(), job.stage, job.key)
    tokenizer = load_tokenizer(job.pretrain.tokenizer, job.pretrain.lowercase)
    feature_paths = [build_features(job.storage(), k, sha) for k, sha in job.feature_inputs]
    for name, task_cfg in job.cfg.tasks().items():
        if f"{name}-final" in art.done_shards():
            continue
        if name == "vqa":
            train_vqa(job, art, task_cfg, tokenizer, feature_paths)
    torch.distributed.barrier()


# --- examples ---------------------------------------------------------------------------------


def image_index(feature_paths: list[Path], image_set: str) -> dict[int, str]:
    """Numeric image id → feature key, for the set's files whose stem ends in the id
    (COCO_val2014_000000000042 → 42, 1000092795 → 1000092795)."""
    import pyarrow.ipc as ipc

    out: dict[int, str] = {}
    prefix = f"{image_set}/"
    for path in feature_paths:
        keys = ipc.open_file(pa.memory_map(str(path), "r")).read_all().column("image_key").to_pylist()
        for key in keys:
            if not key.startswith(prefix):
                continue
            digits = key.rsplit("_", 1)[-1]
            if digits.isdigit():
                if int(digits) in out and out[int(digits)] != key:
                    raise InputDataError(f"downstream set {image_set!r}: images {out[int(digits)]} and {key} share id {int(digits)}")
                out[int(digits)] = key
    return out


def question_corpus(questions: list[vqa.Question], ids: dict[int, str], tokenizer, max_len: int, path: Path,
                    feature_paths: list[Path], pretrain: PretrainConfig) -> tuple[Corpus, np.ndarray]:
    """A Corpus whose texts are the questions; returns it and, per example, its question's index."""
    tokens = tokenizer([q.question for q in questions], add_special_tokens=False)["input_ids"] if questions else []
    _write_ipc(pa.table({
        "pair_id": [str(i) for i in range(len(questions))],
        "source": ["vqa"] * len(questions),
        "image_key": [ids.get(q.image_id, "") for q in questions],
        "input_ids": pa.array([t[:max_len] for t in tokens], pa.list_(pa.int32())),
    }), path)
    corpus = Corpus(path, feature_paths, pretrain.conf_thresh, pretrain.min_bb, pretrain.max_bb, val_percent=0.0)
    return corpus, corpus.text_row


def collate(corpus: Corpus, ids: np.ndarray, vocab: Vocab, targets: list[dict[int, float]] | None,
            qindex: np.ndarray, answers: int) -> dict[str, torch.Tensor]:
    texts = [np.concatenate([[vocab.cls], corpus.text(int(i)), [vocab.sep]]) for i in ids]
    batch = pack(texts, [corpus.example_region(int(i)) for i in ids], vocab)
    if targets is not None:
        t = torch.zeros(len(ids), answers)
        for row, i in enumerate(ids):
            for label, score in targets[int(qindex[i])].items():
                t[row, label] = score
        batch["targets"] = t
    return batch


# --- training ---------------------------------------------------------------------------------


@dataclass
class TaskTrainer:
    """The resumable loop of one task (what `save_checkpoint` / `resume` need: engine, step, state)."""

    engine: Any
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.history = state["step"], list(state["history"])


def build_vqa_model(job: Job, tokenizer, answers: int):
    from uniter.configuration_uniter import PRESETS
    from uniter.init import load_bert
    from uniter.modeling_uniter import UniterForVqa

    cfg = job.cfg
    torch.manual_seed(cfg.seed)
    if cfg.init == "pretrained":
        if not job.model_files:
            raise InputDataError("finetune.init is 'pretrained' but the pretrain artifact holds no model files")
        folder = Path(job.local_dir) / "pretrained"
        folder.mkdir(parents=True, exist_ok=True)
        for key in job.model_files:
            (folder / key.rsplit("/", 1)[-1]).write_bytes(job.storage().read_bytes(key))
        return UniterForVqa.from_pretrained(folder, num_answers=answers, **cfg.model_overrides)
    config = PRESETS[cfg.model](vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_answers=answers,
                                **cfg.model_overrides)
    model = UniterForVqa(config)
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


def train_vqa(job: Job, art: Artifact, task, tokenizer, feature_paths: list[Path]) -> None:
    import deepspeed

    cfg = job.cfg
    local = Path(job.local_dir)
    train_q = [q for files in task.train for q in vqa.read_vqa(files.questions, files.annotations)]
    val_q = vqa.read_vqa(task.val.questions, task.val.annotations)
    labels = vqa.answer_vocab(train_q, task.answers)
    label_of = {a: i for i, a in enumerate(labels)}
    ids = image_index(feature_paths, task.images)
    train, train_q_idx = question_corpus(train_q, ids, tokenizer, cfg.max_txt_len, local / "vqa-train.arrow", feature_paths, job.pretrain)
    val, val_q_idx = question_corpus(val_q, ids, tokenizer, cfg.max_txt_len, local / "vqa-val.arrow", feature_paths, job.pretrain)
    missing = len(train_q) - len(train) + len(val_q) - len(val)
    if not len(train):
        raise InputDataError(f"VQA: none of the {len(train_q)} training questions has features of its image in the "
                             f"downstream set {task.images!r} (configure downstream.images.{task.images})")
    if missing:
        log.warning("VQA: %d questions have no features of their image (set %r) and are skipped", missing, task.images)
    targets = [vqa.soft_targets(list(q.answers), label_of) for q in train_q]
    vocab = Vocab.from_tokenizer(tokenizer)

    model = build_vqa_model(job, tokenizer, len(labels))
    groups = param_groups(model, task.head_lr_mult)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "lr_mult"} | {"lr": task.lr * g["lr_mult"]}
                                   for g in groups], lr=task.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_linear(s, task.warmup, task.steps))
    ds_cfg = deepspeed_config(cfg.deepspeed)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
    accum = int(ds_cfg["gradient_accumulation_steps"])
    trainer = TaskTrainer(engine)
    resume(trainer, art, job, 0, 0, prefix="vqa-ckpt")

    def device_batch(batch):
        out = {}
        for k, v in batch.items():
            v = v.to(engine.device)
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() and k != "targets" else v
        return out

    def micro_batch(j: int) -> np.ndarray:  # the j-th micro-batch of the endless shuffled stream
        epoch = 0
        while True:
            batches = token_bucket_batches(np.arange(len(train)), train.lengths, task.batch_tokens, 8192,
                                           np.random.default_rng([cfg.seed, 7, epoch]))
            if j < len(batches):
                return batches[j]
            j -= len(batches)
            epoch += 1

    def validate() -> dict[str, float]:
        engine.eval()
        predictions = {}
        with torch.no_grad():
            for ids_ in token_bucket_batches(np.arange(len(val)), val.lengths, task.batch_tokens, 8192,
                                             np.random.default_rng([cfg.seed, 8])):
                logits = engine(device_batch(collate(val, ids_, vocab, None, val_q_idx, len(labels)))).logits
                for i, label in zip(ids_, logits.float().argmax(-1).tolist(), strict=True):
                    predictions[val_q[int(val_q_idx[i])].question_id] = labels[label]
        engine.train()
        scores = vqa.evaluate(predictions, val_q)
        for name, value in sorted(scores.items()):
            trainer.history.append({"step": trainer.step, "name": f"val/vqa_{name}", "value": round(value, 4)})
        return predictions

    started = time.time()
    engine.train()
    predictions: dict[int, str] = {}
    while trainer.step < task.steps:
        losses = []
        for a in range(accum):
            j = trainer.step * accum + a
            torch.manual_seed(int(np.random.default_rng([cfg.seed, 9, j]).integers(2**62)))
            out = engine(device_batch(collate(train, micro_batch(j), vocab, targets, train_q_idx, len(labels))))
            engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss.detach().float()))
        trainer.history.append({"step": trainer.step, "name": "loss/vqa", "value": round(sum(losses) / len(losses), 6)})
        if trainer.step % cfg.log_every == 0:
            trainer.history.append({"step": trainer.step, "name": "lr", "value": scheduler.get_last_lr()[0]})
            log.info("vqa step %d/%d loss %.4f", trainer.step, task.steps, losses[-1])
        trainer.step += 1
        if trainer.step % task.validate_every == 0 or trainer.step == task.steps:
            predictions = validate()
            log.info("vqa step %d validation: %s", trainer.step,
                     ", ".join(f"{r['name']} {r['value']}" for r in trainer.history if r["step"] == trainer.step and r["name"].startswith("val/")))
        if trainer.step % cfg.checkpoint_every == 0 and trainer.step < task.steps:
            save_checkpoint(trainer, art, job, 0, 0, prefix="vqa-ckpt")
    if not predictions:  # resumed at the end: score the final model
        predictions = validate()
    publish_vqa(trainer, art, job, labels, predictions, started, skipped=missing)


def publish_vqa(trainer: TaskTrainer, art: Artifact, job: Job, labels: list[str], predictions: dict[int, str],
                started: float, skipped: int) -> None:
    rows = trainer.history
    metrics = pa.table({
        "task": pa.array(["vqa"] * len(rows), pa.string()),
        "step": pa.array([r["step"] for r in rows], pa.int64()),
        "name": pa.array([r["name"] for r in rows], pa.string()),
        "value": pa.array([float(r["value"]) for r in rows], pa.float64()),
    })
    extras = {"vqa/answers.json": json.dumps(labels).encode(),
              "vqa/results.json": json.dumps([{"question_id": q, "answer": a} for q, a in sorted(predictions.items())]).encode()}
    with tempfile.TemporaryDirectory(prefix="uniter-vqa-model-") as tmp:
        trainer.engine.module.save_pretrained(tmp, safe_serialization=True)
        for path in sorted(Path(tmp).iterdir()):
            extras[f"vqa/model/{path.name}"] = path.read_bytes()
    final = {r["name"].removeprefix("val/"): r["value"] for r in rows if r["name"].startswith("val/") and r["step"] == trainer.step}
    stats = {"vqa": {"steps": trainer.step, "val": final, "skipped_questions": skipped,
                     "seconds": round(time.time() - started, 1)}}
    art.write_shard("vqa-final", {"finetune_metrics": metrics}, stats, job.run_id, started, extras=extras)
    shutil.rmtree(Path(job.local_dir) / "pretrained", ignore_errors=True)


FINETUNE = Stage(
    name="finetune",
    version=1,
    run=run_finetune,
    inputs=("downstream", "pretrain"),
    tables=("finetune_metrics",),
    description="fine-tune on the downstream tasks (VQA) from the pretrained model, BERT or scratch",
    extra_config=("pretrain",),
)
