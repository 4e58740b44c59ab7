"""All pairs of 64-bit hashes within Hamming distance d, exactly, without comparing all pairs.

Multi-index hashing: cut the 64 bits into m contiguous bands; e_1 … e_m, the bits two hashes differ
by in each band, sum to at most d. Two pigeonhole rules give each pair a key it must share:
  - m ≤ d + 1: some band has e_j ≤ r = floor(d / m). A key is one band; the query side enumerates
    every value within r bits of its own (the masks), the index side is joined on equality.
  - m > d: at most d bands differ at all, so at least s = m − d bands are equal. A key is one
    combination of s bands (`h & mask` of their bits), joined on equality with nothing enumerated.
    With many hashes, wide keys of a few narrow bands (m = 7, s = 3: 35 keys of ~27 bits at d = 4)
    produce far fewer chance collisions than one narrow band each (m = 5: 5 keys of ~13 bits):
    candidates grow with n_query · n_index / 2^width, so the best plan changes with the corpus.
Each candidate is checked with popcount(xor) <= d. `plan_bands` picks the cheapest plan for the sizes
at hand (mask probes + index rows + candidate checks, assuming uniform hashes). Everything runs inside
DuckDB, one key at a time, so memory holds one key's hash table, not all of them.
"""

from __future__ import annotations

import itertools
import math
import uuid
from dataclasses import dataclass

import duckdb
import pyarrow as pa

_MAX_KEYS = 128  # keys per plan: each is a pass over both sides, so more never pays


@dataclass(frozen=True)
class BandPlan:
    widths: tuple[int, ...]  # the m bands, low bits first
    radius: int  # bits enumerated around the query's key (one band per key); 0 for combinations
    per_key: int  # bands a key is made of: 1, or m − d when m > d

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(sum(self.widths[:i]) for i in range(len(self.widths)))

    def key_masks(self) -> list[int]:
        """Each key as the mask of its bits."""
        bands = [((1 << w) - 1) << s for s, w in zip(self.starts, self.widths, strict=True)]
        return [sum(c) for c in itertools.combinations(bands, self.per_key)]

    def expected_candidates(self, n_query: int, n_index: int) -> float:
        """Candidates if hashes were uniform: each query probe meets n_index / 2^width by chance."""
        return sum(
            n_query * _ball(key.bit_count(), self.radius) * n_index / 2.0 ** key.bit_count() for key in self.key_masks()
        )

    def __str__(self) -> str:
        m = len(self.widths)
        if self.per_key == 1:
            return f"{m} bands of {min(self.widths)}-{max(self.widths)} bits, radius {self.radius}"
        return f"{len(self.key_masks())} keys of {self.per_key} of {m} bands (~{64 * self.per_key // m} bits)"


def _ball(width: int, radius: int) -> int:
    return sum(math.comb(width, k) for k in range(radius + 1))


