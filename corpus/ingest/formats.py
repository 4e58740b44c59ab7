"""One class per annotation format: split the input into chunks, normalize a chunk into pairs/rejects.

``chunks`` is deterministic (same input → same chunks), so a chunk index is a stable shard id:
a resumed run skips the chunks whose shards are done without normalizing them again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contract.configbase import credentials_in
from contract.errors import InputDataError
from contract.stage import batched
from corpus.annotations.reader import JsonArrayStream, count_lines, file_size, read_line_chunks
from corpus.annotations.records import (
    FLICKR_PATTERN,
    CocoImage,
    as_int,
    coco_images,
    flickr30k_photo_id,
    flickr_id_from_url,
    join_location,
    karpathy_image_uri,
)
from corpus.ingest.config import (
    CocoSource,
    ConceptualCaptionsSource,
    KarpathySource,
    SbuSource,
    TableSource,
    VisualGenomeSource,
)
from corpus.ingest.writer import ShardBuilder

MAX_URL_CHARS = 2048


@dataclass
class Chunk:
    index: int
    records: Any
    nbytes: int  # input bytes this chunk covers (progress)


# --- normalizers ------------------------------------------------------------------------------
# The JSON formats normalize row by row in Python; the line formats (CC, SBU: the big ones) do the
# same with Arrow kernels over a whole chunk. Both follow these rules (tests check they agree):
# - a caption has every whitespace run (Python's str.split set) collapsed to one space, ends trimmed;
#   then it is rejected if empty, if it holds a control character (below), or if it is longer than
#   `ingest.max_caption_chars` characters;
# - a usable URL is http(s)://host[/…] with no whitespace or control characters, at most 2048 chars,
#   and no credentials (user:password@host): every table that holds the URL would hold them too.

# Exactly the characters Python's str.split() splits on, as a class both `re` and RE2 accept.
_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + "\u2028\u2029\u202f\u205f\u3000"
)


def _regex_class(chars: str) -> str:
    return "[" + "".join(f"\\x{ord(c):02x}" if ord(c) < 128 else c for c in chars) + "]"


WHITESPACE_RUN = _regex_class(_WHITESPACE) + "+"
# A caption needs cleaning only if it has a whitespace character other than a single inner space.
NEEDS_CLEANING = _regex_class(_WHITESPACE.replace(" ", "")) + "|  |^ | $"
URL_PATTERN = r"https?://[^\x00-\x20\x7f/?#]+(?:[/?#][^\x00-\x20\x7f]*)?"
_URL = re.compile(URL_PATTERN)
CREDENTIALS_PATTERN = r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*@"
# Control characters that are not whitespace to str.split (which cleaning collapses): C0 (NUL…),
# DEL, and C1 but NEL. In a caption they are binary debris or mis-decoded text, never language.
_CONTROLS = "".join(map(chr, [*range(0x00, 0x09), *range(0x0E, 0x1C), *range(0x7F, 0x85), *range(0x86, 0xA0)]))
CONTROL_CHAR = _regex_class(_CONTROLS)
_CONTROL = re.compile(CONTROL_CHAR)
DEFAULT_MAX_CAPTION_CHARS = 1000


def clean_caption(text: Any) -> str | None:
    """Collapse all whitespace runs (COCO captions carry newlines and double spaces); None if empty."""
    if not isinstance(text, str):
        return None
    return " ".join(text.split()) or None


def caption_problem(caption: str, max_chars: int) -> str | None:
    """Why a cleaned, non-empty caption is rejected, or None."""
    if _CONTROL.search(caption):
        return "control_characters"
    if len(caption) > max_chars:
        return "caption_too_long"
    return None


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be fetched, or None when it is a usable http(s) URL."""
    if not url:
        return "missing_url"
    if len(url) > MAX_URL_CHARS or not _URL.fullmatch(url):
        return "bad_url"
    if credentials_in(url):
        return "credentials_in_url"
    return None


def url_key(url: str) -> str:
    """Image key of a URL-only image (CC, SBU, tables): same URL, same image."""
    return "url:" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:20]


_local = threading.local()


