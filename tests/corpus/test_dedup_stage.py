"""Dedup end to end: planted exact and near duplicates are merged (captions kept), distinct photos
stay, and decontamination removes by id and by appearance what it should — with a report to match."""

from __future__ import annotations

import json
import pickle

import pytest
import yaml

from contract.errors import InputDataError
from corpus.dedup.evalsets import load_refs
from pipeline.config import load_config
from pipeline.runner import run_stage, storage_for
from tests.conftest import read_table
from tests.fixtures import images as fx
from tests.fixtures import server as srv

P = {i: fx.synthetic_photo(3000 + i, (400, 300)) for i in range(16)}

# web images: (path, bytes); the planted near duplicates are the transformations
WEB = {
    "/a.jpg": fx.jpeg(P[0]),
    "/a-copy.jpg": fx.jpeg(P[0]),  # exact
    "/b.jpg": fx.jpeg(P[1]),
    "/b-q40.jpg": fx.jpeg(P[1], 40),  # JPEG quality 40
    "/c.jpg": fx.jpeg(P[2]),
    "/c-half.jpg": fx.jpeg(fx.resized(P[2], 0.5)),  # 50 % resize
    "/d.jpg": fx.jpeg(P[3]),
    "/d-crop.jpg": fx.jpeg(fx.cropped(P[3], 0.05)),  # 5 % crop
    "/e.jpg": fx.jpeg(P[4]),
    "/e-bright.jpg": fx.jpeg(fx.brightened(P[4], 1.1)),  # brightness +10 %
    "/f.jpg": fx.jpeg(P[5]),
    "/f-dark.jpg": fx.jpeg(fx.brightened(P[5], 0.9)),  # brightness −10 %
    "/g.jpg": fx.jpeg(P[6]),
    "/h.jpg": fx.jpeg(P[7]),  # distinct
    "/f30k-copy.jpg": fx.jpeg(fx.resized(P[8], 0.6), 50),  # a Flickr30K image
}
NEAR = {
    ("/b.jpg", "/b-q40.jpg"),
    ("/c.jpg", "/c-half.jpg"),
    ("/d.jpg", "/d-crop.jpg"),
    ("/e.jpg", "/e-bright.jpg"),
    ("/f.jpg", "/f-dark.jpg"),
}


