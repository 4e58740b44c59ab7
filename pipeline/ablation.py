"""The ablation: pretrain each variant (variants whose pretraining config is the same share one
cached artifact), fine-tune each on every configured task, and one Meta-Sum table with a row per
variant — the paper's Table 2 at any scale — with `ablation.png` (a bar group per variant, a bar per
task) beside the report's other pictures.

Each variant is the pipeline config with its `pretrain` section changed (or fine-tuning from
scratch / BERT), run through the ordinary runner: keys, caching and resume are the stages' own.
"""

from __future__ import annotations

import json
import logging

from pydantic import ValidationError

from contract.errors import ConfigError
from contract.fingerprint import sha256_json
from pipeline.config import PipelineConfig
from pipeline.runner import run_stage, storage_for
from pipeline.stages import ancestors, dependents
from uniter.finetune import report
from uniter.finetune.evaluate import evaluate_run
from uniter.finetune.stage import baseline_architecture

log = logging.getLogger(__name__)


def variant_config(cfg: PipelineConfig, variant) -> PipelineConfig:
    """The pipeline config of one variant (validated like a config file: bad fields are errors)."""
    data = cfg.model_dump(mode="python")
    if variant.pretrain == "none":
        data["finetune"]["init"] = "scratch"
    elif variant.pretrain == "bert":
        data["finetune"]["init"] = "bert"
    else:
        data["pretrain"] = {**data["pretrain"], **variant.pretrain}
        data["finetune"]["init"] = "pretrained"
    if data["finetune"].get("retrieval"):
        data["finetune"]["retrieval"]["eval_split"] = cfg.ablation.retrieval_eval_split
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"ablation variant {variant.name!r}: {problems}") from None


def architecture(vcfg: PipelineConfig) -> tuple[str, dict]:
    """The model a variant fine-tunes: the pretrained one's, or the baseline's it builds."""
    if vcfg.finetune.init == "pretrained":
        return vcfg.pretrain.model, {**vcfg.pretrain.model_overrides, **vcfg.finetune.model_overrides}
    return baseline_architecture(vcfg.finetune, vcfg.pretrain)


def check_same_architecture(cfg: PipelineConfig, variants) -> None:
    """One table compares pretraining, not model sizes: every row must fine-tune the same model."""
    seen = {v.name: architecture(variant_config(cfg, v)) for v in variants}
    if len({sha256_json(list(a)) for a in seen.values()}) > 1:
        rows = "; ".join(f"{name}: {size} {overrides or ''}".strip() for name, (size, overrides) in seen.items())
        raise ConfigError(
            f"ablation variants fine-tune different models ({rows}); a Meta-Sum table compares pretraining "
            "only. Leave finetune.model unset (baselines then build the pretrained architecture) or make "
            "the variants' pretrain.model and model_overrides agree"
        )


def shared_stages() -> list[str]:
    """What every variant fine-tunes on and no variant changes: fine-tuning's inputs but pretraining
    and what reads it."""
    per_variant = {"pretrain", *dependents("pretrain")}
    return [s for s in ancestors("finetune") if s not in per_variant]


def run_ablation(cfg: PipelineConfig, progress=None) -> dict:
    variants = cfg.ablation.variants
    if not variants:
        raise ConfigError("ablation.variants is empty: list the pretraining variants to compare")
    if not cfg.finetune.tasks():
        raise ConfigError("the ablation fine-tunes on the configured tasks, and finetune configures none")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"ablation variant names must be unique: {names}")
    check_same_architecture(cfg, variants)
    storage = storage_for(cfg)
    for stage in shared_stages():
        run_stage(stage, cfg, storage, progress=progress)
    runs, rows = [], []
    for variant in variants:
        vcfg = variant_config(cfg, variant)
        pre = run_stage("pretrain", vcfg, storage, progress=progress)
        fin = run_stage("finetune", vcfg, storage, progress=progress)
        run = evaluate_run(storage, fin.manifest.key, vcfg.finetune, variant.name)
        runs.append(run)
        rows.append(
            {
                "variant": variant.name,
                "pretrain": {"key": pre.manifest.key, "status": pre.status},
                "finetune": {"key": fin.manifest.key, "status": fin.status},
                "scores": run.scores,
                "meta_sum": round(run.meta_sum, 4),
            }
        )
        log.info(
            "ablation %s: pretrain %s, finetune %s, Meta-Sum %.2f", variant.name, pre.status, fin.status, run.meta_sum
        )
    # the report lives with the runs it compares: its key is their keys
    key = sha256_json([[r["variant"], r["finetune"]["key"]] for r in rows])
    prefix = f"artifacts/ablation/{key}"
    pictures = report.pictures(runs, ablation=True)
    files = {
        "report.json": json.dumps(report.to_json(runs) | {"variants": rows}, indent=2).encode(),
        "report.md": report.to_markdown(runs).encode(),
        "report.html": report.to_html(runs, pictures).encode(),
        **pictures,
    }
    for name, data in files.items():
        storage.put(f"{prefix}/{name}", data)
    return {
        "flow": "ablation",
        "key": key,
        "report": f"{storage.uri}/{prefix}/report.md",
        "variants": rows,
        "pretrain_runs": sum(1 for r in rows if r["pretrain"]["status"] == "ran"),
    }
