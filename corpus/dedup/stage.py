"""The dedup stage: merge exact and near duplicates, remove everything that overlaps the evaluation
sets, and publish the clean corpus with an audit of every removal.

Steps, each a shard (so a killed run resumes where it stopped):
  eval-NNNNN   the evaluation images: ids from their files, pHashes fetched like the crawl does
  map-00000    duplicate clusters (sha256, then pHash) and decontamination → image_map, duplicates, removed
  images-NNNNN the kept images, one shard per crawl shard (pointers to the crawled bytes)
  pairs-NNNNN  the kept pairs, re-pointed to the kept image, one shard per ingest shard
  report-00000 counts per source × evaluation set × rule, as a table and as JSON + Markdown files
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from typing import Protocol

import pyarrow as pa

from contract.errors import GuardError
from contract.pools import process_pool
from contract.reuse import Hit, ItemIndex
from contract.stage import Stage, StageContext, batched, now, shard_id
from corpus.dedup.config import DedupConfig
from corpus.dedup.evalsets import EvalItem, read_eval_set
from corpus.dedup.join import components, hamming_join
from corpus.images.colour import aspect_ratio_close, colour_distances, fine_differences
from corpus.images.fetch import Fetcher, FetchSettings, decide
from corpus.images.imagehash import hamming
from corpus.images.imaging import ImageOptions, ImageSettings, Processed, process_or_reject
from storage.catalog import Catalog


class CrawlSettings(FetchSettings, ImageSettings, Protocol):
    """What dedup reads from the `crawl` config section: evaluation images are fetched and hashed as
    the crawl fetches and hashes the corpus images."""

    workers: int | None


EVAL_SCHEMA = pa.schema(
    [
        ("eval_set", pa.string()),
        ("split", pa.string()),
        ("item", pa.string()),
        ("coco_id", pa.int64()),
        ("flickr_id", pa.int64()),
        ("image_uri", pa.string()),
        ("status", pa.string()),
        ("phash", pa.int64()),
        ("phash_windows", pa.list_(pa.int64())),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("thumb", pa.binary()),
    ]
)
MAP_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("kept_key", pa.string()),
        ("removed", pa.bool_()),
        ("cluster_size", pa.int32()),
    ]
)
DUPLICATES_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("kept_key", pa.string()),
        ("rule", pa.string()),
        ("distance", pa.int32()),
        ("colour_distance", pa.float32()),  # near duplicates: corpus/images/colour.py
    ]
)
REMOVED_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("rule", pa.string()),
        ("eval_set", pa.string()),
        ("eval_split", pa.string()),
        ("eval_item", pa.string()),
        ("distance", pa.int32()),
        ("matched_key", pa.string()),
        ("colour_distance", pa.float32()),  # appearance matches
    ]
)
# pHash candidates the colour check turned down: auditable, and what a threshold change would add.
REJECTED_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("candidate_key", pa.string()),  # kind "near": the other corpus image
        ("eval_set", pa.string()),  # kind "appearance": the evaluation image
        ("eval_item", pa.string()),
        ("kind", pa.string()),
        ("distance", pa.int32()),
        ("colour_distance", pa.float32()),
    ]
)
# Every caption that moved to another image (its image is a verified duplicate of the kept one).
REPOINTED_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("source", pa.string()),
        ("original_image_key", pa.string()),
        ("kept_key", pa.string()),
        ("rule", pa.string()),  # exact | near
    ]
)


def run_dedup(ctx: StageContext, crawl_cfg: CrawlSettings) -> None:
    cfg = ctx.config
    # Sorted by image location: the same evaluation sets always give the same shards.
    items = sorted(
        (item for spec in cfg.eval_sets for item in read_eval_set(spec)),
        key=lambda i: (i.image_uri is None, i.image_uri or "", i.eval_set, i.item),
    )
    eval_shards = []
    with ctx.progress.task("dedup: evaluation images", total=len(items)) as bar:
        for index, chunk in enumerate(batched(items, cfg.eval_shard_images)):
            name = shard_id("eval", index)
            eval_shards.append(name)
            if not ctx.shard_done(name):
                started = now()
                table, stats, index_rows = hash_eval_images(chunk, crawl_cfg, cfg, ctx.reuse)
                if ctx.reuse is not None:
                    stats.update(ctx.reuse.record(name, index_rows))
                ctx.write_shard(name, {"eval_images": table}, stats, started)
            bar.advance(len(chunk))

    catalog = Catalog(
        ctx.storage,
        {"images": ctx.input_files("crawl", "images"), "pairs": ctx.input_files("ingest", "pairs")},
        settings={"memory_limit": "2GB"},
    )
    try:
        eval_keys = [k for s in eval_shards for k in ctx.shard_files(s, "eval_images")]
        if eval_keys:
            catalog.add_view("eval_images", eval_keys)
        else:
            catalog.con.execute(f"create view eval_images as select * from ({_empty(EVAL_SCHEMA)})")
        if not ctx.shard_done("map-00000"):
            started = now()
            tables, stats = build_map(catalog, cfg, ctx.reuse)
            ctx.write_shard("map-00000", tables, stats, started)
        for table in ("image_map", "duplicates", "removed", "rejected"):
            catalog.add_view(table, ctx.shard_files("map-00000", table))
        n_files = len(ctx.input_files("crawl", "images")) + len(ctx.input_files("ingest", "pairs"))
        with ctx.progress.task("dedup: clean corpus shards", total=n_files) as bar:
            write_kept_images(ctx, catalog, bar)
            write_kept_pairs(ctx, catalog, bar)
        if not ctx.shard_done("report-00000"):
            started = now()
            tables, report, stats = build_report(catalog, cfg)
            files = {
                "report.json": json.dumps(report, indent=1).encode(),
                "report.md": report_markdown(report).encode(),
            }
            ctx.write_shard("report-00000", tables, stats, started, extras=files)
    finally:
        catalog.close()


# --- evaluation images ------------------------------------------------------------------------


# An evaluation image's hash, by location, for rebuilds (contract/reuse.py): the fields `decide` reads.
EVAL_INDEX_SCHEMA = pa.schema(
    [
        pa.field("item", pa.string(), nullable=False),  # the image location
        pa.field("url", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),  # "ok" or the failure reason
        pa.field("phash", pa.int64()),
        pa.field("phash_windows", pa.list_(pa.int64())),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("thumb", pa.binary()),
        pa.field("etag", pa.string()),
        pa.field("last_modified", pa.string()),
        pa.field("checked_at", pa.float64(), nullable=False),
    ]
)


def hash_eval_images(
    items: list[EvalItem], crawl_cfg: CrawlSettings, cfg, reuse: ItemIndex | None = None
) -> tuple[pa.Table, dict, pa.Table]:
    """Fetch and hash the evaluation images of one shard, with the crawl's fetcher and worker.
    Their own image roots are readable in addition to the crawl's. Images an earlier dedup
    hashed (same location, same image settings) are taken from its index, re-checked as the crawl
    re-checks its images. Returns the table, its stats and the shard's index rows."""
    eval_roots = [i.image_uri.rsplit("/", 1)[0] for i in items if i.image_uri and i.image_uri.startswith("/")]
    roots = sorted(set(crawl_cfg.file_roots) | set(eval_roots))
    uris = sorted({i.image_uri for i in items if i.image_uri}) if cfg.by_bytes else []
    hits = reuse.lookup(uris) if reuse is not None and uris else {}
    rows_by_uri = asyncio.run(_fetch_and_hash(uris, hits, crawl_cfg, roots)) if uris else {}
    rows = []
    for item in items:
        res = rows_by_uri.get(item.image_uri) if item.image_uri else None
        if not cfg.by_bytes:
            status = "skipped"
        elif not item.image_uri:
            status = "no_location"
        else:
            status = res["outcome"]
        ok = res is not None and res["outcome"] == "ok"
        rows.append(
            {
                "eval_set": item.eval_set,
                "split": item.split,
                "item": item.item,
                "coco_id": item.coco_id,
                "flickr_id": item.flickr_id,
                "image_uri": item.image_uri,
                "status": status,
                **{k: res[k] if ok else None for k in _IMAGE_FIELDS},
            }
        )
    table = pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)
    actions = Counter(r.pop("action") for r in rows_by_uri.values())
    index_rows = pa.Table.from_pylist([rows_by_uri[u] for u in uris], schema=EVAL_INDEX_SCHEMA)
    return (
        table,
        {
            "eval_items": len(rows),
            "eval_hashed": sum(r["status"] == "ok" for r in rows),
            "eval_status": dict(sorted(Counter(r["status"] for r in rows).items())),
            "eval_reuse": dict(sorted(actions.items())),
        },
        index_rows,
    )


