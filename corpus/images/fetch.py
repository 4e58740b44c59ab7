"""Polite, hostile-server-proof fetching of image bytes over HTTP(S) and from local folders.

- Bounded concurrency in total and per host, a per-host request rate, connect/read/total timeouts.
- Retries with exponential backoff and jitter on connection errors, 429 and 5xx, honouring
  Retry-After; redirects followed by hand (each hop re-checked), at most `max_redirects`.
- Bodies are streamed and abandoned past `max_bytes`; X-Robots-Tag opt-outs are honoured.
- SSRF: every host is resolved by `SafeResolver`, which drops private, loopback, link-local,
  multicast and reserved addresses; the connection goes to an address that passed the check (no
  second lookup, so no DNS rebinding), on every hop. IP-literal hosts are checked before the request.
- Local images: only paths that resolve (symlinks followed) inside the configured roots.

Shared by the crawl (the corpus images) and dedup (the evaluation images), both configured by the
`crawl` config section (`FetchSettings` names the fields read here).
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import os
import random
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver

from contract.configbase import redact_credentials

REDIRECTS = (301, 302, 303, 307, 308)
RETRYABLE_STATUS = {429, 500, 502, 503, 504, 520, 521, 522, 523, 524}


class FetchSettings(Protocol):
    """The fields of the `crawl` config section that fetching reads (see corpus/crawl/config.py)."""

    concurrency: int
    per_host: int
    per_host_rate: float
    connect_timeout: float
    read_timeout: float
    total_timeout: float
    retries: int
    backoff: float
    max_retry_after: float
    max_redirects: int
    max_bytes: int
    disallowed_robots_directives: Sequence[str]
    allow_private_networks: bool
    allowed_networks: Sequence[str]
    file_roots: Sequence[str]
    recrawl_after: float | None  # re-check images fetched longer ago than this (None: never)
    retry_failures_after: float  # try a failed image again only this long after

    def user_agent_header(self) -> str: ...


@dataclass
class Fetched:
    """Outcome of one fetch: ``body`` on success, else a failure ``reason`` (a short code)."""

    url: str
    body: bytes | None = None
    reason: str | None = None
    detail: str = ""
    http_status: int | None = None
    attempts: int = 0
    final_url: str = ""
    # HTTP validators of the response (a local file: size and mtime as its ETag), for a later
    # conditional re-check; ``not_modified``: that re-check said the copy we have is current.
    etag: str | None = None
    last_modified: str | None = None
    not_modified: bool = False


def decide(prior: dict | None, uri: str, settings, clock: float) -> str:
    """What to do with an image given its row from an earlier fetch (``url``, ``outcome``: "ok" or
    the failure reason, ``checked_at``): ``fetch``, ``reuse`` it, or ``check`` it with a
    conditional GET. ``settings`` has ``recrawl_after`` (None: never) and ``retry_failures_after``."""
    if prior is None or prior["url"] != uri:
        return "fetch"
    ok = prior["outcome"] == "ok"
    if not uri.startswith(("http://", "https://")):
        return "check" if ok else "fetch"  # a local file: a stat tells whether it changed
    age = clock - prior["checked_at"]
    if ok:
        return "check" if settings.recrawl_after is not None and age >= settings.recrawl_after else "reuse"
    return "fetch" if age >= settings.retry_failures_after else "reuse"


class Refused(Exception):
    """A fetch we will not make or finish; ``reason`` is the failure code."""

    def __init__(self, reason: str, detail: str = "", http_status: int | None = None, attempts: int = 0):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.http_status, self.attempts = reason, detail, http_status, attempts


class BlockedAddress(OSError):
    """Raised by the resolver when a host resolves only to addresses we refuse to connect to."""


def address_allowed(ip: str, allowed_networks: tuple = ()) -> bool:
    """Public unicast addresses, plus any in ``allowed_networks`` (ip_network objects)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if any(addr.version == net.version and addr in net for net in allowed_networks):
        return True
    return addr.is_global and not addr.is_multicast


