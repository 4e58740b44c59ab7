"""Building blocks for typed configs: strict models, input files resolved and fingerprinted by content.

Relative paths in a config file are resolved against the folder of that file (passed to
pydantic as validation context ``base_dir``), so a config means the same from any CWD.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic_core import core_schema

URL_SCHEMES = ("http://", "https://", "s3://", "file://")


class StrictModel(BaseModel):
    """Unknown keys are errors; values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SectionConfig(StrictModel):
    """A stage's config section. Fields named in ``NOT_IN_KEY`` do not change the stage's output
    (parallelism, progress), so they are left out of its cache key."""

    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset()


def _base_dir(info: core_schema.ValidationInfo) -> Path:
    ctx = info.context or {}
    return Path(ctx.get("base_dir", "."))


def _must_exist(info: core_schema.ValidationInfo) -> bool:
    """False where a config is only read for its settings (`uniter recipe`), not run."""
    return bool((info.context or {}).get("check_paths", True))


def _resolve(value: str, info: core_schema.ValidationInfo) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = _base_dir(info) / path
    return Path(os.path.normpath(path.absolute()))


class InputFile(str):
    """A local file the stage reads. Must exist. In cache keys it stands for its sha256, not its path,
    so moving a file keeps the cache and editing it invalidates the cache. A subclass may accept
    keywords in place of a file (KEYWORDS)."""

    KEYWORDS: frozenset[str] = frozenset()

    @classmethod
    def __get_pydantic_core_schema__(cls, _source: Any, _handler: Any) -> core_schema.CoreSchema:
        return core_schema.with_info_after_validator_function(cls._validate, core_schema.str_schema(min_length=1))

    @classmethod
    def _validate(cls, value: str, info: core_schema.ValidationInfo) -> InputFile:
        if value in cls.KEYWORDS:
            return cls(value)
        path = _resolve(value, info)
        if path.is_dir():
            raise ValueError(f"expected a file, found a folder: {path}")
        if not path.is_file() and _must_exist(info):
            hint = f" (or one of: {', '.join(sorted(cls.KEYWORDS))})" if cls.KEYWORDS else ""
            raise ValueError(f"file not found: {path}{hint}")
        return cls(str(path))


class InputFolder(str):
    """A local folder of images the stage reads. Must exist. In cache keys it stands for the digest
    of its files' names and contents (`folder_fingerprint`), not its path."""

    @classmethod
    def __get_pydantic_core_schema__(cls, _source: Any, _handler: Any) -> core_schema.CoreSchema:
        return core_schema.with_info_after_validator_function(cls._validate, core_schema.str_schema(min_length=1))

    @classmethod
    def _validate(cls, value: str, info: core_schema.ValidationInfo) -> InputFolder:
        path = _resolve(value, info)
        if path.is_file():
            raise ValueError(f"expected a folder of images, found a file: {path}")
        if not path.is_dir() and _must_exist(info):
            raise ValueError(f"folder not found: {path}")
        return cls(str(path))


# Folders no image root may be or lie in: the only files an "image" read there could return are
# the system's own (the crawl records what it read, so a root of /etc leaks /etc/passwd).
SYSTEM_FOLDERS = (
    "/etc", "/proc", "/sys", "/dev", "/boot", "/run", "/var/run", "/var/lib", "/var/log",
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/snap",
)  # fmt: skip
# Folders of credentials in the home folder.
SECRET_FOLDERS = (".ssh", ".aws", ".gnupg", ".config", ".kube", ".docker", ".azure", ".netrc")


def within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def root_problem(real: str) -> str | None:
    """Why the resolved folder ``real`` may not be a root images are read from, or None."""
    home = os.path.realpath(os.path.expanduser("~"))
    if any(within(real, f) for f in SYSTEM_FOLDERS):
        return "a system folder"
    if within(home, real):
        return "the home folder or a folder above it"
    if any(within(real, os.path.join(home, s)) for s in SECRET_FOLDERS):
        return "a folder of credentials"
    return None


def credentials_in(url: str) -> bool:
    """Whether a URL carries ``user:password@`` (or ``user@``) before its host."""
    authority = url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    return "@" in authority


_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s@]*@")


def redact_credentials(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``: for the messages and
    tables that quote a refused record."""
    return _USERINFO.sub(r"\1***@", text)


class Location(str):
    """A folder or URL prefix (local path, http(s)://, s3://, file://) that images are read from.
    Local paths become absolute with symlinks resolved, and may not be (or lie in) a system
    folder, the home folder or its credentials; they are not required to exist yet (a later stage
    reads them, possibly on another host). URLs may not carry credentials."""

    @classmethod
    def __get_pydantic_core_schema__(cls, _source: Any, _handler: Any) -> core_schema.CoreSchema:
        return core_schema.with_info_after_validator_function(cls._validate, core_schema.str_schema(min_length=1))

    @classmethod
    def _validate(cls, value: str, info: core_schema.ValidationInfo) -> Location:
        if value.startswith("file://"):
            value = value[len("file://") :] or "/"
        elif value.startswith(URL_SCHEMES):
            if credentials_in(value):
                raise ValueError(
                    "credentials in a URL are refused (they would be stored in every table that holds "
                    "the URL): serve the images without them, or mirror them to a folder or bucket"
                )
            return cls(value.rstrip("/"))
        if "://" in value:
            raise ValueError(
                f"unsupported scheme in {value!r}: expected a local path or one of {', '.join(URL_SCHEMES)}"
            )
        real = os.path.realpath(_resolve(value, info))
        if problem := root_problem(real):
            raise ValueError(f"{value!r} resolves to {real}, {problem}: expected a folder of images")
        return cls(real)


class StorageUri(str):
    """Where artifacts live: a local folder (made absolute) or ``s3://bucket/prefix``."""

    @classmethod
    def __get_pydantic_core_schema__(cls, _source: Any, _handler: Any) -> core_schema.CoreSchema:
        return core_schema.with_info_after_validator_function(cls._validate, core_schema.str_schema(min_length=1))

    @classmethod
    def _validate(cls, value: str, info: core_schema.ValidationInfo) -> StorageUri:
        if value.startswith("s3://"):
            bucket = value[5:].split("/", 1)[0]
            if len(bucket) < 3:
                raise ValueError(
                    f"invalid S3 URI {value!r}: expected s3://bucket[/prefix] with a bucket name of 3+ characters"
                )
            return cls(value.rstrip("/"))
        if "://" in value:
            raise ValueError(f"unsupported storage URI {value!r}: expected a local folder or s3://bucket/prefix")
        return cls(str(_resolve(value, info)))


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Duration(float):
    """Seconds, written as a number or with a unit: ``90``, ``"45s"``, ``"30m"``, ``"12h"``, ``"7d"``, ``"2w"``."""

    @classmethod
    def __get_pydantic_core_schema__(cls, _source: Any, _handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(float)
        )

    @classmethod
    def _validate(cls, value: Any) -> Duration:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and value.strip()[-1:].lower() in _UNITS:
            text = value.strip()
            try:
                seconds = float(text[:-1]) * _UNITS[text[-1].lower()]
            except ValueError:
                raise ValueError(f"invalid duration {value!r}: expected e.g. 90, '30m', '12h' or '7d'") from None
        else:
            raise ValueError(f"invalid duration {value!r}: expected e.g. 90, '30m', '12h' or '7d'")
        if not seconds >= 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return cls(seconds)