_IMAGE_FIELDS = ("phash", "phash_windows", "sha256", "width", "height", "thumb")


async def _fetch_and_hash(
    uris: list[str], hits: dict[str, Hit], crawl_cfg: CrawlSettings, file_roots: list[str]
) -> dict[str, dict]:
    """Per location: its index row (outcome, pHashes, validators) plus the ``action`` taken."""
    opts = ImageOptions.from_settings(crawl_cfg)
    workers = crawl_cfg.workers or os.cpu_count() or 1
    loop = asyncio.get_running_loop()
    clock = time.time()
    with process_pool(workers) as pool:
        async with Fetcher(crawl_cfg, file_roots) as fetcher:

            async def hashed(uri: str, fetched, action: str) -> dict:
                row = {"item": uri, "url": uri, "etag": fetched.etag, "last_modified": fetched.last_modified,
                       "checked_at": time.time(), "action": action, **dict.fromkeys(_IMAGE_FIELDS)}  # fmt: skip
                if fetched.body is None:
                    return {**row, "outcome": fetched.reason or "fetch_failed"}
                result = await loop.run_in_executor(pool, process_or_reject, fetched.body, opts)
                if not isinstance(result, Processed):
                    return {**row, "outcome": result[0]}
                return {**row, "outcome": "ok", **{k: getattr(result, k) for k in _IMAGE_FIELDS}}

            async def one(uri: str) -> dict:
                hit = hits.get(uri)
                action = decide(hit.row if hit else None, uri, crawl_cfg, clock)
                if action == "reuse":
                    return {**hit.row, "action": "reused"}
                if action == "check":
                    fetched = await fetcher.fetch(uri, hit.row["etag"], hit.row["last_modified"])
                    if fetched.not_modified:
                        return {**hit.row, "etag": fetched.etag, "checked_at": time.time(), "action": "revalidated"}
                    if fetched.body is None and fetched.http_status not in (404, 410) and uri.startswith("http"):
                        return {**hit.row, "action": "recheck_failed"}  # keep the hash we have
                    return await hashed(uri, fetched, "refetched" if fetched.body is not None else "gone")
                return await hashed(uri, await fetcher.fetch(uri), "retried" if hit is not None else "fetched")

            done = await asyncio.gather(*(one(u) for u in uris))
    return dict(zip(uris, done, strict=True))


