"""Hostile annotation files and image roots: the same caption and URL rules in every format, byte
order marks, record paths that climb out of their root, roots that are system folders, credentials
in URLs, and failures that never quote the bytes of what failed. Every hostile file is made here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cli.main import main
from contract.errors import ConfigError
from pipeline.config import load_config
from pipeline.runner import run_stage, storage_for
from tests.conftest import read_table, run_ingest
from tests.fixtures import images as fx
from tests.fixtures import server as srv

SECRET = "s3cretpw"
GOOD_URL = "http://example.org/a@2x.jpg"  # an @ in the path is not a credential
# (caption, image URL, reject reason or None)
CASES = [
    ("a red bus", GOOD_URL, None),
    ("nul\x00byte", "http://example.org/1.jpg", "control_characters"),
    ("bell\x07ringing", "http://example.org/2.jpg", "control_characters"),
    ("c1 \x9b control", "http://example.org/3.jpg", "control_characters"),
    ("x" * 5_000_000, "http://example.org/4.jpg", "caption_too_long"),
    ("y" * 1000, "http://example.org/5.jpg", None),  # exactly at the default limit
    ("a cat", f"http://user:{SECRET}@127.0.0.1:9/5.png", "credentials_in_url"),
    ("a dog", "http://token@example.org/6.jpg", "credentials_in_url"),
]


def _write_source(tmp_path: Path, fmt: str) -> dict:
    caps = [c for c, _, _ in CASES]
    urls = [u for _, u, _ in CASES]
    if fmt == "cc":
        (tmp_path / "cc.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in zip(caps, urls, strict=True)))
        return {"format": "cc", "path": "cc.tsv"}
    if fmt == "sbu":
        (tmp_path / "urls.txt").write_text("".join(u + "\n" for u in urls))
        (tmp_path / "caps.txt").write_text("".join(c + "\n" for c in caps))
        return {"format": "sbu", "urls": "urls.txt", "captions": "caps.txt"}
    if fmt == "coco":
        images = [{"id": i, "file_name": f"{i}.jpg", "coco_url": u} for i, u in enumerate(urls)]
        anns = [{"id": 100 + i, "image_id": i, "caption": c} for i, c in enumerate(caps)]
        (tmp_path / "coco.json").write_text(json.dumps({"images": images, "annotations": anns}))
        return {"format": "coco", "path": "coco.json"}
    if fmt == "vg":
        images = [{"image_id": i, "url": u} for i, u in enumerate(urls)]
        regions = [
            {
                "id": i,
                "regions": [
                    {"region_id": 100 + i, "image_id": i, "phrase": c, "x": 1, "y": 2, "width": 3, "height": 4}
                ],
            }  # fmt: skip
            for i, c in enumerate(caps)
        ]
        (tmp_path / "image_data.json").write_text(json.dumps(images))
        (tmp_path / "regions.json").write_text(json.dumps(regions))
        return {"format": "vg", "image_data": "image_data.json", "region_descriptions": "regions.json"}
    rows = [{"image_url": u, "caption": c} for c, u in zip(caps, urls, strict=True)]
    if fmt == "jsonl":
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"format": "table", "path": "t.jsonl"}
    if fmt == "csv":
        lines = ["image_url,caption"] + [f'{r["image_url"]},"{r["caption"]}"' for r in rows]
        (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
        return {"format": "table", "path": "t.csv"}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    return {"format": "table", "path": "t.parquet"}


@pytest.mark.parametrize("fmt", ["cc", "sbu", "coco", "vg", "jsonl", "csv", "parquet"])
def test_every_format_applies_the_same_caption_and_url_rules(tmp_path, fmt):
    pairs, rejects, _ = run_ingest(tmp_path, _write_source(tmp_path, fmt))
    assert sorted(p["caption"] for p in pairs) == sorted(c for c, _, r in CASES if r is None)
    assert sorted(r["reason"] for r in rejects) == sorted(r for _, _, r in CASES if r is not None)
    assert all(p["image_uri"] in (GOOD_URL, "http://example.org/5.jpg") for p in pairs)
    for r in rejects:
        assert SECRET not in r["detail"] and "token@" not in r["detail"]
        assert len(r["detail"]) <= 300  # the 5 MB caption is not copied whole
    if fmt != "sbu":  # SBU's URL file holds only the URL: the detail shows the caption line too
        assert any("http://***@127.0.0.1" in r["detail"] for r in rejects if r["reason"] == "credentials_in_url")


def test_a_byte_order_mark_is_not_text(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "cc.tsv").write_bytes(bom + b"first caption\thttp://example.org/1.jpg\r\n")
    (tmp_path / "urls.txt").write_bytes(bom + b"http://example.org/2.jpg\n")
    (tmp_path / "caps.txt").write_bytes(bom + b"second caption\n")
    coco = {"images": [{"id": 1, "coco_url": "http://example.org/3.jpg"}], "annotations": [
        {"id": 1, "image_id": 1, "caption": "third caption"}]}  # fmt: skip
    (tmp_path / "coco.json").write_bytes(bom + json.dumps(coco).encode())
    (tmp_path / "t.csv").write_bytes(bom + b"caption,image_url\nfourth caption,http://example.org/4.jpg\n")
    (tmp_path / "t.jsonl").write_bytes(bom + b'{"caption": "fifth caption", "image_url": "http://example.org/5.jpg"}\n')
    pairs, rejects, _ = run_ingest(
        tmp_path,
        {"format": "cc", "path": "cc.tsv"},
        {"format": "sbu", "urls": "urls.txt", "captions": "caps.txt"},
        {"format": "coco", "path": "coco.json"},
        {"format": "table", "name": "csv", "path": "t.csv"},
        {"format": "table", "name": "jsonl", "path": "t.jsonl"},
    )
    assert rejects == []
    assert sorted(p["caption"] for p in pairs) == sorted(
        ["first caption", "second caption", "third caption", "fourth caption", "fifth caption"]
    )
    assert {p["image_uri"] for p in pairs} == {f"http://example.org/{i}.jpg" for i in range(1, 6)}


def test_coco_captions_without_annotation_ids_are_named_by_position(tmp_path):
    coco = {
        "images": [{"id": 7, "coco_url": "http://example.org/7.jpg"}],
        "annotations": [
            {"image_id": 7, "caption": "no id here"},
            {"id": 12, "image_id": 7, "caption": "an id"},
            {"id": "twelve", "image_id": 7, "caption": "a bad id"},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    pairs, rejects, _ = run_ingest(tmp_path, {"format": "coco", "path": "coco.json"})
    assert sorted(p["pair_id"] for p in pairs) == ["coco:#0", "coco:12"]
    assert [(r["record"], r["reason"]) for r in rejects] == [("annotations[2]", "bad_record")]


def test_record_paths_stay_under_their_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = [
        {"image_path": "../../../../etc/passwd", "caption": "climbs out"},
        {"image_path": "sub/../../outside.jpg", "caption": "climbs out too"},
        {"image_path": "sub/../inside.jpg", "caption": "stays in"},
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    coco = {
        "images": [{"id": 1, "file_name": "../../etc/hostname"}, {"id": 2, "file_name": "COCO_2.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "a"}, {"id": 2, "image_id": 2, "caption": "b"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    karpathy = {"images": [
        {"filepath": "../..", "filename": "passwd", "cocoid": 3, "split": "train", "sentences": [
            {"sentid": 1, "raw": "c"}]},
        {"filepath": "train2014", "filename": "COCO_4.jpg", "cocoid": 4, "split": "train", "sentences": [
            {"sentid": 2, "raw": "d"}]},
    ]}  # fmt: skip
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    pairs, rejects, _ = run_ingest(
        tmp_path,
        {"format": "table", "path": "t.jsonl", "image_root": "imgs"},
        {"format": "coco", "path": "coco.json", "image_root": "imgs"},
        {"format": "karpathy", "path": "karpathy.json", "dataset": "coco", "image_root": "imgs"},
    )
    root = str(tmp_path / "imgs")
    assert sorted(p["image_uri"] for p in pairs) == [f"{root}/COCO_2.jpg", f"{root}/inside.jpg",
                                                     f"{root}/train2014/COCO_4.jpg"]  # fmt: skip
    assert sorted((r["source"], r["record"], r["reason"]) for r in rejects) == [
        ("coco", "annotations[0]", "path_outside_root"),
        ("karpathy", "images[0]", "path_outside_root"),
        ("table", "line 1", "path_outside_root"),
        ("table", "line 2", "path_outside_root"),
    ]


def _config_error(tmp_path: Path, crawl: dict, source: dict | None = None) -> str:
    (tmp_path / "cc.tsv").write_text("a cat\thttp://example.org/1.jpg\n")
    doc = {
        "storage": {"uri": str(tmp_path / "data")},
        "ingest": {"sources": [source or {"format": "cc", "path": "cc.tsv"}]},
        "crawl": crawl,
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "cfg.yaml")
    return str(exc.value)


def test_roots_that_resolve_to_system_or_secret_folders_are_refused(tmp_path):
    (tmp_path / "www" / "img").mkdir(parents=True)
    climb = "www/img/" + "../" * (len(tmp_path.parts) + 1) + "etc"
    message = _config_error(tmp_path, {"file_roots": [climb]})
    assert "crawl.file_roots" in message and "resolves to /etc, a system folder" in message

    os.symlink("/proc", tmp_path / "innocent")  # a symlink is followed before the check
    message = _config_error(tmp_path, {"file_roots": [str(tmp_path / "www"), "innocent"]})
    assert "crawl.file_roots[1]" in message and "resolves to /proc" in message

    message = _config_error(tmp_path, {"file_roots": ["~"]})
    assert "the home folder" in message
    message = _config_error(tmp_path, {"file_roots": ["~/.ssh"]})
    assert "a folder of credentials" in message

    source = {"format": "coco", "path": "cc.tsv", "image_root": f"https://user:{SECRET}@example.org/imgs"}
    message = _config_error(tmp_path, {}, source)
    assert "ingest.sources[0]" in message and "credentials in a URL are refused" in message
    assert SECRET not in message


def test_a_crawl_keeps_no_credential_and_no_byte_of_what_failed(tmp_path, capsys, caplog):
    """One run with a credential in a URL, a redirect to one, a redirect to a good image, and a
    "photo" that is /etc/passwd-like text: then every table, manifest and report is searched."""
    photo = fx.jpeg(fx.synthetic_photo(3, (120, 90)))
    secret_file = tmp_path / "imgs" / "passwd.jpg"
    secret_file.parent.mkdir()
    secret_file.write_text("root:x:0:0:root:/root:/bin/bash\n" * 3)
    (tmp_path / "imgs" / "binary.jpg").write_bytes(b"\x00\x01SECRETBYTES\xfe\xff" * 20)
    with srv.ImageServer({"/photo.jpg": srv.serve(photo)}) as server:
        server.routes["/moved.jpg"] = srv.redirect("/photo.jpg")
        server.routes["/cred.jpg"] = srv.redirect(server.base.replace("://", f"://user:{SECRET}@") + "/photo.jpg")
        rows = [
            {"image_url": server.url("/moved.jpg"), "caption": "moved"},
            {"image_url": server.url("/cred.jpg"), "caption": "redirect to a credential"},
            {"image_url": server.url("/photo.jpg").replace("://", f"://u:{SECRET}@"), "caption": "credential"},
            {"image_path": "passwd.jpg", "caption": "a text file"},
            {"image_path": "binary.jpg", "caption": "binary junk"},
        ]
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        doc = {
            "storage": {"uri": str(tmp_path / "data")},
            "ingest": {"sources": [{"format": "table", "path": "t.jsonl", "image_root": "imgs"}]},
            "crawl": {"allow_private_networks": True, "retries": 0, "file_roots": ["imgs"], "workers": 1},
        }
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
        caplog.set_level("DEBUG")
        for stage in ("ingest", "crawl"):  # as a user runs them, verbose: the logs are searched too
            assert main(["-v", "run", stage, "-c", str(tmp_path / "cfg.yaml")]) == 0
            assert main(["run", stage, "-c", str(tmp_path / "cfg.yaml"), "--json"]) == 0
        said = capsys.readouterr()
        cfg = load_config(tmp_path / "cfg.yaml")
        result = run_stage("crawl", cfg)
        assert result.status == "cached"

    store = storage_for(cfg)
    images = read_table(store, result.manifest, "images").to_pylist()
    assert [(r["url"], r["final_url"]) for r in images] == [(server.url("/moved.jpg"), server.url("/photo.jpg"))]
    failures = {Path(r["url"]).name: (r["reason"], r["detail"]) for r in read_table(store, result.manifest, "failures")
                .to_pylist()}  # fmt: skip
    assert failures["cred.jpg"][0] == "credentials_in_url" and "http://***@127.0.0.1" in failures["cred.jpg"][1]
    assert failures["passwd.jpg"] == ("not_an_image", "text, not an image (96 bytes)")
    assert failures["binary.jpg"] == ("not_an_image", "unrecognized binary format (300 bytes)")

    assert "credentials_in_url" in said.out + said.err
    for text in (said.out, said.err, caplog.text):
        assert SECRET not in text and "root:x:0" not in text
    searched = 0
    for path in Path(tmp_path / "data").rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".parquet":  # compressed: search the values, not the bytes
            table = pq.read_table(path)
            table = table.drop_columns([c for c in table.column_names if c in ("bytes", "thumb")])
            data = json.dumps(table.to_pylist(), default=str).encode()
        searched += 1
        assert SECRET.encode() not in data, path
        assert b"root:x:0" not in data and b"SECRETBYTES" not in data, path
    assert searched >= 8
