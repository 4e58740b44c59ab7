"""The training stages as the DAG declares them: names, versions, inputs, tables. Their work is
`Deferred`: its module (torch, DeepSpeed, transformers) is imported when the stage runs, so every command that only
reads the DAG (status, sql, planning a run, a Prefect flow's start) starts without it."""

from __future__ import annotations

from contract.stage import Deferred, Stage

PRETRAIN = Stage(
    name="pretrain",
    version=1,  # not 2 for loss_curves.png: a picture is not worth a retraining; older artifacts lack it
    run=Deferred("uniter.pretrain.stage:run_pretrain"),
    inputs=("dedup", "extract"),
    tables=("metrics",),
    description="UNITER pretraining on DeepSpeed: MLM, MRFR, MRC(-kl), ITM + WRA with conditional masking",
)

FINETUNE = Stage(
    name="finetune",
    version=2,  # 2: the reference's NLVR2 heads and VQA soft scores
    run=Deferred("uniter.finetune.stage:run_finetune"),
    inputs=("downstream", "pretrain"),
    tables=("finetune_metrics",),
    description="fine-tune on the downstream tasks (VQA, NLVR2, retrieval) from the pretrained model, BERT or scratch",
    extra_config=("pretrain",),
)

EVALUATE = Stage(
    name="evaluate",
    version=2,  # 2: report.html holds every table of report.md and the pictures; finetune_curves.png
    run=Deferred("uniter.finetune.evaluate:run_evaluate"),
    inputs=("finetune",),
    tables=("evaluation",),
    description="score the fine-tuned tasks with the official metrics; the Meta-Sum report",
    extra_config=("finetune",),
)
