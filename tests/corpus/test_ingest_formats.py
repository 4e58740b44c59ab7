"""Every ingest format, from files in its real layout: good rows, rejects with reasons, and whole
files that are malformed (an error naming the file and the position)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contract.errors import InputDataError
from tests.conftest import run_ingest


def by_id(rows):
    return {r["pair_id"]: r for r in rows}


def reasons(rejects):
    return sorted((r["record"], r["reason"]) for r in rejects)


# --- COCO -------------------------------------------------------------------------------------

COCO = {
    "info": {"year": 2014},
    "images": [
        {
            "id": 9,
            "file_name": "COCO_train2014_000000000009.jpg",
            "coco_url": "http://images.cocodataset.org/train2014/COCO_train2014_000000000009.jpg",
            "flickr_url": "http://farm4.staticflickr.com/3153/2970773875_164f0c0b83_z.jpg",
            "width": 640,
            "height": 480,
        },
        {
            "id": 25,
            "file_name": "COCO_train2014_000000000025.jpg",
            "coco_url": "http://images.cocodataset.org/train2014/COCO_train2014_000000000025.jpg",
            "flickr_url": "http://farm9.staticflickr.com/8090/8424963022_8f0a8a1c4f_z.jpg",
            "width": 640,
            "height": 426,
        },
    ],
    "annotations": [
        {"id": 48, "image_id": 9, "caption": "A plate  of food\nwith broccoli. "},
        {"id": 67, "image_id": 25, "caption": "A giraffe eating leaves."},
        {"id": 68, "image_id": 25, "caption": "   "},
        {"id": 69, "image_id": 25},
        {"id": 70, "image_id": 404, "caption": "orphan"},
        ["not", "an", "object"],
    ],
}


def test_coco_captions(tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps(COCO))
    pairs, rejects, run = run_ingest(tmp_path, {"format": "coco", "path": "captions.json", "split": "train"})
    got = by_id(pairs)
    assert set(got) == {"coco:48", "coco:67"}
    p = got["coco:48"]
    assert p["caption"] == "A plate of food with broccoli."  # whitespace runs collapsed
    assert p["image_key"] == "coco:9" and p["coco_id"] == 9 and p["split"] == "train" and p["source"] == "coco"
    assert p["flickr_id"] == 2970773875  # parsed from flickr_url, as UNITER's decontamination does
    assert p["image_uri"] == COCO["images"][0]["coco_url"]  # no image_root: the public URL
    assert reasons(rejects) == [
        ("annotations[2]", "empty_caption"),
        ("annotations[3]", "missing_caption"),
        ("annotations[4]", "unknown_image"),
        ("annotations[5]", "bad_record"),
    ]
    assert run.manifest.counts["reject_reasons"] == {
        "bad_record": 1,
        "empty_caption": 1,
        "missing_caption": 1,
        "unknown_image": 1,
    }
    assert all(r["file"] == str(tmp_path / "captions.json") for r in rejects)


def test_coco_image_root_and_key_order(tmp_path):
    """`annotations` before `images` in the file still works (two streaming passes)."""
    doc = {"annotations": COCO["annotations"][:2], "images": COCO["images"]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    pairs, _, _ = run_ingest(
        tmp_path, {"format": "coco", "name": "coco_val", "path": "c.json", "image_root": "imgs/train2014"}
    )
    got = by_id(pairs)
    assert got["coco_val:67"]["image_uri"] == str(tmp_path / "imgs" / "train2014" / "COCO_train2014_000000000025.jpg")


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '{"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "caption": "a"}, {"id": 2,',
            "at line 1, column 92 (byte 91): premature EOF",
        ),
        ('{"images": [],\n "annotations": [\n  {"id": 1 "image_id": 1}]}', "at line 3, column 14 (byte 46)"),
        ('[{"id": 1}]', "expected an object at the top level, found an array"),
        ('{"images": []}', "expected a top-level key 'annotations' holding an array; it is missing"),
        ('{"images": [], "annotations": {"id": 1}}', "expected 'annotations' to be an array, found an object"),
        ("", "empty file"),
    ],
)
def test_coco_malformed_file_stops_with_position(tmp_path, text, expected):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(InputDataError) as exc:
        run_ingest(tmp_path, {"format": "coco", "path": "bad.json"})
    assert str(tmp_path / "bad.json") in str(exc.value)
    assert expected in str(exc.value)


def test_failed_file_publishes_nothing(tmp_path):
    (tmp_path / "bad.json").write_text(
        '{"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "caption": "a"},'
    )
    with pytest.raises(InputDataError):
        run_ingest(tmp_path, {"format": "coco", "path": "bad.json"}, shard_rows=1)
    assert not list((tmp_path / "data").rglob("_manifest.json"))


# --- Visual Genome ----------------------------------------------------------------------------


def test_visual_genome_regions(tmp_path):
    (tmp_path / "image_data.json").write_text(
        json.dumps(
            [
                {
                    "image_id": 1,
                    "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg",
                    "width": 800,
                    "height": 600,
                    "coco_id": None,
                    "flickr_id": None,
                },
                {
                    "id": 2,
                    "url": "https://cs.stanford.edu/people/rak248/VG_100K/2.jpg",
                    "coco_id": 30,
                    "flickr_id": 2970773875,
                },
            ]
        )
    )
    (tmp_path / "regions.json").write_text(
        json.dumps(
            [
                {
                    "id": 1,
                    "regions": [
                        {
                            "region_id": 1382,
                            "image_id": 1,
                            "phrase": "the clock is green",
                            "x": 421,
                            "y": 57,
                            "width": 82,
                            "height": 139,
                        },
                        {"region_id": 1383, "image_id": 1, "phrase": "", "x": 1, "y": 2, "width": 3, "height": 4},
                    ],
                },
                {
                    "id": 2,
                    "regions": [
                        {
                            "region_id": 2001,
                            "image_id": 2,
                            "phrase": "white vase",
                            "x": 100.0,
                            "y": 80,
                            "width": 200,
                            "height": 300,
                        },
                        {"region_id": 2002, "image_id": 2, "phrase": "no box"},
                        {
                            "region_id": 2003,
                            "image_id": 77,
                            "phrase": "unknown image",
                            "x": 0,
                            "y": 0,
                            "width": 1,
                            "height": 1,
                        },
                    ],
                },
            ]
        )
    )
    src = {
        "format": "vg",
        "image_data": "image_data.json",
        "region_descriptions": "regions.json",
        "image_root": "/data/vg",
    }
    pairs, rejects, _ = run_ingest(tmp_path, src)
    got = by_id(pairs)
    assert set(got) == {"vg:1382", "vg:2001"}
    a, b = got["vg:1382"], got["vg:2001"]
    assert (a["region_id"], a["region_x"], a["region_y"], a["region_w"], a["region_h"]) == (1382, 421, 57, 82, 139)
    assert a["image_uri"] == "/data/vg/VG_100K_2/1.jpg" and a["image_key"] == "vg:1" and a["vg_id"] == 1
    assert a["coco_id"] is None and a["flickr_id"] is None
    assert (b["coco_id"], b["flickr_id"], b["vg_id"], b["region_x"]) == (30, 2970773875, 2, 100)  # VG 1.0 "id" key
    assert reasons(rejects) == [
        ("region #3", "bad_record"),
        ("region 1383", "empty_caption"),
        ("region 2003", "unknown_image"),
    ]


# --- Conceptual Captions ----------------------------------------------------------------------


def test_conceptual_captions_tsv(tmp_path):
    lines = [
        b"a very typical bus station\thttp://example.org/bus.jpg\n",
        b"\n",
        b"sierra looked stunning\thttps://farm1.staticflickr.com/2/5148648301_1174ef1011_b.jpg\r\n",
        b"the view\tftp://example.org/x.jpg\n",
        b"the void\t\n",
        b"\thttp://example.org/empty.jpg\n",
        b"caf\xe9 au lait\thttp://example.org/cafe.jpg\n",
        b"no tab here http://example.org/n.jpg\n",
        "a  very\u3000typical bus station\thttp://example.org/bus.jpg".encode(),  # same URL, no final newline
    ]
    (tmp_path / "cc.tsv").write_bytes(b"".join(lines))
    pairs, rejects, run = run_ingest(tmp_path, {"format": "cc", "path": "cc.tsv", "split": "val"}, shard_rows=4)
    got = by_id(pairs)
    assert set(got) == {"cc:1", "cc:3", "cc:9"}
    assert got["cc:1"]["image_key"] == got["cc:9"]["image_key"]  # same URL, same image
    assert got["cc:9"]["caption"] == "a very typical bus station"
    assert got["cc:3"]["image_uri"] == "https://farm1.staticflickr.com/2/5148648301_1174ef1011_b.jpg"
    assert got["cc:3"]["flickr_id"] == 5148648301 and got["cc:1"]["flickr_id"] is None
    assert {p["split"] for p in pairs} == {"val"}
    assert reasons(rejects) == [
        ("line 4", "bad_url"),
        ("line 5", "missing_url"),
        ("line 6", "empty_caption"),
        ("line 7", "undecodable_text"),
        ("line 8", "bad_record"),
    ]
    assert run.manifest.counts["blank_lines"] == 1
    assert run.manifest.shards == 3  # 9 lines in shards of 4


# --- SBU --------------------------------------------------------------------------------------


def test_sbu_parallel_files(tmp_path):
    (tmp_path / "urls.txt").write_text(
        "http://static.flickr.com/2723/4385058960_b0f291553e.jpg\nhttp://static.flickr.com/1/2_a.jpg\nnot a url\n"
    )
    (tmp_path / "caps.txt").write_text("Man sits in a rusted car \nempty next\nok caption\n".replace("empty next", " "))
    pairs, rejects, _ = run_ingest(tmp_path, {"format": "sbu", "urls": "urls.txt", "captions": "caps.txt"})
    assert [(p["pair_id"], p["caption"], p["flickr_id"]) for p in pairs] == [
        ("sbu:1", "Man sits in a rusted car", 4385058960)
    ]
    assert reasons(rejects) == [("line 2", "empty_caption"), ("line 3", "bad_url")]
    assert rejects[1]["file"] == str(tmp_path / "urls.txt") and rejects[0]["file"] == str(tmp_path / "caps.txt")


def test_sbu_files_of_different_lengths_are_an_error(tmp_path):
    (tmp_path / "urls.txt").write_text("http://a.org/1.jpg\nhttp://a.org/2.jpg\n")
    (tmp_path / "caps.txt").write_text("one\n")
    with pytest.raises(InputDataError, match="has 2 lines but .*caps.txt has 1"):
        run_ingest(tmp_path, {"format": "sbu", "urls": "urls.txt", "captions": "caps.txt"})


# --- Karpathy ---------------------------------------------------------------------------------


def _sent(sid, raw):
    return {"tokens": raw.lower().split(), "raw": raw, "imgid": 0, "sentid": sid}


def test_karpathy_coco_and_flickr30k(tmp_path):
    (tmp_path / "dataset_coco.json").write_text(
        json.dumps(
            {
                "images": [
                    {
                        "filepath": "val2014",
                        "filename": "COCO_val2014_000000391895.jpg",
                        "imgid": 0,
                        "split": "test",
                        "cocoid": 391895,
                        "sentids": [770337],
                        "sentences": [_sent(770337, "A man riding a motorbike.")],
                    },
                    {
                        "filepath": "train2014",
                        "filename": "COCO_train2014_000000000009.jpg",
                        "imgid": 1,
                        "split": "train",
                        "cocoid": 9,
                        "sentids": [1, 2],
                        "sentences": [_sent(1, "Food."), {"raw": "no id"}],
                    },
                    {
                        "filepath": "val2014",
                        "filename": "COCO_val2014_000000000042.jpg",
                        "imgid": 2,
                        "split": "restval",
                        "cocoid": 42,
                        "sentids": [3],
                        "sentences": [_sent(3, "A dog.")],
                    },
                    {"filename": "broken.jpg"},
                ],
                "dataset": "coco",
            }
        )
    )
    (tmp_path / "dataset_flickr30k.json").write_text(
        json.dumps(
            {
                "images": [
                    {
                        "filename": "1000092795.jpg",
                        "imgid": 0,
                        "split": "val",
                        "sentids": [0],
                        "sentences": [_sent(0, "Two young guys.")],
                    },
                ],
                "dataset": "flickr30k",
            }
        )
    )
    pairs, rejects, _ = run_ingest(
        tmp_path,
        {
            "format": "karpathy",
            "name": "kc",
            "dataset": "coco",
            "path": "dataset_coco.json",
            "splits": ["train", "test"],
        },
        {
            "format": "karpathy",
            "name": "kf",
            "dataset": "flickr30k",
            "path": "dataset_flickr30k.json",
            "image_root": "f30k",
        },
    )
    got = by_id(pairs)
    assert set(got) == {"kc:770337", "kc:1", "kf:0"}  # restval filtered out by `splits`
    assert got["kc:770337"]["split"] == "test" and got["kc:770337"]["image_key"] == "coco:391895"
    assert got["kc:770337"]["image_uri"] == "http://images.cocodataset.org/val2014/COCO_val2014_000000391895.jpg"
    f = got["kf:0"]
    assert (f["image_key"], f["flickr_id"], f["split"]) == ("flickr30k:1000092795", 1000092795, "val")
    assert f["image_uri"] == str(tmp_path / "f30k" / "1000092795.jpg")
    assert reasons(rejects) == [("images[1].sentences[1]", "bad_record"), ("images[3]", "bad_record")]


def test_karpathy_and_coco_share_image_keys(tmp_path):
    """The same COCO image from the captions file and from Karpathy's file is one image."""
    (tmp_path / "captions.json").write_text(json.dumps(COCO))
    (tmp_path / "k.json").write_text(
        json.dumps(
            {
                "images": [
                    {
                        "filepath": "train2014",
                        "filename": "COCO_train2014_000000000009.jpg",
                        "split": "train",
                        "cocoid": 9,
                        "sentences": [_sent(5, "x")],
                    }
                ]
            }
        )
    )
    pairs, _, _ = run_ingest(
        tmp_path,
        {"format": "coco", "path": "captions.json"},
        {"format": "karpathy", "dataset": "coco", "path": "k.json"},
    )
    keys = {p["pair_id"]: p["image_key"] for p in pairs}
    assert keys["coco:48"] == keys["karpathy:5"] == "coco:9"


