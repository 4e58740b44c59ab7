"""The pretraining loop (on `uniter.runtime`'s DeepSpeed engine): short, stateful, resumable.

One task per optimizer update (every micro-batch of the accumulation window and every process run
the same task), drawn from the task × dataset mix. Nothing random depends on the process layout or
on history: the step's task is a function of (seed, step); a micro-batch's examples, masks,
negatives and dropout are functions of (seed, dataset, the batch's position in that dataset's
stream). So 2 processes equal 1 process with twice the accumulation, and a resumed run repeats
an uninterrupted one step for step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from contract.pools import main_module_hidden
from uniter.batch import Vocab
from uniter.data import Corpus, token_bucket_batches
from uniter.pretrain.config import PretrainConfig
from uniter.pretrain.mix import dataset_weights
from uniter.pretrain.tasks import collate
from uniter.runtime import TrainState, create_engine, on_engine, train_micro_batch

# --- what each step trains on -----------------------------------------------------------------


class BatchPlan:
    """Step → (task, dataset); micro-batch → (step, task, dataset, position in the dataset's stream)."""

    def __init__(self, cfg: PretrainConfig, corpus: Corpus, world: int, tasks_off: tuple[str, ...] = ()):
        self.cfg, self.world = cfg, world
        self.accum = cfg.accumulation()
        train = corpus.is_train
        self.ids = [np.flatnonzero(train & (corpus.source == d)) for d in range(len(corpus.sources))]
        self.lengths = corpus.lengths
        self.datasets = [d for d in range(len(corpus.sources)) if len(self.ids[d])]
        self.pool = [
            (task, d)
            for task, ratio in sorted(cfg.tasks.items())
            if ratio > 0 and task not in tasks_off
            for d in self.datasets
        ]
        share = dataset_weights(cfg, corpus.sources, [len(ids) for ids in self.ids])
        weights = np.array([cfg.tasks[t] * share[d] for t, d in self.pool], float)
        if not self.pool or weights.sum() <= 0:
            raise ValueError("nothing to train: no task with a positive ratio has training examples")
        self.p = weights / weights.sum()
        self._epochs: dict[tuple[int, int], list[np.ndarray]] = {}
        self._epoch_len: dict[tuple[int, int], int] = {}
        # choices for every step, and how many batches of each dataset came before it
        rng_choices = [
            int(np.random.default_rng([cfg.seed, 1, s]).choice(len(self.pool), p=self.p)) for s in range(cfg.steps)
        ]
        self.choice = np.array(rng_choices, dtype=np.int64)
        ds_of = np.array([self.pool[c][1] for c in self.choice], dtype=np.int64)
        self.before = np.zeros((cfg.steps, len(corpus.sources)), dtype=np.int64)
        counts = np.zeros(len(corpus.sources), dtype=np.int64)
        for s in range(cfg.steps):
            self.before[s] = counts
            counts[ds_of[s]] += 1

    def micro(self, i: int, rank: int) -> tuple[int, str, int, int]:
        """(step, task, dataset, global batch position) of this rank's i-th micro-batch."""
        step, a = divmod(i, self.accum)
        task, d = self.pool[self.choice[step]]
        position = int(self.before[step, d]) * self.accum * self.world + a * self.world + rank
        return step, task, d, position

    def epoch(self, d: int, e: int) -> list[np.ndarray]:
        """Dataset d's batches in epoch e (a few recent epochs are kept: building one sorts the dataset)."""
        if (d, e) not in self._epochs:
            if len(self._epochs) >= 8:
                self._epochs.pop(next(iter(self._epochs)))
            rng = np.random.default_rng([self.cfg.seed, 2, d, e])
            self._epochs[(d, e)] = token_bucket_batches(
                self.ids[d], self.lengths, self.cfg.batch_tokens, self.cfg.bucket_size, rng
            )
        return self._epochs[(d, e)]

    def batch(self, d: int, position: int) -> np.ndarray:
        """The position-th batch of dataset d's endless stream (epoch after epoch)."""
        e = 0
        while True:
            if (d, e) not in self._epoch_len:  # counts stay known after the batches are evicted
                self._epoch_len[(d, e)] = len(self.epoch(d, e))
            if position < self._epoch_len[(d, e)]:
                return self.epoch(d, e)[position]
            position -= self._epoch_len[(d, e)]
            e += 1


class MicroBatches(Dataset):
    """Index i → this rank's i-th micro-batch, collated (in DataLoader workers, ahead of the model)."""

    def __init__(self, plan: BatchPlan, corpus: Corpus, vocab: Vocab, rank: int):
        self.plan, self.corpus, self.vocab, self.rank = plan, corpus, vocab, rank

    def __len__(self) -> int:
        return self.plan.cfg.steps * self.plan.accum

    def __getitem__(self, i: int) -> dict[str, Any]:
        cfg = self.plan.cfg
        step, task, d, position = self.plan.micro(i, self.rank)
        seed = [cfg.seed, 3, d, position]
        rng = np.random.default_rng(seed)
        batch = collate(
            self.corpus,
            self.plan.batch(d, position),
            task,
            self.vocab,
            rng,
            mlm_prob=cfg.mlm_prob,
            mrm_prob=cfg.mrm_prob,
            itm_neg_prob=cfg.itm_neg_prob,
            joint_masking=cfg.joint_masking,
            with_ot=cfg.ot_lambda > 0,
            negative_pool=self.plan.ids[d],
        )
        return {
            "batch": batch,
            "task": task,
            "step": step,
            "torch_seed": int(np.random.default_rng(seed + [1]).integers(2**62)),
        }


# --- the loop ------------------------------------------------------------------------------------

FP32_TARGETS = ("feat_targets", "label_targets")  # MRFR's regression targets, MRC's soft labels


@dataclass
class Trainer(TrainState):
    """The loop over `BatchPlan`'s steps; its checkpointed state is `TrainState`'s (step, history)."""

    cfg: PretrainConfig
    corpus: Corpus
    vocab: Vocab
    model: torch.nn.Module
    rank: int
    world: int
    tasks_off: tuple[str, ...] = ()

    def __post_init__(self):
        cfg = self.cfg
        self.plan = BatchPlan(cfg, self.corpus, self.world, self.tasks_off)
        self.engine, self.scheduler = create_engine(self.model, cfg.deepspeed, cfg.lr, cfg.warmup, cfg.steps)

    def _device_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return on_engine(self.engine, batch, FP32_TARGETS)

    def train(self, on_step=None) -> None:
        """Run from `self.step` to cfg.steps; `on_step(trainer)` after every optimizer update."""
        cfg = self.cfg
        start = self.step * self.plan.accum
        loader = DataLoader(
            MicroBatches(self.plan, self.corpus, self.vocab, self.rank),
            batch_size=None,
            sampler=range(start, cfg.steps * self.plan.accum),
            num_workers=cfg.loader_workers,
            prefetch_factor=4 if cfg.loader_workers else None,
            multiprocessing_context="forkserver" if cfg.loader_workers else None,
        )
        self.engine.train()
        losses: list[float] = []
        with main_module_hidden():  # the loader's workers start here (contract/pools.py)
            loaded = iter(loader)
        for item in loaded:
            losses.append(
                train_micro_batch(
                    self.engine,
                    item["batch"],
                    item["torch_seed"],
                    FP32_TARGETS,
                    task=item["task"],
                    ot_lambda=cfg.ot_lambda,
                )
            )
            # NOTE: counted here, not asked of the engine: after step() DeepSpeed already answers for
            # the next micro-batch.
            if len(losses) == self.plan.accum:
                lr = self.scheduler.get_last_lr()[0] if self.step % cfg.log_every == 0 else None
                self.end_step(f"loss/{item['task']}", losses, self.world, lr)
                losses = []
                if on_step is not None:
                    on_step(self)

    @torch.no_grad()
    def validate(self, max_batches: int = 20) -> dict[str, float]:
        """Per-task validation on held-out images (same batches every time)."""
        cfg = self.cfg
        val = np.flatnonzero(self.corpus.is_val)
        if not len(val):
            return {}
        batches = token_bucket_batches(
            val, self.corpus.lengths, cfg.batch_tokens, cfg.bucket_size, np.random.default_rng([cfg.seed, 4])
        )[:max_batches]
        self.engine.eval()
        sums: dict[str, float] = {}
        tasks = sorted(t for t, r in cfg.tasks.items() if r > 0 and t not in self.tasks_off)
        for task in tasks:
            for k, ids in enumerate(batches):
                if k % self.world != self.rank:
                    continue
                rng = np.random.default_rng([cfg.seed, 5, k])
                batch = collate(
                    self.corpus,
                    ids,
                    task,
                    self.vocab,
                    rng,
                    mlm_prob=cfg.mlm_prob,
                    mrm_prob=cfg.mrm_prob,
                    itm_neg_prob=cfg.itm_neg_prob,
                    with_ot=cfg.ot_lambda > 0,
                    negative_pool=val,
                )
                out = self.engine(self._device_batch(batch), task=task, ot_lambda=cfg.ot_lambda)
                for name, (total, count) in _scores(task, out).items():
                    s, c = sums.get(name + "/sum", 0.0), sums.get(name + "/n", 0.0)
                    sums[name + "/sum"], sums[name + "/n"] = s + total, c + count
        self.engine.train()
        # every rank reduces the same names in the same order, batches or not
        names = sorted(n for task in tasks for n in _score_names(task, cfg.ot_lambda > 0))
        totals = torch.tensor(
            [[sums.get(n + "/sum", 0.0), sums.get(n + "/n", 0.0)] for n in names], dtype=torch.float64
        )
        if self.world > 1:
            torch.distributed.all_reduce(totals)
        metrics = {n: float(totals[i, 0] / totals[i, 1]) for i, n in enumerate(names) if totals[i, 1] > 0}
        for n, v in metrics.items():
            self.record(f"val/{n}", round(v, 6))
        return metrics


def _score_names(task: str, with_ot: bool) -> list[str]:
    if task == "itm":
        return ["itm_acc", "ot_pos", "ot_neg"] if with_ot else ["itm_acc"]
    return [f"{task}_acc"] if task in ("mlm", "mrc") else [f"{task}_loss"]


def _scores(task: str, out) -> dict[str, tuple[float, float]]:
    """(sum, count) per validation metric."""
    if task == "mlm":
        hits = (out.logits.argmax(-1) == out.targets).sum()
        return {"mlm_acc": (float(hits), float(out.targets.numel()))}
    if task == "itm":
        scores = {"itm_acc": (float((out.logits.argmax(-1) == out.targets).sum()), float(out.targets.numel()))}
        if out.ot_distance is not None:
            pos, neg = out.ot_distance[out.targets == 1], out.ot_distance[out.targets == 0]
            scores["ot_pos"] = (float(pos.sum()), float(pos.numel()))
            scores["ot_neg"] = (float(neg.sum()), float(neg.numel()))
        return scores
    if task == "mrc":
        return {"mrc_acc": (float((out.logits.argmax(-1) == out.targets).sum()), float(out.targets.numel()))}
    return {f"{task}_loss": (float(out.loss) * 1.0, 1.0)}
