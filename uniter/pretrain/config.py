"""The `pretrain` config section: model, tasks and their mix, data, DeepSpeed."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from contract.configbase import SectionConfig

TASK_NAMES = ("itm", "mlm", "mrfr", "mrc", "mrckl")


class PretrainConfig(SectionConfig):
    """UNITER pretraining as the reference recipe (uniter-recipe.md §2, §4)."""

    # Parallelism and bookkeeping do not change what is learned (the data order and every random
    # draw are functions of the seed and the step, not of the process layout).
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset(
        {"processes", "launcher", "launcher_args", "loader_workers", "log_every", "checkpoint_every", "tensorboard_dir"}
    )

    model: Literal["debug", "base", "large"] = "base"
    model_overrides: dict[str, Any] = {}  # UniterConfig fields, e.g. {hidden_dropout_prob: 0.0}
    # Text side initialised from a BERT checkpoint (HF folder, or pkg://<package>/<folder>); None = random.
    init_from_bert: str | None = "bert-base-cased"
    tokenizer: str = "bert-base-cased"  # a BERT WordPiece vocab: HF name, folder, vocab.txt or pkg://…
    lowercase: bool | None = None  # None: the tokenizer's own setting
    max_txt_len: int = Field(default=60, ge=1)  # longer texts are dropped, as the reference does
    conf_thresh: float = 0.2
    min_bb: int = Field(default=10, ge=1)
    max_bb: int = Field(default=100, ge=1)

    # Mix ratios per task (0 switches a task off); default ITM:MLM:MRFR:MRC-kl = 3:4:2:2.
    # NOTE: floats, as validation makes them: defaults are not validated, and 3 vs 3.0 would give
    # the same config two cache keys (the file vs the flow parameter document)
    tasks: dict[str, float] = {"itm": 3.0, "mlm": 4.0, "mrfr": 2.0, "mrckl": 2.0}
    # Sampling weight per `pairs.source`, or per family of `dataset_families`; unlisted weigh 1. A
    # dataset's share of the updates is its weight over the sum. A family's weight is split among its
    # sources by their training examples, as if they were one dataset (the reference samples COCO 20,
    # VG 30, CC 30, SBU 20, whatever files each came from).
    dataset_weights: dict[str, float] = {}
    dataset_families: dict[str, list[str]] = {}  # e.g. {coco: [coco_train, karpathy_coco]}
    joint_masking: bool = False  # ablation baseline: mask text and regions in the same batch
    mlm_prob: float = Field(default=0.15, gt=0, lt=1)
    mrm_prob: float = Field(default=0.15, gt=0, lt=1)
    itm_neg_prob: float = Field(default=0.5, ge=0, le=1)
    ot_lambda: float = Field(default=0.1, ge=0)  # WRA weight inside ITM; 0 switches WRA off

    batch_tokens: int = Field(default=10240, ge=8)  # per micro-batch per process, text + regions, padding incl.
    bucket_size: int = Field(default=8192, ge=8)
    steps: int = Field(default=200_000, ge=1)
    warmup: int = Field(default=10_000, ge=0)
    lr: float = Field(default=5e-5, gt=0)
    seed: int = 42
    # Which pairs' `split` values train and which validate; a pair in neither (test) does neither, and
    # an image with a validation caption never trains. With no pair in a val split, val_percent of
    # the training images (by key hash) are held out instead.
    train_splits: list[str] = Field(default=["train", "restval"], min_length=1)
    val_splits: list[str] = ["val"]
    val_percent: float = Field(default=1.0, ge=0, lt=100)  # images held out for validation
    validate_every: int = Field(default=5000, ge=1)
    checkpoint_every: int = Field(default=1000, ge=1)
    log_every: int = Field(default=100, ge=1)
    # TensorBoard event files are written here during the run (point `tensorboard --logdir` at it)
    # and copied into the artifact (`tensorboard/`) at every checkpoint. None: a temporary folder.
    tensorboard_dir: str | None = None
    # DeepSpeed's own JSON, merged over our defaults: bf16/fp16, zero_optimization, gradient_accumulation_steps…
    deepspeed: dict[str, Any] = {}
    device: Literal["cpu", "cuda"] = "cpu"
    processes: int = Field(default=1, ge=1)  # per node: CPU processes (gloo) or GPUs (NCCL)
    # spawn: the stage starts `processes` workers itself (one node). torchrun: it runs
    # `torchrun --nproc-per-node processes [launcher_args] -m uniter.pretrain.launch JOB`; give the
    # rendezvous in launcher_args for several nodes (default --standalone), see docs/pretrain.md.
    launcher: Literal["spawn", "torchrun"] = "spawn"
    launcher_args: list[str] = []
    loader_workers: int = Field(default=2, ge=0)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(TASK_NAMES))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}: expected some of {', '.join(TASK_NAMES)}")
        if not any(v > 0 for v in value.values()):
            raise ValueError("every task has ratio 0: at least one task must be on")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> PretrainConfig:
        if self.min_bb > self.max_bb:
            raise ValueError(f"min_bb ({self.min_bb}) > max_bb ({self.max_bb})")
        member_of: dict[str, str] = {}
        for family, members in self.dataset_families.items():
            for source in members:
                if source in member_of:
                    raise ValueError(
                        f"dataset_families: source {source!r} is in both {member_of[source]!r} and {family!r}"
                    )
                member_of[source] = family
        both = sorted(k for k in self.dataset_weights if k in member_of and member_of[k] in self.dataset_weights)
        if both:
            raise ValueError(f"dataset_weights: {both[0]!r} has a weight and so has its family {member_of[both[0]]!r}")
        if any(w < 0 for w in self.dataset_weights.values()):
            raise ValueError("dataset_weights: weights must be >= 0")
        return self

    def accumulation(self) -> int:
        return int(self.deepspeed.get("gradient_accumulation_steps", 1))
