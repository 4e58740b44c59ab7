"""The import graph, read from the source (ast, not runtime): three layers, arrows only downward.

- contract layer: `storage/` (nothing of ours) and `contract/` (storage only): knows no stage;
- stage packages: `corpus/`, `feature_extraction/`, `uniter/`: the contract layer and libraries only;
  inside a package, one stage's code never imports another stage's (they meet in artifacts);
- composition: `pipeline/` (config, stage list, runner) ← `flows/` (Prefect) ← `cli/` (`uniter`).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each top-level package may import packages of a lower rank only (or itself).
RANK = {
    "storage": 0,
    "contract": 1,
    "corpus": 2,
    "feature_extraction": 2,
    "uniter": 2,
    "pipeline": 3,
    "flows": 4,
    "cli": 5,
}
# Which stage a module belongs to (the longest matching prefix; None: shared by the package's stages).
# Outside the composition layer, a module may import another stage's module only if it is that stage.
STAGE_MODULES: dict[str, str | None] = {
    "corpus.ingest": "ingest",
    "corpus.crawl": "crawl",
    "corpus.dedup": "dedup",
    "feature_extraction.stage": "extract",
    "feature_extraction.downstream": "downstream",
    "uniter.pretrain": "pretrain",
    "uniter.finetune": "finetune",
    "uniter.finetune.evaluate": "evaluate",
    "uniter.finetune.tasks": None,  # each task's data, metric and report column: fine-tuning and evaluation
    "uniter.finetune.config": None,
    "uniter.finetune.report": None,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (function bodies included)."""
    found: set[str] = set()
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            for alias in node.names:  # `from pkg import module` names the module, else the package
                sub = f"{module}.{alias.name}"
                found.add(sub if is_module(sub) else module)
    return found


def project_imports() -> dict[str, set[str]]:
    """Module → the project modules it imports."""
    graph: dict[str, set[str]] = {}
    for package in RANK:
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[module_name(path)] = {m for m in imports(path) if m.split(".")[0] in RANK}
    return graph


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        edges[module.split(".")[0]].update(t.split(".")[0] for t in targets if t.split(".")[0] != module.split(".")[0])
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def stage_of(module: str) -> str | None:
    matches = [p for p in STAGE_MODULES if module == p or module.startswith(p + ".")]
    return STAGE_MODULES[max(matches, key=len)] if matches else None


def test_no_cycle_between_top_level_packages():
    assert find_cycle(package_graph(project_imports())) is None


def test_imports_point_down_only():
    wrong = [
        f"{module} imports {target}"
        for module, targets in project_imports().items()
        for target in targets
        if RANK[target.split(".")[0]] > RANK[module.split(".")[0]]
        or (RANK[target.split(".")[0]] == RANK[module.split(".")[0]] and target.split(".")[0] != module.split(".")[0])
    ]
    assert not wrong, "\n".join(wrong)


def test_the_contract_layer_knows_no_stage():
    stage_packages = {p for p, r in RANK.items() if r == RANK["corpus"]}
    wrong = [
        f"{m} imports {t}"
        for m, ts in project_imports().items()
        for t in ts
        if RANK[m.split(".")[0]] < RANK["corpus"] and t.split(".")[0] in stage_packages
    ]
    assert not wrong, "\n".join(wrong)


def test_stages_meet_only_in_artifacts():
    wrong = [
        f"{m} ({stage_of(m) or 'shared'}) imports {t} ({stage_of(t)})"
        for m, ts in project_imports().items()
        for t in ts
        if RANK[m.split(".")[0]] < RANK["pipeline"] and stage_of(t) and stage_of(m) != stage_of(t)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checks_catch_what_they_forbid():
    """The rules above on a made-up graph with one wrong arrow of each kind (so they can fail)."""
    assert find_cycle({"pipeline": {"flows"}, "flows": {"pipeline"}}) == ["flows", "pipeline", "flows"]
    assert find_cycle({"cli": {"flows"}, "flows": {"pipeline"}}) is None
    assert stage_of("corpus.dedup.stage") == "dedup" and stage_of("corpus.crawl.fetch") == "crawl"
    assert stage_of("corpus.images") is None and stage_of("uniter.runtime") is None
    assert stage_of("uniter.finetune.evaluate") == "evaluate" and stage_of("uniter.finetune.tasks.vqa") is None
    assert imports(Path(__file__)) >= {"ast", "collections", "pathlib"} and is_module("contract.stage")


# Libraries a command that only reads the DAG must not import: each costs seconds and hundreds of
# MB at start-up (issue 15: `uniter status`, `uniter sql`, a corpus stage start in about 2 s);
# matplotlib is imported only by the functions that draw (uniter/plots.py).
HEAVY = ("torch", "deepspeed", "detectron2", "transformers", "prefect", "matplotlib")


def test_the_cli_and_the_corpus_stages_start_without_heavy_libraries():
    import subprocess
    import sys

    code = (
        "import sys, cli.main, pipeline.runner, pipeline.stages, pipeline.gc, "
        "corpus.ingest.stage, corpus.crawl.stage, corpus.dedup.stage; "
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"imported at start-up: {done.stdout}"


def test_every_deferred_stage_function_exists():
    """A stage's work is named by a string (contract.stage.Deferred): a typo must fail here, not
    when the stage first runs."""
    import importlib
    from dataclasses import fields

    from contract.stage import Deferred
    from pipeline.stages import STAGES

    named = [(s.name, getattr(s, f.name)) for s in STAGES.values() for f in fields(s)]
    deferred = [(stage, d.target) for stage, d in named if isinstance(d, Deferred)]
    assert {stage for stage, _ in deferred} >= {"extract", "downstream", "pretrain", "finetune", "evaluate"}
    for stage, target in deferred:
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name, None)), (stage, target)
