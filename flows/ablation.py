"""The ablation as a Prefect flow: a thin wrapper over `pipeline.ablation.run_ablation`."""

from __future__ import annotations

from typing import Any

from prefect import flow

from pipeline.ablation import run_ablation
from pipeline.config import ConfigParameter, config_from_parameter


@flow(name="ablation", log_prints=False)
def ablation(config: ConfigParameter) -> dict[str, Any]:
    """Pretrain each variant (shared keys train once), fine-tune each, one Meta-Sum table."""
    return run_ablation(config_from_parameter(config))