def url_keys(urls: pa.Array) -> pa.Array:
    """`url_key` of a whole column (DuckDB's vectorized sha256: same digests, ~4x faster)."""
    con = getattr(_local, "duckdb", None)
    if con is None:  # one connection per thread: DuckDB connections are not thread-safe
        # One DuckDB thread: ingest already runs one worker process per core.
        con = _local.duckdb = duckdb.connect(config={"threads": 1})
    url_table = pa.table({"u": urls})  # noqa: F841 — DuckDB reads it by its name
    keys = con.sql("select 'url:' || left(sha256(u), 20) as k from url_table").arrow().read_all()
    return keys.column("k").combine_chunks()


def clean_captions(captions: pa.Array) -> pa.Array:
    """`clean_caption` of a whole column; the (slow) regex replace runs only where needed."""
    dirty = pc.match_substring_regex(captions, NEEDS_CLEANING)
    if not pc.any(dirty).as_py():
        return captions
    fixed = pc.utf8_trim(pc.replace_substring_regex(captions.filter(dirty), WHITESPACE_RUN, " "), " ")
    return pc.replace_with_mask(captions, dirty, fixed)


def add_url_pairs(
    out: ShardBuilder,
    name: str,
    split: str,
    line_numbers: list[int],
    captions: list[str],
    urls: list[str],
    caption_file: str,
    url_file: str,
    max_caption_chars: int,
) -> None:
    """Vectorized normalization of (line, caption, url) rows; bad rows go to rejects one by one
    (with the reason `url_problem` / `caption_problem` gives: the rules are written once)."""
    if not line_numbers:
        return
    caps = clean_captions(pa.array(captions, pa.string()))
    url_arr = pc.utf8_trim_whitespace(pa.array(urls, pa.string()))
    url_ok = pc.and_(
        pc.and_(
            pc.match_substring_regex(url_arr, f"^{URL_PATTERN}$"),
            pc.less_equal(pc.utf8_length(url_arr), MAX_URL_CHARS),
        ),
        pc.invert(pc.match_substring_regex(url_arr, CREDENTIALS_PATTERN)),
    )
    cap_len = pc.utf8_length(caps)
    cap_ok = pc.and_(
        pc.and_(pc.greater(cap_len, 0), pc.less_equal(cap_len, max_caption_chars)),
        pc.invert(pc.match_substring_regex(caps, CONTROL_CHAR)),
    )
    good = pc.and_(url_ok, cap_ok)
    if not pc.all(good).as_py():
        bad = np.flatnonzero(~good.to_numpy(zero_copy_only=False))
        ok_url = url_ok.to_numpy(zero_copy_only=False)
        for i in bad:
            where = f"line {line_numbers[i]}"
            detail = f"{captions[i].strip()}\t{urls[i].strip()}"
            if not ok_url[i]:
                out.reject(url_file, where, url_problem(urls[i].strip()) or "bad_url", detail)
            else:
                caption = clean_caption(captions[i])
                reason = caption_problem(caption, max_caption_chars) if caption else "empty_caption"
                out.reject(caption_file, where, reason or "bad_caption", detail)
        caps, url_arr = caps.filter(good), url_arr.filter(good)
        line_numbers = pa.array(line_numbers, pa.int64()).filter(good)
    if isinstance(line_numbers, list):
        line_numbers = pa.array(line_numbers, pa.int64())
    line_ids = pc.cast(line_numbers, pa.string())
    flickr = pc.struct_field(pc.extract_regex(url_arr, FLICKR_PATTERN), [0])
    out.extend(
        {
            "pair_id": pc.binary_join_element_wise(pa.scalar(name + ":"), line_ids, ""),
            "image_key": url_keys(url_arr),
            "image_uri": url_arr,
            "caption": caps,
            "split": pa.array([split] * len(caps), pa.string()),
            "flickr_id": pc.cast(pc.if_else(pc.equal(flickr, ""), None, flickr), pa.int64()),
        }
    )


class Format:
    """What every format shares: the caption rule, and the configured caption length."""

    max_caption_chars = DEFAULT_MAX_CAPTION_CHARS  # `open_format` sets the configured value

    def caption(self, out: ShardBuilder, file: str, where: str, raw: Any, record: Any) -> str | None:
        """The cleaned caption, or None after rejecting ``record`` with the reason."""
        caption = clean_caption(raw)
        if caption is None:
            reason = "empty_caption" if isinstance(raw, str) else "missing_caption"
        else:
            reason = caption_problem(caption, self.max_caption_chars)
        if reason:
            out.reject(file, where, reason, record)
            return None
        return caption


