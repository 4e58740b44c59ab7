"""The DAG as Prefect flows, derived from `pipeline.stages`: `full-pipeline` (every stage),
`corpus-rebuild` (the corpus stages, the scheduled deployment), `train` (the stages that train on the
corpus) and one `stage-<name>` flow per stage. Each stage is a task that calls the runner
(flows/tasks.py); each flow run publishes a Markdown artifact of what every stage did.

NOTE: not named pipeline.py: a Prefect runner puts this folder on sys.path, where a `pipeline`
module would shadow the `pipeline` package in worker processes."""

from __future__ import annotations

from typing import Any

from prefect import Flow, flow
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from contract.fingerprint import sha256_json
from flows.tasks import shard_group_task, stage_task
from pipeline.config import (
    ConfigParameter,
    OrchestrationConfig,
    PipelineConfig,
    config_document,
    config_from_parameter,
)
from pipeline.diff import diff_markdown, rebuild_diff
from pipeline.runner import shard_ids, storage_for
from pipeline.stages import CORPUS_STAGES, GPU_STAGES, STAGES, TRAIN_STAGES, get_stage

REPORTS = {"dedup": "report.md", "evaluate": "report.html"}


def run_stages(
    names: list[str] | tuple[str, ...], config: ConfigParameter, force: bool, title: str
) -> list[dict[str, Any]]:
    cfg = config_from_parameter(config)
    # the tasks (on Dask workers too) get the validated document: every task runs the same config
    document = config_document(cfg)
    results = []
    for name in names:
        # Sequential on purpose: a stage's key needs its inputs' content digests.
        if cfg.orchestration.fan_out > 1 and not force:
            fan_out(name, document, cfg)
        results.append(stage_task.with_options(name=name)(name, document, force))
    publish_summary(title, results, cfg.storage.uri, sha256_json(document))
    if any(r["stage"] == "dedup" and r["status"] == "ran" for r in results):
        diff = rebuild_diff(cfg, storage_for(cfg))
        create_markdown_artifact(
            key="uniter-corpus-diff",
            markdown=diff_markdown(diff),
            description="what this rebuild changed in the corpus, and what it reused",
        )
    return results


def task_runner(orch: OrchestrationConfig, workers: int):
    if orch.task_runner == "dask":
        from prefect_dask import DaskTaskRunner  # noqa: PLC0415 — dask loads only for runs that ask for it

        if orch.dask_address:
            return DaskTaskRunner(address=orch.dask_address)
        # threads in one worker process each: the stages start their own process pools
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": False})
    return ThreadPoolTaskRunner(max_workers=workers)


def fan_out(name: str, document: dict[str, Any], cfg: PipelineConfig) -> None:
    """A sharded stage's pending shards as `fan_out` parallel tasks; the stage task publishes after."""
    pending = shard_ids(name, cfg)
    if not pending:
        return
    n = min(cfg.orchestration.fan_out, len(pending))
    groups = [pending[i::n] for i in range(n)]
    with task_runner(cfg.orchestration, n) as runner:
        futures = [
            runner.submit(
                shard_group_task, parameters={"stage": name, "config": document, "shards": g, "count": len(g)}
            )
            for g in groups
        ]
        for future in futures:
            future.result()  # raises the first failure (after its retries)


