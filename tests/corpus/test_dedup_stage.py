"""Dedup end to end: planted exact and near duplicates are merged (captions kept), distinct photos
stay, and decontamination removes by id and by appearance what it should — with a report to match."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from contract.errors import ConfigError, GuardError, InputDataError
from corpus.dedup.config import DedupConfig
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

    def write(server: srv.ImageServer, storage: dict, web=WEB, **dedup) -> str:
        (tmp_path / "web.jsonl").write_text(
            "".join(json.dumps({"image_url": server.url(p), "caption": f"web {p}"}) + "\n" for p in web)
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
def test_decontamination_modes(corpus, storage_spec):
    """`ids` fetches no evaluation image; `exact` adds byte copies (sha256), here one without any id,
    with near-duplicate merging off; `none` removes nothing."""
    web = {**WEB, "/f30k-exact.jpg": fx.jpeg(P[8])}  # the very bytes of the Flickr30K test image
    with srv.ImageServer({p: srv.serve(b) for p, b in web.items()}) as server:
        cfg = load_config(corpus(server, storage_spec, web=web, decontamination="ids", near_duplicates=False))
        run_stage("ingest", cfg)
        run_stage("crawl", cfg)
        result = run_stage("dedup", cfg)
        dups, removed, evals = _tables(cfg, result, "duplicates", "removed", "eval_images")
        assert {d["rule"] for d in dups} == {"exact"}
        assert {r["rule"] for r in removed} == {"coco_id", "flickr_id"}
        assert {e["status"] for e in evals} == {"skipped"}  # ids need no pictures

        key_of = {r["image_uri"].removeprefix(server.base): r["image_key"] for r in _pairs(cfg) if r["source"] == "web"}
        exact = load_config(corpus(server, storage_spec, web=web, decontamination="exact", near_duplicates=False))
        result = run_stage("dedup", exact)  # crawl stays cached: only dedup's key changed
        dups, removed = _tables(exact, result, "duplicates", "removed")
        assert {d["rule"] for d in dups} == {"exact"}
        by_rule = {}
        for r in removed:
            by_rule.setdefault(r["rule"], set()).add((r["image_key"], r["eval_set"]))
        assert set(by_rule) == {"coco_id", "flickr_id", "sha256"}
        assert by_rule["sha256"] == {
            (key_of["/f30k-exact.jpg"], "flickr30k"),
            ("coco:2", "coco_test"),
            ("coco:3", "refcoco"),
        }
        assert key_of["/f30k-copy.jpg"] not in {r["image_key"] for r in removed}  # resized: appearance only

        none = load_config(corpus(server, storage_spec, web=web, decontamination="none"))
        assert _tables(none, run_stage("dedup", none), "removed")[0] == []


def _pairs(cfg):
    return read_table(storage_for(cfg), run_stage("ingest", cfg).manifest, "pairs").to_pylist()


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_old_rule_switches_get_a_clear_error(corpus, storage_spec):
    with srv.ImageServer({}) as server, pytest.raises(ConfigError, match="replaced by `decontamination"):
        load_config(corpus(server, storage_spec, identity=False, appearance=False))


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_guard_stops_a_dedup_that_removes_too_much(corpus, storage_spec):
    """5 of the 20 images overlap the evaluation sets and 6 are duplicates: over a 20 % limit, dedup
    exits 2 with the counts, the rules and the closest pairs, and publishes nothing."""
    with srv.ImageServer({p: srv.serve(b) for p, b in WEB.items()}) as server:
        cfg = load_config(corpus(server, storage_spec, guard_min_images=10))
        run_stage("ingest", cfg)
        run_stage("crawl", cfg)
        with pytest.raises(GuardError) as err:
            run_stage("dedup", cfg)
        message = str(err.value)
        assert "decontamination would remove 5 of 20 images (25.0%" in message
        assert "duplicate merging would fold 6 of 20 images" in message and "(pHash 0, colour" in message
        assert "dedup.max_removed_fraction = 0.2" in message and "coco:2 ~ coco_test" in message
        written = list(storage_for(cfg).list("artifacts/dedup/"))
        # nothing published: no manifest, no map; the hashed evaluation images stay for the next run
        assert not [k for k in written if k.endswith("_manifest.json") or "/_shards/eval-" not in k and ".json" in k]
        assert all("eval" in k for k in written)
        cli = subprocess.run(
            [sys.executable, "-m", "cli", "run", "dedup", "-c", corpus(server, storage_spec, guard_min_images=10)],
            capture_output=True,
            text=True,
        )
        assert cli.returncode == 2 and "dedup stopped before publishing anything" in cli.stderr
        assert "Traceback" not in cli.stderr

        relaxed = load_config(corpus(server, storage_spec, guard_min_images=10, max_removed_fraction=0.5))
        assert run_stage("dedup", relaxed).manifest.counts["images_removed"] == 5


# Flat shapes: which pairs pHash confuses, found by hashing (the fixture's difficulty is not chosen).
def _confusable_shapes(limit: int) -> dict[str, list[tuple[tuple, tuple]]]:
    from corpus.images.imagehash import hamming, phash_windows

    combos = [
        (shape, colour, size, (x, y), bg)
        for shape in ("rectangle", "ellipse", "triangle")
        for colour in fx.SHAPE_COLOURS
        for size in fx.SHAPE_SIZES
        for x in range(3)
        for y in range(3)
        for bg in range(3)
        if fx.SHAPE_COLOURS[colour] != fx.SHAPE_BACKGROUNDS[bg]
    ]
    # hashed as the crawl hashes them: after the JPEG the test serves
    hashes = {c: phash_windows(Image.open(io.BytesIO(fx.jpeg(fx.flat_shape(*c))))) for c in combos}

    def candidates(a, b) -> bool:
        (fa, wa), (fb, wb) = hashes[a], hashes[b]
        return min(hamming(fa, h) for h in (fb, *wb)) <= 4 or min(hamming(fb, h) for h in wa) <= 4

    # (a shape's place alone never brings pHash within 4 here; its place and size together do)
    found: dict[str, list] = {"colour": [], "size": [], "size+place": []}
    used: set = set()
    for i, a in enumerate(combos):
        for b in combos[i + 1 :]:
            differ = "+".join(k for k, j in (("colour", 1), ("size", 2), ("place", 3)) if a[j] != b[j])
            wanted = differ in found and len(found[differ]) < limit
            if wanted and a[0] == b[0] and a[4] == b[4] and not {a, b} & used and candidates(a, b):
                found[differ].append((a, b))
                used |= {a, b}
    return found


def test_flat_shapes_are_checked_by_colour_and_copies_still_merge(tmp_path):
    """Pictures pHash cannot tell apart (flat shapes differing only in colour, size or place) are
    neither merged nor removed — each stays with its own caption, and the report lists them as
    rejected candidates — while resized and re-encoded copies still merge or are removed, and every
    moved caption is listed with both image keys."""
    confusable = _confusable_shapes(limit=2)
    assert all(len(v) == 2 for v in confusable.values()), confusable  # pHash does confuse each kind
    images = tmp_path / "images"
    images.mkdir()
    rows, corpus_names, eval_names = [], [], []

    def add(name: str, image, caption: str, where: list) -> None:
        (images / name).write_bytes(fx.jpeg(image))
        where.append(name)
        if where is corpus_names:
            rows.append({"image_path": f"images/{name}", "caption": caption})

    for kind, pairs in confusable.items():
        (a, b), (c, d) = pairs
        add(f"{kind}-a.jpg", fx.flat_shape(*a), f"{a}", corpus_names)  # both in the corpus: not merged
        add(f"{kind}-b.jpg", fx.flat_shape(*b), f"{b}", corpus_names)
        add(f"{kind}-c.jpg", fx.flat_shape(*c), f"{c}", corpus_names)  # c in the corpus, d evaluated
        add(f"eval-{kind}-d.jpg", fx.flat_shape(*d), "", eval_names)
    # (copies of photos: pHash proposes them reliably; of a flat shape it often does not)
    base = fx.synthetic_photo(77, (160, 120))
    add("copy-src.jpg", base, "the original", corpus_names)
    add("copy-half.jpg", fx.resized(base, 0.5), "its half-size copy", corpus_names)
    add("copy-q40.jpg", fx.recompressed(base, 40), "its q40 copy", corpus_names)
    evaluated = fx.synthetic_photo(78, (160, 120))
    add("eval-e.jpg", evaluated, "", eval_names)
    add("copy-of-eval.jpg", fx.resized(evaluated, 0.75), "a copy of an evaluation image", corpus_names)

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "f30k.json").write_text(
        json.dumps({"images": [{"filename": n, "split": "test", "sentences": []} for n in eval_names]})
    )
    (tmp_path / "cfg.yaml").write_text(
        yaml.safe_dump(
            {
                "storage": {"uri": str(tmp_path / "store")},
                "ingest": {"sources": [{"format": "table", "name": "shapes", "path": "pairs.jsonl"}]},
                "crawl": {"file_roots": [str(images)], "workers": 1},
                "dedup": {
                    "eval_sets": [
                        {
                            "name": "f30k",
                            "format": "karpathy",
                            "dataset": "flickr30k",
                            "path": "f30k.json",
                            "image_root": str(images),
                        }
                    ]
                },
            }
        )
    )
    cfg = load_config(tmp_path / "cfg.yaml")
    run_stage("ingest", cfg)
    run_stage("crawl", cfg)
    result = run_stage("dedup", cfg)
    name_of = {r["image_key"]: r["image_uri"].rsplit("/", 1)[1] for r in _pairs(cfg)}
    dups, removed, rejected, repointed = _tables(cfg, result, "duplicates", "removed", "rejected", "repointed")

    # the three copies form one cluster, kept as the full-size original or its same-size q40 copy
    kept = {name_of[d["kept_key"]] for d in dups}
    assert len(kept) == 1 and kept <= {"copy-src.jpg", "copy-q40.jpg"}
    copies = {"copy-src.jpg", "copy-half.jpg", "copy-q40.jpg"}
    assert {name_of[d["image_key"]] for d in dups} == copies - kept
    assert {name_of[r["image_key"]]: r["rule"] for r in removed} == {"copy-of-eval.jpg": "appearance"}
    rejected_near = {
        frozenset((name_of[r["image_key"]], name_of[r["candidate_key"]])) for r in rejected if r["kind"] == "near"
    }
    for kind in confusable:
        assert frozenset((f"{kind}-a.jpg", f"{kind}-b.jpg")) in rejected_near, kind
    rejected_eval = {(name_of[r["image_key"]], r["eval_item"]) for r in rejected if r["kind"] == "appearance"}
    for kind in confusable:
        assert any(img == f"{kind}-c.jpg" and item.endswith(f"eval-{kind}-d.jpg") for img, item in rejected_eval), kind
    assert all(r["colour_distance"] > DedupConfig().colour_max_distance for r in rejected)
    moved = {(name_of[r["original_image_key"]], name_of[r["kept_key"]], r["rule"]) for r in repointed}
    assert moved == {(name, *kept, "near") for name in copies - kept}
    (corpus_pairs,) = _tables(cfg, result, "corpus_pairs")
    for p in corpus_pairs:  # every other caption stays on its own picture
        if not name_of[p["original_image_key"]].startswith("copy-"):
            assert p["image_key"] == p["original_image_key"]
    report = json.loads(storage_for(cfg).read_bytes(f"artifacts/dedup/{result.manifest.key}/files/report.json"))
    assert report["repointed_captions"] == 2 and report["candidates_rejected"]["near"] >= len(confusable)


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