# --- line formats -----------------------------------------------------------------------------


class ConceptualCaptions(Format):
    """``caption<TAB>url`` per line. Pair id: the 1-based line number."""

    def __init__(self, source: ConceptualCaptionsSource):
        self.source = source
        self.name = source.source_name
        self.total_bytes = file_size(source.path)

    def chunks(self, n: int) -> Iterator[Chunk]:
        for i, (start, lines, nbytes) in enumerate(read_line_chunks(self.source.path, n)):
            yield Chunk(i, (start, lines), nbytes)

    def normalize(self, chunk: Chunk, out: ShardBuilder) -> None:
        start, lines = chunk.records
        path = self.source.path
        out.records += len(lines)
        nums, caps, urls = [], [], []
        for line_no, raw in enumerate(lines, start):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                detail = f"{exc.reason} at byte {exc.start}: {raw[:200]!r}"
                out.reject(path, f"line {line_no}", "undecodable_text", detail)
                continue
            caption, sep, url = text.rpartition("\t")
            if sep:
                nums.append(line_no)
                caps.append(caption)
                urls.append(url)
            elif text.strip():
                out.reject(path, f"line {line_no}", "bad_record", f"expected caption<TAB>url: {text.strip()}")
            else:
                out.blank_lines += 1
        add_url_pairs(out, self.name, self.source.split, nums, caps, urls, path, path, self.max_caption_chars)


class Sbu(Format):
    """Parallel files: line i of ``urls`` ↔ line i of ``captions``. Pair id: the line number."""

    def __init__(self, source: SbuSource):
        self.source = source
        self.name = source.source_name
        self.total_bytes = file_size(source.urls) + file_size(source.captions)
        n_urls, n_caps = count_lines(source.urls), count_lines(source.captions)
        if n_urls != n_caps:
            # Parallel files of different lengths are misaligned somewhere: every pairing is suspect.
            raise InputDataError(
                f"{source.urls} has {n_urls} lines but {source.captions} has {n_caps}: "
                "SBU's URL and caption files must have one line per photo, in the same order"
            )

    def chunks(self, n: int) -> Iterator[Chunk]:
        urls = read_line_chunks(self.source.urls, n)
        caps = read_line_chunks(self.source.captions, n)
        for i, ((start, u, ub), (_, c, cb)) in enumerate(zip(urls, caps, strict=True)):
            yield Chunk(i, (start, u, c), ub + cb)

    def normalize(self, chunk: Chunk, out: ShardBuilder) -> None:
        start, raw_urls, raw_caps = chunk.records
        src = self.source
        out.records += len(raw_urls)
        nums, caps, urls = [], [], []
        for line_no, raw_url, raw_cap in zip(range(start, start + len(raw_urls)), raw_urls, raw_caps, strict=True):
            try:
                url = raw_url.decode("utf-8")
            except UnicodeDecodeError:
                out.reject(src.urls, f"line {line_no}", "undecodable_text", repr(raw_url[:200]))
                continue
            try:
                caption = raw_cap.decode("utf-8")
            except UnicodeDecodeError:
                out.reject(src.captions, f"line {line_no}", "undecodable_text", repr(raw_cap[:200]))
                continue
            if url.strip() or caption.strip():
                nums.append(line_no)
                caps.append(caption)
                urls.append(url)
            else:
                out.blank_lines += 1
        add_url_pairs(out, self.name, src.split, nums, caps, urls, src.captions, src.urls, self.max_caption_chars)


# --- JSON formats -----------------------------------------------------------------------------


def _json_chunks(stream: JsonArrayStream, n: int) -> Iterator[Chunk]:
    last = 0
    for i, batch in enumerate(batched(enumerate(stream), n)):
        yield Chunk(i, batch, stream.pos - last)
        last = stream.pos


