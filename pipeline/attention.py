"""`uniter analyze attention`: find the config's corpus and pretrained model through the runner's
keys, then hand them to the domain analysis (`uniter.analysis`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from contract.artifact import Artifact
from contract.errors import MissingInputError
from pipeline.config import PipelineConfig
from pipeline.runner import Planner, storage_for
from uniter.analysis import analyze_attention, load_encoder
from uniter.data import Corpus, build_features, build_texts, load_tokenizer


def attention_report(cfg: PipelineConfig, checkpoint: str | None, n: int, out: Path) -> dict:
    """Attention maps of `n` pairs of the config's corpus under a checkpoint (a folder, or None: the
    config's pretrained model), classified and drawn into `out`."""
    storage = storage_for(cfg)
    planner = Planner(cfg, storage)
    plan = planner.plan("pretrain")
    if plan.missing:
        raise MissingInputError(f"attention analysis reads the corpus: run {', '.join(plan.missing)} first")
    p = cfg.pretrain
    tokenizer = load_tokenizer(p.tokenizer, p.lowercase)
    dedup, extract = plan.input_manifests["dedup"], plan.input_manifests["extract"]
    pairs = [Artifact(storage, "dedup", dedup.key).file_key(f.path) for f in dedup.tables.get("corpus_pairs", [])]
    text_path = build_texts(storage, pairs, dedup.table_sha256("corpus_pairs"), tokenizer, p.max_txt_len)
    feats = [
        build_features(storage, Artifact(storage, "extract", extract.key).file_key(f.path), f.sha256)
        for f in extract.tables.get("features", [])
    ]
    corpus = Corpus(
        text_path, feats, p.conf_thresh, p.min_bb, p.max_bb, p.val_percent, tuple(p.train_splits), tuple(p.val_splits)
    )
    with tempfile.TemporaryDirectory(prefix="uniter-attn-") as tmp:
        folder = Path(checkpoint) if checkpoint else Path(tmp)
        if checkpoint is None:
            manifest = planner.manifest("pretrain")
            if manifest is None:
                raise MissingInputError(
                    "no pretrained model for this config: run `uniter run pretrain` first, or pass --checkpoint"
                )
            art = Artifact(storage, "pretrain", manifest.key)
            for name in manifest.files:
                if name.startswith("model/"):
                    (folder / name.split("/", 1)[1]).write_bytes(storage.read_bytes(art.file_key(f"files/{name}")))
        model = load_encoder(folder)
    return analyze_attention(corpus, tokenizer, model, n, out)
