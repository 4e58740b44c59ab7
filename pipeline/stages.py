"""The list of stages — written here once. The runner, the CLI, the Prefect flows, their deployments,
`prefect.yaml` (checked by a test) and the ablation all derive from it.

Adding a stage = one domain module with a `Stage` + one `StageEntry` line below."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from contract.errors import UniterError
from contract.stage import Stage
from corpus.crawl.stage import CRAWL
from corpus.dedup.stage import DEDUP
from corpus.ingest.stage import INGEST
from feature_extraction.stages import DOWNSTREAM, EXTRACT
from uniter.stages import EVALUATE, FINETUNE, PRETRAIN


@dataclass(frozen=True)
class StageEntry:
    stage: Stage
    group: Literal["corpus", "train"]  # corpus: the scheduled corpus rebuild; train: what trains on it
    gpu: bool = False  # its deployment goes to the GPU work pool


# In dependency order: every stage comes after the stages it reads.
ENTRIES: tuple[StageEntry, ...] = (
    StageEntry(INGEST, "corpus"),
    StageEntry(CRAWL, "corpus"),
    StageEntry(DEDUP, "corpus"),
    StageEntry(EXTRACT, "corpus"),
    StageEntry(DOWNSTREAM, "train", gpu=True),
    StageEntry(PRETRAIN, "train", gpu=True),
    StageEntry(FINETUNE, "train", gpu=True),
    StageEntry(EVALUATE, "train"),
)

STAGES: dict[str, Stage] = {e.stage.name: e.stage for e in ENTRIES}
CORPUS_STAGES: tuple[str, ...] = tuple(e.stage.name for e in ENTRIES if e.group == "corpus")
TRAIN_STAGES: tuple[str, ...] = tuple(e.stage.name for e in ENTRIES if e.group == "train")
GPU_STAGES: frozenset[str] = frozenset(e.stage.name for e in ENTRIES if e.gpu)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise UniterError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)} (or 'all')")
    return STAGES[name]


def dependents(name: str) -> list[str]:
    """Stages that (transitively) read ``name``'s artifact, in DAG order."""
    affected = {name}
    for stage in STAGES.values():
        if affected.intersection(stage.inputs):
            affected.add(stage.name)
    return [s for s in STAGES if s in affected and s != name]


def ancestors(name: str) -> list[str]:
    """Stages whose artifacts ``name`` (transitively) reads, in DAG order."""
    needed = set(get_stage(name).inputs)
    for stage in reversed(STAGES.values()):
        if stage.name in needed:
            needed.update(stage.inputs)
    return [s for s in STAGES if s in needed]


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
