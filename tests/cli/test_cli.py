"""The `uniter` console script, as a user runs it: JSON on stdout, messages on stderr, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import S3_SECRET, demo_config, write_config
from tests.fixtures.pictures import check_png

UNITER = str(Path(sys.executable).parent / "uniter")


def uniter(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([UNITER, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def cfg_path(tmp_path, storage_spec):
    (tmp_path / "cc.tsv").write_text("a cat\thttp://example.org/1.jpg\na dog\thttp://example.org/2.jpg\n\tbad\n")
    (tmp_path / "caps.json").write_text(
        json.dumps(
            {
                "images": [
                    {"id": 1, "file_name": "1.jpg", "coco_url": "http://images.cocodataset.org/train2014/1.jpg"}
                ],
                "annotations": [{"id": 10, "image_id": 1, "caption": "a bird"}],
            }
        )
    )
    sources = [{"format": "cc", "path": "cc.tsv"}, {"format": "coco", "path": "caps.json", "split": "val"}]
    return write_config(tmp_path / "cfg.yaml", storage_spec, sources)


def test_run_twice_json_then_cached(cfg_path):
    first = uniter("run", "ingest", "-c", str(cfg_path), "--json")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)  # stdout is exactly one JSON object
    assert set(out) >= {"stage", "status", "key", "inputs", "outputs", "counts", "seconds"}
    assert (out["stage"], out["status"]) == ("ingest", "ran")
    assert {o["table"]: o["rows"] for o in out["outputs"]} == {"pairs": 3, "rejects": 1}
    assert all(len(o["sha256"]) == 64 and o["uri"] for o in out["outputs"])
    assert out["counts"]["reject_reasons"] == {"bad_url": 1}

    second = uniter("run", "ingest", "-c", str(cfg_path), "--json")
    again = json.loads(second.stdout)
    assert again["status"] == "cached" and again["key"] == out["key"] and again["outputs"] == out["outputs"]
    assert S3_SECRET not in first.stdout + first.stderr + second.stdout + second.stderr


# S3 only: DuckDB reads the tables over the S3 protocol there (local paths are the simpler case)
@pytest.mark.parametrize("storage_spec", ["s3"], indirect=True)
def test_status_and_sql(cfg_path):
    status = json.loads(uniter("status", "-c", str(cfg_path), "--json").stdout)
    assert status["stages"][0]["status"] == "missing"
    assert uniter("run", "ingest", "-c", str(cfg_path), "-q").returncode == 0
    status = json.loads(uniter("status", "-c", str(cfg_path), "--json").stdout)
    assert status["stages"][0]["status"] == "complete"

    sql = uniter(
        "sql", "-c", str(cfg_path), "--json", "select source, split, count(*) as n from pairs group by all order by all"
    )
    assert sql.returncode == 0, sql.stderr
    assert json.loads(sql.stdout)["rows"] == [
        {"source": "cc", "split": "train", "n": 2},
        {"source": "coco", "split": "val", "n": 1},
    ]
    human = uniter("sql", "-c", str(cfg_path), "select reason from rejects")
    assert human.returncode == 0 and "bad_url" in human.stdout


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_errors_are_one_paragraph_with_exit_code_2(tmp_path, cfg_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  sources: [{format: cc, path: nope.tsv}]\n")
    res = uniter("run", "ingest", "-c", str(bad))
    assert res.returncode == 2
    assert f"{bad}: invalid config" in res.stderr and "file not found" in res.stderr
    assert "Traceback" not in res.stderr

    res = uniter("run", "crawlx", "-c", str(cfg_path))
    assert res.returncode == 2 and "unknown stage 'crawlx'" in res.stderr

    (tmp_path / "trunc.json").write_text('{"images": [], "annotations": [{"id": 1,')
    trunc = write_config(
        tmp_path / "trunc.yaml", {"uri": str(tmp_path / "d")}, [{"format": "coco", "path": "trunc.json"}]
    )
    res = uniter("run", "ingest", "-c", str(trunc), "--json")
    assert res.returncode == 2 and res.stdout == ""
    assert f"{tmp_path / 'trunc.json'}: invalid JSON at line 1" in res.stderr and "Traceback" not in res.stderr

    res = uniter("sql", "-c", str(cfg_path), "select * from pairs")
    assert res.returncode == 2 and "Tables available: none yet" in res.stderr


def test_demo_runs_the_dag_on_the_bundled_sample(tmp_path):
    """What `make demo` runs, redirected to a temporary storage root (Prefect's temporary server)."""
    cfg, doc = demo_config(tmp_path)

    DEMO_STEPS = doc["pretrain"]["steps"]
    res = uniter("demo", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    stages = json.loads(res.stdout)["stages"]
    ingest, crawl, dedup, extract, downstream, pretrain, finetune, evaluate = stages
    assert [s["status"] for s in stages] == ["ran"] * 8
    assert ingest["counts"]["pairs_by_source"] == {
        "cc": 5,
        "coco": 8,
        "karpathy_coco": 8,
        "karpathy_f30k": 4,
        "sbu": 3,
        "vg": 5,
    }
    assert ingest["counts"]["reject_reasons"] == {
        "bad_url": 1,
        "empty_caption": 4,
        "undecodable_text": 1,
        "unknown_image": 1,
    }
    assert (crawl["counts"]["images"], crawl["counts"]["success_rate"]) == (19, 1.0)
    assert (dedup["counts"]["exact_duplicates"], dedup["counts"]["near_duplicates"]) == (1, 3)
    assert (dedup["counts"]["images_removed"], dedup["counts"]["images_kept"], dedup["counts"]["corpus_pairs"]) == (
        8,
        9,
        20,
    )
    assert extract["counts"]["images"] == 9 and extract["counts"]["mean_boxes"] == 36  # the grid backend
    # a few hundred steps of the debug model (grid features: no MRC), and it learns: the MLM loss
    # ends far below chance, ln(30522 word pieces) ≈ 10.3
    counts = pretrain["counts"]
    assert counts["steps"] == DEMO_STEPS and counts["tasks_off"] == {"mrc": 1, "mrckl": 1}
    assert counts["final"]["loss/mlm"] < 6 and {"val/itm_acc", "val/mlm_acc", "val/ot_pos", "val/ot_neg"} <= set(
        counts["final"]
    )
    assert (
        pretrain["outputs"][0]["table"] == "metrics" and pretrain["outputs"][0]["rows"] > DEMO_STEPS
    )  # a loss per step
    # VQA fine-tuned from that model, on the sample's COCO images (7, featurized by `downstream`),
    # then re-scored by `evaluate` from the official results file
    assert downstream["counts"]["images"] == 7
    vqa = finetune["counts"]["vqa"]
    assert vqa["steps"] == doc["finetune"]["vqa"]["steps"] and vqa["skipped"] == 0
    assert 0 <= vqa["val"]["vqa_overall"] <= 100
    assert evaluate["counts"]["scores"]["this config"]["vqa"] == vqa["val"]["vqa_overall"]
    again = json.loads(uniter("demo", "-c", str(cfg), "--json").stdout)
    assert [s["status"] for s in again["stages"]] == ["cached"] * 8

    # attention analysis of the pretrained model on 4 pairs: every (layer, head, pair) map classified
    res = uniter("analyze", "attention", "-c", str(cfg), "--n", "4", "--out", str(tmp_path / "attn"), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["examples"] == 4 and sum(summary["overall"].values()) == 4 * summary["layers"] * summary["heads"]
    check_png((tmp_path / "attn" / "attention_summary.png").read_bytes())
    assert len(list((tmp_path / "attn").glob("attention_example_*.png"))) == 4
    check_png((tmp_path / "attn" / "attention_example_00.png").read_bytes())

    # the pictures: pretraining's loss curves; the evaluation's, inline in the self-contained report.html
    artifacts = tmp_path / "data" / "artifacts"
    check_png((artifacts / "pretrain" / pretrain["key"] / "files" / "loss_curves.png").read_bytes())
    report = artifacts / "evaluate" / evaluate["key"] / "files"
    for name in ("meta_sum.png", "finetune_curves.png"):
        check_png((report / name).read_bytes())
    page = (report / "report.html").read_text()
    assert page.count("<img src='data:image/png;base64,") == 2 and "VQA answer types" in page

    # the features in the reference's npz layout and LXMERT's TSV: one record per extracted image
    for fmt, out in (("npz", tmp_path / "npz"), ("lxmert", tmp_path / "features.tsv")):
        res = uniter("export", "features", "--format", fmt, "--out", str(out), "-c", str(cfg), "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["exported"] == extract["counts"]["images"]


def test_a_temporary_server_that_does_not_start_is_an_environment_error(tmp_path):
    """`uniter run all` with no PREFECT_API_URL starts Prefect's temporary server; when it does not
    come up in time the command says what to do and exits 2, not 1 (0 s: it never does in time)."""
    cfg_path, _ = demo_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0", PREFECT_HOME=str(tmp_path / "prefect"))
    done = subprocess.run(
        [UNITER, "run", "all", "-c", str(cfg_path), "--until", "ingest"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "temporary server did not start within 0 s" in done.stderr and "PREFECT_API_URL" in done.stderr


def test_sql_prints_values_as_they_are(tmp_path, capsys):
    """Rich reads `[...]` in a string as markup and `:name:` as an emoji code; query results are
    data, printed verbatim (an IPv6 URL lost its host: `http://[fd00::1]/x.jpg` → `http:///x.jpg`)."""
    from cli.main import main

    (tmp_path / "cc.tsv").write_text("a router\thttp://[fd00::1]/x.jpg\n")
    cfg = write_config(tmp_path / "cfg.yaml", {"uri": str(tmp_path / "data")}, [{"format": "cc", "path": "cc.tsv"}])
    assert main(["run", "ingest", "-c", str(cfg), "-q"]) == 0
    capsys.readouterr()
    query = """select image_uri as "[bold]uri", '[red]:cat: x[/red]' as note from pairs"""
    assert main(["sql", "-c", str(cfg), query]) == 0
    out = capsys.readouterr().out
    assert "http://[fd00::1]/x.jpg" in out and "[red]:cat: x[/red]" in out and "[bold]uri" in out
