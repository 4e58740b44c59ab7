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
    near_duplicates: bool = True  # merge near duplicates (exact ones are always merged)
    identity: bool = True  # decontaminate by COCO / Flickr ids
    appearance: bool = True  # decontaminate by pHash against the evaluation images
    eval_sets: list[EvalSet] = []
    eval_shard_images: int = Field(default=1000, ge=1)  # evaluation images hashed per shard

    @model_validator(mode="after")
    def _unique(self) -> DedupConfig:
        names = [e.name for e in self.eval_sets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"evaluation set names must be unique: {', '.join(dupes)} repeated")
        return self