# --- duplicate clusters and decontamination ---------------------------------------------------


def near_pairs(con, d: int, reuse: ItemIndex | None) -> tuple[dict[tuple[int, int], int], int]:
    """Near-duplicate pairs among the exact-duplicate roots of `img`: {(id, id): distance}.

    With an earlier dedup's roots and pairs (same image settings, same distance), only the roots it
    did not have (new images, changed bytes, new roots of their exact group) are joined against
    all: a pair of two old roots was already found, or not, by the earlier full join. Returns the
    pairs and how many roots were taken as already joined. Records this run's roots and pairs."""
    con.execute("""create or replace temp table roots as
        select id, image_key, sha256, phash, phash_windows from img where id = exact_root""")
    prev_roots = reuse.newest_table("near-roots") if reuse is not None else None
    prev_pairs = reuse.newest_table("near-pairs") if prev_roots is not None and reuse is not None else None
    if prev_pairs is None or (prev_pairs.schema.metadata or {}).get(b"distance") != str(d).encode():
        prev_roots = prev_pairs = None
    old: dict[str, int] = {}
    if prev_roots is not None:
        con.register("prev_roots", prev_roots)
        old = dict(
            con.execute("""select r.image_key, r.id from roots r
            join prev_roots p on p.item = r.image_key and p.sha256 = r.sha256""").fetchall()
        )
        con.unregister("prev_roots")
    con.execute("create or replace temp table old_roots (id BIGINT)")
    if old:
        con.register("old_ids", pa.table({"id": pa.array(list(old.values()), pa.int64())}))
        con.execute("insert into old_roots select id from old_ids")
        con.unregister("old_ids")
    full = "select id, phash as h from roots"
    windows = f"{full} union all select id, unnest(phash_windows) as h from roots"
    if not old:
        joins = [hamming_join(con, full, windows, d, exclude_self=True)]
    else:
        new = "where id not in (select id from old_roots)"
        new_full = f"select id, phash as h from roots {new}"
        new_windows = f"{new_full} union all select id, unnest(phash_windows) as h from roots {new}"
        has_new = con.execute(f"select count(*) from roots {new}").fetchone()[0] > 0
        joins = (
            [hamming_join(con, new_full, windows, d, True), hamming_join(con, full, new_windows, d, True)]
            if has_new
            else []
        )
    best: dict[tuple[int, int], int] = {}
    for near in joins:
        for q, i, dist in zip(*(near.column(c).to_pylist() for c in ("qid", "iid", "distance")), strict=True):
            pair = (min(q, i), max(q, i))  # windows make the relation one-sided: keep either direction
            best[pair] = min(dist, best.get(pair, 99))
    if prev_pairs is not None:
        for a, b, dist in zip(*(prev_pairs.column(c).to_pylist() for c in ("a", "b", "distance")), strict=True):
            if a in old and b in old:
                pair = (min(old[a], old[b]), max(old[a], old[b]))
                best[pair] = min(dist, best.get(pair, 99))
    if reuse is not None:
        roots = con.execute("select image_key as item, sha256 from roots order by image_key").arrow().read_all()
        key_of = dict(con.execute("select id, image_key from roots").fetchall())
        pairs = sorted((key_of[a], key_of[b], dist) for (a, b), dist in best.items())
        reuse.put_table("near-roots", roots)
        schema = pa.schema([("a", pa.string()), ("b", pa.string()), ("distance", pa.int32())]).with_metadata(
            {"distance": str(d)}
        )
        reuse.put_table(
            "near-pairs", pa.Table.from_pylist([dict(zip("ab", p[:2]), distance=p[2]) for p in pairs], schema)
        )
    return best, len(old)


