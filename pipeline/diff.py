"""What a corpus rebuild changed: the clean corpus (dedup) against the previous one on the storage.

Images added and removed, each removal with its reason (the link is gone, newly decontaminated, now
a duplicate of another kept image, no longer in the annotations); kept pairs added and removed per
source; and what the stages reused, fetched and extracted (their `counts.reuse`).

The diff is published next to the artifacts, at ``reports/corpus-diff/<dedup key>.json`` (and
``.md``), not inside the dedup artifact: an artifact holds only what its inputs determine, so a
rebuild stays byte-identical to a build from scratch, which has no previous corpus.
"""

from __future__ import annotations

import json
from typing import Any

from contract.artifact import ARTIFACTS, MANIFEST, Artifact, Manifest
from storage import Storage, StorageError
from storage.catalog import Catalog

REPORTS = "reports/corpus-diff"


def previous_corpus(storage: Storage, current: Manifest) -> Manifest | None:
    """The newest complete dedup artifact older than ``current`` (the corpus it replaces)."""
    best: Manifest | None = None
    for path in storage.list(f"{ARTIFACTS}/dedup"):
        parts = path.split("/")
        if len(parts) != 4 or parts[3] != MANIFEST or parts[2] == current.key:
            continue
        try:
            m = Artifact(storage, "dedup", parts[2]).manifest()
        except StorageError:
            continue
        if m is not None and m.created_at <= current.created_at and (best is None or m.created_at > best.created_at):
            best = m
    return best


def _files(storage: Storage, m: Manifest, table: str) -> list[str]:
    art = Artifact(storage, m.stage, m.key)
    return [art.file_key(f.path) for f in m.tables.get(table, [])]


def corpus_diff(
    storage: Storage,
    current: Manifest,
    previous: Manifest | None,
    crawl: Manifest | None = None,
    extract: Manifest | None = None,
) -> dict[str, Any]:
    """The diff of ``current`` (a dedup manifest) against ``previous``; ``crawl`` / ``extract`` are
    the current corpus's crawl and extract manifests, for the failure reasons and the reuse counts."""
    work = {
        "crawl": (crawl.counts.get("reuse") if crawl else None) or {},
        "extract": (extract.counts.get("reuse") if extract else None) or {},
    }
    diff: dict[str, Any] = {"corpus": current.key, "previous": previous.key if previous else None, "work": work}
    tables = {
        "cur_images": _files(storage, current, "corpus_images"),
        "cur_pairs": _files(storage, current, "corpus_pairs"),
        "cur_map": _files(storage, current, "image_map"),
        "cur_removed": _files(storage, current, "removed"),
        "failures": _files(storage, crawl, "failures") if crawl else [],
    }
    if previous is not None:
        tables.update(
            prev_images=_files(storage, previous, "corpus_images"), prev_pairs=_files(storage, previous, "corpus_pairs")
        )
    catalog = Catalog(storage, tables, settings={"memory_limit": "2GB"})
    try:
        for view, sql in (
            ("prev_images", "select ''::VARCHAR as image_key where false"),
            ("prev_pairs", "select ''::VARCHAR as pair_id, ''::VARCHAR as source where false"),
            ("cur_images", "select ''::VARCHAR as image_key where false"),
            ("cur_pairs", "select ''::VARCHAR as pair_id, ''::VARCHAR as source where false"),
            ("cur_map", "select ''::VARCHAR as image_key, ''::VARCHAR as kept_key, false as removed where false"),
            ("cur_removed", "select ''::VARCHAR as image_key, ''::VARCHAR as rule where false"),
            ("failures", "select ''::VARCHAR as image_key, ''::VARCHAR as reason where false"),
        ):
            if view not in catalog.views:
                catalog.con.execute(f"create view {view} as {sql}")
        con = catalog.con
        added, kept_before = con.execute("""
            select count(*) filter (where p.image_key is null), count(*) filter (where p.image_key is not null)
            from cur_images c left join prev_images p using (image_key)""").fetchone()
        removed = dict(
            con.execute("""
            select case
                     when f.image_key is not null then 'link_gone'
                     when r.image_key is not null then 'decontaminated'
                     when m.image_key is not null and m.kept_key <> m.image_key then 'duplicate'
                     when m.image_key is null then 'left_annotations'
                     else 'other' end as reason, count(*)
            from prev_images p
            left join cur_images c using (image_key)
            left join (select distinct image_key from failures) f using (image_key)
            left join (select distinct image_key from cur_removed) r using (image_key)
            left join cur_map m using (image_key)
            where c.image_key is null
            group by 1 order by 1""").fetchall()
        )
        gone_reasons = dict(
            con.execute("""
            select f.reason, count(*) from prev_images p join failures f using (image_key)
            left join cur_images c using (image_key) where c.image_key is null group by 1 order by 1""").fetchall()
        )
        pairs = {
            source: {"added": int(a), "removed": int(r)}
            for source, a, r in con.execute("""
            with c as (select pair_id, source from cur_pairs), p as (select pair_id, source from prev_pairs)
            select coalesce(c.source, p.source) as source,
                   count(*) filter (where p.pair_id is null), count(*) filter (where c.pair_id is null)
            from c full join p using (pair_id) group by 1 order by 1""").fetchall()
        }
    finally:
        catalog.close()
    diff["images"] = {
        "added": int(added),
        "kept": int(kept_before),
        "removed": sum(removed.values()),
        "removed_by_reason": removed,
        "link_gone_by_failure": gone_reasons,
    }
    diff["pairs"] = pairs
    return diff


