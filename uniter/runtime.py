"""One training runtime, for pretraining and fine-tuning alike.

A stage describes its run as a `TrainJob` (plain data: pickled to the workers it spawns, JSON to the
ones a launcher starts, on other nodes too). Each worker process: `start_worker` → `build_model` →
`create_engine` (AdamW over `param_groups`, `warmup_linear`, our DeepSpeed defaults under the
config's JSON) → `resume` from the newest checkpoint → steps of `train_micro_batch` closed by
`TrainState.end_step` → `save_checkpoint` every so often → `model_files` for the published model.

Checkpoints live on the artifact storage: the files under `checkpoints/<tag>/`, then a `<tag>` marker
shard (tag: `<prefix>-<step, 8 digits>`), so a marker means every part is stored.

The stage modules import this one when the CLI starts: DeepSpeed and transformers are imported
where they are used, in the worker processes.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
from pydantic import TypeAdapter

from contract.artifact import Artifact
from contract.configbase import SectionConfig
from contract.stage import StageContext, now
from storage import Storage, open_storage
from uniter.init import load_bert

log = logging.getLogger(__name__)


# --- the job and the worker process ---------------------------------------------------------------


@dataclass(frozen=True)
class TrainJob:
    """Everything a training worker needs, as plain data. A stage subclasses it to add its inputs
    (and to name its config class, which the JSON round-trip validates against)."""

    cfg: SectionConfig
    storage_uri: str
    endpoint_url: str | None
    region: str | None
    stage: str
    key: str
    run_id: str
    feature_inputs: list[tuple[str, str]]  # (features shard key, sha256)
    local_dir: str  # checkpoints are written here first (the same path on every node), then uploaded
    port: int  # the rendezvous of workers the stage spawns itself

    @classmethod
    def of(cls, ctx: StageContext, local_dir: str, features: tuple[str, str], **inputs: Any) -> Self:
        """The job of the stage run `ctx`; `features` names the (input stage, table) of its region features."""
        stage, table = features
        shards = zip(ctx.input_files(stage, table), ctx.inputs[stage].tables.get(table, []), strict=True)
        return cls(
            cfg=ctx.config,
            storage_uri=ctx.storage.uri,
            endpoint_url=getattr(ctx.storage, "endpoint_url", None),
            region=getattr(ctx.storage, "region", None),
            stage=ctx.output.stage,
            key=ctx.output.key,
            run_id=ctx.run_id,
            feature_inputs=[(k, f.sha256) for k, f in shards],
            local_dir=local_dir,
            port=free_port(),
            **inputs,
        )

    def storage(self) -> Storage:
        return open_storage(self.storage_uri, endpoint_url=self.endpoint_url, region=self.region)

    def artifact(self) -> Artifact:
        return Artifact(self.storage(), self.stage, self.key)

    def to_json(self) -> str:
        return TypeAdapter(type(self)).dump_json(self).decode()

    @classmethod
    def from_json(cls, text: str) -> Self:
        return TypeAdapter(cls).validate_json(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(rank: int, world: int, port: int, device: str, label: str, local_rank: int | None = None) -> int:
    """A training worker's set-up: stdout onto stderr, the rendezvous (ours when spawned; a launcher's
    when local_rank is given), threads, DeepSpeed's process group. Returns the local rank."""
    # stdout belongs to the parent's --json summary; DeepSpeed prints build notes there
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if local_rank is None:
        local_rank = rank
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"[{label} {rank}/{world}] %(message)s"
    )
    if device == "cpu" and rank == 0 and not shm_op_built():
        logging.getLogger(__name__).warning(
            "building DeepSpeed's shared-memory op before the first step: once per machine, a few minutes "
            "on 2 cores (`make venv` builds it ahead)"
        )
    import deepspeed  # noqa: PLC0415 -- slow to import; only worker processes need it

    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    return local_rank


def shm_op_built() -> bool:
    """Whether DeepSpeed's CPU shared-memory op is in the torch extensions cache (it compiles it
    the first time a CPU process group starts)."""
    from torch.utils.cpp_extension import _get_build_directory  # noqa: PLC0415

    folder = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    return (folder / "deepspeed_shm_comm.so").exists()


