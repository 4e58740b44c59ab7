"""The `dedup` config section: near-duplicate distance and the evaluation sets to decontaminate against."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from contract.configbase import InputFile, Location, SectionConfig, StrictModel

EvalName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_+]*$", max_length=48)]


class KarpathyEval(StrictModel):
    """Karpathy split file. Defaults follow UNITER: COCO val+test; Flickr30K all splits (every
    Flickr30K image is kept out of pretraining so zero-shot retrieval on it is fair)."""

    format: Literal["karpathy"]
    name: EvalName
    path: InputFile
    dataset: Literal["coco", "flickr30k"]
    splits: list[str] | None = None
    image_root: Location | None = None  # for appearance matching; COCO defaults to images.cocodataset.org

    def chosen_splits(self) -> list[str]:
        if self.splits is not None:
            return self.splits
        return ["val", "test"] if self.dataset == "coco" else ["train", "restval", "val", "test"]


class RefcocoEval(StrictModel):
    """RefCOCO / RefCOCO+ / RefCOCOg: ``refs(unc).p`` (or umd/google) plus ``instances.json``."""

    format: Literal["refcoco"]
    name: EvalName
    refs: InputFile  # a Python pickle: read with a restricted unpickler (builtins only)
    instances: InputFile | None = None  # gives each image's file name and Flickr URL
    splits: list[str] = ["val", "testA", "testB", "test"]
    image_root: Location | None = None  # COCO train2014 folder, for appearance matching


class FlickrIdsEval(StrictModel):
    """A list of Flickr photo ids, one per line (e.g. Flickr30K Entities train/val/test.txt)."""

    format: Literal["flickr_ids"]
    name: EvalName
    path: InputFile


EvalSet = Annotated[KarpathyEval | RefcocoEval | FlickrIdsEval, Field(discriminator="format")]


class DedupConfig(SectionConfig):
    """Exact and near duplicates, and decontamination against downstream evaluation sets."""

    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset()

    # Largest pHash Hamming distance between one image's whole-image hash and any window hash of the
    # other (see corpus/images/imagehash.py). 4 matches JPEG q40, 50 % resizes, 3–5 % crops and ±10 %
    # brightness in ≥ 99 % of cases while no two distinct fixture photos come closer than 12.
    phash_max_distance: int = Field(default=4, ge=0, le=16)
    # A pHash candidate is the same picture only if its colour thumbnails are this close (largest
    # ΔE after alignment and erosion; corpus/images/colour.py) and its aspect ratios agree.
    # Measured in benchmarks/dedup.py: see docs/corpus.md.
    colour_max_distance: float = Field(default=13.0, gt=0, le=100)
    near_duplicates: bool = True  # merge verified near duplicates (exact ones are always merged)
    # What counts as overlapping an evaluation set, each mode including the ones before it:
    #   ids         a shared COCO id or Flickr photo id
    #   exact       + a byte copy (sha256) of an evaluation image, which is fetched and hashed
    #   appearance  + a verified near duplicate of an evaluation image
    decontamination: Literal["none", "ids", "exact", "appearance"] = "appearance"
    # Stop, publishing nothing, when merging or decontamination would take more than this fraction of
    # the images: a hash that cannot tell the pictures apart looks like a corpus full of copies.
    max_removed_fraction: float = Field(default=0.2, ge=0, le=1)
    guard_min_images: int = Field(default=100, ge=0)  # below this, a few planted copies are no alarm
    eval_sets: list[EvalSet] = []
    eval_shard_images: int = Field(default=1000, ge=1)  # evaluation images hashed per shard

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and ({"identity", "appearance"} & set(data)):
            raise ValueError(
                "`identity` and `appearance` were replaced by `decontamination: none | ids | exact | appearance` "
                "(each includes the ones before it)"
            )
        return data

    @property
    def by_ids(self) -> bool:
        return self.decontamination != "none"

    @property
    def by_bytes(self) -> bool:
        """Evaluation images are fetched and hashed (sha256, and pHash + thumbnail for appearance)."""
        return self.decontamination in ("exact", "appearance")

    @property
    def by_appearance(self) -> bool:
        return self.decontamination == "appearance"

    @model_validator(mode="after")
    def _unique(self) -> DedupConfig:
        names = [e.name for e in self.eval_sets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"evaluation set names must be unique: {', '.join(dupes)} repeated")
        return self
