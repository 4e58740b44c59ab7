"""Pretraining data: tokenized texts and region features, streamed from memory-mapped Arrow files.

The corpus never sits in memory: texts are tokenized once into an Arrow IPC file, each features
shard is converted once into an uncompressed Arrow IPC file, all in a local cache keyed by content,
and read through memory maps (the OS keeps what is hot). An example is (text row, image row).

Batches come from a token-bucket sampler: a token budget per micro-batch (text + regions, padding
included), lengths sorted inside large shuffled buckets, so padding stays small.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contract.errors import ConfigError
from storage import Storage

log = logging.getLogger(__name__)


# --- tokenizer --------------------------------------------------------------------------------


def resolve(spec: str) -> str:
    """`pkg://package/sub/path` → the installed package's folder; anything else unchanged."""
    if spec.startswith("pkg://"):
        package, _, sub = spec[6:].partition("/")
        try:
            return str(importlib.resources.files(package) / sub)
        except ModuleNotFoundError:
            raise ConfigError(f"{spec}: Python package {package!r} is not installed") from None
    return spec


def load_tokenizer(spec: str, lowercase: bool | None = None):
    """A fast BERT WordPiece tokenizer from a folder, a vocab.txt, or a hub name (offline: cache only)."""
    # transformers takes seconds to import; the stages that never tokenize should not pay it
    from transformers import BertTokenizerFast  # noqa: PLC0415

    path = resolve(spec)
    kwargs = {} if lowercase is None else {"do_lower_case": lowercase}
    try:
        if Path(path).is_file():
            return BertTokenizerFast(vocab=path, **kwargs)
        if Path(path).is_dir():
            return BertTokenizerFast.from_pretrained(path, **kwargs)
        return BertTokenizerFast.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"tokenizer {spec!r}: not found locally ({type(exc).__name__}). No model hub is reached at run "
            "time: give a folder with vocab.txt / tokenizer.json, a vocab.txt, or pkg://<package>/<folder>"
        ) from None


# --- the local cache --------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("UNITER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "uniter")
    path = Path(base) / "arrow"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_ipc(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=4096)
    os.replace(tmp, path)