def diff_markdown(diff: dict[str, Any]) -> str:
    img = diff["images"]
    prev = f"`{diff['previous'][:12]}`" if diff["previous"] else "none (first build)"
    lines = [
        "# Corpus rebuild: what changed",
        "",
        f"corpus `{diff['corpus'][:12]}` against the previous corpus {prev}",
        "",
        f"Images: {img['added']:,} added, {img['removed']:,} removed, {img['kept']:,} kept.",
        "",
        "| images removed because | count |",
        "|---|---:|",
        *(f"| {reason} | {n:,} |" for reason, n in img["removed_by_reason"].items()),
        "",
        "| source | pairs added | pairs removed |",
        "|---|---:|---:|",
        *(f"| {s} | {v['added']:,} | {v['removed']:,} |" for s, v in diff["pairs"].items()),
        "",
        "| stage | " + " | ".join(["reused", "revalidated", "fetched", "refetched", "gone", "extracted"]) + " |",
        "|---|" + "---:|" * 6,
    ]
    for stage, counts in diff["work"].items():
        cells = [counts.get(k, "") for k in ("reused", "revalidated", "fetched", "refetched", "gone", "extracted")]
        lines.append(f"| {stage} | " + " | ".join(f"{c:,}" if isinstance(c, int) else "" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def publish_diff(storage: Storage, diff: dict[str, Any]) -> str:
    """Write the diff next to the artifacts; returns the address of its JSON."""
    key = f"{REPORTS}/{diff['corpus']}"
    storage.put(f"{key}.md", diff_markdown(diff).encode())
    storage.put(f"{key}.json", json.dumps(diff, indent=1, sort_keys=True).encode())
    return storage.url(f"{key}.json")


def rebuild_diff(cfg, storage: Storage, against: str | None = None, publish: bool = True) -> dict[str, Any]:
    """The diff of the config's current corpus against ``against`` (a dedup key) or the previous
    corpus on the storage; published unless ``publish`` is False."""
    from contract.errors import MissingInputError  # noqa: PLC0415
    from pipeline.runner import Planner  # noqa: PLC0415 — the runner imports the stage packages (seconds)

    planner = Planner(cfg, storage)
    current = planner.manifest("dedup")
    if current is None:
        raise MissingInputError("no clean corpus for this config yet: run `uniter run dedup` (or `uniter run all`)")
    if against is not None:
        previous = Artifact(storage, "dedup", against).manifest()
        if previous is None:
            raise MissingInputError(f"no complete dedup artifact with key {against} on {storage.uri}")
    else:
        previous = previous_corpus(storage, current)
    diff = corpus_diff(storage, current, previous, planner.manifest("crawl"), planner.manifest("extract"))
    if publish:
        diff["uri"] = publish_diff(storage, diff)
    return diff
