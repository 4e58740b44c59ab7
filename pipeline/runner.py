"""Run one stage: compute its content key, return the cached artifact or build (and resume) it."""

from __future__ import annotations

import functools
import logging
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from contract.artifact import Artifact, Manifest
from contract.configbase import InputFile, InputFolder, SectionConfig, redact_credentials
from contract.errors import MissingInputError
from contract.fingerprint import file_fingerprint, folder_fingerprint, sha256_json
from contract.lease import Lease
from contract.progress import NullProgress, Progress
from contract.reuse import ItemIndex
from contract.stage import Stage, StageContext
from pipeline.config import PipelineConfig
from pipeline.stages import STAGES, get_stage
from storage import Storage, StorageError, open_storage

log = logging.getLogger(__name__)


# Storages that passed their start-up check in this process (a failure is checked again next time).
_CHECKED: set[tuple[str, str | None]] = set()


def storage_for(cfg: PipelineConfig) -> Storage:
    """The configured storage, checked before any work: one that cannot be used stops the command
    with a message naming the config key, not a traceback from the first write."""
    storage = open_storage(cfg.storage.uri, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
    where = (cfg.storage.uri, cfg.storage.endpoint_url)
    if where in _CHECKED:  # once per process: callers ask for the storage per stage and per table
        return storage
    try:
        storage.check()
        _CHECKED.add(where)
    except StorageError as exc:
        endpoint = f" (storage.endpoint_url {cfg.storage.endpoint_url!r})" if cfg.storage.endpoint_url else ""
        message = f"storage.uri {cfg.storage.uri!r}{endpoint} cannot be used: {exc}"
        raise StorageError(redact_credentials(message)) from None  # an endpoint URL may hold user:password
    return storage


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Git sha of the checkout when there is one, else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        try:
            return f"uniter-pipeline {version('uniter-pipeline')}"
        except PackageNotFoundError:
            return "unknown"


def key_payload(value: Any, files: dict[str, str]) -> Any:
    """The config as it enters the cache key: input files stand for their content digest.
    ``files`` collects ``{"file:<path>": sha256}`` for the manifest's provenance."""
    if isinstance(value, InputFile) and value in type(value).KEYWORDS:
        return str(value)
    if isinstance(value, InputFile):
        digest = file_fingerprint(value)
        files[f"file:{value}"] = digest
        return {"sha256": digest}
    if isinstance(value, InputFolder):
        digest = folder_fingerprint(value)
        files[f"folder:{value}"] = digest
        return {"sha256": digest}
    if isinstance(value, BaseModel):
        skip = value.NOT_IN_KEY if isinstance(value, SectionConfig) else frozenset()
        return {name: key_payload(getattr(value, name), files) for name in type(value).model_fields if name not in skip}
    if isinstance(value, (list, tuple)):
        return [key_payload(v, files) for v in value]
    if isinstance(value, dict):
        return {str(k): key_payload(v, files) for k, v in value.items()}
    return to_jsonable_python(value)


@dataclass
class StagePlan:
    """What a stage would run on: its key, or the upstream stages still missing."""

    stage: Stage
    key: str | None
    config_sha256: str
    inputs: dict[str, str]
    input_manifests: dict[str, Manifest]
    missing: list[str] = field(default_factory=list)
    item_fingerprint: str | None = None  # stages that reuse items across keys (contract/reuse.py)


class Planner:
    """Computes keys for the whole DAG, reading each upstream manifest once."""

    def __init__(self, cfg: PipelineConfig, storage: Storage):
        self.cfg, self.storage = cfg, storage
        self._plans: dict[str, StagePlan] = {}
        self._manifests: dict[str, Manifest | None] = {}

    def plan(self, name: str) -> StagePlan:
        if name in self._plans:
            return self._plans[name]
        stage = get_stage(name)
        files: dict[str, str] = {}
        payload = key_payload(getattr(self.cfg, name, None), files)
        if stage.extra_config:
            payload = {
                "section": payload,
                "extra": {x: key_payload(getattr(self.cfg, x), files) for x in stage.extra_config},
            }
        config_sha = sha256_json(payload)
        inputs: dict[str, str] = {}
        manifests: dict[str, Manifest] = {}
        missing: list[str] = []
        for up in stage.inputs:
            manifest = self.manifest(up)
            if manifest is None:
                missing.append(up)
            else:
                manifests[up] = manifest
                inputs[up] = manifest.content_sha256
        key = None
        if not missing:
            # Content only: stage identity + config (files by digest) + upstream content digests.
            key = sha256_json({"stage": name, "version": stage.version, "config": config_sha, "inputs": inputs})
        item_fp = None
        if stage.reuse_ignores is not None:
            ignores = set(stage.reuse_ignores)
            sections = [payload["section"], *payload["extra"].values()] if stage.extra_config else [payload]
            kept = [{k: v for k, v in section.items() if k not in ignores} for section in sections]
            upstream = {up: self.plan(up).item_fingerprint for up in stage.reuse_inputs}
            version = stage.version if stage.item_version is None else stage.item_version
            body = {"stage": name, "version": version, "config": kept}
            item_fp = sha256_json({**body, "inputs": upstream} if upstream else body)[:32]
        plan = StagePlan(stage, key, config_sha, {**inputs, **files}, manifests, missing, item_fp)
        self._plans[name] = plan
        return plan

    def manifest(self, name: str) -> Manifest | None:
        """The complete artifact of ``name`` for the current config, if built."""
        if name not in self._manifests:
            plan = self.plan(name)
            self._manifests[name] = Artifact(self.storage, name, plan.key).manifest() if plan.key else None
        return self._manifests[name]


@dataclass
class StageRun:
    """The outcome of ``uniter run STAGE``; ``to_json`` is the ``--json`` contract."""

    stage: str
    status: str  # "ran" | "cached"
    manifest: Manifest
    seconds: float
    resumed_shards: int = 0

    def outputs(self, storage: Storage) -> list[dict[str, Any]]:
        art = Artifact(storage, self.stage, self.manifest.key)
        return [
            {
                "table": table,
                "uri": storage.url(f"{art.prefix}/{table}"),
                "sha256": self.manifest.table_sha256(table),
                "rows": self.manifest.rows(table),
                "files": len(files),
            }
            for table, files in sorted(self.manifest.tables.items())
        ]

    def to_json(self, storage: Storage) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "status": self.status,
            "key": self.manifest.key,
            "inputs": self.manifest.inputs,
            "outputs": self.outputs(storage),
            "counts": self.manifest.counts,
            "content_sha256": self.manifest.content_sha256,
            "resumed_shards": self.resumed_shards,
            "seconds": round(self.seconds, 3),  # this run's (≈ 0 when cached)
            "built_seconds": self.manifest.seconds,  # the run that built the artifact
        }


