"""The whole DAG as one Prefect flow: each stage a cached task, in dependency order."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.stages import result_storage, stage_task_for
from pipeline.config import load_config
from pipeline.dag import STAGES, get_stage


@flow(name="full-pipeline", log_prints=False)
def full_pipeline(config_path: str, force: bool = False, until: str | None = None) -> list[dict[str, Any]]:
    """Run every stage (or up to `until`, e.g. "extract" to rebuild the pretraining corpus without
    training); unchanged stages are cache hits, a change re-runs it and what reads it."""
    names = list(STAGES)
    if until is not None:
        get_stage(until)  # a clear error for an unknown name
        names = names[: names.index(until) + 1]
    results_block = result_storage(load_config(config_path))
    results = []
    for name in names:
        # Sequential on purpose: a stage's key needs its inputs' content digests.
        state = stage_task_for(name, results_block, force)(name, config_path, force, return_state=True)
        summary = dict(state.result())
        if state.name == "Cached":  # Prefect answered from its cache: no stage code ran
            summary["status"] = "cached"
        results.append(summary)
    return results
