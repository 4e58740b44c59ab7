"""`uniter recipe`: a config's effective training settings next to the reference's UNITER-base
all-data run (shared/reference/uniter-recipe.md §4, the authors' config files), every difference
flagged — what to check before spending GPU-days.

A line is `same`, `explained` (a difference this project makes on purpose, with the reason) or
`differs` (a deviation nobody explained). The effective values are computed, not read off one
key: tokens per update are the micro-batch × accumulation × processes, a source's sampling share
comes from `dataset_weights` over families and unlisted sources (which weigh 1), and so on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.artifact import Artifact
from contract.errors import ConfigError
from pipeline.config import PipelineConfig

# The reference (UNITER-base, all data: COCO, VG, CC, SBU; 8 V100s; config/pretrain-alldata-base-8gpu.json)
PRETRAIN = {
    "model": "base",
    "batch_tokens": 10240,
    "accumulation": 6,
    "processes": 8,
    "steps": 200_000,
    "warmup": 10_000,
    "lr": 5e-5,
    "grad_clip": 5.0,
    "precision": "fp16",
    "tasks": {"itm": 3, "mlm": 4, "mrfr": 2, "mrckl": 2},
    "joint_masking": False,
    "mlm_prob": 0.15,
    "mrm_prob": 0.15,
    "itm_neg_prob": 0.5,
    "ot_lambda": 0.1,
    "conf_thresh": 0.2,
    "boxes": (10, 100),
    "train_splits": ["restval", "train"],
    "val_splits": ["val"],
    "shares": {"coco": 20.0, "vg": 30.0, "cc": 30.0, "sbu": 20.0},  # % of updates, by dataset
}
# Fine-tuning (config/train-*-base-*.json): micro-batch, accumulation × GPUs, lr, head lr ×, steps, warm-up
FINETUNE: dict[str, dict[str, Any]] = {
    "vqa": {"batch": "5120 tokens", "accumulation": 20, "lr": 8e-5, "head_lr_mult": 10.0, "steps": 6000,
            "warmup": 600, "grad_clip": 2.0, "target_score": "butd", "loss": "bce", "answers": 3129},
    "nlvr2": {"batch": "10240 tokens", "accumulation": 1, "lr": 3e-5, "head_lr_mult": 1.0, "steps": 8000,
              "warmup": 800, "grad_clip": 2.0, "head": "pair-biattn"},
    "retrieval": {"batch": "1 text + 1 image query", "accumulation": 128, "lr": 5e-5, "head_lr_mult": 1.0,
                  "steps": 5000, "warmup": 500, "grad_clip": 2.0, "negative_pool": 399, "hard_negatives": 31,
                  "margin": 0.2},
    "refcoco": {"batch": "128 examples", "accumulation": 1, "lr": 6e-5, "head_lr_mult": 1.0, "steps": 10000,
                "warmup": 1000, "grad_clip": 2.0},
}  # fmt: skip

# Differences made on purpose: (stage or "*", setting, our value) → why
EXPLAINED = {
    ("*", "precision", "bf16"): "bf16 on Ampere/Hopper: fp32's exponent range, no loss scaling "
    "(the reference's fp16 with apex O2 needed a dynamic loss scaler per task); set fp16 on V100s",
    ("refcoco", "micro-batch", "8000 tokens"): "a token budget like every other task (the reference "
    "batches RefCOCO+ by examples: 128)",
}


@dataclass(frozen=True)
class Line:
    stage: str
    setting: str
    ours: str
    reference: str
    status: str  # same | explained | differs | info (no reference value to compare)
    why: str = ""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict):
        return " : ".join(f"{k} {_fmt(v)}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _line(stage: str, setting: str, ours: Any, ref: Any, why_same: str = "") -> Line:
    """One comparison; `why_same` marks a difference that leaves the effective recipe unchanged."""
    o, r = _fmt(ours), _fmt(ref)
    if o == r:
        return Line(stage, setting, o, r, "same")
    why = EXPLAINED.get((stage, setting, o)) or EXPLAINED.get(("*", setting, o)) or why_same
    return Line(stage, setting, o, r, "explained" if why else "differs", why)


def precision(deepspeed: dict[str, Any]) -> str:
    if deepspeed.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if deepspeed.get("fp16", {}).get("enabled") else "fp32"


def sampling_shares(cfg: PipelineConfig) -> dict[str, float]:
    """% of pretraining updates per dataset: a family counts once with its weight, a source outside
    every family with its own (unlisted: 1). Left out: weight 0, and sources whose every pair is in
    a split that does not train (a `split: val` source such as CC's validation file)."""
    pre = cfg.pretrain
    family = {s: f for f, members in pre.dataset_families.items() for s in members}

    def trains(source) -> bool:
        splits = getattr(source, "splits", None) or [getattr(source, "split", "train")]
        return any(split in pre.train_splits for split in splits)

    groups = {family.get(s.source_name, s.source_name) for s in cfg.ingest.sources if trains(s)}
    weights = {g: float(pre.dataset_weights.get(g, 1.0)) for g in sorted(groups)}
    total = sum(weights.values()) or 1.0
    return {g: round(100 * w / total, 2) for g, w in weights.items() if w > 0}


def normalized(ratios: dict[str, float]) -> dict[str, float]:
    """Task ratios scaled to the reference's sum (3 + 4 + 2 + 2 = 11), so 6:8:4:4 reads as 3:4:2:2."""
    on = {k: v for k, v in ratios.items() if v > 0}
    total = sum(on.values())
    return {k: round(11 * v / total, 3) for k, v in on.items()}


def pretrain_lines(cfg: PipelineConfig) -> list[Line]:
    pre, ref = cfg.pretrain, PRETRAIN
    tokens = pre.batch_tokens * pre.accumulation() * pre.processes
    ref_tokens = ref["batch_tokens"] * ref["accumulation"] * ref["processes"]
    same_update = "the same tokens per update" if tokens == ref_tokens else ""
    lines = [
        _line("pretrain", "model", pre.model, ref["model"]),
        _line("pretrain", "tokens per update", tokens, ref_tokens),
        _line("pretrain", "micro-batch tokens", pre.batch_tokens, ref["batch_tokens"], same_update),
        _line("pretrain", "accumulation", pre.accumulation(), ref["accumulation"], same_update),
        _line("pretrain", "processes (GPUs)", pre.processes, ref["processes"], same_update),
        _line("pretrain", "updates", pre.steps, ref["steps"]),
        _line("pretrain", "peak lr", pre.lr, ref["lr"]),
        _line("pretrain", "warm-up updates", pre.warmup, ref["warmup"]),
        # fixed in the code (uniter/runtime.py), the reference's
        Line("pretrain", "schedule", "warm-up, linear to 0", "warm-up, linear to 0", "same"),
        Line("pretrain", "optimizer", "AdamW (0.9, 0.98) 1e-6 wd 0.01", "AdamW (0.9, 0.98) 1e-6 wd 0.01", "same"),
        _line("pretrain", "grad clip", float(pre.deepspeed.get("gradient_clipping", 5.0)), ref["grad_clip"]),
        _line("pretrain", "precision", precision(pre.deepspeed), ref["precision"]),
        _line("pretrain", "task mix", normalized(pre.tasks), normalized(ref["tasks"])),
        _line("pretrain", "joint masking", pre.joint_masking, ref["joint_masking"]),
        _line("pretrain", "mlm / mrm prob", (pre.mlm_prob, pre.mrm_prob), (ref["mlm_prob"], ref["mrm_prob"])),
        _line("pretrain", "itm negatives", pre.itm_neg_prob, ref["itm_neg_prob"]),
        _line("pretrain", "WRA (OT) weight", pre.ot_lambda, ref["ot_lambda"]),
        _line("pretrain", "region confidence", pre.conf_thresh, ref["conf_thresh"]),
        _line("pretrain", "regions per image", (pre.min_bb, pre.max_bb), ref["boxes"]),
        _line("pretrain", "training splits", sorted(pre.train_splits), ref["train_splits"]),
        _line("pretrain", "validation splits", sorted(pre.val_splits), ref["val_splits"]),
    ]
    shares = sampling_shares(cfg)
    for name in sorted(set(shares) | set(ref["shares"])):
        lines.append(
            _line("pretrain", f"sampling share: {name} (%)", shares.get(name, 0.0), ref["shares"].get(name, 0.0))
        )
    return lines


def finetune_lines(cfg: PipelineConfig) -> list[Line]:
    lines = []
    for name, task in cfg.finetune.tasks().items():
        ref = FINETUNE[name]
        batch = f"{task.queries} text + {task.queries} image query" if name == "retrieval" else (
            f"{task.batch_tokens} tokens")  # fmt: skip
        lines += [
            _line(name, "micro-batch", batch, ref["batch"]),
            _line(name, "micro-batches per update", task.accumulation, ref["accumulation"]),
            _line(name, "updates", task.steps, ref["steps"]),
            _line(name, "peak lr", task.lr, ref["lr"]),
            _line(name, "head lr ×", task.head_lr_mult, ref["head_lr_mult"]),
            _line(name, "warm-up updates", task.warmup, ref["warmup"]),
            _line(name, "grad clip", task.grad_clip, ref["grad_clip"]),
            _line(name, "precision", precision(cfg.finetune.deepspeed), PRETRAIN["precision"]),
        ]
        lines += [_line(name, key, getattr(task, key), ref[key]) for key in ref if hasattr(task, key) and key not in (
            "accumulation", "lr", "head_lr_mult", "steps", "warmup", "grad_clip")]  # fmt: skip
    if cfg.finetune.retrieval is not None and cfg.ablation.variants:
        lines.append(_line("ablation", "retrieval split", cfg.ablation.retrieval_eval_split, "val"))
    return lines


def corpus_lines(cfg: PipelineConfig) -> list[Line]:
    """Per source, from the corpus the pretrain stage would read (dedup's pairs, extract's regions):
    training examples, share of the updates, examples per update and epochs. Needs both stages
    built for this config; tokenizes the captions as pretraining does (and caches them for it)."""
    from pipeline.runner import Planner, storage_for  # noqa: PLC0415 -- storage only for --corpus
    from uniter.data import load_tokenizer  # noqa: PLC0415 -- tokenizers: only for --corpus
    from uniter.pretrain.mix import source_epochs  # noqa: PLC0415

    storage = storage_for(cfg)
    planner = Planner(cfg, storage)
    built = {name: planner.manifest(name) for name in ("dedup", "extract")}
    missing = [name for name, manifest in built.items() if manifest is None]
    if missing:
        raise ConfigError(
            f"recipe --corpus reads the pretraining corpus: build {' and '.join(missing)} for this config first "
            f"(uniter run {missing[-1]} -c CONFIG)"
        )

    def keys(stage: str, table: str) -> list[str]:
        manifest = built[stage]
        art = Artifact(storage, stage, manifest.key)
        return [art.file_key(f.path) for f in manifest.tables.get(table, [])]

    pre = cfg.pretrain
    rows = source_epochs(
        pre, storage, keys("dedup", "corpus_pairs"), built["dedup"].table_sha256("corpus_pairs"),
        keys("extract", "features"), load_tokenizer(pre.tokenizer, pre.lowercase),
    )  # fmt: skip
    lines = []
    for r in rows:
        stage = f"corpus {r['source']}"
        lines += [
            Line(stage, "training examples", _fmt(r["examples"]), "", "info"),
            Line(stage, "mean length (tokens + regions)", _fmt(r["mean_length"]), "", "info"),
            Line(stage, "share of updates (%)", f"{100 * r['share']:.2f}", "", "info"),
            Line(stage, "examples per update", f"{r['examples_per_update']:,.0f}", "", "info"),
            Line(stage, "epochs", f"{r['epochs']:.2f}", "", "info"),
        ]
    return lines


def recipe(cfg: PipelineConfig, corpus: bool = False) -> list[Line]:
    return pretrain_lines(cfg) + finetune_lines(cfg) + (corpus_lines(cfg) if corpus else [])