def build_map(catalog: Catalog, cfg, reuse: ItemIndex | None = None) -> tuple[dict[str, pa.Table], dict]:
    """Clusters of duplicates and the removals. Python only holds edges and removals (small);
    per-image tables stay in DuckDB. Every pHash candidate passes the colour check
    (corpus/images/colour.py) before it merges or removes anything; the ones that fail are kept
    in `rejected`. Raises GuardError, before anything is written, when merging or
    decontamination would take more than `max_removed_fraction` of the images."""
    con = catalog.con
    d = cfg.phash_max_distance
    # Ids in order of preference: the largest original (then the smallest key) represents a cluster.
    con.execute("""
        create or replace temp table img as
        with ranked as (
            select (row_number() over (order by orig_width * orig_height desc, image_key) - 1)::BIGINT as id,
                   image_key, sha256, phash, phash_windows
            from images)
        select *, min(id) over (partition by sha256) as exact_root from ranked""")
    exact = con.execute("select id, exact_root from img where id <> exact_root order by id").fetchall()
    edges = list(exact)
    dups: list[tuple[int, int, str, int, float | None]] = [(a, b, "exact", 0, None) for a, b in exact]
    rejected: list[tuple] = []  # (id, other id or None, eval_set, eval item, kind, distance, colour)
    near_reused = 0
    verified: set[tuple[int, int]] = set()
    if cfg.near_duplicates:
        best, near_reused = near_pairs(con, d, reuse)
        cands = sorted(best.items())
        colour, ok = check_pairs(con, [(b, a) for (a, b), _ in cands], cfg)
        for ((a, b), dist), c, good in zip(cands, colour, ok, strict=True):
            if good:
                verified.add((a, b))
                edges.append((b, a))
                dups.append((b, a, "near", dist, c))
            else:
                rejected.append((b, a, None, None, "near", dist, c))
    root = keep_verified(con, components(edges), verified, cfg)

    removed_rows: list[tuple] = []
    if cfg.by_ids:
        removed_rows += con.execute(_IDENTITY_SQL).fetchall()
    if cfg.by_bytes:
        removed_rows += con.execute(_SHA256_SQL).fetchall()
    if cfg.by_appearance:
        matches, misses = appearance_matches(con, cfg)
        removed_rows += matches
        rejected += misses
    removed_rows.sort(key=lambda r: (r[0], r[1], r[2], r[4]))
    removed_ids = {r[0] for r in removed_rows}
    first_match: dict[int, tuple] = {}
    for row in removed_rows:
        first_match.setdefault(root.get(row[0], row[0]), row)
    # A removed image takes its duplicates with it: they are the same picture.
    members: dict[int, list[int]] = {}
    for node, r in root.items():
        members.setdefault(r, []).append(node)
    for r, row in sorted(first_match.items()):
        for m in sorted(members.get(r, [r])):
            if m not in removed_ids:
                removed_rows.append((m, "duplicate_of_removed", row[2], row[3], row[4], None, row[0], None))

    needed = sorted(
        {i for a, b, *_ in dups for i in (a, b)}
        | {r[0] for r in removed_rows}
        | {r[6] for r in removed_rows if r[6] is not None}
        | {i for r in rejected for i in (r[0], r[1]) if i is not None}
    )
    key_of = dict(
        con.execute("select id, image_key from img where id in (select unnest($1::BIGINT[]))", [needed]).fetchall()
    )
    n_images = con.execute("select count(*) from img").fetchone()[0]
    guard(cfg, n_images, root, removed_rows, dups, key_of)

    roots_t = pa.table({"id": pa.array(list(root), pa.int64()), "root": pa.array(list(root.values()), pa.int64())})
    con.register("roots_t", roots_t)
    con.register("removed_roots_t", pa.table({"root": pa.array(sorted(first_match), pa.int64())}))
    image_map = (
        con.execute("""
        with m as (
            select i.id, i.image_key, coalesce(r.root, i.id) as root from img i left join roots_t r on r.id = i.id)
        select m.image_key, k.image_key as kept_key, m.root in (select root from removed_roots_t) as removed,
               (count(*) over (partition by m.root))::INTEGER as cluster_size
        from m join img k on k.id = m.root order by m.image_key""")
        .arrow()
        .read_all()
        .cast(MAP_SCHEMA)
    )
    dup_table = pa.table(
        {
            "image_key": [key_of[a] for a, *_ in dups],
            "kept_key": [key_of.get(root.get(a, a)) for a, *_ in dups],
            "rule": [r for _, _, r, _, _ in dups],
            "distance": [dist for *_, dist, _ in dups],
            "colour_distance": [c for *_, c in dups],
        },
        schema=DUPLICATES_SCHEMA,
    )
    removed = pa.table(
        {
            "image_key": [key_of[r[0]] for r in removed_rows],
            "rule": [r[1] for r in removed_rows],
            "eval_set": [r[2] for r in removed_rows],
            "eval_split": [r[3] for r in removed_rows],
            "eval_item": [r[4] for r in removed_rows],
            "distance": [r[5] for r in removed_rows],
            "matched_key": [key_of[r[6]] if r[6] is not None else None for r in removed_rows],
            "colour_distance": [r[7] for r in removed_rows],
        },
        schema=REMOVED_SCHEMA,
    )
    rejected_table = pa.table(
        {
            "image_key": [key_of[r[0]] for r in rejected],
            "candidate_key": [key_of[r[1]] if r[1] is not None else None for r in rejected],
            "eval_set": [r[2] for r in rejected],
            "eval_item": [r[3] for r in rejected],
            "kind": [r[4] for r in rejected],
            "distance": [r[5] for r in rejected],
            "colour_distance": [r[6] for r in rejected],
        },
        schema=REJECTED_SCHEMA,
    )
    stats = {
        "images_in": image_map.num_rows,
        "exact_duplicates": len(exact),
        "near_duplicates": len(dups) - len(exact),
        "candidates_rejected": dict(sorted(Counter(r[4] for r in rejected).items())),
        "images_removed": sum(image_map.column("removed").to_pylist()),
        "near_roots_reused": near_reused,  # roots a rebuild did not join again (an earlier dedup had)
    }
    mapped = zip(*(image_map.column(c).to_pylist() for c in ("image_key", "kept_key", "removed")), strict=True)
    stats["images_kept"] = sum(1 for k, kk, rm in mapped if k == kk and not rm)
    tables = {
        "image_map": image_map,
        "duplicates": dup_table.sort_by([("image_key", "ascending"), ("kept_key", "ascending")]),
        "removed": removed,
        "rejected": rejected_table.sort_by([("kind", "ascending"), ("image_key", "ascending")]),
    }
    return tables, stats


