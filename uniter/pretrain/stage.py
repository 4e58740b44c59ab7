"""The pretrain stage: clean pairs + region features → a UNITER checkpoint (save_pretrained).

Training runs in worker processes (one per GPU, or gloo on CPU), even when there is one:
DeepSpeed's distributed state then lives and dies with them. `launcher: spawn` starts them here;
`launcher: torchrun` hands a job file to torchrun (`uniter.pretrain.launch` is the entry point,
which the deepspeed launcher can run too), so several nodes can join. Checkpoints go to the storage
every `checkpoint_every` steps (files under the artifact, then a `ckpt-<step>` marker); a killed run
resumes from the newest. The final shard holds the metrics, the model files and `loss_curves.png`
(each task's training loss and each validation metric over steps, drawn from the metrics).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from contract.artifact import Artifact
from contract.errors import UniterError
from contract.stage import StageContext
from uniter import plots
from uniter.batch import Vocab
from uniter.data import Corpus, build_features, build_texts, load_tokenizer
from uniter.pretrain.config import PretrainConfig
from uniter.pretrain.trainer import Trainer
from uniter.runtime import TrainJob, build_model, model_files, resume, save_checkpoint, start_worker

log = logging.getLogger(__name__)
CKPT = "ckpt"


@dataclass(frozen=True)
class PretrainJob(TrainJob):
    """A pretraining worker's job; as JSON, it reaches processes a launcher starts on other nodes
    (which rebuild the local caches)."""

    cfg: PretrainConfig
    text_keys: list[str]  # corpus_pairs shards and their table digest
    text_sha: str

    def local_inputs(self, tokenizer) -> tuple[Path, list[Path]]:
        """The memory-mappable caches on this node (built once, then found by content)."""
        storage = self.storage()
        return (
            build_texts(storage, self.text_keys, self.text_sha, tokenizer, self.cfg.max_txt_len),
            [build_features(storage, k, sha) for k, sha in self.feature_inputs],
        )


def run_pretrain(ctx: StageContext) -> None:
    cfg: PretrainConfig = ctx.config
    with tempfile.TemporaryDirectory(prefix="uniter-pretrain-") as local:
        job = PretrainJob.of(
            ctx,
            local,
            ("extract", "features"),
            text_keys=ctx.input_files("dedup", "corpus_pairs"),
            text_sha=ctx.inputs["dedup"].table_sha256("corpus_pairs"),
        )
        job.local_inputs(load_tokenizer(cfg.tokenizer, cfg.lowercase))  # once here, not in every worker
        if cfg.launcher == "spawn":
            torch.multiprocessing.start_processes(
                train_process, args=(cfg.processes, job), nprocs=cfg.processes, start_method="spawn"
            )
        else:
            run_torchrun(job, Path(local))
    ctx.done.update(ctx.output.done_shards())


def run_torchrun(job: PretrainJob, local: Path) -> None:
    cfg = job.cfg
    job_file = local / "job.json"
    job_file.write_text(job.to_json())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(cfg.processes),
        *(cfg.launcher_args or ["--standalone"]),
        "-m",
        "uniter.pretrain.launch",
        str(job_file),
    ]
    log.info("pretrain: %s", " ".join(cmd))
    # the workers' stdout goes to our stderr: stdout belongs to the --json summary
    done = subprocess.run(cmd, stdout=sys.stderr, check=False)
    if done.returncode != 0:
        raise UniterError(f"pretrain: torchrun exited with status {done.returncode} (the workers' errors are above)")


def train_process(rank: int, world: int, job: PretrainJob, local_rank: int | None = None) -> None:
    """One training process (of `world`). Spawned here (local_rank None: rank on this node, and the
    rendezvous is ours) or started by a launcher that set RANK, WORLD_SIZE and MASTER_* itself."""
    cfg = job.cfg
    local_rank = start_worker(rank, world, job.port, cfg.device, "pretrain", local_rank)
    from uniter.modeling_uniter import UniterForPretraining  # noqa: PLC0415 -- transformers: slow, workers only

    Path(job.local_dir).mkdir(parents=True, exist_ok=True)
    art = job.artifact()
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.lowercase)
    text_path, feature_paths = job.local_inputs(tokenizer)
    corpus = Corpus(
        text_path, feature_paths, cfg.conf_thresh, cfg.min_bb, cfg.max_bb, cfg.val_percent,
        tuple(cfg.train_splits), tuple(cfg.val_splits),
    )  # fmt: skip
    tasks_off = ()
    if not corpus.has_soft_labels and any(cfg.tasks.get(t, 0) > 0 for t in ("mrc", "mrckl")):
        tasks_off = ("mrc", "mrckl")
        if rank == 0:
            log.warning("the features carry no soft labels (grid backend): MRC and MRC-kl are off for this run")
    model = build_model(UniterForPretraining, cfg.model, tokenizer, cfg.seed, cfg.init_from_bert, **cfg.model_overrides)
    trainer = Trainer(cfg, corpus, Vocab.from_tokenizer(tokenizer), model, rank, world, tasks_off)
    resume(trainer.engine, trainer, art, job, rank, local_rank, CKPT)
    board = Board(job, art, len(trainer.history)) if rank == 0 else None
    started, last_log, last_step = time.time(), time.time(), trainer.step

    def on_step(t: Trainer) -> None:
        nonlocal last_log, last_step
        if board is not None:
            board.write(t.history)
        if t.step % cfg.validate_every == 0 or t.step == cfg.steps:
            metrics = t.validate()
            if rank == 0 and metrics:
                log.info(
                    "step %d validation: %s", t.step, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
                )
        if rank == 0 and (t.step % cfg.log_every == 0 or t.step == cfg.steps):
            # every task's mean loss over the steps since the last line (a step trains one task)
            since: dict[str, list[float]] = {}
            for r in reversed(t.history):
                if r["step"] <= last_step:
                    break
                if r["name"].startswith("loss/"):
                    since.setdefault(r["name"][5:], []).append(r["value"])
            losses = " ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in sorted(since.items()))
            log.info("step %d/%d %s (%.1f s)", t.step, cfg.steps, losses, time.time() - last_log)
            last_log, last_step = time.time(), t.step
        if t.step % cfg.checkpoint_every == 0 and t.step < cfg.steps:
            save_checkpoint(t.engine, t, art, job, rank, local_rank, CKPT)
            if board is not None:
                board.upload()

    trainer.train(on_step)
    if rank == 0:
        board.write(trainer.history)
        board.close()
        publish_final(trainer, art, job, started, tasks_off)
    torch.distributed.barrier()


class Board:
    """TensorBoard scalars (rank 0): every history row once; event files copied to the artifact."""

    def __init__(self, job: PretrainJob, art: Artifact, written: int):
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 -- tensorboard: slow, rank 0 of workers only

        root = Path(job.cfg.tensorboard_dir) if job.cfg.tensorboard_dir else Path(job.local_dir) / "tensorboard"
        self.folder = root / f"{job.stage}-{job.key[:12]}"
        self.writer = SummaryWriter(log_dir=str(self.folder))
        # a resumed run starts after what its checkpoint's history holds (logged by the killed run)
        self.art, self.written = art, written

    def write(self, history: list[dict]) -> None:
        for row in history[self.written :]:
            self.writer.add_scalar(row["name"], row["value"], row["step"])
        self.written = len(history)

    def upload(self) -> None:
        self.writer.flush()
        for path in sorted(self.folder.iterdir()):
            self.art.storage.put_file(self.art.file_key(f"tensorboard/{path.name}"), path)

    def close(self) -> None:
        self.upload()
        self.writer.close()


def publish_final(
    trainer: Trainer, art: Artifact, job: PretrainJob, started: float, tasks_off: tuple[str, ...]
) -> None:
    metrics = pa.table(
        {
            "step": pa.array([r["step"] for r in trainer.history], pa.int64()),
            "name": pa.array([r["name"] for r in trainer.history], pa.string()),
            "value": pa.array([float(r["value"]) for r in trainer.history], pa.float64()),
        }
    )
    extras = model_files(trainer.engine.module, "model")
    # NOTE: drawn here, not in the evaluate report: evaluate's only input is the finetune artifact
    extras["loss_curves.png"] = plots.curves_png(
        {
            "training loss (a step trains one task)": plots.series(trainer.history, "loss/"),
            "validation": plots.series(trainer.history, "val/"),
        },
        "pretraining",
    )
    final = {}
    for r in trainer.history:
        if r["name"].startswith(("loss/", "val/")):
            final[r["name"]] = r["value"]
    stats = {
        "steps": trainer.step,
        "final": final,
        "tasks_off": {t: 1 for t in tasks_off},
        "seconds_training": round(time.time() - started, 1),
    }
    art.write_shard("final-00000", {"metrics": metrics}, stats, job.run_id, started, extras=extras)
