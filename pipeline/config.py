"""The pipeline config: one YAML file, validated before any work starts."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from contract.configbase import StorageUri, StrictModel
from contract.errors import ConfigError
from corpus.crawl.config import CrawlConfig
from corpus.dedup.config import DedupConfig
from corpus.ingest.config import IngestConfig
from feature_extraction.config import DownstreamConfig, ExtractConfig
from uniter.finetune.config import AblationConfig, FinetuneConfig
from uniter.pretrain.config import PretrainConfig


class StorageConfig(StrictModel):
    """Where artifacts live. Credentials are never read from here: S3 uses boto3's standard chain
    (environment, ~/.aws, instance role)."""

    uri: StorageUri = StorageUri("./data")
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+/?$")  # any S3-compatible server
    region: str | None = None


class OrchestrationConfig(StrictModel):
    """How the Prefect deployments run (none of it changes an artifact)."""

    # The scheduled rebuild of the pretraining corpus (the corpus-rebuild deployment), cron syntax.
    corpus_rebuild_cron: str = Field(default="0 3 * * 1", pattern=r"^\S+( \S+){4}$")  # Mondays 03:00
    timezone: str = "UTC"
    deployment_name: str = "uniter"
    # Sharded stages (crawl, extract) in flows: their pending shards split into `fan_out` groups,
    # each a Prefect task on the task runner (threads here, or Dask: a local cluster of `fan_out`
    # workers, or the scheduler at `dask_address`); the stage then publishes once. 1: the stage
    # runs all its shards itself.
    fan_out: int = Field(default=1, ge=1)
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = None


class PipelineConfig(StrictModel):
    storage: StorageConfig = StorageConfig()
    ingest: IngestConfig
    crawl: CrawlConfig = CrawlConfig()
    dedup: DedupConfig = DedupConfig()
    extract: ExtractConfig = ExtractConfig()
    downstream: DownstreamConfig = DownstreamConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    ablation: AblationConfig = AblationConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate ``path``; every problem is reported with the file and the key path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (storage, ingest, …) at the top level, got {type(data).__name__}"
        )
    try:
        return PipelineConfig.model_validate(data, context={"base_dir": path.parent.resolve()})
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        raise ConfigError(f"{path}: invalid config:\n" + "\n".join(f"  - {p}" for p in problems)) from None


def _describe(err: dict[str, Any]) -> str:
    key_path, model = _walk(PipelineConfig, err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(model.model_fields) if model else "?"
        return f"{key_path}: unknown key (allowed here: {allowed})"
    if err["type"] == "missing":
        return f"{key_path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{key_path or '(top level)'}: {msg}{shown}"


def _walk(model: type[BaseModel] | None, loc: tuple) -> tuple[str, type[BaseModel] | None]:
    """Turn pydantic's error location into ``ingest.sources[0].path`` and the model that holds the
    last key (for "allowed keys"). Discriminated unions insert the tag into ``loc``: skip it."""
    parts: list[str] = []
    current: Any = model
    parent: type[BaseModel] | None = None
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            current = _item_type(current)
            continue
        options = _union_members(current)
        tagged = [m for m in options if _tag(m) == item]
        if tagged:
            current = tagged[0]
            continue
        if len(options) == 1:  # Optional[Model]
            current = options[0]
        parts.append(f".{item}" if parts else str(item))
        if isinstance(current, type) and issubclass(current, BaseModel):
            parent = current
            field = current.model_fields.get(item)
            current = field.annotation if field else None
        else:
            current = None
    return "".join(parts), parent


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _item_type(tp: Any) -> Any:
    tp = _strip(tp)
    args = typing.get_args(tp)
    return _strip(args[0]) if typing.get_origin(tp) is list and args else None


def _union_members(tp: Any) -> list[type[BaseModel]]:
    tp = _strip(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for m in map(_strip, typing.get_args(tp)) if isinstance(m, type) and issubclass(m, BaseModel)]
    return []


def _tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("format")
    args = typing.get_args(field.annotation) if field else ()
    return args[0] if args else None