class Coco(Format):
    """COCO captions: ``images`` (id → file, URLs) then ``annotations``. Pair id: annotation id.

    Memory: the image table (~120k small tuples for train2014) plus one chunk of annotations."""

    def __init__(self, source: CocoSource):
        self.source = source
        self.name = source.source_name
        self.total_bytes = file_size(source.path)
        self.images: dict[int, CocoImage] | None = None

    def chunks(self, n: int) -> Iterator[Chunk]:
        yield from _json_chunks(JsonArrayStream(self.source.path, "annotations"), n)

    def normalize(self, chunk: Chunk, out: ShardBuilder) -> None:
        if self.images is None:
            # An image without an integer id is left out: its captions are rejected as unknown_image.
            self.images = coco_images(self.source.path)
        name, split, path, root = self.name, self.source.split, self.source.path, self.source.image_root
        out.records += len(chunk.records)
        for i, ann in chunk.records:
            where = f"annotations[{i}]"
            if not isinstance(ann, dict):
                out.reject(path, where, "bad_record", ann)
                continue
            image_id = as_int(ann.get("image_id"))
            if image_id is None or ("id" in ann and as_int(ann["id"]) is None):
                out.reject(path, where, "bad_record", f"expected an integer 'image_id' (and 'id', if any): {ann}")
                continue
            # COCO's caption files give every annotation an id, but nothing that reads captions needs
            # one (a caption belongs to its image): without it the pair is named by its position.
            ann_id = as_int(ann["id"]) if "id" in ann else f"#{i}"
            image = self.images.get(image_id)
            if image is None:
                out.reject(path, where, "unknown_image", f"image_id {image_id} is not in 'images'")
                continue
            caption = self.caption(out, path, where, ann.get("caption"), ann)
            if caption is None:
                continue
            file_name, coco_url, flickr_id = image
            if root and file_name:
                uri = join_location(root, str(file_name))
                if uri is None:
                    out.reject(path, where, "path_outside_root", f"image {image_id}: file_name {file_name!r}")
                    continue
            elif problem := url_problem(coco_url if isinstance(coco_url, str) else ""):
                detail = f"image {image_id}: no file_name with image_root, no usable coco_url ({problem}): {coco_url}"
                reason = problem if problem == "credentials_in_url" else "no_image_location"
                out.reject(path, where, reason, detail)
                continue
            else:
                uri = coco_url
            out.pair(f"{name}:{ann_id}", f"coco:{image_id}", uri, caption, split, image_id, flickr_id)


class VisualGenome(Format):
    """VG dense captions: every region phrase is a pair, with its box. Pair id: region id."""

    def __init__(self, source: VisualGenomeSource):
        self.source = source
        self.name = source.source_name
        self.total_bytes = file_size(source.region_descriptions)
        self.images: dict[int, tuple[str | None, int | None, int | None]] | None = None

    def _load_images(self) -> dict:
        images = {}
        for img in JsonArrayStream(self.source.image_data):
            if not isinstance(img, dict):
                continue
            # NOTE: VG 1.2 names it image_id, VG 1.0 id.
            image_id = as_int(img.get("image_id", img.get("id")))
            if image_id is not None:
                images[image_id] = (img.get("url"), as_int(img.get("coco_id")), as_int(img.get("flickr_id")))
        return images

    def chunks(self, n: int) -> Iterator[Chunk]:
        yield from _json_chunks(JsonArrayStream(self.source.region_descriptions, None, "regions.item"), n)

    def normalize(self, chunk: Chunk, out: ShardBuilder) -> None:
        if self.images is None:
            self.images = self._load_images()
        name, split, path, root = self.name, self.source.split, self.source.region_descriptions, self.source.image_root
        out.records += len(chunk.records)
        for i, region in chunk.records:
            where = f"region #{i}"
            if not isinstance(region, dict):
                out.reject(path, where, "bad_record", region)
                continue
            region_id, image_id = as_int(region.get("region_id")), as_int(region.get("image_id"))
            box = [
                as_int(round(region[k])) if isinstance(region.get(k), (int, float)) else None
                for k in ("x", "y", "width", "height")
            ]
            if region_id is None or image_id is None or None in box:
                detail = f"expected integer region_id, image_id, x, y, width, height: {region}"
                out.reject(path, where, "bad_record", detail)
                continue
            where = f"region {region_id}"
            image = self.images.get(image_id)
            if image is None:
                out.reject(path, where, "unknown_image", f"image_id {image_id} is not in {self.source.image_data}")
                continue
            caption = self.caption(out, path, where, region.get("phrase"), region)
            if caption is None:
                continue
            url, coco_id, flickr_id = image
            url = url if isinstance(url, str) else ""
            if root and url:
                # Local copies keep the zip layout: <root>/VG_100K[_2]/<id>.jpg, the URL's last two parts.
                uri = join_location(root, *url.split("/")[-2:])
                if uri is None:
                    out.reject(path, where, "path_outside_root", f"image {image_id}: url {url!r}")
                    continue
            elif problem := url_problem(url):
                reason = problem if problem == "credentials_in_url" else "no_image_location"
                out.reject(path, where, reason, f"image {image_id} has no usable url ({problem}): {url}")
                continue
            else:
                uri = url
            out.pair(
                f"{name}:{region_id}",
                f"vg:{image_id}",
                uri,
                caption,
                split,
                coco_id,
                flickr_id,
                image_id,
                (region_id, *box),
            )