def missing_input_message(name: str, missing: list[str], config_path: str | None) -> str:
    cfg = f" -c {config_path}" if config_path else ""
    first = missing[0]
    return (
        f"stage '{name}' needs the output of '{first}' for this config, which is not built yet. "
        f"Run `uniter run {first}{cfg}` first (or `uniter run all{cfg}`)."
    )


def run_stage(
    name: str,
    cfg: PipelineConfig,
    storage: Storage | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    config_path: str | None = None,
    wait: bool = True,
) -> StageRun:
    """Run ``name`` and nothing else. Cached when its key already has a complete artifact.
    One run per stage and key builds at a time: another one holding the lease is waited for
    (``wait``) or reported (`LeaseHeld`)."""
    started = time.time()
    storage = storage or storage_for(cfg)
    plan = Planner(cfg, storage).plan(name)
    if plan.missing:
        raise MissingInputError(missing_input_message(name, plan.missing, config_path))
    art = Artifact(storage, name, plan.key)
    if not force and (manifest := art.manifest()) is not None:
        log.info("%s: cached (key %s…), nothing to do", name, plan.key[:12])
        return StageRun(name, "cached", manifest, time.time() - started)
    lease = Lease(storage, name, plan.key, ttl=cfg.storage.lease_seconds)
    lease.acquire(wait)
    try:
        if not force and (manifest := art.manifest()) is not None:  # the run we waited for built it
            log.info("%s: built by the run we waited for (key %s…)", name, plan.key[:12])
            return StageRun(name, "cached", manifest, time.time() - started)
        if force:
            art.clear()
        return _build(name, plan, cfg, storage, art, progress, force, started)
    except StorageError as exc:
        message = redact_credentials(str(exc).rstrip("."))
        raise StorageError(
            f"{name} stopped: {message}. Finished shards are kept; the next run resumes from them."
        ) from exc
    finally:
        lease.release()


