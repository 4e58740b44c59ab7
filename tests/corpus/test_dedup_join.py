"""The Hamming join is exact: every plan finds what comparing all pairs finds, on clustered hashes."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from corpus.dedup.join import BandPlan, count_candidates, hamming_join, plan_bands


def clustered(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n,) ids and hashes in tight clusters: a few centres, each hash 0–4 distinct bits away from
    one, so many pairs sit at every distance up to 8 (uniform hashes would leave the join almost
    nothing to find)."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(-(2**63), 2**63 - 1, size=8, dtype=np.int64)
    h = centres[rng.integers(0, len(centres), n)]
    for row in range(n):
        for bit in rng.choice(64, size=int(rng.integers(0, 5)), replace=False):
            h[row] ^= np.int64(1) << np.int64(bit)
    return np.arange(n, dtype=np.int64), h


def brute(q: np.ndarray, qh: np.ndarray, i: np.ndarray, ih: np.ndarray, d: int, exclude_self: bool) -> dict:
    best: dict = {}
    for a, ha in zip(q.tolist(), qh.tolist(), strict=True):
        for b, hb in zip(i.tolist(), ih.tolist(), strict=True):
            dist = ((ha ^ hb) & (2**64 - 1)).bit_count()
            if dist <= d and not (exclude_self and a == b):
                best[(a, b)] = min(dist, best.get((a, b), 99))
    return best


@pytest.mark.parametrize("d", [0, 2, 4, 6])
def test_every_plan_finds_exactly_the_pairs_within_d(d, monkeypatch):
    ids, h = clustered(300, seed=d)
    windows = h ^ (np.int64(1) << np.arange(300, dtype=np.int64) % 64)  # a second hash per id, one bit off
    idx_ids, idx_h = np.concatenate([ids, ids]), np.concatenate([h, windows])
    con = duckdb.connect()
    con.register("q", pa.table({"id": ids, "h": h}))
    con.register("ix", pa.table({"id": idx_ids, "h": idx_h}))
    truth = brute(ids, h, idx_ids, idx_h, d, exclude_self=True)
    assert len(truth) > 100  # clusters: the join has real work at every distance

    widths = {m: tuple(64 // m + (1 if i < 64 % m else 0) for i in range(m)) for m in range(1, 17)}
    plans = [BandPlan(widths[m], d // m, 1) for m in range(max(1, d // 2), d + 2)]  # one band per key
    plans += [BandPlan(widths[m], 0, m - d) for m in (d + 2, d + 3)]  # combinations of bands
    for plan in plans:
        monkeypatch.setattr("corpus.dedup.join.plan_bands", lambda *_, p=plan: p)
        got = hamming_join(con, "select * from q", "select * from ix", d, exclude_self=True)
        found = dict(zip(zip(got["qid"].to_pylist(), got["iid"].to_pylist()), got["distance"].to_pylist()))
        assert found == truth, f"plan {plan}"
    # the join leaves no temporary tables behind
    assert not con.execute("select * from duckdb_tables() where table_name like '_hj_%'").fetchall()


def test_candidates_are_counted_as_the_join_forms_them():
    ids, h = clustered(200, seed=7)
    con = duckdb.connect()
    con.register("q", pa.table({"id": ids, "h": h}))
    plan = plan_bands(4, 200, 200)
    pairs = 0
    for key in plan.key_masks():  # plan for 200 × 200: one band per key, radius 0
        k = h & np.int64(key - (1 << 64) if key >= 1 << 63 else key)
        pairs += int((k[:, None] == k[None, :]).sum())
    assert count_candidates(con, "select * from q", "select * from q", 4) == pairs


def test_plans_widen_the_keys_as_the_corpus_grows():
    small, large = plan_bands(4, 1000, 6000), plan_bands(4, 5_000_000, 30_000_000)
    assert small.per_key == 1 and small.radius == 0  # 5 bands: one must be equal
    assert large.per_key > 1  # 3 of 7 bands equal: ~27-bit keys, far fewer chance collisions
