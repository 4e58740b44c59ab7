"""All pairs of 64-bit hashes within Hamming distance d, exactly, without comparing all pairs.

Multi-index hashing: cut the 64 bits into m bands. If two hashes differ in at most d bits, some
band differs in at most r = floor(d / m) bits (pigeonhole). So for each query hash and band we
enumerate the band values within r bits of its own (the masks), join them on equality against the
index's band values, and verify each candidate with popcount(xor) <= d. Choosing m trades the
enumeration (more masks for wide bands) against the candidates (more collisions for narrow bands);
`plan_bands` picks the cheapest for the sizes at hand. All of it runs inside DuckDB, streaming.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import duckdb
import pyarrow as pa


@dataclass(frozen=True)
class BandPlan:
    widths: tuple[int, ...]
    radius: int

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(sum(self.widths[:i]) for i in range(len(self.widths)))


def _ball(width: int, radius: int) -> int:
    return sum(math.comb(width, k) for k in range(radius + 1))


def plan_bands(d: int, n_query: int, n_index: int) -> BandPlan:
    """The band split with the fewest estimated operations (mask probes + candidate checks)."""
    best = None
    for m in range(1, 17):
        if m > d + 1:
            break
        widths = tuple(64 // m + (1 if i < 64 % m else 0) for i in range(m))
        radius = d // m
        probes = sum(n_query * _ball(w, radius) for w in widths)
        if probes > 5e9:
            continue
        candidates = sum(n_query * _ball(w, radius) * n_index / 2.0**w for w in widths)
        cost = probes + 4 * candidates  # a candidate costs a fetch and a popcount besides the probe
        if best is None or cost < best[0]:
            best = (cost, BandPlan(widths, radius))
    if best is None:
        raise ValueError(f"no practical band plan for distance {d}")
    return best[1]


def _masks(width: int, radius: int) -> list[int]:
    return [sum(1 << b for b in bits) for k in range(radius + 1) for bits in itertools.combinations(range(width), k)]


def hamming_join(
    con: duckdb.DuckDBPyConnection, query: str, index: str, d: int, exclude_self: bool = False
) -> pa.Table:
    """Pairs ``(qid, iid, distance)`` with popcount(q.h xor i.h) <= d, one row per (qid, iid) with
    the smallest distance. ``query`` and ``index`` are relations with columns ``id BIGINT, h BIGINT``
    (an id may appear with several hashes, e.g. crop windows)."""
    n_q = con.execute(f"select count(*) from ({query})").fetchone()[0]
    n_i = con.execute(f"select count(*) from ({index})").fetchone()[0]
    if not n_q or not n_i:
        return pa.table(
            {"qid": pa.array([], pa.int64()), "iid": pa.array([], pa.int64()), "distance": pa.array([], pa.int32())}
        )
    plan = plan_bands(d, n_q, n_i)
    self_clause = "and q.id <> i.id" if exclude_self else ""
    parts = []
    for start, width in zip(plan.starts, plan.widths, strict=True):
        band = f"((h >> {start}) & {(1 << width) - 1})" if width < 64 else "h"
        masks = ",".join(str(m) for m in _masks(width, plan.radius))
        if plan.radius == 0:
            probe = f"select id, h, {band} as v from ({query})"
        else:
            neighbours = f"unnest(list_transform([{masks}]::BIGINT[], x -> xor({band}, x)))"
            probe = f"select id, h, {neighbours} as v from ({query})"
        parts.append(
            f"""select q.id as qid, i.id as iid, bit_count(xor(q.h, i.h)) as distance
            from ({probe}) q join (select id, h, {band} as v from ({index})) i on q.v = i.v
            where bit_count(xor(q.h, i.h)) <= {d} {self_clause}"""
        )
    sql = (
        f"select qid, iid, min(distance)::INTEGER as distance from ({' union all '.join(parts)}) "
        "group by qid, iid order by qid, iid"
    )
    return con.execute(sql).arrow().read_all()


def components(edges: list[tuple[int, int]]) -> dict[int, int]:
    """Union-find over the edges: node → the smallest node of its connected component."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}
