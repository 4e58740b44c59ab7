"""The `crawl` config section."""

from __future__ import annotations

import ipaddress
from typing import ClassVar

from pydantic import Field, field_validator

from contract.configbase import Duration, Location, SectionConfig

DEFAULT_USER_AGENT = "uniter-pipeline/0.1 (vision-language research corpus builder)"


class CrawlConfig(SectionConfig):
    """Fetch every distinct image of `pairs`, validate, normalize and hash it."""

    # How fast we go and how hard we push servers: not part of the output's identity.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset(
        {"concurrency", "per_host", "per_host_rate", "workers", "open_shards", "recrawl_after", "retry_failures_after"}
    )

    shard_images: int = Field(default=1000, ge=1)  # distinct images per shard (the unit of resume)
    concurrency: int = Field(default=64, ge=1, le=4096)  # requests in flight, in total
    per_host: int = Field(default=8, ge=1)  # connections per host
    per_host_rate: float = Field(default=20.0, ge=0)  # requests per second per host; 0 = no limit
    workers: int | None = Field(default=None, ge=1, le=256)  # decode/resize/hash processes; unset = CPU cores
    open_shards: int = Field(default=4, ge=1)  # shards in flight, so a slow host never idles the crawl

    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=20.0, gt=0)  # longest silence while reading
    total_timeout: float = Field(default=60.0, gt=0)  # one attempt, headers to last byte
    retries: int = Field(default=3, ge=0)  # after the first attempt, on connection errors, 429 and 5xx
    backoff: float = Field(default=1.0, ge=0)  # first retry delay (s); doubles each time, with jitter
    max_retry_after: float = Field(default=60.0, ge=0)  # longest Retry-After we wait for
    max_redirects: int = Field(default=5, ge=0)
    max_bytes: int = Field(default=20_000_000, ge=1)

    max_side: int = Field(default=1000, ge=16)  # longer side after resize (no upscaling)
    # of re-encoded JPEGs; a JPEG within max_side at or below it is stored as downloaded (no metadata)
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    max_pixels: int = Field(default=89_478_485, ge=1)  # decompression-bomb limit (decoded pixels)

    # Rebuilds take images already fetched (same URL, same settings above) from earlier crawls on
    # this storage. `recrawl_after` (e.g. "30d"; unset: never) re-checks those older than that with
    # a conditional GET: 304 keeps the copy, 200 brings new bytes, 404/410 drops the image. A failed
    # image is tried again only `retry_failures_after` its last try. Local files are always re-checked
    # (a stat). Neither setting changes what a build from scratch would hold: not in the key.
    recrawl_after: Duration | None = None
    retry_failures_after: Duration = Duration(7 * 86400)

    user_agent: str = DEFAULT_USER_AGENT
    contact: str | None = None  # e.g. a URL or e-mail, appended to the User-Agent
    # X-Robots-Tag directives that forbid our use (as "noai" or "uniter: noai"); [] to ignore them.
    disallowed_robots_directives: list[str] = ["noai", "noimageai"]
    # Refuse hosts that resolve to private, loopback, link-local, multicast or reserved addresses…
    allow_private_networks: bool = False
    # …except these networks (CIDR), e.g. an internal image mirror: ["10.1.2.0/24"].
    allowed_networks: list[str] = []
    # Local images (paths and file:// URIs) are read only under these folders.
    file_roots: list[Location] = []

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad entry
        return value

    def user_agent_header(self) -> str:
        return f"{self.user_agent} +{self.contact}" if self.contact else self.user_agent
