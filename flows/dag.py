"""The DAG as Prefect flows (NOTE: not named pipeline.py: a Prefect runner puts this folder on
sys.path, where a `pipeline` module would shadow the `pipeline` package in worker processes): `full_pipeline` (every stage), `corpus_rebuild` (ingest → extract),
`train` (downstream → evaluate) and one flow per stage (`stage-<name>`). Each stage is a cached
task (flows/stages.py); each flow run publishes a Markdown artifact of what every stage did."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.stages import result_storage, stage_task_for, transient
from pipeline.config import OrchestrationConfig, PipelineConfig, load_config
from pipeline.dag import STAGES, get_stage
from pipeline.runner import run_shards, shard_ids

CORPUS_STAGES = ("ingest", "crawl", "dedup", "extract")
TRAIN_STAGES = ("downstream", "pretrain", "finetune", "evaluate")
REPORTS = {"dedup": "report.md", "evaluate": "report.html"}


def run_stages(names: list[str] | tuple[str, ...], config_path: str, force: bool, title: str) -> list[dict[str, Any]]:
    cfg = load_config(config_path)
    results_block = result_storage(cfg)
    results = []
    for name in names:
        # Sequential on purpose: a stage's key needs its inputs' content digests.
        if cfg.orchestration.fan_out > 1 and not force:
            fan_out(name, config_path, cfg)
        state = stage_task_for(name, results_block, force)(name, config_path, force, return_state=True)
        summary = dict(state.result())
        if state.name == "Cached":  # Prefect answered from its cache: no stage code ran
            summary["status"] = "cached"
        results.append(summary)
    publish_summary(title, results, cfg.storage.uri)
    return results


@task(name="shards", task_run_name="{stage} × {count}", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=transient)
def shard_group_task(stage: str, config_path: str, shards: list[str], count: int) -> int:
    """Write one group of a sharded stage's shards (resumable: done shards are skipped)."""
    return run_shards(stage, load_config(config_path), shards)


def task_runner(orch: OrchestrationConfig, workers: int):
    if orch.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orch.dask_address:
            return DaskTaskRunner(address=orch.dask_address)
        # threads in one worker process each: the stages start their own process pools
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": False})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers)


def fan_out(name: str, config_path: str, cfg: PipelineConfig) -> None:
    """A sharded stage's pending shards as `fan_out` parallel tasks; the stage task publishes after."""
    pending = shard_ids(name, cfg)
    if not pending:
        return
    n = min(cfg.orchestration.fan_out, len(pending))
    groups = [pending[i::n] for i in range(n)]
    with task_runner(cfg.orchestration, n) as runner:
        futures = [runner.submit(shard_group_task, parameters={"stage": name, "config_path": config_path, "shards": g,
                                                               "count": len(g)}) for g in groups]
        for future in futures:
            future.result()  # raises the first failure (after its retries)


def summary_markdown(title: str, results: list[dict[str, Any]], storage_uri: str) -> str:
    lines = [f"# {title}", "", "| stage | status | key | rows | seconds | counts |", "|---|---|---|---:|---:|---|"]
    for r in results:
        rows = sum(o.get("rows", 0) for o in r.get("outputs", []))
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.get("counts", {}).items()) if isinstance(v, (int, float)))
        lines.append(f"| {r['stage']} | {r['status']} | `{r['key'][:12]}` | {rows:,} | {r.get('seconds', 0):.1f} | {counts} |")
    links = [f"- {r['stage']}: {storage_uri}/artifacts/{r['stage']}/{r['key']}/files/{REPORTS[r['stage']]}"
             for r in results if r["stage"] in REPORTS]
    if links:
        lines += ["", "Reports:", *links]
    return "\n".join(lines) + "\n"


def publish_summary(title: str, results: list[dict[str, Any]], storage_uri: str) -> None:
    create_markdown_artifact(key="uniter-" + title.lower().replace(" ", "-").replace("_", "-"),
                             markdown=summary_markdown(title, results, storage_uri),
                             description=f"{title}: every stage's status, counts and timing")


@flow(name="full-pipeline", log_prints=False)
def full_pipeline(config_path: str, force: bool = False, until: str | None = None) -> list[dict[str, Any]]:
    """Run every stage (or up to `until`); unchanged stages are cache hits, a change re-runs it and
    what reads it."""
    names = list(STAGES)
    if until is not None:
        get_stage(until)  # a clear error for an unknown name
        names = names[: names.index(until) + 1]
    return run_stages(names, config_path, force, "full pipeline")


@flow(name="corpus-rebuild", log_prints=False)
def corpus_rebuild(config_path: str, force: bool = False) -> list[dict[str, Any]]:
    """The pretraining corpus: ingest → crawl → dedup → extract (the scheduled deployment)."""
    return run_stages(CORPUS_STAGES, config_path, force, "corpus rebuild")


@flow(name="train", log_prints=False)
def train(config_path: str, force: bool = False) -> list[dict[str, Any]]:
    """Downstream features → pretrain → finetune → evaluate, on the corpus already built."""
    return run_stages(TRAIN_STAGES, config_path, force, "train")


def _stage_flow(name: str):
    @flow(name=f"stage-{name}", log_prints=False)
    def one_stage(config_path: str, force: bool = False) -> list[dict[str, Any]]:
        return run_stages([name], config_path, force, f"stage {name}")

    one_stage.__doc__ = f"The {name} stage alone (its inputs must be built)."
    return one_stage


# One flow per stage, as module attributes (`flows/dag.py:stage_crawl` in prefect.yaml).
STAGE_FLOWS = {name: _stage_flow(name) for name in STAGES}
globals().update({f"stage_{name}": f for name, f in STAGE_FLOWS.items()})
ALL_FLOWS = {"full-pipeline": full_pipeline, "corpus-rebuild": corpus_rebuild, "train": train,
             **{f"stage-{n}": f for n, f in STAGE_FLOWS.items()}}