def _thumbs(con, table: str, ids: list[int]) -> dict[int, tuple[bytes, int, int]]:
    """id → (thumbnail, width, height) for the given ids of `img` (from `images`) or `ev_ok`
    (from `eval_images`): thumbnails are fetched only for candidates, never for the whole corpus."""
    if not ids:
        return {}
    source = (
        "img i join images x on x.image_key = i.image_key"
        if table == "img"
        else "ev_ok i join eval_images x on x.eval_set = i.eval_set and x.item = i.item"
    )
    rows = con.execute(
        f"select i.id, x.thumb, x.width, x.height from {source} where i.id in (select unnest($1::BIGINT[]))",
        [sorted(set(ids))],
    ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def check_pairs(con, pairs: list[tuple[int, int]], cfg, other: str = "img") -> tuple[list[float], list[bool]]:
    """The colour check of pHash candidates (a in `img`, b in `img` or `ev_ok`): (colour distance,
    same picture?) per pair. Aspect ratios must agree, and the pairs that pass the coarse colour
    check must pass the fine one (no 2×2 block of differing pixels at 64×64)."""
    if not pairs:
        return [], []
    if other == "img":  # one lookup for both sides
        left = right = _thumbs(con, "img", [i for p in pairs for i in p])
    else:
        left, right = _thumbs(con, "img", [a for a, _ in pairs]), _thumbs(con, other, [b for _, b in pairs])
    colour = colour_distances([left[a][0] for a, _ in pairs], [right[b][0] for _, b in pairs])
    ok = [
        float(c) <= cfg.colour_max_distance and aspect_ratio_close(*left[a][1:], *right[b][1:])
        for (a, b), c in zip(pairs, colour, strict=True)
    ]
    coarse = [i for i, passed in enumerate(ok) if passed]
    fine = fine_differences([left[pairs[i][0]][0] for i in coarse], [right[pairs[i][1]][0] for i in coarse])
    for i, blocks in zip(coarse, fine, strict=True):
        ok[i] = blocks == 0
    return [round(float(c), 2) for c in colour], ok


def keep_verified(con, root: dict[int, int], verified: set[tuple[int, int]], cfg) -> dict[int, int]:
    """A caption moves to its cluster's kept image only if its own image is an exact copy of that
    image or a verified near duplicate of it. Verified edges chain (a~b, b~c), so members whose
    exact group was not checked against the kept image directly are checked now (pHash within
    the distance and the colour check); an exact group that fails stays an image of its own."""
    exact_root = dict(
        con.execute(
            "select id, exact_root from img where id in (select unnest($1::BIGINT[]))", [sorted(root)]
        ).fetchall()
    )
    todo = sorted(
        {(exact_root[m], r) for m, r in root.items() if exact_root[m] != r and (r, exact_root[m]) not in verified}
    )
    if not todo:
        return root
    hashes = dict(
        con.execute(
            "select id, [phash] || phash_windows from img where id in (select unnest($1::BIGINT[]))",
            [sorted({i for p in todo for i in p})],
        ).fetchall()
    )

    def phash_close(a: int, b: int) -> bool:
        (fa, *wa), (fb, *wb) = hashes[a], hashes[b]
        return (
            min(hamming(fa, h) for h in (fb, *wb)) <= cfg.phash_max_distance
            or min(hamming(fb, h) for h in wa) <= cfg.phash_max_distance
        )

    _, ok = check_pairs(con, todo, cfg)
    failed = {er for (er, r), good in zip(todo, ok, strict=True) if not (good and phash_close(er, r))}
    return {m: (exact_root[m] if exact_root[m] in failed else r) for m, r in root.items()}


def guard(cfg, n_images: int, root: dict[int, int], removed_rows: list[tuple], dups: list[tuple], key_of) -> None:
    """Stop before publishing when merging or decontamination would take more than the allowed
    fraction of the images: one paragraph with the count, the rules and the closest pairs."""
    limit = cfg.max_removed_fraction
    merged = sum(1 for m, r in root.items() if m != r)
    removed = {r[0] for r in removed_rows}
    problems = []
    if n_images < max(cfg.guard_min_images, 1):
        return
    if len(removed) > limit * n_images:
        by_rule = Counter(r[1] for r in {r[0]: r for r in removed_rows}.values())
        closest = sorted(
            (r for r in removed_rows if r[1] != "duplicate_of_removed"),
            key=lambda r: (r[5] if r[5] is not None else -1, r[7] if r[7] is not None else -1, r[0]),
        )
        firsts: dict[int, tuple] = {}
        for r in closest:
            firsts.setdefault(r[0], r)  # the closest match of each image
        examples = list(firsts.values())[:5]
        lines = [
            f"{key_of[r[0]]} ~ {r[2]} {r[4]} ({r[1]}"
            + (f", pHash {r[5]}, colour {r[7]}" if r[5] is not None else "")
            + ")"
            for r in examples
        ]
        problems.append(
            f"decontamination would remove {len(removed):,} of {n_images:,} images ({len(removed) / n_images:.1%}; "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(by_rule.items()))
            + "). Closest matches: "
            + "; ".join(lines)
        )
    if merged > limit * n_images:
        near = sorted((x for x in dups if x[2] == "near"), key=lambda x: (x[3], x[4] or 0, x[0]))[:5]
        exact = sum(1 for x in dups if x[2] == "exact")
        lines = [f"{key_of[a]} ~ {key_of[b]} (pHash {dist}, colour {c})" for a, b, _, dist, c in near]
        problems.append(
            f"duplicate merging would fold {merged:,} of {n_images:,} images into others ({merged / n_images:.1%}; "
            f"exact {exact:,}, near {len(dups) - exact:,})"
            + (". Closest near pairs: " + "; ".join(lines) if lines else "")
        )
    if problems:
        raise GuardError(
            "dedup stopped before publishing anything: "
            + " Also, ".join(problems)
            + f". That is more than dedup.max_removed_fraction = {limit}. Pictures a hash cannot tell apart "
            "look like copies: check the pairs above. If they are not the same picture, lower "
            "dedup.phash_max_distance or dedup.colour_max_distance, or set dedup.decontamination: exact "
            "(ids and byte copies only) or dedup.near_duplicates: false; if they are, raise "
            "dedup.max_removed_fraction (up to 1.0)."
        )


