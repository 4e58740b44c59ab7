"""The `ingest` config section: which annotation files to read, in which format."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from contract.configbase import InputFile, Location, SectionConfig, StrictModel

SourceName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_]*$", max_length=48)]


class _Source(StrictModel):
    name: SourceName | None = None  # unique per config; defaults to the format name
    split: str = "train"  # split of every pair from this source (Karpathy files carry their own)

    @property
    def source_name(self) -> str:
        return self.name or self.format  # type: ignore[attr-defined]

    def input_files(self) -> list[str]:
        raise NotImplementedError


class CocoSource(_Source):
    """COCO captions (``captions_train2014.json``): ``images`` + ``annotations``."""

    format: Literal["coco"]
    path: InputFile
    # Folder (or URL prefix) holding the images by ``file_name``; without it ``coco_url`` is used.
    image_root: Location | None = None

    def input_files(self) -> list[str]:
        return [self.path]


class VisualGenomeSource(_Source):
    """Visual Genome dense captions: each region phrase is one pair, with its box."""

    format: Literal["vg"]
    image_data: InputFile
    region_descriptions: InputFile
    # Folder holding ``VG_100K/`` and ``VG_100K_2/``; without it the ``url`` of image_data.json is used.
    image_root: Location | None = None

    def input_files(self) -> list[str]:
        return [self.image_data, self.region_descriptions]


class ConceptualCaptionsSource(_Source):
    """Conceptual Captions TSV: ``caption<TAB>url`` per line, no header."""

    format: Literal["cc"]
    path: InputFile

    def input_files(self) -> list[str]:
        return [self.path]


class SbuSource(_Source):
    """SBU Captions: line i of ``urls`` goes with line i of ``captions``."""

    format: Literal["sbu"]
    urls: InputFile
    captions: InputFile

    def input_files(self) -> list[str]:
        return [self.urls, self.captions]


class KarpathySource(_Source):
    """Karpathy split files (``dataset_coco.json`` / ``dataset_flickr30k.json``); each image keeps its split."""

    format: Literal["karpathy"]
    path: InputFile
    dataset: Literal["coco", "flickr30k"]
    # COCO: the folder holding train2014/ and val2014/ (default: images.cocodataset.org).
    # Flickr30K: the folder of the images (required: Flickr30K has no public image URLs).
    image_root: Location | None = None
    splits: list[Literal["train", "restval", "val", "test"]] = ["train", "restval", "val", "test"]

    @model_validator(mode="after")
    def _flickr_needs_root(self) -> KarpathySource:
        if self.dataset == "flickr30k" and self.image_root is None:
            raise ValueError("dataset 'flickr30k' needs image_root: Flickr30K images have no public URL")
        return self

    def input_files(self) -> list[str]:
        return [self.path]


class TableSource(_Source):
    """A generic table (.parquet, .csv, .tsv, .jsonl) with ``image_url`` or ``image_path``, ``caption``
    and optionally ``split`` and ``id`` columns."""

    format: Literal["table"]
    path: InputFile
    # Relative ``image_path`` values are resolved against this folder (default: the table's folder).
    image_root: Location | None = None

    def input_files(self) -> list[str]:
        return [self.path]


Source = Annotated[
    CocoSource | VisualGenomeSource | ConceptualCaptionsSource | SbuSource | KarpathySource | TableSource,
    Field(discriminator="format"),
]


class IngestConfig(SectionConfig):
    """Annotation files → one normalized ``pairs`` table plus ``rejects``."""

    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"workers"})

    sources: list[Source] = Field(min_length=1)
    # Longer captions (characters, after whitespace is collapsed) are rejected as caption_too_long:
    # real captions are a sentence or two; longer ones are scraped page text. Pretraining still cuts
    # each caption to its token budget.
    max_caption_chars: int = Field(default=1000, ge=1)
    # Input records per shard (lines, annotations, regions, images). Changing it re-shards the output.
    shard_rows: int = Field(default=100_000, ge=1)
    # Processes normalizing shards of the big line formats (CC, SBU) in parallel; 1 = in-process,
    # unset = one per CPU core. Does not change the output (not part of the cache key).
    workers: int | None = Field(default=None, ge=1, le=256)

    @model_validator(mode="after")
    def _unique_names(self) -> IngestConfig:
        seen: set[str] = set()
        for src in self.sources:
            if src.source_name in seen:
                raise ValueError(
                    f"two sources are named {src.source_name!r}: give each a unique 'name' (it prefixes pair ids)"
                )
            seen.add(src.source_name)
        return self
