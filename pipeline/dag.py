"""The DAG of stages. Adding a stage = one domain module with a `Stage` + one line here + one flow."""

from __future__ import annotations

from corpus.crawl.stage import CRAWL
from corpus.dedup.stage import DEDUP
from corpus.ingest.stage import INGEST
from feature_extraction.downstream import DOWNSTREAM
from feature_extraction.stage import EXTRACT
from uniter.finetune.evaluate import EVALUATE
from uniter.finetune.stage import FINETUNE
from uniter.pretrain.stage import PRETRAIN
from pipeline.stage import Stage

# In dependency order: every stage comes after the stages it reads.
STAGES: dict[str, Stage] = {s.name: s for s in (INGEST, CRAWL, DEDUP, EXTRACT, DOWNSTREAM, PRETRAIN, FINETUNE, EVALUATE)}


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


def check_dag(stages: dict[str, Stage]) -> None:
    """Inputs come first; table names are unique (they are the catalog's view names)."""
    seen: set[str] = set()
    tables: dict[str, str] = {}
    for stage in stages.values():
        unknown = [i for i in stage.inputs if i not in seen]
        if unknown:
            raise ValueError(f"stage {stage.name} reads {unknown}, which are not listed before it")
        for table in stage.tables:
            if table in tables:
                raise ValueError(f"table {table!r} of stage {stage.name} is already a table of {tables[table]}")
            tables[table] = stage.name
        seen.add(stage.name)


check_dag(STAGES)