# Pretraining images sharing a COCO id or a Flickr photo id with an evaluation item. Evaluation
# COCO images get their Flickr id from any COCO source in `pairs` (its flickr_url) when their own
# files do not carry it, so SBU/VG/CC copies of the same Flickr photo are caught too.
_IDENTITY_SQL = """
with coco_flickr as (
    select coco_id, min(flickr_id) as flickr_id from pairs
    where coco_id is not null and flickr_id is not null group by coco_id
),
pimg as (  -- a VG image with a COCO id is that COCO photo: it inherits its Flickr id
    select distinct p.image_key, p.coco_id, coalesce(p.flickr_id, cf.flickr_id) as flickr_id
    from pairs p left join coco_flickr cf on p.coco_id = cf.coco_id
    where p.coco_id is not null or p.flickr_id is not null
),
ev as (
    select e.eval_set, e.split, e.item, e.coco_id, coalesce(e.flickr_id, cf.flickr_id) as flickr_id
    from eval_images e left join coco_flickr cf on e.coco_id = cf.coco_id
)
select distinct i.id, rule, eval_set, split, item, null::INTEGER as distance, null::BIGINT as matched,
       null::FLOAT as colour
from (
    select p.image_key, 'coco_id' as rule, ev.eval_set, ev.split, ev.item
    from pimg p join ev on p.coco_id = ev.coco_id
    union all
    select p.image_key, 'flickr_id' as rule, ev.eval_set, ev.split, ev.item
    from pimg p join ev on p.flickr_id = ev.flickr_id
) m join img i on i.image_key = m.image_key
order by i.id, rule, eval_set, item
"""

# Byte copies of an evaluation image (the sha256 of the original bytes, as the crawl takes it).
_SHA256_SQL = """
select distinct i.id, 'sha256' as rule, e.eval_set, e.split, e.item, 0 as distance, null::BIGINT as matched,
       null::FLOAT as colour
from img i join eval_images e on e.sha256 = i.sha256
where e.status = 'ok'
order by i.id, e.eval_set, e.item
"""


