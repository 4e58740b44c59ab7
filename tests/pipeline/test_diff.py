"""What a rebuild changed, against the previous corpus: every removed image with its reason, pairs
per source, and the reuse counts; in `uniter diff --json` and next to the artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import load_config
from pipeline.runner import run_stage, storage_for
from tests.fixtures import images as fx
from tests.fixtures import server as srv

UNITER = str(Path(sys.executable).parent / "uniter")
FLICKR = "/farm4.staticflickr.com/3153/2970773875_164f0c0b83_z.jpg"


def _config(folder: Path, storage: dict, sources: dict[str, list[tuple[str, str]]], **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, rows in sources.items():
        lines = [json.dumps({"id": pid, "image_url": url, "caption": f"caption {pid}"}) for pid, url in rows]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        specs.append({"format": "table", "name": name, "path": f"{name}.jsonl"})
    doc = {
        "storage": storage,
        "ingest": {"sources": specs},
        "crawl": {"allow_private_networks": True, "retries": 0, "workers": 1, "shard_images": 3, "max_side": 200},
        **extra,
    }
    (folder / "cfg.yaml").write_text(yaml.safe_dump(doc))
    return folder / "cfg.yaml"


def test_diff_names_why_each_image_left_and_counts_pairs_per_source(tmp_path):
    storage = {"uri": str(tmp_path / "data")}
    photos = {f"/img{i}.jpg": fx.synthetic_photo(40 + i, (120, 90)) for i in range(7)}
    routes = {p: srv.validated(fx.jpeg(im)) for p, im in photos.items()}
    routes[FLICKR] = srv.validated(fx.jpeg(fx.synthetic_photo(60, (120, 90))))
    routes["/img2-large.jpg"] = srv.validated(fx.jpeg(photos["/img2.jpg"].resize((240, 180))))
    with srv.ImageServer(routes) as server:
        old = [(f"p{i}", server.url(f"/img{i}.jpg")) for i in range(6)] + [("pf", server.url(FLICKR))]
        v1 = _config(tmp_path / "v1", storage, {"web": old})
        for stage in ("ingest", "crawl", "dedup"):
            run_stage(stage, load_config(v1))

        (tmp_path / "v2").mkdir()
        (tmp_path / "v2" / "eval.txt").write_text("2970773875\n")
        server.routes["/img1.jpg"] = srv.status(404)  # the link is gone
        web = [r for r in old if r[0] != "p5"]  # its only caption left the annotations
        web += [("p6", server.url("/img6.jpg")), ("p2l", server.url("/img2-large.jpg"))]  # new; a larger img2
        more = [("m0", server.url("/img0.jpg"))]  # a new source captioning an old image
        v2 = _config(
            tmp_path / "v2", storage, {"web": web, "more": more},
            dedup={"eval_sets": [{"format": "flickr_ids", "name": "f30k", "path": "eval.txt"}]},
        )  # fmt: skip
        cfg = load_config(v2)
        cfg = cfg.model_copy(update={"crawl": cfg.crawl.model_copy(update={"recrawl_after": 0.0})})
        for stage in ("ingest", "crawl", "dedup"):
            run_stage(stage, cfg)

    out = subprocess.run([UNITER, "diff", "-c", str(v2), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    diff = json.loads(out.stdout)
    assert diff["images"]["removed_by_reason"] == {
        "decontaminated": 1, "duplicate": 1, "left_annotations": 1, "link_gone": 1
    }  # fmt: skip
    assert diff["images"]["link_gone_by_failure"] == {"http_404": 1}
    assert (diff["images"]["added"], diff["images"]["removed"], diff["images"]["kept"]) == (2, 4, 3)
    assert diff["pairs"] == {"more": {"added": 1, "removed": 0}, "web": {"added": 2, "removed": 3}}
    # (img2's pair stays: it now points at the larger copy, the image kept for their cluster)
    assert diff["work"]["crawl"]["fetched"] == 2 and diff["work"]["crawl"]["gone"] == 1
    storage_ = storage_for(cfg)
    published = json.loads(storage_.read_bytes(f"reports/corpus-diff/{diff['corpus']}.json"))
    assert published["images"] == diff["images"]
    assert "| link_gone | 1 |" in storage_.read_bytes(f"reports/corpus-diff/{diff['corpus']}.md").decode()
