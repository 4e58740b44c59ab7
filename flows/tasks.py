"""Each stage as a Prefect task that calls the runner.

One cache: the runner's content key decides whether a stage runs (a complete artifact under its key
means "cached"), so the task keeps no cache of its own and no result records — Prefect contributes
retries, logs, the UI and the fan-out, never a second opinion on what is up to date.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from contract.errors import UniterError
from pipeline.config import ConfigParameter, config_from_parameter
from pipeline.runner import run_shards, run_stage, storage_for


def transient(_task, _task_run, state) -> bool:
    """Retry a stage that failed on the network or the object store; never one that failed on its
    config or input data (a retry would fail the same way). Stages resume, so a retry redoes
    only the unfinished shards."""
    exc = getattr(state, "data", None)
    return isinstance(exc, Exception) and not isinstance(exc, UniterError)


# Retries with backoff (10 s, then 60 s) on transient failures.
RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": transient}


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, **RETRIES)
def stage_task(stage: str, config: ConfigParameter, force: bool = False) -> dict[str, Any]:
    """Run one stage in-process; returns the ``--json`` summary (URIs and digests, never data)."""
    cfg = config_from_parameter(config)
    storage = storage_for(cfg)
    result = run_stage(stage, cfg, storage, force=force)
    get_run_logger().info("%s: %s (key %s…)", stage, result.status, result.manifest.key[:12])
    return result.to_json(storage)


@task(name="shards", task_run_name="{stage} × {count}", cache_policy=NO_CACHE, **RETRIES)
def shard_group_task(stage: str, config: ConfigParameter, shards: list[str], count: int) -> int:
    """Write one group of a sharded stage's shards (resumable: done shards are skipped)."""
    return run_shards(stage, config_from_parameter(config), shards)
