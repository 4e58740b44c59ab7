"""Each stage as a Prefect task whose cache key is the stage's content key.

The task's result record is stored inside the artifact folder it describes, so Prefect's cache
and the artifacts cannot disagree: removing an artifact removes its cache entry too.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from flows.results import PipelineStorage
from pipeline.artifact import Artifact
from pipeline.config import PipelineConfig, load_config
from pipeline.fingerprint import sha256_json
from pipeline.runner import Planner, run_stage, storage_for

RESULT_NAME = "_prefect_result.json"


def result_storage(cfg: PipelineConfig) -> PipelineStorage:
    """The result-storage block for this config's storage, saved on the Prefect server
    (Prefect requires it; the block holds the URI and endpoint only, no credentials)."""
    block = PipelineStorage(uri=cfg.storage.uri, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
    name = "uniter-" + sha256_json([block.uri, block.endpoint_url, block.region])[:16]
    block.save(name, overwrite=True)
    return block


def stage_cache_key(_ctx: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """``artifacts/<stage>/<content key>/_prefect_result.json``; no key (no caching) while an
    input is missing, so the task runs and fails with the stage's own clear message."""
    cfg = load_config(parameters["config_path"])
    plan = Planner(cfg, storage_for(cfg)).plan(parameters["stage"])
    if plan.key is None:
        return None
    return f"{Artifact(storage_for(cfg), plan.stage.name, plan.key).prefix}/{RESULT_NAME}"


@task(
    name="stage",
    task_run_name="{stage}",
    cache_key_fn=stage_cache_key,
    persist_result=True,
    result_serializer="json",
)
def stage_task(stage: str, config_path: str, force: bool = False) -> dict[str, Any]:
    """Run one stage in-process; returns the ``--json`` summary (URIs and digests, never data)."""
    cfg = load_config(config_path)
    storage = storage_for(cfg)
    result = run_stage(stage, cfg, storage, force=force, config_path=config_path)
    get_run_logger().info("%s: %s (key %s…)", stage, result.status, result.manifest.key[:12])
    return result.to_json(storage)


def transient(_task, _task_run, state) -> bool:
    """Retry a stage that failed on the network or the object store; never one that failed on its
    config or input data (a retry would fail the same way). Stages resume, so a retry redoes
    only the unfinished shards."""
    from pipeline.errors import UniterError

    exc = getattr(state, "data", None)
    return isinstance(exc, Exception) and not isinstance(exc, UniterError)


def stage_task_for(stage: str, results: PipelineStorage, force: bool):
    """The task for one stage, with results on the pipeline's storage, the --force choice, and
    retries with backoff (10 s, then 60 s) on transient failures."""
    return stage_task.with_options(name=stage, result_storage=results, refresh_cache=force, retries=2,
                                   retry_delay_seconds=[10, 60], retry_condition_fn=transient)
