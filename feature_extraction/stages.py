"""The feature stages as the DAG declares them: names, versions, inputs, tables. Their work is
`Deferred`: its module (torch, Detectron2) is imported when the stage runs, so every command that only
reads the DAG (status, sql, planning a run, a Prefect flow's start) starts without it."""

from __future__ import annotations

from contract.stage import Deferred, Stage
from feature_extraction.config import DownstreamConfig

EXTRACT = Stage(
    name="extract",
    # 2: the detector runs each image alone (its features no longer depend on its batchmates);
    # 3: grid cells from one whole-image resize, projected by the fast Walsh–Hadamard transform;
    # 4: grid DCT terms centred and averaged (the DC term no longer swamps a cell's statistics);
    # 5: the grid backend's object regions and whole-image region before the cells; 6: a shard
    # never spans two crawl shards (a rebuild links the shards of unchanged crawl shards)
    version=6,
    run=Deferred("feature_extraction.stage:run_extract"),
    inputs=("crawl", "dedup"),
    tables=("features",),
    description="kept images → BUTD region features (Detectron2) or grid features, to Parquet",
    summarize=Deferred("feature_extraction.featurize:summarize"),
    compression={"features": "none"},  # float16 features barely compress; don't pay zstd for it
    shard_ids=Deferred("feature_extraction.stage:extract_shard_ids"),
    reuse_ignores=("shard_images",),
    reuse_inputs=("crawl",),
)

DOWNSTREAM = Stage(
    name="downstream",
    # 2: task_features gained image_id; 3: each image runs alone through the detector;
    # 4: grid features projected by the fast Walsh–Hadamard transform; 5: grid DCT terms rescaled;
    # 6: grid object and whole-image regions
    version=6,
    run=Deferred("feature_extraction.downstream:run_downstream"),
    inputs=(),
    tables=("task_features",),
    description="the downstream tasks' images → region features (the extract section's detector)",
    summarize=Deferred("feature_extraction.featurize:summarize"),
    compression={"task_features": "none"},
    extra_config=("extract",),
    # Features of an unchanged file (and boxes) are reused across keys; which sets are configured
    # does not shape one item's features, the extract section's detector settings do.
    reuse_ignores=(*DownstreamConfig.model_fields, "shard_images"),
)