def appearance_matches(con, cfg) -> tuple[list[tuple], list[tuple]]:
    """Pretraining images within pHash distance d of an evaluation image, in either direction, that
    pass the colour check; and the candidates that failed it."""
    d = cfg.phash_max_distance
    con.execute("""
        create or replace temp table ev_ok as
        select (row_number() over (order by eval_set, item) - 1)::BIGINT as id,
               eval_set, split, item, phash, phash_windows
        from eval_images where status = 'ok'""")
    corpus_full = "select id, phash as h from img"
    corpus_all = "select id, phash as h from img union all select id, unnest(phash_windows) as h from img"
    eval_full = "select id, phash as h from ev_ok"
    eval_all = "select id, phash as h from ev_ok union all select id, unnest(phash_windows) as h from ev_ok"
    a = hamming_join(con, corpus_full, eval_all, d)
    b = hamming_join(con, eval_full, corpus_all, d)
    best: dict[tuple[int, int], int] = {}
    for img_id, ev_id, dist in zip(*(a.column(c).to_pylist() for c in ("qid", "iid", "distance")), strict=True):
        best[(img_id, ev_id)] = min(dist, best.get((img_id, ev_id), 99))
    for ev_id, img_id, dist in zip(*(b.column(c).to_pylist() for c in ("qid", "iid", "distance")), strict=True):
        best[(img_id, ev_id)] = min(dist, best.get((img_id, ev_id), 99))
    evals = {r[0]: r[1:] for r in con.execute("select id, eval_set, split, item from ev_ok").fetchall()}
    cands = sorted(best.items())
    colour, ok = check_pairs(con, [p for p, _ in cands], cfg, other="ev_ok")
    matches, misses = [], []
    for ((img_id, ev_id), dist), c, good in zip(cands, colour, ok, strict=True):
        eval_set, split, item = evals[ev_id]
        if good:
            matches.append((img_id, "appearance", eval_set, split, item, dist, None, c))
        else:
            misses.append((img_id, None, eval_set, item, "appearance", dist, c))
    return matches, misses


# --- the clean corpus -------------------------------------------------------------------------


def write_kept_images(ctx: StageContext, catalog: Catalog, bar) -> None:
    """One shard per crawl shard: the kept images and where their bytes are."""
    for index, key in enumerate(ctx.input_files("crawl", "images")):
        name = shard_id("images", index)
        bar.advance(1)
        if ctx.shard_done(name):
            continue
        started = now()
        table = (
            catalog.con.execute(f"""
            select i.image_key, i.sha256, i.phash, i.width, i.height, {catalog.literal(key)} as crawl_file,
                   i.file_row_number::BIGINT as crawl_row, m.cluster_size
            from read_parquet({catalog.url(key)}, file_row_number = true) i
            join image_map m on m.image_key = i.image_key
            where m.kept_key = i.image_key and not m.removed
            order by i.image_key""")
            .arrow()
            .read_all()
        )
        ctx.write_shard(name, {"corpus_images": table}, {"corpus_images": table.num_rows}, started)


def write_kept_pairs(ctx: StageContext, catalog: Catalog, bar) -> None:
    """One shard per ingest shard: pairs of kept images, re-pointed to their cluster's kept image.
    Pairs whose image was not crawled or was removed are dropped (counted in the report)."""
    for index, key in enumerate(ctx.input_files("ingest", "pairs")):
        name = shard_id("pairs", index)
        bar.advance(1)
        if ctx.shard_done(name):
            continue
        started = now()
        table = (
            catalog.con.execute(f"""
            select p.* replace (m.kept_key as image_key), p.image_key as original_image_key
            from read_parquet({catalog.url(key)}) p join image_map m on m.image_key = p.image_key
            where not m.removed
            order by p.pair_id""")
            .arrow()
            .read_all()
        )
        ctx.write_shard(name, {"corpus_pairs": table}, {"corpus_pairs": table.num_rows}, started)


# --- the report -------------------------------------------------------------------------------


def build_report(catalog: Catalog, cfg) -> tuple[pa.Table, dict, dict]:
    con = catalog.con
    table = (
        con.execute("""
        with r as (select distinct image_key, rule, eval_set from removed)
        select p.source, r.eval_set, r.rule,
               count(distinct r.image_key)::BIGINT as images, count(distinct p.pair_id)::BIGINT as pairs
        from r join pairs p on p.image_key = r.image_key
        group by all order by all""")
        .arrow()
        .read_all()
    )
    totals = con.execute("""
        select (select count(*) from pairs), (select count(distinct image_key) from pairs),
               (select count(*) from images),
               (select count(*) from image_map where kept_key = image_key and not removed),
               (select count(*) from pairs p join image_map m using (image_key) where not m.removed),
               (select count(*) from duplicates where rule = 'exact'),
               (select count(*) from duplicates where rule = 'near'),
               (select count(distinct image_key) from removed)""").fetchone()
    evals = con.execute("""
        select eval_set, count(*), count(*) filter (where status = 'ok')
        from eval_images group by 1 order by 1""").fetchall()
    repointed = (
        con.execute("""
        select p.pair_id, p.source, p.image_key as original_image_key, m.kept_key,
               case when a.sha256 = b.sha256 then 'exact' else 'near' end as rule
        from pairs p join image_map m on m.image_key = p.image_key
        join images a on a.image_key = p.image_key join images b on b.image_key = m.kept_key
        where m.kept_key <> m.image_key and not m.removed
        order by p.pair_id""")
        .arrow()
        .read_all()
        .cast(REPOINTED_SCHEMA)
    )
    rejected = dict(con.execute("select kind, count(*) from rejected group by 1 order by 1").fetchall())
    report = {
        "phash_max_distance": cfg.phash_max_distance,
        "colour_max_distance": cfg.colour_max_distance,
        "rules": {"decontamination": cfg.decontamination, "near_duplicates": cfg.near_duplicates},
        "corpus": {
            "pairs_in": totals[0],
            "images_in": totals[1],
            "images_crawled": totals[2],
            "images_kept": totals[3],
            "pairs_kept": totals[4],
        },
        "duplicates": {"exact": totals[5], "near": totals[6]},
        "images_removed": totals[7],
        "eval_sets": {name: {"items": n, "images_hashed": ok} for name, n, ok in evals},
        "candidates_rejected": rejected,  # pHash candidates that failed the colour check (table `rejected`)
        "repointed_captions": repointed.num_rows,  # every one is in the table `repointed`
        "repointed_examples": repointed.slice(0, REPORT_EXAMPLES).to_pylist(),
        "removed": table.to_pylist(),
    }
    return {"decontamination": table, "repointed": repointed}, report, {"report_rows": table.num_rows}


