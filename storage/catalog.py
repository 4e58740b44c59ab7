"""A DuckDB catalog: each published Parquet table becomes a view, on local disk or on S3 via httpfs."""

from __future__ import annotations

import logging
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import duckdb
import duckdb_extension_httpfs

from storage.base import Storage, StorageError

log = logging.getLogger(__name__)


class CatalogError(Exception):
    """A catalog query or setup failed; the message says which table or query."""


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple]


def httpfs_extension_path() -> Path:
    """The httpfs build shipped by the `duckdb-extension-httpfs` wheel.

    NOTE: DuckDB would otherwise download the extension at first use, which fails offline
    and on locked-down workers; the wheel pins it to our exact DuckDB version.
    """
    base = Path(duckdb_extension_httpfs.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    path = base / "httpfs.duckdb_extension"
    if not path.is_file():
        raise CatalogError(f"httpfs extension for DuckDB {duckdb.__version__} not found at {path}")
    return path


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Catalog:
    """Read-only SQL over the views given as ``{view name: [storage keys of its Parquet files]}``."""

    def __init__(self, storage: Storage, tables: dict[str, list[str]], settings: dict | None = None):
        self.storage = storage
        # Spills (sorts and joins past memory_limit: dedup's join at the paper's scale spills in 2 GB)
        # go to a folder of this catalog's own under the system's temporary directory. DuckDB
        # creates it at the first spill and removes it on close; its default, .tmp in the working
        # directory, may not be writable on a worker and is shared by every process started there.
        spill = str(Path(tempfile.gettempdir()) / f"uniter-duckdb-{uuid.uuid4().hex[:12]}")
        self.con = duckdb.connect(
            config={
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "temp_directory": spill,
                **(settings or {}),
            }
        )
        if storage.uri.startswith("s3://"):
            self._connect_s3()
        self.views: dict[str, int] = {}
        for name, keys in tables.items():
            if keys:
                self.add_view(name, keys)

    def add_view(self, name: str, keys: list[str], positions: bool = False) -> None:
        """(Re)define view ``name`` over the Parquet files at ``keys``. ``positions``: with each
        row's ``filename`` and ``file_row_number`` (where it stands in its input)."""
        urls = ", ".join(_quote(self.storage.url(k)) for k in keys)
        options = ", filename=true, file_row_number=true" if positions else ""
        try:
            # DuckDB binds the view now: it reads the Parquet footers (schema) here.
            self.con.execute(f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM read_parquet([{urls}]{options})')
        except duckdb.Error as exc:
            raise CatalogError(f"table {name!r} ({len(keys)} files under {self.storage.uri}): {exc}") from None
        self.views[name] = len(keys)

    def url(self, key: str) -> str:
        """A storage key as a quoted SQL string literal for read_parquet."""
        return _quote(self.storage.url(key))

    @staticmethod
    def literal(value: str) -> str:
        return _quote(value)

    def _connect_s3(self) -> None:
        self.con.execute(f"LOAD {_quote(str(httpfs_extension_path()))}")
        creds = self.storage.credentials()  # type: ignore[attr-defined]
        opts = ["TYPE s3", f"REGION {_quote(getattr(self.storage, 'region', None) or 'us-east-1')}"]
        if creds is not None:
            opts += [f"KEY_ID {_quote(creds.access_key)}", f"SECRET {_quote(creds.secret_key)}"]
            if creds.token:
                opts.append(f"SESSION_TOKEN {_quote(creds.token)}")
        endpoint = getattr(self.storage, "endpoint_url", None)
        if endpoint:
            parsed = urlparse(endpoint)
            opts += [
                f"ENDPOINT {_quote(parsed.netloc)}",
                "URL_STYLE 'path'",
                f"USE_SSL {'true' if parsed.scheme == 'https' else 'false'}",
            ]
        try:
            # A temporary (in-memory) secret: nothing is written to DuckDB's secret directory.
            self.con.execute(f"CREATE TEMPORARY SECRET uniter_s3 ({', '.join(opts)})")
        except duckdb.Error as exc:
            # NOTE: never echo the statement: it holds the credentials.
            raise StorageError(f"could not configure DuckDB for {self.storage.uri}: {type(exc).__name__}") from None

    def sql(self, query: str) -> QueryResult:
        try:
            cur = self.con.execute(query)
            columns = [d[0] for d in cur.description] if cur.description else []
            return QueryResult(columns=columns, rows=cur.fetchall())
        except duckdb.CatalogException as exc:
            known = ", ".join(sorted(self.views)) or "none yet"
            raise CatalogError(f"{exc}\nTables available: {known}.") from None
        except duckdb.Error as exc:
            raise CatalogError(str(exc)) from None

    def stream(self, query: str, batch_rows: int = 100_000):
        """The result of ``query`` as Arrow record batches, without materializing it."""
        try:
            reader = self.con.execute(query).fetch_record_batch(batch_rows)
        except duckdb.Error as exc:
            raise CatalogError(str(exc)) from None
        yield from reader

    def close(self) -> None:
        self.con.close()