class Karpathy(Format):
    """Karpathy splits: each image keeps its split (train/restval/val/test). Pair id: sentence id."""

    def __init__(self, source: KarpathySource):
        self.source = source
        self.name = source.source_name
        self.total_bytes = file_size(source.path)
        self.splits = set(source.splits)

    def chunks(self, n: int) -> Iterator[Chunk]:
        yield from _json_chunks(JsonArrayStream(self.source.path, "images"), n)

    def normalize(self, chunk: Chunk, out: ShardBuilder) -> None:
        src, path = self.source, self.source.path
        out.records += len(chunk.records)
        for i, img in chunk.records:
            where = f"images[{i}]"
            if (
                not isinstance(img, dict)
                or not isinstance(img.get("filename"), str)
                or not isinstance(img.get("sentences"), list)
            ):
                out.reject(path, where, "bad_record", f"expected an image with 'filename' and 'sentences': {img}")
                continue
            split = img.get("split")
            if split not in self.splits:
                continue  # not an error: the config chose other splits
            filename = img["filename"]
            if src.dataset == "coco":
                coco_id = as_int(img.get("cocoid"))
                if coco_id is None:
                    out.reject(path, where, "bad_record", f"COCO image without integer 'cocoid': {filename}")
                    continue
                flickr_id, image_key = None, f"coco:{coco_id}"
            else:
                coco_id = None
                flickr_id = flickr30k_photo_id(filename)
                image_key = f"flickr30k:{Path(filename).stem}"
            # Flickr30K sources have an image_root (the config requires it): None only for a name
            # that climbs out of the root.
            uri = karpathy_image_uri(img, src.dataset, src.image_root)
            if uri is None:
                out.reject(path, where, "path_outside_root", f"filepath/filename {img.get('filepath', '')}/{filename}")
                continue
            for j, sent in enumerate(img["sentences"]):
                sent_id = as_int(sent.get("sentid")) if isinstance(sent, dict) else None
                if sent_id is None:
                    detail = f"expected a sentence with integer 'sentid': {sent}"
                    out.reject(path, f"{where}.sentences[{j}]", "bad_record", detail)
                    continue
                caption = self.caption(out, path, f"{where}.sentences[{j}]", sent.get("raw"), sent)
                if caption is None:
                    continue
                out.pair(f"{self.name}:{sent_id}", image_key, uri, caption, split, coco_id, flickr_id)


# --- generic tables ---------------------------------------------------------------------------


