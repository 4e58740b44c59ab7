"""The `finetune` config section: where the model starts, and each downstream task's files and recipe."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from contract.configbase import InputFile, SectionConfig, StrictModel


class TaskConfig(SectionConfig):
    """A fine-tuning task's section: `FinetuneConfig.tasks()` lists the fields of this type, whose names
    are the tasks' names in `uniter.finetune.tasks.FINETUNE_TASKS`."""

    # "zeroed": the model gets as many regions as usual, each with a zero feature and a zero box, at
    # fine-tuning and at evaluation: the question-only (image-blind) baseline that a model which
    # looks at the picture must beat (issue 13). Targets (RefCOCO+'s boxes) still come from the real ones.
    image_features: Literal["real", "zeroed"] = "real"
    # Micro-batches per update, all processes together: the reference's accumulation × GPUs, so an
    # update sees the reference's examples whatever `finetune.processes` is (it must divide this).
    accumulation: int = Field(default=1, ge=1)
    grad_clip: float = Field(default=2.0, gt=0)  # the reference fine-tunes every task with grad_norm 2.0


class VqaFiles(StrictModel):
    questions: InputFile  # v2_OpenEnded_mscoco_<split>_questions.json
    annotations: InputFile  # v2_mscoco_<split>_annotations.json


class VqaTask(TaskConfig):
    """VQA v2 (recipe: uniter-recipe.md §4.2): train on `train`, score on `val` with the official metric."""

    train: list[VqaFiles] = Field(min_length=1)
    val: VqaFiles
    # test-dev (or test-std) questions: the final model's answers go to vqa/test_upload.json, the
    # file the official server (EvalAI) scores; the paper's VQA figures are test-dev
    test_questions: InputFile | None = None
    images: str = "coco"  # the downstream image set (downstream.images) holding the question's images
    answers: int = Field(default=3129, ge=1)  # vocabulary: the most frequent training answers
    # a given vocabulary instead (the reference ships its 3,129 answers as ans2label.json)
    answers_file: InputFile | None = None
    # soft target of an answer n humans gave: "butd" 0.3/0.6/0.9/1 (the reference), "thirds" min(1, n/3)
    target_score: Literal["butd", "thirds"] = "butd"
    steps: int = Field(default=6000, ge=1)
    warmup: int = Field(default=600, ge=0)
    lr: float = Field(default=8e-5, gt=0)
    head_lr_mult: float = Field(default=10.0, gt=0)  # the new head learns faster (the reference's lr_mul)
    batch_tokens: int = Field(default=5120, ge=8)
    accumulation: int = Field(default=20, ge=1)  # 5 × 4 GPUs
    validate_every: int = Field(default=1000, ge=1)
    # "bce": the reference's binary cross-entropy on each answer's soft score (× answers);
    # "softmax": cross-entropy against the soft scores made a distribution. On the grounding world
    # (issue 13) a small model with softmax learned colour in 400 steps where BCE stayed near chance:
    # BCE spends its first steps pushing every one of the answers' logits down.
    loss: Literal["bce", "softmax"] = "bce"


class TrainRecipe(TaskConfig):
    steps: int = Field(default=8000, ge=1)
    warmup: int = Field(default=800, ge=0)
    lr: float = Field(default=3e-5, gt=0)
    head_lr_mult: float = Field(default=1.0, gt=0)
    validate_every: int = Field(default=1000, ge=1)


class Nlvr2Task(TrainRecipe):
    """NLVR2 (recipe: base 1 GPU, 10240 tokens, lr 3e-5, 8000 steps): train on `train`, score `dev`."""

    batch_tokens: int = Field(default=10240, ge=8)
    train: InputFile  # train.json (jsonl)
    dev: InputFile  # dev.json (jsonl)
    images: str = "nlvr2"  # the downstream image set with <split>-<set>-<pair>-img0/1 files
    head: Literal["pair", "pair-biattn"] = "pair-biattn"


class RetrievalTask(TrainRecipe):
    """Image-text retrieval on a Karpathy split file (Flickr30K or COCO): train on `train` (+ restval),
    rank every text against every image of `eval_split`; hinge loss with hard negatives.

    A micro-batch is `queries` text queries (each with its hardest negative images) and as many image
    queries (each with its hardest negative captions), as the reference trains both directions in
    every step; its hard-negative runs take 16 GPUs × 8 accumulation of them per update."""

    karpathy: InputFile  # dataset_flickr30k.json / dataset_coco.json
    images: str = "flickr30k"  # the downstream image set holding the split's files
    eval_split: Literal["val", "test"] = "test"  # the paper's Table 3; its ablations (Table 2) use val
    margin: float = Field(default=0.2, ge=0)
    negative_pool: int = Field(default=399, ge=1)  # sampled candidates scored without gradient …
    hard_negatives: int = Field(default=31, ge=1)  # … of which the hardest are trained on
    steps: int = Field(default=5000, ge=1)
    warmup: int = Field(default=500, ge=0)
    lr: float = Field(default=5e-5, gt=0)
    score_batch: int = Field(default=400, ge=1)  # pairs per forward when scoring pools and the full matrix
    queries: int = Field(default=1, ge=1)  # per direction, per micro-batch
    accumulation: int = Field(default=128, ge=1)  # 8 × 16 GPUs