def flat_counts(counts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Numeric counts, nested ones by dotted name (``reuse.fetched``: what a rebuild reused vs made)."""
    flat: dict[str, Any] = {}
    for k, v in counts.items():
        if isinstance(v, dict) and k != "failure_reasons":
            flat.update(flat_counts(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[prefix + k] = v
    return flat


def summary_markdown(title: str, results: list[dict[str, Any]], storage_uri: str, config_sha256: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"config sha256 `{config_sha256}`",
        "",
        "| stage | status | key | rows | seconds | built in (s) | counts |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        rows = sum(o.get("rows", 0) for o in r.get("outputs", []))
        counts = ", ".join(f"{k} {v}" for k, v in sorted(flat_counts(r.get("counts", {})).items()))
        lines.append(
            f"| {r['stage']} | {r['status']} | `{r['key'][:12]}` | {rows:,} | {r['seconds']:.1f} "
            f"| {r['built_seconds']:.1f} | {counts} |"
        )
    links = [
        f"- {r['stage']}: {storage_uri}/artifacts/{r['stage']}/{r['key']}/files/{REPORTS[r['stage']]}"
        for r in results
        if r["stage"] in REPORTS
    ]
    if links:
        lines += ["", "Reports:", *links]
    return "\n".join(lines) + "\n"


def publish_summary(title: str, results: list[dict[str, Any]], storage_uri: str, config_sha256: str) -> None:
    create_markdown_artifact(
        key="uniter-" + title.lower().replace(" ", "-").replace("_", "-"),
        markdown=summary_markdown(title, results, storage_uri, config_sha256),
        description=f"{title}: every stage's status, counts and timing",
    )


@flow(name="full-pipeline", log_prints=False)
def full_pipeline(config: ConfigParameter, force: bool = False, until: str | None = None) -> list[dict[str, Any]]:
    """Run every stage (or up to `until`); unchanged stages are cache hits, a change re-runs it and
    what reads it."""
    names = list(STAGES)
    if until is not None:
        get_stage(until)  # a clear error for an unknown name
        names = names[: names.index(until) + 1]
    return run_stages(names, config, force, "full pipeline")


@flow(name="corpus-rebuild", log_prints=False)
def corpus_rebuild(config: ConfigParameter, force: bool = False) -> list[dict[str, Any]]:
    """The pretraining corpus: ingest → crawl → dedup → extract (the scheduled deployment)."""
    return run_stages(CORPUS_STAGES, config, force, "corpus rebuild")


@flow(name="train", log_prints=False)
def train(config: ConfigParameter, force: bool = False) -> list[dict[str, Any]]:
    """Downstream features → pretrain → finetune → evaluate, on the corpus already built."""
    return run_stages(TRAIN_STAGES, config, force, "train")


def _stage_flow(name: str) -> Flow:
    def one_stage(config: ConfigParameter, force: bool = False) -> list[dict[str, Any]]:
        return run_stages([name], config, force, f"stage {name}")

    # NOTE: a deployment loads its flow by `module:qualname`; naming the function after the module
    # attribute it is stored under (stage_<name>) makes that entrypoint importable.
    one_stage.__name__ = one_stage.__qualname__ = f"stage_{name}"
    one_stage.__doc__ = f"The {name} stage alone (its inputs must be built)."
    return flow(name=f"stage-{name}", log_prints=False)(one_stage)


# One flow per stage, as module attributes (`flows/dag.py:stage_crawl` in prefect.yaml).
STAGE_FLOWS: dict[str, Flow] = {name: _stage_flow(name) for name in STAGES}
globals().update({f"stage_{name}": f for name, f in STAGE_FLOWS.items()})

# Every flow by its Prefect name, and the stages it runs.
ALL_FLOWS: dict[str, Flow] = {
    "full-pipeline": full_pipeline,
    "corpus-rebuild": corpus_rebuild,
    "train": train,
    **{f"stage-{n}": f for n, f in STAGE_FLOWS.items()},
}
FLOW_STAGES: dict[str, tuple[str, ...]] = {
    "full-pipeline": tuple(STAGES),
    "corpus-rebuild": CORPUS_STAGES,
    "train": TRAIN_STAGES,
    **{f"stage-{n}": (n,) for n in STAGES},
}
# The module attribute that holds each flow: its deployment entrypoint is `flows/dag.py:<attribute>`.
ENTRYPOINTS: dict[str, str] = {name: f.fn.__name__ for name, f in ALL_FLOWS.items()}
# Flows that run a GPU stage go to the GPU work pool when there is one.
GPU_FLOWS: frozenset[str] = frozenset(name for name, names in FLOW_STAGES.items() if GPU_STAGES.intersection(names))