class Table(Format):
    """Parquet / CSV / TSV / JSONL rows with ``image_url`` or ``image_path`` and ``caption``
    (optional ``split``, ``id``). Pair id: ``id`` when given, else the row number."""

    def __init__(self, source: TableSource):
        self.source = source
        self.name = source.source_name
        self.total_bytes = file_size(source.path)
        self.kind = Path(source.path).suffix.lower().lstrip(".")
        if self.kind not in ("parquet", "csv", "tsv", "jsonl"):
            raise InputDataError(
                f"{source.path}: unsupported table type '.{self.kind}': expected .parquet, .csv, .tsv or .jsonl"
            )
        self.root = source.image_root or str(Path(source.path).parent)

    def _rows(self) -> Iterator[tuple[str, Any, int]]:
        """(locator, row dict or error text, bytes) in file order."""
        path = self.source.path
        if self.kind == "parquet":
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            if not {"caption"} <= set(names) or not {"image_url", "image_path"} & set(names):
                raise InputDataError(
                    f"{path}: expected columns 'caption' and 'image_url' or 'image_path'; found {names}"
                )
            per_row = self.total_bytes / max(1, pf.metadata.num_rows)
            row = 0
            for batch in pf.iter_batches(batch_size=8192):
                for rec in batch.to_pylist():
                    row += 1
                    yield f"row {row}", rec, int(per_row)
        elif self.kind == "jsonl":
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, 1):
                    if not raw.strip():
                        yield f"line {line_no}", None, len(raw)
                        continue
                    try:
                        rec = json.loads(raw)
                    except UnicodeDecodeError as exc:
                        rec = f"undecodable_text:{exc.reason}: {raw[:200]!r}"
                    except ValueError as exc:
                        rec = f"bad_json:{exc}"
                    yield f"line {line_no}", rec, len(raw)
        else:
            with open(path, "rb") as fb:
                # utf-8-sig: a leading byte order mark (Excel writes one) is not part of the header.
                text = io.TextIOWrapper(fb, encoding="utf-8-sig", errors="surrogateescape", newline="")
                # A field over csv's 128 KiB default would stop the whole file; the caption rule
                # rejects that one row instead.
                csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
                reader = csv.DictReader(text, delimiter="\t" if self.kind == "tsv" else ",")
                names = reader.fieldnames or []
                if "caption" not in names or not {"image_url", "image_path"} & set(names):
                    raise InputDataError(
                        f"{path}: expected a header with 'caption' and 'image_url' or 'image_path'; found {names}"
                    )
                for row_no, rec in enumerate(reader, 1):
                    yield f"row {row_no}", rec, 0

    def chunks(self, n: int) -> Iterator[Chunk]:
        for i, batch in enumerate(batched(self._rows(), n)):
            yield Chunk(i, batch, sum(b for _, _, b in batch))

    def normalize(self, chunk: Chunk, out: ShardBuilder) -> None:
        path, name = self.source.path, self.name
        out.records += len(chunk.records)
        for where, rec, _ in chunk.records:
            if rec is None:
                out.blank_lines += 1
                continue
            if isinstance(rec, str):  # a line that did not parse
                reason, _, detail = rec.partition(":")
                out.reject(path, where, reason, detail)
                continue
            if not isinstance(rec, dict):
                out.reject(path, where, "bad_record", rec)
                continue
            if any(isinstance(v, str) and _has_surrogates(v) for v in rec.values()):
                out.reject(path, where, "undecodable_text", rec)
                continue
            url, rel = rec.get("image_url"), rec.get("image_path")
            if url:
                if problem := url_problem(str(url).strip()):
                    out.reject(path, where, problem, rec)
                    continue
                uri = str(url).strip()
                image_key = url_key(uri)
            elif rel:
                rel = str(rel).strip()
                # An absolute path is kept as written (normalized): crawl.file_roots decides whether
                # it may be read. A relative one must stay under its root.
                uri = os.path.normpath(rel) if rel.startswith("/") else join_location(self.root, rel)
                if uri is None:
                    out.reject(path, where, "path_outside_root", f"image_path {rel!r} climbs out of {self.root}")
                    continue
                image_key = "file:" + hashlib.sha1(uri.encode("utf-8")).hexdigest()[:20]
            else:
                out.reject(path, where, "missing_url", rec)
                continue
            caption = self.caption(out, path, where, rec.get("caption"), rec)
            if caption is None:
                continue
            pair_id = rec.get("id")
            pair_id = f"{name}:{pair_id}" if pair_id not in (None, "") else f"{name}:{where.split()[-1]}"
            split = rec.get("split") or self.source.split
            out.pair(pair_id, image_key, uri, caption, str(split), None, flickr_id_from_url(uri))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


FORMATS = {
    "coco": Coco,
    "vg": VisualGenome,
    "cc": ConceptualCaptions,
    "sbu": Sbu,
    "karpathy": Karpathy,
    "table": Table,
}


def open_format(source: Any, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> Format:
    fmt = FORMATS[source.format](source)
    fmt.max_caption_chars = max_caption_chars
    return fmt