@pytest.fixture
def corpus(tmp_path):
    """Files in their real layouts; returns a function that writes the config for a storage."""
    coco = tmp_path / "coco" / "train2014"
    coco.mkdir(parents=True)
    for cid, pid in [(1, 9), (2, 10), (3, 11), (4, 13)]:
        (coco / f"COCO_train2014_{cid:012d}.jpg").write_bytes(fx.jpeg(P[pid]))
    (tmp_path / "captions.json").write_text(
        json.dumps(
            {
                "images": [
                    {
                        "id": c,
                        "file_name": f"COCO_train2014_{c:012d}.jpg",
                        "flickr_url": f"http://farm1.staticflickr.com/1/{f}_abcdef0123_z.jpg",
                    }
                    for c, f in [(1, 111), (2, 222), (3, 333), (4, 444)]
                ],
                "annotations": [
                    {"id": 10 * c + k, "image_id": c, "caption": f"coco {c} caption {k}"}
                    for c in (1, 2, 3, 4)
                    for k in (1, 2)
                ],
            }
        )
    )
    vg = tmp_path / "vg" / "VG_100K"
    vg.mkdir(parents=True)
    (vg / "5.jpg").write_bytes(fx.jpeg(P[12]))
    (tmp_path / "image_data.json").write_text(
        json.dumps([{"image_id": 5, "url": "https://x/VG_100K/5.jpg", "coco_id": 1, "flickr_id": None}])
    )
    (tmp_path / "regions.json").write_text(
        json.dumps(
            [
                {
                    "id": 5,
                    "regions": [
                        {
                            "region_id": 51,
                            "image_id": 5,
                            "phrase": "a region",
                            "x": 1,
                            "y": 2,
                            "width": 30,
                            "height": 40,
                        }
                    ],
                }
            ]
        )
    )
    f30k = tmp_path / "f30k"
    f30k.mkdir()
    (f30k / "111.jpg").write_bytes(fx.jpeg(P[8]))
    (tmp_path / "dataset_flickr30k.json").write_text(
        json.dumps({"images": [{"filename": "111.jpg", "split": "test", "sentences": [{"raw": "x", "sentid": 0}]}]})
    )
    (tmp_path / "dataset_coco.json").write_text(
        json.dumps(
            {
                "images": [
                    {
                        "filepath": "train2014",
                        "filename": "COCO_train2014_000000000002.jpg",
                        "split": "test",
                        "cocoid": 2,
                        "sentences": [],
                    },
                    {
                        "filepath": "train2014",
                        "filename": "COCO_train2014_000000000004.jpg",
                        "split": "train",
                        "cocoid": 4,
                        "sentences": [],
                    },
                ]
            }
        )
    )
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump(
            [
                {"ref_id": 1, "image_id": 3, "split": "val", "sentences": [{"raw": "left one", "sent_id": 1}]},
                {"ref_id": 2, "image_id": 4, "split": "train", "sentences": []},
            ],
            f,
            protocol=2,
        )

    def write(server: srv.ImageServer, storage: dict, **dedup) -> str:
        (tmp_path / "web.jsonl").write_text(
            "".join(json.dumps({"image_url": server.url(p), "caption": f"web {p}"}) + "\n" for p in WEB)
        )
        doc = {
            "storage": storage,
            "ingest": {
                "sources": [
                    {"format": "table", "name": "web", "path": "web.jsonl"},
                    {"format": "coco", "path": "captions.json", "image_root": str(coco)},
                    {
                        "format": "vg",
                        "image_data": "image_data.json",
                        "region_descriptions": "regions.json",
                        "image_root": str(tmp_path / "vg"),
                    },
                ]
            },
            "crawl": {"allow_private_networks": True, "file_roots": [str(tmp_path)], "shard_images": 6, "workers": 2},
            "dedup": {
                "eval_sets": [
                    {
                        "name": "flickr30k",
                        "format": "karpathy",
                        "dataset": "flickr30k",
                        "path": "dataset_flickr30k.json",
                        "image_root": str(f30k),
                    },
                    {
                        "name": "coco_test",
                        "format": "karpathy",
                        "dataset": "coco",
                        "path": "dataset_coco.json",
                        "image_root": str(tmp_path / "coco"),
                    },
                    {"name": "refcoco", "format": "refcoco", "refs": "refs(unc).p", "image_root": str(coco)},
                ],
                **dedup,
            },
        }
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(doc))
        return str(path)

    return write


def _tables(cfg, result, *names):
    storage = storage_for(cfg)
    return [read_table(storage, result.manifest, n).to_pylist() for n in names]


