"""The pretrain stage: clean pairs + region features → a UNITER checkpoint (save_pretrained).

Training runs in worker processes (one per GPU, or gloo on CPU), even when there is one:
DeepSpeed's distributed state then lives and dies with them. `launcher: spawn` starts them here;
`launcher: torchrun` hands a job file to torchrun (`uniter.pretrain.launch` is the entry point,
which the deepspeed launcher can run too), so several nodes can join. Checkpoints go to the storage
every `checkpoint_every` steps (files under the artifact, then a `ckpt-<step>` marker); a killed run
resumes from the newest. The final shard holds the metrics and the model files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import torch

from pipeline.artifact import Artifact
from pipeline.errors import UniterError
from pipeline.stage import Stage, StageContext, now
from storage import Storage, open_storage
from uniter.data import Corpus, build_features, build_texts, load_tokenizer
from uniter.pretrain.config import PretrainConfig

log = logging.getLogger(__name__)
CKPT = "ckpt"


@dataclass(frozen=True)
class Job:
    """Everything a worker process needs, as plain data: it travels to spawned processes and, as
    JSON, to processes a launcher starts on other nodes (which rebuild the local caches)."""

    cfg: PretrainConfig
    storage_uri: str
    endpoint_url: str | None
    region: str | None
    stage: str
    key: str
    run_id: str
    text_keys: list[str]  # corpus_pairs shards and their table digest
    text_sha: str
    feature_inputs: list[tuple[str, str]]  # (features shard key, sha256)
    local_dir: str  # checkpoints are written here first (the same path on every node), then uploaded
    port: int

    def storage(self) -> Storage:
        return open_storage(self.storage_uri, endpoint_url=self.endpoint_url, region=self.region)

    def local_inputs(self, tokenizer) -> tuple[Path, list[Path]]:
        """The memory-mappable caches on this node (built once, then found by content)."""
        storage = self.storage()
        return (build_texts(storage, self.text_keys, self.text_sha, tokenizer, self.cfg.max_txt_len),
                [build_features(storage, k, sha) for k, sha in self.feature_inputs])

    def to_json(self) -> str:
        data = asdict(self) | {"cfg": self.cfg.model_dump(mode="json")}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        data = json.loads(text)
        data["cfg"] = PretrainConfig.model_validate(data["cfg"])
        data["feature_inputs"] = [tuple(x) for x in data["feature_inputs"]]
        return cls(**data)


def run_pretrain(ctx: StageContext) -> None:
    cfg: PretrainConfig = ctx.config
    features = ctx.inputs["extract"].tables.get("features", [])
    with tempfile.TemporaryDirectory(prefix="uniter-pretrain-") as local:
        job = Job(cfg, ctx.storage.uri, getattr(ctx.storage, "endpoint_url", None), getattr(ctx.storage, "region", None),
                  ctx.output.stage, ctx.output.key, ctx.run_id, ctx.input_files("dedup", "corpus_pairs"),
                  ctx.inputs["dedup"].table_sha256("corpus_pairs"),
                  [(k, f.sha256) for k, f in zip(ctx.input_files("extract", "features"), features, strict=True)],
                  local, _free_port())
        job.local_inputs(load_tokenizer(cfg.tokenizer, cfg.lowercase))  # once here, not in every worker
        if cfg.launcher == "spawn":
            torch.multiprocessing.start_processes(train_process, args=(cfg.processes, job), nprocs=cfg.processes,
                                                  start_method="spawn")
        else:
            run_torchrun(job, Path(local))
    ctx.done.update(ctx.output.done_shards())


def run_torchrun(job: Job, local: Path) -> None:
    cfg = job.cfg
    job_file = local / "job.json"
    job_file.write_text(job.to_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.processes),
           *(cfg.launcher_args or ["--standalone"]), "-m", "uniter.pretrain.launch", str(job_file)]
    log.info("pretrain: %s", " ".join(cmd))
    # the workers' stdout goes to our stderr: stdout belongs to the --json summary
    done = subprocess.run(cmd, stdout=sys.stderr, check=False)
    if done.returncode != 0:
        raise UniterError(f"pretrain: torchrun exited with status {done.returncode} (the workers' errors are above)")


def start_worker(rank: int, world: int, port: int, device: str, label: str, local_rank: int | None = None) -> int:
    """A training worker's process set-up (pretrain and finetune): stdout onto stderr, the rendezvous
    (ours when spawned; a launcher's when local_rank is given), threads, DeepSpeed's process group.
    Returns the local rank."""
    # stdout belongs to the parent's --json summary; DeepSpeed prints build notes there
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if local_rank is None:
        local_rank = rank
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[{label} {rank}/{world}] %(message)s")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    return local_rank


def model_files(module, prefix: str) -> dict[str, bytes]:
    """`save_pretrained` output (config.json, model.safetensors) as artifact extras under `prefix`."""
    with tempfile.TemporaryDirectory(prefix="uniter-model-") as tmp:
        module.save_pretrained(tmp, safe_serialization=True)
        return {f"{prefix}/{path.name}": path.read_bytes() for path in sorted(Path(tmp).iterdir())}


def train_process(rank: int, world: int, job: Job, local_rank: int | None = None) -> None:
    """One training process (of `world`). Spawned here (local_rank None: rank on this node, and the
    rendezvous is ours) or started by a launcher that set RANK, WORLD_SIZE and MASTER_* itself."""
    cfg = job.cfg
    local_rank = start_worker(rank, world, job.port, cfg.device, "pretrain", local_rank)
    from uniter.pretrain.tasks import Vocab
    from uniter.pretrain.trainer import Trainer

    Path(job.local_dir).mkdir(parents=True, exist_ok=True)
    storage = job.storage()
    art = Artifact(storage, job.stage, job.key)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.lowercase)
    text_path, feature_paths = job.local_inputs(tokenizer)
    corpus = Corpus(text_path, feature_paths, cfg.conf_thresh, cfg.min_bb, cfg.max_bb, cfg.val_percent)
    tasks_off = ()
    if not corpus.has_soft_labels and any(cfg.tasks.get(t, 0) > 0 for t in ("mrc", "mrckl")):
        tasks_off = ("mrc", "mrckl")
        if rank == 0:
            log.warning("the features carry no soft labels (grid backend): MRC and MRC-kl are off for this run")
    model = build_model(cfg, tokenizer)
    trainer = Trainer(cfg, corpus, Vocab.from_tokenizer(tokenizer), model, rank, world, tasks_off)
    resume(trainer, art, job, rank, local_rank)
    board = Board(job, art, len(trainer.history)) if rank == 0 else None
    started, last_log = time.time(), time.time()

    def on_step(t: Trainer) -> None:
        nonlocal last_log
        if board is not None:
            board.write(t.history)
        if t.step % cfg.validate_every == 0 or t.step == cfg.steps:
            metrics = t.validate()
            if rank == 0 and metrics:
                log.info("step %d validation: %s", t.step, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        if rank == 0 and (t.step % cfg.log_every == 0 or t.step == cfg.steps):
            last = next(r for r in reversed(t.history) if r["name"].startswith("loss/"))
            log.info("step %d/%d %s %.4f (%.1f s)", t.step, cfg.steps, last["name"], last["value"], time.time() - last_log)
            last_log = time.time()
        if t.step % cfg.checkpoint_every == 0 and t.step < cfg.steps:
            save_checkpoint(t, art, job, rank, local_rank)
            if board is not None:
                board.upload()

    trainer.train(on_step)
    if rank == 0:
        board.write(trainer.history)
        board.close()
        publish_final(trainer, art, job, started, tasks_off)
    torch.distributed.barrier()


def build_model(cfg: PretrainConfig, tokenizer):
    from uniter.configuration_uniter import PRESETS
    from uniter.init import load_bert
    from uniter.modeling_uniter import UniterForPretraining

    config = PRESETS[cfg.model](vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **cfg.model_overrides)
    torch.manual_seed(cfg.seed)  # the fresh init is part of the run's identity
    model = UniterForPretraining(config)
    if cfg.init_from_bert:
        load_bert(model, cfg.init_from_bert)
    return model


class Board:
    """TensorBoard scalars (rank 0): every history row once; event files copied to the artifact."""

    def __init__(self, job: Job, art: Artifact, written: int):
        from torch.utils.tensorboard import SummaryWriter

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


# --- checkpoints --------------------------------------------------------------------------------


def _tag(step: int, prefix: str = CKPT) -> str:
    return f"{prefix}-{step:08d}"


def save_checkpoint(trainer, art: Artifact, job: Job, rank: int, local_rank: int, prefix: str = CKPT) -> None:
    """All processes write their part locally; the first process of each node uploads what its node
    wrote, then process 0 writes the marker (so the marker means: every part is stored)."""
    tag = _tag(trainer.step, prefix)
    trainer.engine.save_checkpoint(job.local_dir, tag=tag, client_state={"trainer": trainer.state_dict()})
    torch.distributed.barrier()
    started = now()
    folder = Path(job.local_dir) / tag
    if local_rank == 0:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                art.storage.put_file(art.file_key(f"checkpoints/{tag}/{path.relative_to(folder).as_posix()}"), path)
    torch.distributed.barrier()
    if rank == 0:
        art.publish_shard(tag, {}, {}, job.run_id, started)
    if local_rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    torch.distributed.barrier()


def resume(trainer, art: Artifact, job: Job, rank: int, local_rank: int, prefix: str = CKPT) -> None:
    """Load the newest published checkpoint of this key, if any (every node fetches all its parts)."""
    tags = sorted(s for s in art.done_shards() if s.startswith(prefix + "-"))
    if not tags:
        return
    tag = tags[-1]
    if local_rank == 0:
        stored = art.file_key(f"checkpoints/{tag}")
        for key in art.storage.list(stored):
            local = Path(job.local_dir) / tag / key[len(stored) + 1 :]
            local.parent.mkdir(parents=True, exist_ok=True)
            with art.storage.open(key) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst)
        (Path(job.local_dir) / "latest").write_text(tag)
    torch.distributed.barrier()
    _, client = trainer.engine.load_checkpoint(job.local_dir, tag=tag)
    trainer.load_state_dict(client["trainer"])
    if rank == 0:
        log.info("resumed from %s (step %d)", tag, trainer.step)


def publish_final(trainer, art: Artifact, job: Job, started: float, tasks_off: tuple[str, ...]) -> None:
    metrics = pa.table({
        "step": pa.array([r["step"] for r in trainer.history], pa.int64()),
        "name": pa.array([r["name"] for r in trainer.history], pa.string()),
        "value": pa.array([float(r["value"]) for r in trainer.history], pa.float64()),
    })
    extras = model_files(trainer.engine.module, "model")
    final = {}
    for r in trainer.history:
        if r["name"].startswith(("loss/", "val/")):
            final[r["name"]] = r["value"]
    stats = {"steps": trainer.step, "final": final, "tasks_off": {t: 1 for t in tasks_off},
             "seconds_training": round(time.time() - started, 1)}
    art.write_shard("final-00000", {"metrics": metrics}, stats, job.run_id, started, extras=extras)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRETRAIN = Stage(
    name="pretrain",
    version=1,
    run=run_pretrain,
    inputs=("dedup", "extract"),
    tables=("metrics",),
    description="UNITER pretraining on DeepSpeed: MLM, MRFR, MRC(-kl), ITM + WRA with conditional masking",
)
