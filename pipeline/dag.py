"""The DAG of stages. Adding a stage = one domain module with a `Stage` + one line here + one flow."""

from __future__ import annotations

from corpus.ingest.stage import INGEST
from pipeline.stage import Stage

# In dependency order: every stage comes after the stages it reads.
STAGES: dict[str, Stage] = {s.name: s for s in (INGEST,)}


def get_stage(name: str) -> Stage:
    from pipeline.errors import UniterError

    if name not in STAGES:
        raise UniterError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)} (or 'all')")
    return STAGES[name]


def downstream(name: str) -> list[str]:
    """Stages that (transitively) read ``name``'s artifact, in DAG order."""
    affected = {name}
    for stage in STAGES.values():
        if affected.intersection(stage.inputs):
            affected.add(stage.name)
    return [s for s in STAGES if s in affected and s != name]


def _check_order() -> None:
    seen: set[str] = set()
    for stage in STAGES.values():
        unknown = [i for i in stage.inputs if i not in seen]
        assert not unknown, f"stage {stage.name} reads {unknown} which are not listed before it"
        seen.add(stage.name)


_check_order()