def test_duplicates_and_decontamination(corpus, storage_spec):
    with srv.ImageServer({p: srv.serve(b) for p, b in WEB.items()}) as server:
        cfg = load_config(corpus(server, storage_spec))
        for stage in ("ingest", "crawl"):
            run_stage(stage, cfg)
        result = run_stage("dedup", cfg)
        web_key = {}
        for row in read_table(storage_for(cfg), run_stage("ingest", cfg).manifest, "pairs").to_pylist():
            if row["source"] == "web":
                web_key[row["image_uri"].removeprefix(server.base)] = row["image_key"]

    dups, removed, images, pairs = _tables(cfg, result, "duplicates", "removed", "corpus_images", "corpus_pairs")
    path_of = {v: k for k, v in web_key.items()}
    found = {
        tuple(sorted((path_of.get(d["image_key"], d["image_key"]), path_of.get(d["kept_key"], d["kept_key"])))): d[
            "rule"
        ]
        for d in dups
    }
    assert found[("/a-copy.jpg", "/a.jpg")] == "exact"
    for pair in NEAR:
        assert found.get(tuple(sorted(pair))) == "near", pair
    # distinct photos are never merged: only the planted pairs (and the Flickr30K copy, removed below)
    assert set(found) - {("/a-copy.jpg", "/a.jpg")} - {tuple(sorted(p)) for p in NEAR} == set()

    by_rule = {}
    for r in removed:
        by_rule.setdefault(r["rule"], set()).add((path_of.get(r["image_key"], r["image_key"]), r["eval_set"]))
    assert by_rule["appearance"] >= {("/f30k-copy.jpg", "flickr30k")}
    # VG 5 inherits COCO 1's Flickr id; COCO 2 and 3 also match their evaluation items' Flickr ids
    assert by_rule["flickr_id"] == {
        ("coco:1", "flickr30k"),
        ("vg:5", "flickr30k"),
        ("coco:2", "coco_test"),
        ("coco:3", "refcoco"),
    }
    assert by_rule["coco_id"] == {("coco:2", "coco_test"), ("coco:3", "refcoco")}
    # the evaluation images themselves sit in the corpus as COCO 2 and 3: appearance finds them too
    assert {("coco:2", "coco_test"), ("coco:3", "refcoco")} <= by_rule["appearance"]

    kept = {path_of.get(i["image_key"], i["image_key"]) for i in images}
    clusters = [{"/a.jpg", "/a-copy.jpg"}, *map(set, NEAR), {"/g.jpg"}, {"/h.jpg"}, {"coco:4"}]
    assert all(len(kept & c) == 1 for c in clusters) and len(kept) == len(clusters)
    assert {"/c.jpg", "/d.jpg"} <= kept  # the larger original represents its smaller copy
    # every caption of a merged duplicate is kept, re-pointed to the kept image
    web_pairs = [p for p in pairs if p["source"] == "web"]
    assert len(web_pairs) == len(WEB) - 1  # all but the Flickr30K copy
    repointed = {path_of[p["original_image_key"]]: path_of[p["image_key"]] for p in web_pairs}
    assert repointed["/c-half.jpg"] == "/c.jpg" and repointed["/d-crop.jpg"] == "/d.jpg"
    assert repointed["/a-copy.jpg"] == repointed["/a.jpg"] and repointed["/b-q40.jpg"] == repointed["/b.jpg"]
    assert {p["image_key"] for p in pairs} == {i["image_key"] for i in images}

    # the report counts what `removed` says
    report = json.loads(storage_for(cfg).read_bytes(f"artifacts/dedup/{result.manifest.key}/files/report.json"))
    assert report["images_removed"] == 5 and report["corpus"]["images_kept"] == 9
    assert report["duplicates"] == {"exact": 1, "near": 5}
    rows = {(r["source"], r["eval_set"], r["rule"]): (r["images"], r["pairs"]) for r in report["removed"]}
    assert rows[("web", "flickr30k", "appearance")] == (1, 1)
    assert rows[("coco", "flickr30k", "flickr_id")] == (1, 2)
    assert rows[("vg", "flickr30k", "flickr_id")] == (1, 1)
    assert rows[("coco", "refcoco", "coco_id")] == (1, 2) and rows[("coco", "coco_test", "coco_id")] == (1, 2)
    assert report["eval_sets"] == {
        "coco_test": {"items": 1, "images_hashed": 1},
        "flickr30k": {"items": 1, "images_hashed": 1},
        "refcoco": {"items": 1, "images_hashed": 1},
    }
    md = storage_for(cfg).read_bytes(f"artifacts/dedup/{result.manifest.key}/files/report.md").decode()
    assert "| web | flickr30k | appearance | 1 | 1 |" in md


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_rules_can_be_switched_off(corpus, storage_spec):
    with srv.ImageServer({p: srv.serve(b) for p, b in WEB.items()}) as server:
        cfg = load_config(corpus(server, storage_spec, appearance=False, near_duplicates=False))
        run_stage("ingest", cfg)
        run_stage("crawl", cfg)
        result = run_stage("dedup", cfg)
        dups, removed = _tables(cfg, result, "duplicates", "removed")
        assert {d["rule"] for d in dups} == {"exact"}
        assert {r["rule"] for r in removed} == {"coco_id", "flickr_id"}
        cfg2 = load_config(corpus(server, storage_spec, identity=False, appearance=False))
        result2 = run_stage("dedup", cfg2)  # crawl stays cached: only dedup's key changed
        assert _tables(cfg2, result2, "removed")[0] == []