class SafeResolver(AbstractResolver):
    """Resolves with the system resolver, then keeps only public unicast addresses."""

    def __init__(self, allow_private: bool, allowed_networks: tuple = ()):
        self._inner = ThreadedResolver()
        self._allow_private = allow_private
        self._allowed_networks = allowed_networks

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        hosts = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return hosts
        allowed = [h for h in hosts if address_allowed(h["host"], self._allowed_networks)]
        if not allowed:
            raise BlockedAddress(f"{host} resolves to {', '.join(h['host'] for h in hosts)}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class RateLimiter:
    """Per-host spacing of request starts (``rate`` per second); 0 = unlimited."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_slot: dict[str, float] = {}

    async def wait(self, host: str) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        slot = max(now, self.next_slot.get(host, now))
        self.next_slot[host] = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


def retry_after_seconds(value: str | None, limit: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), limit)


def robots_forbid(headers, disallowed: list[str], agent: str = "uniter") -> str | None:
    """The X-Robots-Tag directive that forbids our use, if any.

    ``X-Robots-Tag: noai, noimageai`` addresses every crawler; ``X-Robots-Tag: otherbot: noai``
    addresses another one and is ignored; ``uniter: noai`` addresses us."""
    if not disallowed:
        return None
    banned = {d.lower() for d in disallowed}
    for value in headers.getall("X-Robots-Tag", []):
        directives = value
        head, sep, rest = value.partition(":")
        head = head.strip().lower()
        if sep and head and " " not in head and "," not in head and head != "unavailable_after":
            if head not in (agent, "uniter-pipeline"):
                continue
            directives = rest
        for directive in directives.split(","):
            if directive.strip().lower() in banned:
                return directive.strip().lower()
    return None


class Fetcher:
    """One per crawl (and per dedup shard of evaluation images): the HTTP session, its limits, the local roots.

    ``file_roots``, when given, replaces ``cfg.file_roots`` (dedup adds the evaluation sets' folders)."""

    def __init__(self, cfg: FetchSettings, file_roots: Iterable[str] | None = None):
        self.cfg = cfg
        roots = cfg.file_roots if file_roots is None else file_roots
        self.roots = [os.path.realpath(r) for r in roots if "://" not in r]
        self.allowed_networks = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.allowed_networks)
        self.rate = RateLimiter(cfg.per_host_rate)
        self.slots = asyncio.Semaphore(cfg.concurrency)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        connector = aiohttp.TCPConnector(
            resolver=SafeResolver(self.cfg.allow_private_networks, self.allowed_networks),
            limit=self.cfg.concurrency,
            limit_per_host=self.cfg.per_host,
            ttl_dns_cache=300,
        )
        timeout = aiohttp.ClientTimeout(
            total=self.cfg.total_timeout, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.read_timeout
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": self.cfg.user_agent_header(), "Accept": "image/*,*/*;q=0.5"},
            trust_env=False,  # never route through proxies from the environment
            auto_decompress=True,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()

    async def fetch(self, uri: str, etag: str | None = None, last_modified: str | None = None) -> Fetched:
        """Fetch ``uri``; with ``etag`` / ``last_modified`` (recorded by an earlier fetch) a
        conditional GET, which comes back ``not_modified`` without a body when the copy is current."""
        validators = {}
        if etag:
            validators["If-None-Match"] = etag
        if last_modified:
            validators["If-Modified-Since"] = last_modified
        async with self.slots:
            try:
                if uri.startswith(("http://", "https://")):
                    return await self._fetch_http(uri, validators)
                if uri.startswith("file://") or uri.startswith("/"):
                    return await asyncio.to_thread(self._read_local, uri, etag)
                raise Refused("unsupported_scheme", uri[:100])
            except Refused as exc:
                return Fetched(
                    uri, reason=exc.reason, detail=exc.detail, http_status=exc.http_status, attempts=exc.attempts
                )

    # --- local files ------------------------------------------------------------------------

    def _read_local(self, uri: str, etag: str | None = None) -> Fetched:
        path = unquote(urlsplit(uri).path) if uri.startswith("file://") else uri
        real = os.path.realpath(path)
        if not any(real == root or real.startswith(root + os.sep) for root in self.roots):
            raise Refused("outside_roots", f"{path} is not under crawl.file_roots")
        try:
            st = os.stat(real)
            stamp = f"{st.st_size}-{st.st_mtime_ns}"  # a stat is cheap: local files are always re-checked
            if etag == stamp:
                return Fetched(uri, attempts=1, final_url=uri, etag=stamp, not_modified=True)
            if st.st_size > self.cfg.max_bytes:
                raise Refused("too_large", f"{st.st_size} bytes > max_bytes {self.cfg.max_bytes}")
            with open(real, "rb") as f:
                return Fetched(uri, body=f.read(), attempts=1, final_url=uri, etag=stamp)
        except FileNotFoundError:
            raise Refused("file_not_found", path) from None
        except IsADirectoryError:
            raise Refused("file_not_found", f"{path} is a folder") from None
        except PermissionError:
            raise Refused("file_unreadable", path) from None

    # --- HTTP -------------------------------------------------------------------------------

    async def _fetch_http(self, original: str, validators: dict[str, str]) -> Fetched:
        """``url`` of the result is ``original``, ``final_url`` the one that answered."""
        url, attempts = original, 0
        for _hop in range(self.cfg.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise Refused("bad_redirect" if attempts else "bad_url", redact_credentials(url[:200]))
            if parts.username is not None or parts.password is not None:
                # Ingest refuses such URLs; a redirect must not bring them back into our tables.
                raise Refused("credentials_in_url", redact_credentials(url[:200]), attempts=attempts)
            self._check_literal_host(parts.hostname)
            try:
                status, location, body, headers, tries = await self._get_with_retries(url, parts.hostname, validators)
            except Refused as exc:
                exc.attempts += attempts
                raise
            attempts += tries
            if location is None:
                etag, modified = headers.get("ETag"), headers.get("Last-Modified")
                if status == 304:
                    if not validators:
                        raise Refused("bad_response", "HTTP 304 to an unconditional GET", status, attempts)
                    # A 304 may omit validators that did not change: keep the ones we sent.
                    etag = etag or validators.get("If-None-Match")
                    modified = modified or validators.get("If-Modified-Since")
                    return Fetched(original, http_status=304, attempts=attempts, final_url=url, etag=etag,
                                   last_modified=modified, not_modified=True)  # fmt: skip
                return Fetched(
                    original, body=body, http_status=status, attempts=attempts, final_url=url, etag=etag,
                    last_modified=modified,
                )  # fmt: skip
            url = urljoin(url, location)
        last = redact_credentials(url[:200])
        detail = f"more than {self.cfg.max_redirects} redirects, last {last}"
        raise Refused("too_many_redirects", detail, attempts=attempts)

    def _check_literal_host(self, host: str) -> None:
        """aiohttp connects to IP literals without asking the resolver: check them here."""
        if self.cfg.allow_private_networks:
            return
        try:
            allowed = address_allowed(host.strip("[]"), self.allowed_networks)
        except ValueError:
            return  # a name: the resolver checks it
        if not allowed:
            raise Refused("blocked_private_address", host)

    async def _get_with_retries(
        self, url: str, host: str, validators: dict[str, str]
    ) -> tuple[int, str | None, bytes | None, dict[str, str], int]:
        """One hop: ``(status, redirect location or None, body, validator headers, attempts)``."""
        cfg = self.cfg
        for attempt in range(cfg.retries + 1):
            delay = None
            try:
                await self.rate.wait(host)
                return (*await self._get_once(url, validators), attempt + 1)
            except Refused as exc:
                exc.attempts = attempt + 1
                raise
            except _Retry as exc:
                if attempt == cfg.retries:
                    raise Refused(exc.reason, exc.detail, exc.status, attempt + 1) from None
                delay = exc.retry_after
            if delay is None:
                delay = cfg.backoff * (2**attempt) * random.uniform(0.5, 1.5)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _get_once(
        self, url: str, validators: dict[str, str]
    ) -> tuple[int, str | None, bytes | None, dict[str, str]]:
        cfg = self.cfg
        try:
            async with self.session.get(url, allow_redirects=False, headers=validators) as resp:
                status = resp.status
                if status in REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise Refused("bad_redirect", f"HTTP {status} without Location", status)
                    return status, location, None, {}
                found = {h: resp.headers[h][:200] for h in ("ETag", "Last-Modified") if h in resp.headers}
                if status == 304:
                    return status, None, None, found
                if status in RETRYABLE_STATUS:
                    retry_after = retry_after_seconds(resp.headers.get("Retry-After"), cfg.max_retry_after)
                    raise _Retry(f"http_{status}", url[:200], status, retry_after)
                if status >= 400:
                    raise Refused(f"http_{status}", url[:200], status)
                if directive := robots_forbid(resp.headers, cfg.disallowed_robots_directives):
                    raise Refused("x_robots_tag", f"X-Robots-Tag: {directive}", status)
                if resp.content_length is not None and resp.content_length > cfg.max_bytes:
                    raise Refused(
                        "too_large", f"Content-Length {resp.content_length} > max_bytes {cfg.max_bytes}", status
                    )
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(1 << 18):
                    size += len(chunk)
                    if size > cfg.max_bytes:
                        raise Refused("too_large", f"body over max_bytes {cfg.max_bytes}", status)
                    chunks.append(chunk)
                return status, None, b"".join(chunks), found
        except (Refused, _Retry):
            raise
        except TimeoutError:
            raise _Retry("timeout", url[:200]) from None
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, BlockedAddress):
                raise Refused("blocked_private_address", str(exc.os_error)) from None
            raise _Retry("dns_error", str(exc.os_error)[:200]) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, BlockedAddress):
                raise Refused("blocked_private_address", str(exc.os_error)) from None
            raise _Retry("connection_error", str(exc)[:200]) from None
        except (
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientPayloadError,
            aiohttp.ClientOSError,
            ConnectionResetError,
        ) as exc:
            # The type only: aiohttp's parser messages can quote what the server sent.
            raise _Retry("connection_reset", type(exc).__name__) from None
        except aiohttp.InvalidURL:
            raise Refused("bad_url", redact_credentials(url[:200])) from None
        except aiohttp.ClientResponseError as exc:
            raise _Retry("bad_response", f"malformed HTTP response ({type(exc).__name__})", exc.status) from None


class _Retry(Exception):
    def __init__(self, reason: str, detail: str = "", status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.detail, self.status, self.retry_after = reason, detail, status, retry_after