def plan_bands(d: int, n_query: int, n_index: int, combine: bool = True) -> BandPlan:
    """The plan with the fewest estimated operations: for each key, its query probes, its index
    rows and 4 per candidate (a candidate costs a fetch and a popcount besides the probe).
    `combine=False` keeps one band per key (the only plans before issue 15; for comparison)."""
    best = None
    for m in range(1, 17):
        widths = tuple(64 // m + (1 if i < 64 % m else 0) for i in range(m))
        per_key, radius = (1, d // m) if m <= d + 1 else (m - d, 0)
        if per_key > 1 and not combine:
            break
        if math.comb(m, per_key) > _MAX_KEYS:
            continue
        plan = BandPlan(widths, radius, per_key)
        keys = plan.key_masks()
        probes = [n_query * _ball(key.bit_count(), radius) for key in keys]
        if max(probes) > 5e9:
            continue
        cost = sum(probes) + len(keys) * n_index + 4 * plan.expected_candidates(n_query, n_index)
        if best is None or cost < best[0]:
            best = (cost, plan)
    if best is None:
        raise ValueError(f"no practical band plan for distance {d}")
    return best[1]


def _signed(x: int) -> int:
    """A 64-bit pattern as the BIGINT DuckDB stores it."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _masks(key: int, radius: int) -> list[int]:
    """Every pattern of at most `radius` bits inside `key`'s bits (0 first)."""
    bits = [b for b in range(64) if key >> b & 1]
    return [
        _signed(sum(1 << b for b in chosen)) for k in range(radius + 1) for chosen in itertools.combinations(bits, k)
    ]


def _key_sql(plan: BandPlan, key: int) -> tuple[str, str]:
    """SQL for one key's values over `h`: the query side's (the key and, with a radius, every
    value within it) and the index side's."""
    value = f"(h & {_signed(key)})"
    if not plan.radius:
        return value, value
    masks = ",".join(str(x) for x in _masks(key, plan.radius))
    return f"unnest(list_transform([{masks}]::BIGINT[], x -> xor({value}, x)))", value


def hamming_join(
    con: duckdb.DuckDBPyConnection, query: str, index: str, d: int, exclude_self: bool = False
) -> pa.Table:
    """Pairs ``(qid, iid, distance)`` with popcount(q.h xor i.h) <= d, one row per (qid, iid) with
    the smallest distance. ``query`` and ``index`` are relations with columns ``id BIGINT, h BIGINT``
    (an id may appear with several hashes, e.g. crop windows)."""
    tag = uuid.uuid4().hex[:12]
    q, i, out = f"_hj_q_{tag}", f"_hj_i_{tag}", f"_hj_out_{tag}"
    try:
        # Materialized once: every key reads both sides again.
        con.execute(f"create temp table {q} as select id, h from ({query})")
        con.execute(f"create temp table {i} as select id, h from ({index})")
        con.execute(f"create temp table {out} (qid BIGINT, iid BIGINT, distance INTEGER)")
        n_q = con.execute(f"select count(*) from {q}").fetchone()[0]
        n_i = con.execute(f"select count(*) from {i}").fetchone()[0]
        if n_q and n_i:
            plan = plan_bands(d, n_q, n_i)
            self_clause = "and q.id <> i.id" if exclude_self else ""
            for key in plan.key_masks():
                probe, value = _key_sql(plan, key)
                con.execute(
                    f"""insert into {out}
                    select q.id, i.id, bit_count(xor(q.h, i.h))
                    from (select id, h, {probe} as v from {q}) q
                    join (select id, h, {value} as v from {i}) i on q.v = i.v
                    where bit_count(xor(q.h, i.h)) <= {d} {self_clause}"""
                )
        return (
            con.execute(
                f"select qid, iid, min(distance)::INTEGER as distance from {out} group by qid, iid order by qid, iid"
            )
            .arrow()
            .read_all()
        )
    finally:
        for table in (q, i, out):
            con.execute(f"drop table if exists {table}")


def count_candidates(con: duckdb.DuckDBPyConnection, query: str, index: str, d: int) -> int:
    """How many (query, index) rows the plan's keys bring together before the popcount check: the
    join's real work, which clustered hashes raise above the uniform estimate. Counted from the
    key values' frequencies on both sides, without forming the pairs."""
    n_q = con.execute(f"select count(*) from ({query})").fetchone()[0]
    n_i = con.execute(f"select count(*) from ({index})").fetchone()[0]
    if not n_q or not n_i:
        return 0
    plan = plan_bands(d, n_q, n_i)
    total = 0
    for key in plan.key_masks():
        probe, value = _key_sql(plan, key)
        total += con.execute(
            f"""select coalesce(sum(a.n * b.n), 0)::HUGEINT from
            (select v, count(*) as n from (select {probe} as v from ({query})) group by v) a
            join (select {value} as v, count(*) as n from ({index}) group by v) b on a.v = b.v"""
        ).fetchone()[0]
    return int(total)


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
