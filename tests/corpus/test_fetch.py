"""The fetcher against a real HTTP server on loopback that misbehaves in every way we know."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from corpus.crawl.config import CrawlConfig
from corpus.images.fetch import Fetcher, SafeResolver, address_allowed, retry_after_seconds
from tests.fixtures import images as fx
from tests.fixtures import server as srv

GOOD = fx.jpeg(fx.synthetic_photo(5))


def _cfg(**kw) -> CrawlConfig:
    base = dict(
        allow_private_networks=True,
        connect_timeout=2,
        read_timeout=0.5,
        total_timeout=5,
        retries=2,
        backoff=0.05,
        max_bytes=200_000,
        contact="https://example.org/uniter-contact",
    )
    base.update(kw)
    return CrawlConfig(**base)


def fetch_all(cfg: CrawlConfig, urls: list[str]):
    async def go():
        async with Fetcher(cfg) as fetcher:
            return await asyncio.gather(*(fetcher.fetch(u) for u in urls))

    return asyncio.run(go())


@pytest.fixture
def server():
    with srv.ImageServer() as s:
        yield s


def test_good_image_and_honest_user_agent(server):
    server.routes["/a.jpg"] = srv.serve(GOOD)
    (res,) = fetch_all(_cfg(), [server.url("/a.jpg")])
    assert res.body == GOOD and res.reason is None and res.attempts == 1
    assert server.user_agents == [
        "uniter-pipeline/0.1 (vision-language research corpus builder) +https://example.org/uniter-contact"
    ]


def test_http_errors_and_retries(server):
    server.routes["/flaky.jpg"] = srv.fail_then_serve(500, 1, GOOD)
    server.routes["/down.jpg"] = srv.status(503)
    server.routes["/gone.jpg"] = srv.status(410)
    flaky, down, gone, missing = fetch_all(
        _cfg(), [server.url(p) for p in ("/flaky.jpg", "/down.jpg", "/gone.jpg", "/nope.jpg")]
    )
    assert flaky.body == GOOD and flaky.attempts == 2
    assert (down.reason, down.http_status) == ("http_503", 503) and server.hits["/down.jpg"] == 3  # 1 + 2 retries
    assert gone.reason == "http_410" and server.hits["/gone.jpg"] == 1  # 4xx: no retry
    assert missing.reason == "http_404"


def test_429_honours_retry_after(server):
    server.routes["/busy.jpg"] = srv.fail_then_serve(429, 1, GOOD, {"Retry-After": "1"})
    t0 = time.monotonic()
    (res,) = fetch_all(_cfg(backoff=0.01), [server.url("/busy.jpg")])
    assert res.body == GOOD and res.attempts == 2
    assert time.monotonic() - t0 >= 0.9  # waited what the server asked, not the 10 ms backoff


def test_slow_reset_and_oversized_bodies(server):
    server.routes["/slow.jpg"] = srv.slow_body()
    server.routes["/reset.jpg"] = srv.reset_connection
    server.routes["/big.jpg"] = srv.serve(b"\xff" * 300_000)
    server.routes["/endless.jpg"] = srv.endless_body()
    slow, reset, big, endless = fetch_all(
        _cfg(retries=1), [server.url(p) for p in ("/slow.jpg", "/reset.jpg", "/big.jpg", "/endless.jpg")]
    )
    assert slow.reason == "timeout"
    assert reset.reason == "connection_reset"
    assert big.reason == "too_large" and "Content-Length" in big.detail
    assert endless.reason == "too_large"


def test_redirects(server):
    server.routes["/r1"] = srv.redirect("/r2")
    server.routes["/r2"] = srv.redirect(server.url("/a.jpg"), 301)
    server.routes["/a.jpg"] = srv.serve(GOOD)
    server.routes["/loop"] = srv.redirect("/loop")
    server.routes["/to-ftp"] = srv.redirect("ftp://example.org/x.jpg")
    ok, loop, ftp = fetch_all(_cfg(max_redirects=3), [server.url(p) for p in ("/r1", "/loop", "/to-ftp")])
    assert ok.body == GOOD and ok.final_url == server.url("/a.jpg")
    assert loop.reason == "too_many_redirects" and server.hits["/loop"] == 4
    assert ftp.reason == "bad_redirect"


def test_private_addresses_are_refused_on_every_hop(server):
    """Our server is allowed by an explicit allowlist entry; everything else private is refused."""
    server.routes["/a.jpg"] = srv.serve(GOOD)
    server.routes["/to-metadata"] = srv.redirect("http://169.254.169.254/latest/meta-data/")
    server.routes["/to-loopback"] = srv.redirect(f"http://127.0.0.2:{server.port}/a.jpg")
    server.routes["/to-v6"] = srv.redirect(f"http://[::1]:{server.port}/a.jpg")
    cfg = _cfg(allow_private_networks=False, allowed_networks=["127.0.0.1/32"])
    ok, meta, loop2, v6 = fetch_all(cfg, [server.url(p) for p in ("/a.jpg", "/to-metadata", "/to-loopback", "/to-v6")])
    assert ok.body == GOOD
    assert meta.reason == loop2.reason == v6.reason == "blocked_private_address"
    assert server.hits["/a.jpg"] == 1  # no redirect reached it

    # Without the allowlist: refused by IP literal, and by name (the resolver's answer is checked).
    direct, by_name = fetch_all(
        _cfg(allow_private_networks=False), [server.url("/a.jpg"), f"http://localhost:{server.port}/a.jpg"]
    )
    assert direct.reason == by_name.reason == "blocked_private_address"
    assert "localhost resolves to" in by_name.detail
    assert server.hits["/a.jpg"] == 1


def test_resolver_filters_private_answers():
    async def resolve(allow):
        return await SafeResolver(allow).resolve("localhost", 80)

    with pytest.raises(OSError, match="localhost resolves to"):
        asyncio.run(resolve(False))
    assert asyncio.run(resolve(True))
    assert (
        not address_allowed("10.1.2.3")
        and not address_allowed("::ffff:192.168.0.1")
        and not address_allowed("224.0.0.1")
    )
    assert (
        not address_allowed("169.254.169.254") and not address_allowed("fe80::1") and address_allowed("93.184.216.34")
    )


def test_x_robots_tag(server):
    server.routes["/noai.jpg"] = srv.serve(GOOD, headers={"X-Robots-Tag": "noindex, noai"})
    server.routes["/us.jpg"] = srv.serve(GOOD, headers={"X-Robots-Tag": "uniter: noimageai"})
    server.routes["/other.jpg"] = srv.serve(GOOD, headers={"X-Robots-Tag": "otherbot: noai"})
    urls = [server.url(p) for p in ("/noai.jpg", "/us.jpg", "/other.jpg")]
    noai, us, other = fetch_all(_cfg(), urls)
    assert (noai.reason, us.reason, other.reason) == ("x_robots_tag", "x_robots_tag", None)
    assert all(r.body == GOOD for r in fetch_all(_cfg(disallowed_robots_directives=[]), urls))


def test_local_files_only_inside_roots(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(GOOD)
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.jpg", root / "link.jpg")
    cfg = _cfg(file_roots=[str(root)])
    ok, via_uri, dotdot, link, missing, other = fetch_all(
        cfg,
        [
            str(root / "sub" / "a.jpg"),
            f"file://{root}/sub/a.jpg",
            f"{root}/sub/../../secret.jpg",
            str(root / "link.jpg"),
            str(root / "none.jpg"),
            "s3://bucket/key.jpg",
        ],
    )
    assert ok.body == GOOD and via_uri.body == GOOD
    assert dotdot.reason == link.reason == "outside_roots"
    assert missing.reason == "file_not_found" and other.reason == "unsupported_scheme"


def test_retry_after_parsing():
    assert retry_after_seconds("3", 60) == 3
    assert retry_after_seconds("999", 60) == 60
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 60) == 0  # in the past
    assert retry_after_seconds("soon", 60) is None and retry_after_seconds(None, 60) is None