class RefcocoTask(TrainRecipe):
    """RefCOCO+ (and RefCOCO / RefCOCOg: the same code, another refs file): a score per region,
    trained and evaluated on the detected regions of the downstream features (see docs/finetune.md)."""

    refs: InputFile  # refs(unc).p / refs(umd).p: a pickle, read with a data-only unpickler
    instances: InputFile  # instances.json (COCO boxes and image sizes)
    images: str = "coco"
    train_split: str = "train"
    eval_split: str = "val"
    steps: int = Field(default=10000, ge=1)
    warmup: int = Field(default=1000, ge=0)
    lr: float = Field(default=6e-5, gt=0)
    batch_tokens: int = Field(default=8000, ge=8)  # the reference batches 128 examples, not tokens


class FinetuneConfig(SectionConfig):
    """Fine-tuning runs one model per configured task, from the pretrained artifact (`pretrained`),
    from BERT only (`bert`: the paper's L2 baseline) or from random weights (`scratch`: L1)."""

    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"processes", "loader_workers", "log_every", "checkpoint_every"})

    init: Literal["pretrained", "bert", "scratch"] = "pretrained"
    # For bert / scratch: the model size and the BERT checkpoint (HF folder or pkg://…); the
    # tokenizer is always the pretrain section's, so the vocabularies agree. No size (the default):
    # the pretrain section's `model` and `model_overrides`, so a baseline is the architecture that
    # was pretrained and "pretrained vs scratch" compares like with like.
    model: Literal["debug", "base", "large"] | None = None
    bert: str | None = "bert-base-cased"
    model_overrides: dict[str, Any] = {}
    vqa: VqaTask | None = None
    nlvr2: Nlvr2Task | None = None
    retrieval: RetrievalTask | None = None
    refcoco: RefcocoTask | None = None
    seed: int = 42
    max_txt_len: int = Field(default=60, ge=1)  # longer questions are cut (not dropped: every question is scored)
    deepspeed: dict[str, Any] = {}  # merged over the pretraining defaults (bf16, ZeRO, accumulation…)
    device: Literal["cpu", "cuda"] = "cpu"
    # CPU processes (gloo) or GPUs (NCCL): process r of w trains micro-batches r, r + w, … of one
    # stream, so w processes equal one process with w× the accumulation
    processes: int = Field(default=1, ge=1)
    loader_workers: int = Field(default=2, ge=0)
    log_every: int = Field(default=100, ge=1)
    checkpoint_every: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _update_size(self) -> FinetuneConfig:
        # each task says its update's size; one DeepSpeed value for every task would contradict it
        for key in ("gradient_accumulation_steps", "gradient_clipping", "train_batch_size"):
            if key in self.deepspeed:
                raise ValueError(f"deepspeed.{key}: set per task instead (finetune.<task>.accumulation, .grad_clip)")
        for name, task in self.tasks().items():
            if task.accumulation % self.processes:
                raise ValueError(
                    f"{name}.accumulation ({task.accumulation}) must be a multiple of processes ({self.processes}):"
                    f" each process takes an equal share of an update's micro-batches"
                )
        return self

    def tasks(self) -> dict[str, TaskConfig]:
        """The configured tasks, in field order (the order they are trained and evaluated in)."""
        return {name: value for name, value in self if isinstance(value, TaskConfig)}


class AblationVariant(StrictModel):
    """One row of the ablation table: the pretraining to run (or none), then the same fine-tuning."""

    name: str = Field(min_length=1)
    # "none": no pretraining, fine-tune from random weights (the paper's L1); "bert": from BERT only
    # (L2); a mapping: pretrain-section fields merged over the config's `pretrain` (tasks, joint_masking,
    # ot_lambda, dataset_weights, steps…); {} is the config's pretraining as it is.
    pretrain: dict[str, Any] | Literal["none", "bert"] = {}


class AblationConfig(SectionConfig):
    variants: list[AblationVariant] = []
    # the paper's Table 2 scores retrieval on the val split (its Table 3, the final figures, on test):
    # the ablation sets finetune.retrieval.eval_split to this, so no variant is chosen on test
    retrieval_eval_split: Literal["val", "test"] = "val"
