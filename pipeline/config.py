"""The pipeline config: one YAML file, validated before any work starts."""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from contract.configbase import StorageUri, StrictModel, redact_credentials
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
    # One run per stage and key builds at a time (contract/lease.py): a killed runner's lease lapses
    # this long after its last renewal (every third of it), and the next run takes over.
    lease_seconds: float = Field(default=120.0, ge=1.0)


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


# What a flow run gets as its `config` parameter: the validated config as JSON data (input paths made
# absolute), or a path to a YAML file as the worker sees it (relative to its working directory).
ConfigParameter = dict[str, Any] | str


def load_config(path: str | Path, overrides: Sequence[str] = (), check_paths: bool = True) -> PipelineConfig:
    """Read and validate ``path``, with ``key.path=value`` overrides applied first; every problem is
    reported with the file and the key path. ``check_paths=False``: input files and folders need
    not exist (a config read for its settings, not run)."""
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
    data = apply_overrides(data, overrides, str(path))
    return validate_config(data, str(path), path.parent.resolve(), check_paths)


def validate_config(data: Any, source: str, base_dir: Path, check_paths: bool = True) -> PipelineConfig:
    """The config from parsed data; relative paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections (storage, ingest, …) at the top level, got {type(data).__name__}"
        )
    try:
        return PipelineConfig.model_validate(data, context={"base_dir": base_dir, "check_paths": check_paths})
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        raise ConfigError(f"{source}: invalid config:\n" + "\n".join(f"  - {p}" for p in problems)) from None


def apply_overrides(data: Any, overrides: Sequence[str], source: str) -> Any:
    """``pretrain.steps=100``-style assignments on the parsed config (values read as YAML: numbers,
    booleans, lists); the result is validated like the file, so a wrong key or type is an error."""
    if not overrides:
        return data
    data = copy.deepcopy(data)
    for item in overrides:
        key_path, sep, raw = item.partition("=")
        keys = key_path.strip().split(".")
        if not sep or not all(keys) or not isinstance(data, dict):
            raise ConfigError(f"{source}: override {item!r}: expected key.path=value (e.g. pretrain.steps=100)")
        node = data
        for depth, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: override {item!r}: {'.'.join(keys[: depth + 1])} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def config_document(cfg: PipelineConfig) -> dict[str, Any]:
    """The validated config as JSON data with absolute paths: a flow run's `config` parameter, so a
    worker on any machine runs exactly what was deployed (the files it names must be there too)."""
    return cfg.model_dump(mode="json")


def config_from_parameter(config: ConfigParameter) -> PipelineConfig:
    """A flow's `config` parameter: a config document, or the path of a YAML file on the worker."""
    if isinstance(config, str):
        return load_config(config)
    return validate_config(config, "the flow run's config parameter", Path.cwd())


def _describe(err: dict[str, Any]) -> str:
    key_path, model = _walk(PipelineConfig, err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(model.model_fields) if model else "?"
        return f"{key_path}: unknown key (allowed here: {allowed})"
    if err["type"] == "missing":
        return f"{key_path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else redact_credentials(f" (got {got!r})")
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
