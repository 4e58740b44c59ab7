"""The `pairs` and `rejects` schemas, and the builder that turns one shard's rows into Arrow tables."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),  # "<source name>:<id in the source>", stable
        pa.field("source", pa.string(), nullable=False),
        pa.field("image_key", pa.string(), nullable=False),  # stable per image, shared across sources
        pa.field("image_uri", pa.string(), nullable=False),  # http(s) URL, s3:// URI or absolute local path
        pa.field("caption", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("coco_id", pa.int64()),
        pa.field("flickr_id", pa.int64()),  # Flickr photo id (COCO flickr_url, static Flickr URLs, Flickr30K)
        pa.field("vg_id", pa.int64()),
        pa.field("region_id", pa.int64()),  # Visual Genome region box, pixels of the VG image
        pa.field("region_x", pa.int32()),
        pa.field("region_y", pa.int32()),
        pa.field("region_w", pa.int32()),
        pa.field("region_h", pa.int32()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("record", pa.string(), nullable=False),  # where: "line 12", "annotations[3]", …
        pa.field("reason", pa.string(), nullable=False),  # machine-readable: empty_caption, bad_url, …
        pa.field("detail", pa.string(), nullable=False),  # the offending text, truncated
    ]
)

DETAIL_CHARS = 300


class ShardBuilder:
    """Collects one shard's pairs and rejects column by column (cheap appends on the hot path)."""

    def __init__(self, source: str):
        self.source = source
        self.cols: dict[str, list] = {f.name: [] for f in PAIRS_SCHEMA}
        self.rejects: dict[str, list] = {f.name: [] for f in REJECTS_SCHEMA}
        self.reasons: Counter[str] = Counter()
        self.records = 0  # input records seen (lines, annotations, regions, images)
        self.blank_lines = 0
        c = self.cols
        self._append = [
            c["pair_id"].append,
            c["image_key"].append,
            c["image_uri"].append,
            c["caption"].append,
            c["split"].append,
            c["coco_id"].append,
            c["flickr_id"].append,
            c["vg_id"].append,
        ]

    def pair(
        self,
        pair_id: str,
        image_key: str,
        image_uri: str,
        caption: str,
        split: str,
        coco_id: int | None = None,
        flickr_id: int | None = None,
        vg_id: int | None = None,
        region: tuple[int, int, int, int, int] | None = None,
    ) -> None:
        a = self._append
        a[0](pair_id)
        a[1](image_key)
        a[2](image_uri)
        a[3](caption)
        a[4](split)
        a[5](coco_id)
        a[6](flickr_id)
        a[7](vg_id)
        c = self.cols
        rid, x, y, w, h = region if region is not None else (None, None, None, None, None)
        c["region_id"].append(rid)
        c["region_x"].append(x)
        c["region_y"].append(y)
        c["region_w"].append(w)
        c["region_h"].append(h)

    def reject(self, file: str, record: str, reason: str, detail: Any = "") -> None:
        r = self.rejects
        r["source"].append(self.source)
        r["file"].append(file)
        r["record"].append(record)
        r["reason"].append(reason)
        text = detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False, default=str)
        r["detail"].append(text[:DETAIL_CHARS])
        self.reasons[reason] += 1

    def tables(self) -> dict[str, pa.Table]:
        n = len(self.cols["pair_id"])
        self.cols["source"] = [self.source] * n
        pairs = pa.table({f.name: pa.array(self.cols[f.name], type=f.type) for f in PAIRS_SCHEMA}, schema=PAIRS_SCHEMA)
        rejects = pa.table(
            {f.name: pa.array(self.rejects[f.name], type=f.type) for f in REJECTS_SCHEMA}, schema=REJECTS_SCHEMA
        )
        return {"pairs": pairs, "rejects": rejects}

    def stats(self) -> dict[str, Any]:
        n_pairs = len(self.cols["pair_id"])
        return {
            "pairs": n_pairs,
            "rejects": sum(self.reasons.values()),
            "records": self.records,
            "blank_lines": self.blank_lines,
            "pairs_by_source": {self.source: n_pairs},
            "reject_reasons": dict(sorted(self.reasons.items())),
        }
