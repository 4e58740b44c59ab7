"""Prefect result storage on the pipeline's own storage (local or S3), through the one storage interface."""

from __future__ import annotations

import anyio.to_thread
from prefect.filesystems import WritableFileSystem
from pydantic import Field

from storage import open_storage


class PipelineStorage(WritableFileSystem):
    """Reads and writes Prefect result records as objects of the configured storage.

    Credentials are never fields here: S3 access goes through boto3's standard chain, so nothing
    secret is serialized into Prefect's block documents or result metadata.
    """

    _block_type_name = "Uniter Pipeline Storage"

    uri: str = Field(description="Local folder or s3://bucket/prefix")
    endpoint_url: str | None = None
    region: str | None = None

    def _storage(self):
        return open_storage(self.uri, endpoint_url=self.endpoint_url, region=self.region)

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        return self._storage().read_bytes(path)

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        self._storage().put(path, content)
        return path

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)