# --- generic tables ---------------------------------------------------------------------------


def test_table_formats(tmp_path):
    rows = [
        {"image_url": "http://example.org/a.jpg", "caption": "a cat", "split": "val", "id": "x1"},
        {"image_path": "imgs/b.jpg", "caption": "a dog"},
        {"image_url": "javascript:alert(1)", "caption": "evil"},
        {"image_url": "http://example.org/c.jpg", "caption": ""},
        {"caption": "no image"},
    ]
    columns = ["image_url", "image_path", "caption", "split", "id"]
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n{broken\n\n[1, 2]\n")
    (tmp_path / "t.csv").write_text('image_url,caption\nhttp://example.org/a.jpg,"a, cat"\n')
    pairs, rejects, _ = run_ingest(
        tmp_path,
        {"format": "table", "name": "pq", "path": "t.parquet"},
        {"format": "table", "name": "js", "path": "t.jsonl", "image_root": "/srv/images"},
        {"format": "table", "name": "csv", "path": "t.csv"},
    )
    got = by_id(pairs)
    assert set(got) == {"pq:x1", "pq:2", "js:x1", "js:2", "csv:1"}
    assert got["pq:x1"]["split"] == "val" and got["pq:2"]["split"] == "train"
    assert got["pq:2"]["image_uri"] == str(tmp_path / "imgs" / "b.jpg")  # relative to the table's folder
    assert got["js:2"]["image_uri"] == "/srv/images/imgs/b.jpg"
    assert got["csv:1"]["caption"] == "a, cat"
    assert got["pq:x1"]["image_key"] == got["csv:1"]["image_key"]  # same URL in two tables
    assert reasons(rejects) == [
        ("line 3", "bad_json"),
        ("line 5", "bad_record"),
        ("row 3", "bad_url"),
        ("row 4", "empty_caption"),
        ("row 5", "missing_url"),
    ]


def test_table_without_required_columns(tmp_path):
    pq.write_table(pa.table({"url": ["http://a.org/1.jpg"], "text": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(InputDataError, match="expected columns 'caption' and 'image_url' or 'image_path'"):
        run_ingest(tmp_path, {"format": "table", "path": "t.parquet"})