def _build(
    name: str,
    plan: StagePlan,
    cfg: PipelineConfig,
    storage: Storage,
    art: Artifact,
    progress: Progress | None,
    force: bool,
    started: float,
) -> StageRun:
    ctx = _context(plan, cfg, storage, art, progress, reuse=not force)
    resumed = len(ctx.done)
    if resumed:
        log.info("%s: resuming, %d shards already done", name, resumed)
    plan.stage.run(ctx)
    if ctx.reuse is not None:
        ctx.reuse.seal(ctx.done)  # after every shard, before the manifest: only complete artifacts lend
    manifest = art.publish(
        stage_version=plan.stage.version,
        config_sha256=plan.config_sha256,
        inputs=plan.inputs,
        code_version=code_version(),
        shards=ctx.done,
        seconds=time.time() - started,
        summarize=plan.stage.summarize,
    )
    log.info("%s: published %s (%d shards, %d written now)", name, art.uri, len(ctx.done), ctx.written)
    return StageRun(name, "ran", manifest, time.time() - started, resumed_shards=resumed)


def _context(
    plan: StagePlan,
    cfg: PipelineConfig,
    storage: Storage,
    art: Artifact,
    progress: Progress | None,
    selection: frozenset[str] | None = None,
    reuse: bool = True,
) -> StageContext:
    index = None
    if plan.item_fingerprint is not None:
        index = ItemIndex(storage, plan.stage.name, plan.item_fingerprint, current=art.key, lend=reuse)
    return StageContext(
        stage=plan.stage,
        config=getattr(cfg, plan.stage.name, None),
        storage=storage,
        output=art,
        inputs=plan.input_manifests,
        run_id=uuid.uuid4().hex,
        progress=progress or NullProgress(),
        extra={x: getattr(cfg, x) for x in plan.stage.extra_config},
        done=art.done_shards(),
        selection=selection,
        reuse=index,
    )


def shard_ids(name: str, cfg: PipelineConfig, storage: Storage | None = None) -> list[str]:
    """The shards a run of `name` would still write ([] when it is complete or not sharded)."""
    storage = storage or storage_for(cfg)
    plan = Planner(cfg, storage).plan(name)
    if plan.missing or plan.stage.shard_ids is None:
        return []
    art = Artifact(storage, name, plan.key)
    if art.manifest() is not None:
        return []
    ctx = _context(plan, cfg, storage, art, None)
    return [s for s in plan.stage.shard_ids(ctx) if not ctx.shard_done(s)]


def run_shards(name: str, cfg: PipelineConfig, shards: list[str], storage: Storage | None = None) -> int:
    """Write these shards of `name` (those not done yet) without publishing the artifact: a share of
    a fanned-out stage. Returns how many were written; `run_stage` publishes once all are done."""
    storage = storage or storage_for(cfg)
    plan = Planner(cfg, storage).plan(name)
    if plan.missing:
        raise MissingInputError(missing_input_message(name, plan.missing, None))
    art = Artifact(storage, name, plan.key)
    if art.manifest() is not None:
        return 0
    # Two flows fanning out the same stage split it into the same groups: one lease per group.
    lease = Lease(
        storage, name, plan.key, scope=f"shards-{sha256_json(sorted(shards))[:16]}", ttl=cfg.storage.lease_seconds
    )
    lease.acquire(wait=True)
    try:
        ctx = _context(plan, cfg, storage, art, None, frozenset(shards))
        plan.stage.run(ctx)
        return ctx.written
    finally:
        lease.release()


def stage_status(cfg: PipelineConfig, storage: Storage | None = None) -> list[dict[str, Any]]:
    """Per stage: complete / partial (n shards) / missing / blocked (an input is not built)."""
    storage = storage or storage_for(cfg)
    planner = Planner(cfg, storage)
    rows = []
    for name in STAGES:
        plan = planner.plan(name)
        row: dict[str, Any] = {"stage": name, "key": plan.key}
        if plan.missing:
            row.update(status="blocked", needs=plan.missing)
        elif (manifest := planner.manifest(name)) is not None:
            row.update(status="complete", shards=manifest.shards, rows={t: manifest.rows(t) for t in manifest.tables})
        else:
            done = Artifact(storage, name, plan.key).done_shards()
            row.update(status="partial" if done else "missing", shards=len(done))
        rows.append(row)
    return rows


def catalog_tables(cfg: PipelineConfig, storage: Storage) -> dict[str, list[str]]:
    """``{table: [parquet keys]}`` of every stage whose current artifact is complete."""
    planner = Planner(cfg, storage)
    tables: dict[str, list[str]] = {}
    for name in STAGES:
        manifest = planner.manifest(name)
        if manifest is None:
            continue
        art = Artifact(storage, name, manifest.key)
        for table, files in manifest.tables.items():
            tables[table] = [art.file_key(f.path) for f in files]
    return tables
