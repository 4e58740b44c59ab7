"""The DuckDB catalog over Parquet on local disk and on S3 (httpfs, loaded from the shipped wheel)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import open_storage
from storage.catalog import Catalog, CatalogError


def _publish(storage, tmp_path, key, table):
    local = tmp_path / "t.parquet"
    pq.write_table(table, local)
    storage.put_file(key, local)


def test_views_over_parquet_files(storage, tmp_path):
    _publish(storage, tmp_path, "t/a-0.parquet", pa.table({"source": ["cc", "cc", "sbu"], "n": [1, 2, 3]}))
    _publish(storage, tmp_path, "t/a-1.parquet", pa.table({"source": ["coco"], "n": [4]}))
    catalog = Catalog(storage, {"pairs": ["t/a-0.parquet", "t/a-1.parquet"], "empty": []})
    try:
        result = catalog.sql("select source, sum(n) from pairs group by 1 order by 1")
        assert result.columns == ["source", "sum(n)"]
        assert result.rows == [("cc", 3), ("coco", 4), ("sbu", 3)]
        assert catalog.views == {"pairs": 2}
        with pytest.raises(CatalogError, match="Tables available: pairs"):
            catalog.sql("select * from empty")
        with pytest.raises(CatalogError):
            catalog.sql("select nonsense from")
    finally:
        catalog.close()


def test_spills_go_to_a_temporary_folder_of_its_own(tmp_path, monkeypatch):
    """A query past memory_limit spills, under the system's temporary directory, never into the
    working directory, and the folder is gone after close. (The storage plays no part.)"""
    storage = open_storage(str(tmp_path / "store"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    catalog = Catalog(storage, {}, settings={"memory_limit": "64MB", "threads": 2})
    spill = Path(catalog.sql("select current_setting('temp_directory')").rows[0][0])
    try:
        assert spill.parent == Path(tempfile.gettempdir()) and spill.name.startswith("uniter-duckdb-")
        assert not spill.exists()  # made at the first spill
        rows = catalog.sql(
            "select count(*) from (select h, count(*) from "
            "(select hash(range) as h from range(20000000)) group by h order by h)"
        ).rows
        assert rows == [(20_000_000,)]
        assert spill.is_dir()  # it did spill, there (the files go when the query ends)
        assert not any(cwd.iterdir())
    finally:
        catalog.close()
    assert not spill.exists()


def test_s3_credentials_stay_out_of_errors(s3_endpoint, tmp_path):
    """A broken query on S3 reports DuckDB's message, never the secret we handed it."""
    from tests.conftest import S3_SECRET, make_bucket

    storage = open_storage(f"s3://{make_bucket(s3_endpoint)}/x", endpoint_url=s3_endpoint)
    _publish(storage, tmp_path, "t.parquet", pa.table({"a": [1]}))
    catalog = Catalog(storage, {"t": ["t.parquet"]})
    assert catalog.sql("select a from t").rows == [(1,)]
    with pytest.raises(CatalogError, match="table 'gone'") as exc:
        Catalog(storage, {"gone": ["missing.parquet"]})
    assert S3_SECRET not in str(exc.value)
