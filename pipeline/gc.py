"""`uniter gc`: remove artifacts no current key needs, never a file a kept artifact points to.

Kept:
- every artifact whose key is current for one of the given configs (built or being built);
- the `keep` newest complete artifacts of each stage (a rollback, and lenders for the next rebuild);
- an artifact being built (its lease is live);
- and, to a fixed point, every artifact a kept one points to: a manifest names each upstream input
  by content digest, and a downstream table may address the upstream's files (dedup's
  `corpus_images.crawl_file` points into the crawl artifact; extract reads those bytes).

Each removed artifact is first forgotten as a reuse source (its seal, then its index files: no
rebuild starts copying from it), then removed manifest first (readers stop seeing it at once),
then its lease files (and a dedup artifact's corpus diff). Reuse-index entries whose artifact no
longer exists are removed too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from contract.artifact import ARTIFACTS, Artifact, Manifest
from contract.lease import LEASES, alive
from contract.reuse import INDEX, SEALED, remove_sources
from pipeline.config import PipelineConfig
from pipeline.diff import REPORTS as DIFF_REPORTS
from pipeline.stages import STAGES
from storage import Storage, StorageError


@dataclass
class Found:
    stage: str
    key: str
    manifest: Manifest | None
    objects: int

    @property
    def created(self) -> str:
        return self.manifest.created_at if self.manifest else ""


@dataclass
class GcPlan:
    kept: list[Found] = field(default_factory=list)
    removed: list[Found] = field(default_factory=list)
    orphan_index: list[str] = field(default_factory=list)  # index/<stage>/<fp>/<key> without an artifact

    def to_json(self, dry_run: bool) -> dict:
        def rows(items: list[Found]) -> list[dict]:
            return [{"stage": f.stage, "key": f.key, "complete": f.manifest is not None, "objects": f.objects}
                    for f in items]  # fmt: skip

        return {
            "dry_run": dry_run,
            "kept": rows(self.kept),
            "removed": rows(self.removed),
            "orphan_index_entries": len(self.orphan_index),
        }


def current_keys(configs: list[PipelineConfig], storage: Storage) -> dict[str, set[str]]:
    from pipeline.runner import Planner  # noqa: PLC0415 — the runner imports the stage packages (seconds)

    keys: dict[str, set[str]] = {}
    for cfg in configs:
        planner = Planner(cfg, storage)
        for name in STAGES:
            if (key := planner.plan(name).key) is not None:
                keys.setdefault(name, set()).add(key)
    return keys


def find_artifacts(storage: Storage) -> list[Found]:
    counts: dict[tuple[str, str], int] = {}
    for path in storage.list(ARTIFACTS):
        parts = path.split("/")
        if len(parts) >= 4:
            counts[(parts[1], parts[2])] = counts.get((parts[1], parts[2]), 0) + 1
    found = []
    for (stage, key), n in sorted(counts.items()):
        try:
            manifest = Artifact(storage, stage, key).manifest()
        except StorageError:
            manifest = None  # unreadable: treated as an unfinished artifact
        found.append(Found(stage, key, manifest, n))
    return found


def plan_gc(storage: Storage, current: dict[str, set[str]], keep: int) -> GcPlan:
    found = find_artifacts(storage)
    kept: set[tuple[str, str]] = set()
    by_stage: dict[str, list[Found]] = {}
    for f in found:
        by_stage.setdefault(f.stage, []).append(f)
        if f.key in current.get(f.stage, set()) or (f.manifest is None and _building(storage, f)):
            kept.add((f.stage, f.key))
    for items in by_stage.values():
        complete = sorted((f for f in items if f.manifest is not None), key=lambda f: f.created, reverse=True)
        kept.update((f.stage, f.key) for f in complete[:keep])
    # What kept artifacts point to, to a fixed point: upstream inputs by content digest.
    by_content = {(f.stage, f.manifest.content_sha256): f for f in found if f.manifest is not None}
    todo = [f for f in found if (f.stage, f.key) in kept]
    while todo:
        f = todo.pop()
        for name, digest in (f.manifest.inputs if f.manifest else {}).items():
            up = by_content.get((name, digest))
            if up is not None and (up.stage, up.key) not in kept:
                kept.add((up.stage, up.key))
                todo.append(up)
    plan = GcPlan()
    for f in found:
        (plan.kept if (f.stage, f.key) in kept else plan.removed).append(f)
    existing = {(f.stage, f.key) for f in found}
    removed = {(f.stage, f.key) for f in plan.removed}
    for path in storage.list(INDEX):
        parts = path.split("/")  # index/<stage>/<fp>/<key or _sealed>/<file>
        if len(parts) != 5:
            continue
        pair = (parts[1], parts[4].removesuffix(".json") if parts[3] == SEALED else parts[3])
        if pair not in existing and pair not in removed and not _building(storage, Found(*pair, None, 0)):
            plan.orphan_index.append(path)
    return plan


def _building(storage: Storage, f: Found) -> bool:
    """Whether a live run holds a lease on this unfinished artifact."""
    for path in storage.list(f"{LEASES}/{f.stage}/{f.key}"):
        try:
            body = json.loads(storage.read_bytes(path))
        except (ValueError, StorageError):
            continue
        if not body.get("released") and body.get("expires", 0) > time.time() and alive(body):
            return True
    return False


def collect(storage: Storage, configs: list[PipelineConfig], keep: int, dry_run: bool = False) -> dict:
    plan = plan_gc(storage, current_keys(configs, storage), keep)
    if not dry_run:
        by_stage: dict[str, list[str]] = {}
        for f in plan.removed:
            by_stage.setdefault(f.stage, []).append(f.key)
        for stage, keys in by_stage.items():
            remove_sources(storage, stage, keys)  # no rebuild starts copying from what goes next
        for f in plan.removed:
            Artifact(storage, f.stage, f.key).clear()
            storage.remove(f"{LEASES}/{f.stage}/{f.key}")
            if f.stage == "dedup":  # its corpus diff (pipeline/diff.py)
                for ext in ("json", "md"):
                    storage.remove(f"{DIFF_REPORTS}/{f.key}.{ext}")
        for path in plan.orphan_index:
            storage.remove(path)
    return plan.to_json(dry_run)