def mean_over_processes(value: float, world: int) -> float:
    """The mean of a per-process value over the `world` processes (every process gets it)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item() / world)


# --- model and engine -----------------------------------------------------------------------------


def build_model(cls, preset: str, tokenizer, seed: int, bert: str | None = None, **config_kw: Any):
    """A fresh `cls` of the preset's shapes for the tokenizer's vocabulary, its text side from the
    BERT checkpoint `bert` if one is named."""
    from uniter.configuration_uniter import PRESETS  # noqa: PLC0415 -- transformers: slow, only workers need it

    config = PRESETS[preset](vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config_kw)
    torch.manual_seed(seed)  # the initial weights are part of the run's identity
    model = cls(config)
    if bert:
        load_bert(model, bert)
    return model


def warmup_linear(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def param_groups(
    model: torch.nn.Module, lr: float, head_lr_mult: float | None = None, weight_decay: float = 0.01
) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorms (names as BERT's), as the reference. With
    `head_lr_mult`, what lies outside the encoder (`uniter.`: a new task head) gets groups of its own
    at lr × head_lr_mult."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            head = head_lr_mult is not None and not name.startswith("uniter.")
            groups.setdefault((head, "bias" in name or "LayerNorm" in name), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if no_decay else weight_decay, "lr": lr * head_lr_mult if head else lr}
        for (head, no_decay), ps in sorted(groups.items())
    ]


def deepspeed_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """Our defaults with the config's DeepSpeed JSON merged over them."""
    base = {
        # our micro-batches are token budgets; this only feeds DeepSpeed's counters
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 5.0,
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(base, overrides)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def create_engine(
    model: torch.nn.Module,
    overrides: dict[str, Any],
    lr: float,
    warmup: int,
    steps: int,
    head_lr_mult: float | None = None,
):
    """`model` on DeepSpeed (`deepspeed_config(overrides)`), trained by AdamW over `param_groups`
    with the LR warmed up and decayed by `warmup_linear`. Returns the engine and its LR scheduler."""
    import deepspeed  # noqa: PLC0415 -- slow to import; only worker processes need it

    # fused: one kernel over every tensor; on CPU 4× faster than the per-tensor loop (UNITER-debug at
    # hidden 128: 21 → 5 ms a step, 14 % of a debug step before), the same update
    optimizer = torch.optim.AdamW(param_groups(model, lr, head_lr_mult), lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_linear(s, warmup, steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(overrides)
    )
    return engine, scheduler


def on_engine(engine, batch: dict[str, Any], keep_fp32: tuple[str, ...] = ()) -> dict[str, Any]:
    """The batch's tensors on the engine's device, the floating ones in its precision (bf16, fp16)
    except those named in `keep_fp32` (targets the loss compares at full precision)."""
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(engine.device)
            if dtype is not None and v.is_floating_point() and k not in keep_fp32:
                v = v.to(dtype)
        out[k] = v
    return out


def train_micro_batch(
    engine, batch: dict[str, Any], seed: int, keep_fp32: tuple[str, ...] = (), **forward: Any
) -> float:
    """Forward and backward on one micro-batch, then DeepSpeed's step (an update at the end of the
    accumulation window). Returns the micro-batch's loss."""
    torch.manual_seed(seed)  # dropout: a function of the batch, not of history
    out = engine(on_engine(engine, batch, keep_fp32), **forward)
    engine.backward(out.loss)
    engine.step()
    return float(out.loss.detach().float())


# --- the loop's state and checkpoints -------------------------------------------------------------


@dataclass(kw_only=True)
class TrainState:
    """What a checkpoint holds besides DeepSpeed's own state (model, optimizer, scheduler): the step
    and the metrics so far, one row per (step, name), deterministic (a resumed run repeats them)."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.history = state["step"], list(state["history"])

    def record(self, name: str, value: float) -> None:
        self.history.append({"step": self.step, "name": name, "value": value})

    def end_step(self, loss_name: str, losses: list[float], world: int, lr: float | None = None) -> None:
        """Close an optimizer step: its loss (the mean over micro-batches and processes), the LR if given."""
        self.record(loss_name, round(mean_over_processes(sum(losses) / len(losses), world), 6))
        if lr is not None:
            self.record("lr", lr)
        self.step += 1


def checkpoint_tag(prefix: str, step: int) -> str:
    return f"{prefix}-{step:08d}"


def save_checkpoint(
    engine, state: TrainState, art: Artifact, job: TrainJob, rank: int, local_rank: int, prefix: str
) -> None:
    """All processes write their part locally; the first process of each node uploads what its node
    wrote, then process 0 writes the marker (so the marker means: every part is stored)."""
    tag = checkpoint_tag(prefix, state.step)
    engine.save_checkpoint(job.local_dir, tag=tag, client_state={"trainer": state.state_dict()})
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


def resume(engine, state: TrainState, art: Artifact, job: TrainJob, rank: int, local_rank: int, prefix: str) -> None:
    """Load the newest published checkpoint of this prefix, if any (every node fetches all its parts)."""
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
    _, client = engine.load_checkpoint(job.local_dir, tag=tag)
    state.load_state_dict(client["trainer"])
    if rank == 0:
        log.info("resumed from %s (step %d)", tag, state.step)


def model_files(module, prefix: str) -> dict[str, bytes]:
    """`save_pretrained` output (config.json, model.safetensors) as artifact extras under `prefix`."""
    with tempfile.TemporaryDirectory(prefix="uniter-model-") as tmp:
        module.save_pretrained(tmp, safe_serialization=True)
        return {f"{prefix}/{path.name}": path.read_bytes() for path in sorted(Path(tmp).iterdir())}