def _mmap(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


# --- texts ------------------------------------------------------------------------------------


TEXTS_VERSION = 2  # 2: the split column; (image, caption, split) duplicates dropped


def build_texts(storage: Storage, keys: list[str], content_sha: str, tokenizer, max_txt_len: int) -> Path:
    """Tokenize `corpus_pairs` once into <cache>/texts-<digest>.arrow (ids without CLS/SEP).
    Texts longer than max_txt_len word pieces are dropped, as the reference does. So is every
    repeat of an (image, caption, split) already seen: the same COCO caption ingested twice (from
    the captions file and from the Karpathy file) would otherwise be trained on twice as often."""
    ident = hashlib.sha256(
        f"{content_sha}|{tokenizer.name_or_path}|{len(tokenizer)}|{tokenizer.do_lower_case}|{max_txt_len}|"
        f"{TEXTS_VERSION}".encode()
    ).hexdigest()[:24]
    path = cache_dir() / f"texts-{ident}.arrow"
    if path.exists():
        return path
    parts, dropped, repeats, seen = [], 0, 0, set()
    for key in keys:
        with storage.open(key) as f:
            table = pq.read_table(f, columns=["pair_id", "source", "split", "image_key", "caption"])
        if not table.num_rows:  # a shard whose pairs were all removed upstream
            continue
        # (8-byte digests: a set of them for the paper's 9.6 M pairs is a few hundred MB, not the captions)
        digests = [
            hashlib.blake2b(f"{i}\0{c}\0{s}".encode(), digest_size=8).digest()
            for i, c, s in zip(*(table.column(n).to_pylist() for n in ("image_key", "caption", "split")), strict=True)
        ]
        first = np.array([not (d in seen or seen.add(d)) for d in digests], dtype=bool)
        repeats += int((~first).sum())
        table = table.filter(pa.array(first))
        if not table.num_rows:  # every pair a repeat (the tokenizer refuses an empty list)
            continue
        ids = tokenizer(table.column("caption").to_pylist(), add_special_tokens=False)["input_ids"]
        keep = np.array([len(x) <= max_txt_len for x in ids], dtype=bool)
        dropped += int((~keep).sum())
        kept_ids = [x for x, k in zip(ids, keep, strict=True) if k]
        columns = {n: table.column(n).filter(pa.array(keep)) for n in ("pair_id", "source", "split", "image_key")}
        parts.append(pa.table({**columns, "input_ids": pa.array(kept_ids, pa.list_(pa.int32()))}))
    empty = {n: pa.array([], pa.string()) for n in ("pair_id", "source", "split", "image_key")}
    table = pa.concat_tables(parts) if parts else pa.table({**empty, "input_ids": pa.array([], pa.list_(pa.int32()))})
    if dropped:
        log.info("pretrain: dropped %d texts longer than %d word pieces", dropped, max_txt_len)
    if repeats:
        log.info("pretrain: dropped %d repeats of an (image, caption, split) pair", repeats)
    write_ipc(table, path)
    return path


# --- features ---------------------------------------------------------------------------------


def build_features(storage: Storage, key: str, sha256: str) -> Path:
    """One features shard as an uncompressed Arrow IPC file (memory-mappable), keyed by its digest."""
    path = cache_dir() / f"features-{sha256[:24]}.arrow"
    if not path.exists():
        with storage.open(key) as f:
            parquet = pq.ParquetFile(f)
            # downstream's task_features also carry image_id: fine-tuning joins the task files on it
            extra = ["image_id"] if "image_id" in parquet.schema_arrow.names else []
            columns = ["image_key", "num_boxes", "features", "norm_bb", "conf", "soft_labels", *extra]
            table = parquet.read(columns=columns)
        write_ipc(table, path)
    return path


@dataclass
class Region:
    feat: np.ndarray  # (n, 2048) float16
    pos: np.ndarray  # (n, 7) float32
    soft: np.ndarray | None  # (n, 1601) float16


class Corpus:
    """The examples: texts joined with their image's features. Picklable: worker processes reopen
    the memory maps lazily."""

    def __init__(
        self,
        text_path: Path,
        feature_paths: list[Path],
        conf_thresh: float,
        min_bb: int,
        max_bb: int,
        val_percent: float,
        train_splits: tuple[str, ...] = ("train", "restval"),
        val_splits: tuple[str, ...] = ("val",),
    ):
        self.text_path, self.feature_paths = text_path, feature_paths
        self.conf_thresh, self.min_bb, self.max_bb, self.val_percent = conf_thresh, min_bb, max_bb, val_percent
        self.train_splits, self.val_splits = tuple(train_splits), tuple(val_splits)
        self._build_index()

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("texts", "features"):
            state.pop(k, None)
        return state

    @cached_property
    def texts(self) -> pa.Table:
        return _mmap(self.text_path)

    @cached_property
    def features(self) -> list[pa.Table]:
        return [_mmap(p) for p in self.feature_paths]

    def _build_index(self) -> None:
        # Vectorized over Arrow arrays: at CC scale this indexes millions of images and texts, and a
        # Python loop over every box's confidence would take minutes and gigabytes.
        keys, files, rows, nbbs = [], [], [], []
        has_soft = True
        for f, table in enumerate(self.features):
            conf = table.column("conf").combine_chunks()
            n_boxes = pc.list_value_length(conf).to_numpy(zero_copy_only=False).astype(np.int64)
            above = pc.greater(pc.list_flatten(conf), self.conf_thresh).to_numpy(zero_copy_only=False)
            n_conf = np.bincount(pc.list_parent_indices(conf).to_numpy(), weights=above, minlength=len(n_boxes))
            nbbs.append(np.minimum(np.minimum(n_boxes, self.max_bb), np.maximum(self.min_bb, n_conf.astype(np.int64))))
            keys.append(table.column("image_key").combine_chunks())
            files.append(np.full(len(n_boxes), f, np.int32))
            rows.append(np.arange(len(n_boxes), dtype=np.int64))
            # (the recipe's corpus reads only image_key and conf)
            has_soft &= "soft_labels" in table.column_names and table.column("soft_labels").null_count == 0
        all_keys = pa.concat_arrays(keys) if keys else pa.array([], pa.string())
        self.has_soft_labels = bool(has_soft and len(all_keys))
        texts = self.texts
        # each text's image among all feature rows; -1 where the image has no features
        where = pc.fill_null(pc.index_in(texts.column("image_key"), value_set=all_keys), -1)
        where = np.asarray(where, dtype=np.int64)
        rows_ = np.flatnonzero(where >= 0)
        image = where[rows_].astype(np.int64)
        self.text_row = rows_.astype(np.int64)
        self.img_file = _concat(files, np.int32)[image]
        self.img_row = _concat(rows, np.int64)[image]
        self.nbb = _concat(nbbs, np.int64)[image].astype(np.int32)
        lengths = pc.list_value_length(texts.column("input_ids")).to_numpy(zero_copy_only=False)
        self.txt_len = (lengths[rows_] + 2).astype(np.int32)  # + CLS, SEP
        source = pc.dictionary_encode(texts.column("source").combine_chunks())
        names = source.dictionary.to_pylist()
        codes = source.indices.to_numpy(zero_copy_only=False)[rows_]
        self.sources = sorted({names[c] for c in np.unique(codes)})
        remap = np.array([self.sources.index(n) if n in self.sources else -1 for n in names], dtype=np.int32)
        self.source = remap[codes] if len(codes) else np.zeros(0, np.int32)
        # Splits: a text trains only if its split is a train split, validates only if a val split;
        # any other (test) does neither. Texts without a split (fine-tuning's) count as train.
        if "split" in texts.column_names:
            split = texts.column("split").to_numpy(zero_copy_only=False)[rows_]
        else:
            split = np.full(len(rows_), "train", dtype=object)
        in_train, in_val = np.isin(split, self.train_splits), np.isin(split, self.val_splits)
        # Validation holds whole images (never a caption of a training image): the images of the
        # named val splits when there are any; otherwise a val_percent share of images by key hash.
        val_image = np.zeros(len(all_keys), dtype=bool)
        if in_val.any():
            val_image[image[in_val]] = True
            self.is_val = in_val
        else:
            val_image = np.array([_bucket(k) < self.val_percent for k in all_keys.to_pylist()], dtype=bool)
            self.is_val = in_train & val_image[image] if len(image) else np.zeros(0, bool)
        self.is_train = in_train & ~val_image[image] if len(image) else np.zeros(0, bool)

    def __len__(self) -> int:
        return len(self.text_row)

    @property
    def lengths(self) -> np.ndarray:
        return self.txt_len + self.nbb

    def text(self, i: int) -> np.ndarray:
        return np.asarray(self.texts.column("input_ids")[int(self.text_row[i])].values, dtype=np.int64)

    def region(self, file: int, row: int, nbb: int) -> Region:
        table = self.features[file]
        n = table.column("num_boxes")[row].as_py()
        feat = np.frombuffer(table.column("features")[row].as_buffer(), dtype="<f2").reshape(n, -1)[:nbb]
        pos = np.asarray(table.column("norm_bb")[row].values, dtype=np.float32).reshape(n, 7)[:nbb]
        soft_buf = table.column("soft_labels")[row]
        soft = None if not soft_buf.is_valid else np.frombuffer(soft_buf.as_buffer(), dtype="<f2").reshape(n, -1)[:nbb]
        return Region(feat, pos, soft)

    def example_region(self, i: int) -> Region:
        return self.region(int(self.img_file[i]), int(self.img_row[i]), int(self.nbb[i]))


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _bucket(key: str) -> float:
    """A stable pseudo-random percentage in [0, 100) for a key."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 * 100


# --- batching ---------------------------------------------------------------------------------


def token_bucket_batches(
    ids: np.ndarray,
    lengths: np.ndarray,
    budget: int,
    bucket_size: int,
    rng: np.random.Generator,
    size_multiple: int = 8,
) -> list[np.ndarray]:
    """Shuffle, cut into buckets, sort each bucket by length (longest first), fill micro-batches
    in steps of `size_multiple` while (longest length × examples) ≤ budget; shuffle the batches.
    Every id lands in exactly one batch; a batch over budget holds one step of examples only."""
    perm = ids[rng.permutation(len(ids))]
    batches: list[np.ndarray] = []
    for start in range(0, len(perm), bucket_size):
        bucket = perm[start : start + bucket_size]
        bucket = bucket[np.argsort(-lengths[bucket], kind="stable")]
        current: list[int] = []
        longest = 0
        for i in range(0, len(bucket), size_multiple):
            step = bucket[i : i + size_multiple]
            new_longest = max(longest, int(lengths[step].max()))
            if current and new_longest * (len(current) + len(step)) > budget:
                batches.append(np.array(current))
                current, new_longest = [], int(lengths[step].max())
            current.extend(step.tolist())
            longest = new_longest
        if current:
            batches.append(np.array(current))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]