REPORT_EXAMPLES = 50


def report_markdown(report: dict) -> str:
    c, dup = report["corpus"], report["duplicates"]
    lines = [
        "# Decontamination report",
        "",
        f"pHash distance ≤ {report['phash_max_distance']}, confirmed by colour distance ≤ "
        f"{report['colour_max_distance']} and the pixel check; decontamination: {report['rules']['decontamination']}; "
        f"near duplicates merged: {'yes' if report['rules']['near_duplicates'] else 'no'}",
        "",
        "| | pairs | images |",
        "|---|---:|---:|",
        f"| ingested | {c['pairs_in']:,} | {c['images_in']:,} |",
        f"| crawled | | {c['images_crawled']:,} |",
        f"| kept | {c['pairs_kept']:,} | {c['images_kept']:,} |",
        "",
        f"Duplicates merged: {dup['exact']:,} exact (sha256), {dup['near']:,} near (pHash, colour-checked). "
        f"Images removed for overlapping an evaluation set: {report['images_removed']:,}. "
        "pHash candidates the colour check turned down (table `rejected`): "
        + (", ".join(f"{k} {v:,}" for k, v in report["candidates_rejected"].items()) or "none")
        + ".",
        "",
        "| evaluation set | items | images hashed |",
        "|---|---:|---:|",
        *(f"| {name} | {v['items']:,} | {v['images_hashed']:,} |" for name, v in report["eval_sets"].items()),
        "",
        "An image that several rules match is counted once under each of them.",
        "",
        "| source | evaluation set | rule | images removed | pairs removed |",
        "|---|---|---|---:|---:|",
        *(
            f"| {r['source']} | {r['eval_set']} | {r['rule']} | {r['images']:,} | {r['pairs']:,} |"
            for r in report["removed"]
        ),
        "",
        f"Captions moved to their duplicate's kept image: {report['repointed_captions']:,}"
        + (
            f" (the first {len(report['repointed_examples'])} below; all in table `repointed`)"
            if report["repointed_examples"]
            else ""
        )
        + ".",
    ]
    if report["repointed_examples"]:
        lines += ["", "| pair | image | kept image | rule |", "|---|---|---|---|"]
        lines += [
            f"| {r['pair_id']} | {r['original_image_key']} | {r['kept_key']} | {r['rule']} |"
            for r in report["repointed_examples"]
        ]
    return "\n".join(lines) + "\n"


def _empty(schema: pa.Schema) -> str:
    cols = ", ".join(f"null::{_duck_type(f.type)} as {f.name}" for f in schema)
    return f"select {cols} where false"


def _duck_type(t: pa.DataType) -> str:
    names = {"string": "VARCHAR", "int64": "BIGINT", "int32": "INTEGER", "binary": "BLOB"}
    names["list<item: int64>"] = "BIGINT[]"
    return names[str(t)]


def _run(ctx: StageContext) -> None:
    run_dedup(ctx, ctx.extra["crawl"])


DEDUP = Stage(
    name="dedup",
    # 2: corpus_images.crawl_file is a storage key (was a URL); 3: eval shards by image location;
    # 4: pHash candidates colour-checked, decontamination modes, rejected and repointed tables
    # 5: the fine check (64×64 thumbnails, pixel blocks) after the coarse colour check
    # 6: evaluation images hashed as crawl version 5 hashes (from one reduced copy)
    version=6,
    run=_run,
    inputs=("ingest", "crawl"),
    tables=(
        "corpus_images",
        "corpus_pairs",
        "image_map",
        "duplicates",
        "removed",
        "rejected",
        "eval_images",
        "decontamination",
        "repointed",
    ),  # fmt: skip
    description=(
        "exact + colour-checked near duplicates merged; evaluation-set overlap removed by id, bytes and appearance"
    ),
    extra_config=("crawl",),
    # Reused across keys (contract/reuse.py): evaluation images' hashes, and the near-duplicate join
    # among images an earlier dedup had. Neither depends on a dedup setting (the distance is checked
    # apart) nor on the crawl's shard size; both depend on the crawl's fetch and image settings.
    reuse_ignores=(*DedupConfig.model_fields, "shard_images"),
)
