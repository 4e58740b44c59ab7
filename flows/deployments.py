"""Deployments of every flow: served from one process (`uniter serve`), registered to a work pool
(`uniter deploy`), and triggered by name (`uniter run STAGE --deployment`)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow as prefect_flow
from prefect import serve as prefect_serve
from prefect.deployments import run_deployment
from prefect.schedules import Cron, Interval

from flows.dag import ALL_FLOWS, ENTRYPOINTS, GPU_FLOWS
from pipeline.config import PipelineConfig, config_document

ROOT = Path(__file__).resolve().parents[1]
SCHEDULED_FLOW = "corpus-rebuild"


def schedule_kwargs(cfg: PipelineConfig, flow_name: str, interval: float | None) -> dict[str, Any]:
    """Only corpus-rebuild is scheduled: the config's cron (in its timezone), or an interval
    (seconds) instead."""
    if flow_name != SCHEDULED_FLOW:
        return {}
    if interval:
        return {"schedule": Interval(timedelta(seconds=interval))}
    return {"schedule": Cron(cfg.orchestration.corpus_rebuild_cron, timezone=cfg.orchestration.timezone)}


def runner_deployments(cfg: PipelineConfig, interval: float | None = None) -> list:
    params = {"config": config_document(cfg)}
    return [
        f.to_deployment(
            name=cfg.orchestration.deployment_name, parameters=params, **schedule_kwargs(cfg, name, interval)
        )
        for name, f in ALL_FLOWS.items()
    ]


def serve(cfg: PipelineConfig, interval: float | None = None) -> None:
    """Serve every deployment from this process until interrupted (no work pool, no worker)."""
    prefect_serve(*runner_deployments(cfg, interval), print_starting_message=False)


def deploy(cfg: PipelineConfig, pool: str, interval: float | None = None, gpu_pool: str | None = None) -> list[str]:
    """Register every deployment to `pool` (a process work pool; `prefect worker start -p POOL`
    runs them from this checkout); with `gpu_pool`, the flows that train go there instead."""
    params = {"config": config_document(cfg)}
    ids = []
    for name, attr in ENTRYPOINTS.items():
        remote = prefect_flow.from_source(source=str(ROOT), entrypoint=f"flows/dag.py:{attr}")
        target = gpu_pool if gpu_pool and name in GPU_FLOWS else pool
        deployment_id = remote.deploy(
            name=cfg.orchestration.deployment_name,
            work_pool_name=target,
            parameters=params,
            print_next_steps=False,
            ignore_warnings=True,  # its advice is printed on stdout, which `--json` keeps for one JSON object
            **schedule_kwargs(cfg, name, interval),
        )
        ids.append(str(deployment_id))
    return ids


def trigger(flow_name: str, cfg: PipelineConfig, force: bool = False):
    """Run `flow_name`'s deployment with this config (the file as read here, overrides applied) on the
    server and wait for its end; the final flow run."""
    params = {"config": config_document(cfg), "force": force}
    return run_deployment(name=f"{flow_name}/{cfg.orchestration.deployment_name}", parameters=params, timeout=None)
