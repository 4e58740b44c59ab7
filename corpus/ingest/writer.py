"""The `pairs` and `rejects` schemas, and the builder that turns one shard's rows into Arrow tables."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa

from contract.configbase import redact_credentials

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
    """Collects one shard's pairs and rejects: row by row (`pair`) for the JSON formats, or as
    whole columns (`extend`) for the vectorized line formats."""

    def __init__(self, source: str):
        self.source = source
        self.cols: dict[str, list] = {f.name: [] for f in PAIRS_SCHEMA if f.name != "source"}
        self.batches: list[pa.RecordBatch] = []
        self.rejects: dict[str, list] = {f.name: [] for f in REJECTS_SCHEMA}
        self.reasons: Counter[str] = Counter()
        self.records = 0  # input records seen (lines, annotations, regions, images)
        self.blank_lines = 0

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
        c = self.cols
        c["pair_id"].append(pair_id)
        c["image_key"].append(image_key)
        c["image_uri"].append(image_uri)
        c["caption"].append(caption)
        c["split"].append(split)
        c["coco_id"].append(coco_id)
        c["flickr_id"].append(flickr_id)
        c["vg_id"].append(vg_id)
        rid, x, y, w, h = region if region is not None else (None, None, None, None, None)
        c["region_id"].append(rid)
        c["region_x"].append(x)
        c["region_y"].append(y)
        c["region_w"].append(w)
        c["region_h"].append(h)

    def extend(self, columns: dict[str, pa.Array]) -> None:
        """Append whole columns (equal lengths); columns not given are null."""
        n = len(next(iter(columns.values())))
        arrays = []
        for f in PAIRS_SCHEMA:
            if f.name == "source":
                arrays.append(pa.array([self.source] * n, pa.string()))
            elif isinstance(columns.get(f.name), list):
                arrays.append(pa.array(columns[f.name], type=f.type))
            elif f.name in columns:
                arrays.append(columns[f.name].cast(f.type))
            else:
                arrays.append(pa.nulls(n, f.type))
        self.batches.append(pa.RecordBatch.from_arrays(arrays, schema=PAIRS_SCHEMA))

    def reject(self, file: str, record: str, reason: str, detail: Any = "") -> None:
        r = self.rejects
        r["source"].append(self.source)
        r["file"].append(file)
        r["record"].append(record)
        r["reason"].append(reason)
        text = detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False, default=str)
        r["detail"].append(redact_credentials(text[: 2 * DETAIL_CHARS])[:DETAIL_CHARS])
        self.reasons[reason] += 1

    @property
    def n_pairs(self) -> int:
        return len(self.cols["pair_id"]) + sum(b.num_rows for b in self.batches)

    def tables(self) -> dict[str, pa.Table]:
        batches = list(self.batches)
        n = len(self.cols["pair_id"])
        if n or not batches:
            cols = {**self.cols, "source": [self.source] * n}
            arrays = {f.name: pa.array(cols[f.name], f.type) for f in PAIRS_SCHEMA}
            batches.insert(0, pa.RecordBatch.from_pydict(arrays, schema=PAIRS_SCHEMA))
        pairs = pa.Table.from_batches(batches, schema=PAIRS_SCHEMA).combine_chunks()
        rejects = pa.table(
            {f.name: pa.array(self.rejects[f.name], type=f.type) for f in REJECTS_SCHEMA}, schema=REJECTS_SCHEMA
        )
        return {"pairs": pairs, "rejects": rejects}

    def stats(self) -> dict[str, Any]:
        n_pairs = self.n_pairs
        return {
            "pairs": n_pairs,
            "rejects": sum(self.reasons.values()),
            "records": self.records,
            "blank_lines": self.blank_lines,
            "pairs_by_source": {self.source: n_pairs},
            "reject_reasons": dict(sorted(self.reasons.items())),
        }