def test_refs_pickles_load_only_builtins(tmp_path):
    good = tmp_path / "refs.p"
    good.write_bytes(pickle.dumps([{"image_id": 1, "split": "val", "sentences": [{"raw": "é"}]}], protocol=2))
    assert load_refs(str(good))[0]["sentences"][0]["raw"] == "é"

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    bad = tmp_path / "evil.p"
    bad.write_bytes(pickle.dumps([Evil()], protocol=2))
    with pytest.raises(InputDataError, match="refuses global"):
        load_refs(str(bad))
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "dict.p").write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(InputDataError, match="expected a list of refs"):
        load_refs(str(tmp_path / "dict.p"))


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_dedup_resumes_from_finished_shards(corpus, storage_spec):
    """A dedup that stopped after some of its shards resumes from them and ends byte-identical."""
    from contract.artifact import Artifact

    with srv.ImageServer({p: srv.serve(b) for p, b in WEB.items()}) as server:
        cfg = load_config(corpus(server, storage_spec))
        run_stage("ingest", cfg)
        run_stage("crawl", cfg)
        full = run_stage("dedup", cfg)
        storage = storage_for(cfg)
        art = Artifact(storage, "dedup", full.manifest.key)
        shards = sorted(art.done_shards())
        assert shards[0] == "eval-00000" and "map-00000" in shards and shards[-1] == "report-00000"
        # as if killed after the map: the later shards and the manifest never got written
        storage.remove(f"{art.prefix}/_manifest.json")
        later = [s for s in shards if s.startswith(("images-", "pairs-", "report-"))]
        for name in later[1:]:
            storage.remove(f"{art.prefix}/_shards/{name}.json")
        resumed = run_stage("dedup", cfg)
    assert resumed.resumed_shards == len(shards) - len(later) + 1
    assert resumed.manifest.content_sha256 == full.manifest.content_sha256


def test_rebuild_reuses_evaluation_hashes_and_joins_only_new_images(corpus, tmp_path, storage_spec):
    """More captions: dedup gets a new key. The evaluation images are not hashed again (local files:
    a stat), only the new images are joined against the rest, and the result is the artifact a build
    from scratch writes."""
    extra = {"/g-half.jpg": fx.jpeg(fx.resized(P[6], 0.5)), "/i.jpg": fx.jpeg(P[14])}  # a near dup of g; new

    def add_extra(server):
        with open(tmp_path / "web.jsonl", "a") as f:
            f.writelines(json.dumps({"image_url": server.url(p), "caption": f"web {p}"}) + "\n" for p in extra)

    with srv.ImageServer({p: srv.serve(b) for p, b in {**WEB, **extra}.items()}) as server:
        path = corpus(server, storage_spec)
        cfg = load_config(path)
        for stage in ("ingest", "crawl"):
            run_stage(stage, cfg)
        first = run_stage("dedup", cfg)
        assert first.manifest.counts["near_roots_reused"] == 0
        assert set(first.manifest.counts["eval_reuse"]) == {"fetched"}

        add_extra(server)
        cfg = load_config(path)
        for stage in ("ingest", "crawl"):
            run_stage(stage, cfg)
        rebuilt = run_stage("dedup", cfg)
        assert rebuilt.manifest.key != first.manifest.key
        evals = rebuilt.manifest.counts["eval_reuse"]
        assert set(evals) == {"revalidated"} and evals["revalidated"] == first.manifest.counts["eval_reuse"]["fetched"]
        roots_before = first.manifest.counts["images_in"] - first.manifest.counts["exact_duplicates"]
        assert rebuilt.manifest.counts["near_roots_reused"] == roots_before  # only the 2 new ones joined
        (dups,) = _tables(cfg, rebuilt, "duplicates")
        g_keys = {r["image_key"] for r in dups if r["rule"] == "near"}
        assert len(g_keys) == len(NEAR) + 1  # the new near duplicate of g was found

        corpus(server, {"uri": str(tmp_path / "scratch")})  # (rewrites web.jsonl without the extra rows)
        add_extra(server)
        scratch = load_config(tmp_path / "cfg.yaml")
        for stage in ("ingest", "crawl"):
            run_stage(stage, scratch)
        fresh = run_stage("dedup", scratch)
    assert fresh.manifest.counts["near_roots_reused"] == 0
    assert (fresh.manifest.key, fresh.manifest.content_sha256) == (
        rebuilt.manifest.key,
        rebuilt.manifest.content_sha256,
    )
