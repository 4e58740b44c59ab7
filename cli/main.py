"""`uniter`: run stages, show their status, query the catalog, run the demo.

stdout carries results (a single JSON object with ``--json``); logs and progress go to stderr.
Exit codes: 0 success, 2 a problem with input/config/storage (message says what), 1 a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from contract.artifact import Artifact
from contract.configbase import redact_credentials
from contract.errors import ConfigError, MissingInputError, UniterError
from contract.progress import NullProgress, RichProgress
from pipeline.config import PipelineConfig, config_document, load_config
from pipeline.demo import serve_sample
from storage.base import StorageError
from storage.catalog import Catalog, CatalogError

# NOTE: the runner, the stage list, the stage packages and Prefect are imported inside the commands
# that use them (marked PLC0415 for ruff): together they take seconds to import (torch, DeepSpeed,
# Prefect), which `uniter --help`, a config error or `uniter sql` should not pay.

log = logging.getLogger("uniter")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=_stderr_console(), show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], format="%(message)s")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stderr_console():
    return Console(stderr=True)


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")
    sys.stdout.flush()


def _progress(args):
    return NullProgress() if args.quiet else RichProgress()


def _config(args) -> PipelineConfig:
    return load_config(args.config, args.set)


# --- commands --------------------------------------------------------------------------------


def cmd_run(args) -> int:
    cfg = _config(args)
    if getattr(args, "deployment", False):
        return _run_deployment(args, cfg)
    if args.stage == "all":
        return _run_all(args, cfg)
    if args.stage == "ablation":
        from flows.ablation import ablation  # noqa: PLC0415

        with _temporary_server_errors():
            summary = ablation(config=config_document(cfg))
        if args.json:
            _emit(summary)
        else:
            con = _stderr_console()
            for row in summary["variants"]:
                con.print(
                    f"[bold]{row['variant']}[/]: pretrain {row['pretrain']['status']}, finetune "
                    f"{row['finetune']['status']}, Meta-Sum {row['meta_sum']:.2f}"
                )
            con.print(f"Ablation report: {summary['report']}")
        return 0
    from pipeline.runner import run_stage, storage_for  # noqa: PLC0415

    storage = storage_for(cfg)
    result = run_stage(
        args.stage, cfg, storage, force=args.force, progress=_progress(args), config_path=args.config, wait=args.wait
    )
    summary = result.to_json(storage)
    if args.json:
        _emit(summary)
    else:
        _print_run(summary)
    return 0


def _run_deployment(args, cfg) -> int:
    """Trigger the stage's (or the whole pipeline's) deployment on the server and follow it."""
    from flows.deployments import trigger  # noqa: PLC0415

    if not os.environ.get("PREFECT_API_URL"):
        raise UniterError(
            "--deployment needs a running server: set PREFECT_API_URL (and run `uniter serve` or a worker)"
        )
    name = "full-pipeline" if args.stage == "all" else f"stage-{args.stage}"
    started = time.time()
    run = trigger(name, cfg, force=args.force)
    state = run.state
    ok = state is not None and state.is_completed()
    summary = {
        "flow": name,
        "flow_run": str(run.id),
        "state": state.name if state else None,
        "seconds": round(time.time() - started, 3),
    }
    if not ok:  # why it did not complete (Prefect's message: the exception, or why the run crashed)
        summary["message"] = redact_credentials(state.message or "") if state is not None else "no final state"
    if args.json:
        _emit(summary)
    else:
        _stderr_console().print(
            f"[bold]{name}[/] (flow run {run.name}): {summary['state']} in {summary['seconds']:.1f} s",
            Text(f": {summary['message']}") if not ok else "",
            sep="",
        )
    return 0 if ok else 1


def cmd_serve(args) -> int:
    from flows.deployments import runner_deployments, serve  # noqa: PLC0415

    cfg = _config(args)
    names = [d.name if hasattr(d, "name") else str(d) for d in runner_deployments(cfg, args.interval)]
    schedule = (
        f"every {args.interval:g} s"
        if args.interval
        else f"cron '{cfg.orchestration.corpus_rebuild_cron}' ({cfg.orchestration.timezone})"
    )
    _stderr_console().print(
        f"serving {len(names)} deployments ({cfg.orchestration.deployment_name}); corpus-rebuild "
        f"scheduled {schedule}; Ctrl-C stops"
    )
    serve(cfg, args.interval)
    return 0


def cmd_deploy(args) -> int:
    from flows.deployments import deploy  # noqa: PLC0415

    cfg = _config(args)
    # Prefect prints its own advice on stdout while deploying; stdout is kept for our --json object
    with contextlib.redirect_stdout(sys.stderr):
        ids = deploy(cfg, args.pool, args.interval, args.gpu_pool)
    if args.json:
        _emit({"work_pool": args.pool, "deployments": ids})
    else:
        _stderr_console().print(
            f"registered {len(ids)} deployments to work pool {args.pool!r}; "
            f"start a worker: prefect worker start -p {args.pool}"
        )
    return 0


# A busy machine can take longer than Prefect's default 20 s to start its temporary server.
TEMPORARY_SERVER_TIMEOUT = "180"


@contextlib.contextmanager
def _temporary_server_errors() -> Iterator[None]:
    """A flow run with no PREFECT_API_URL starts Prefect's temporary server; if that fails to come up,
    say what to do (exit 2, an environment problem) instead of a traceback (exit 1, a bug)."""
    try:
        yield
    except RuntimeError as exc:
        if "ephemeral Prefect API server" not in str(exc):
            raise
        waited = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", TEMPORARY_SERVER_TIMEOUT)
        raise UniterError(
            f"Prefect's temporary server did not start within {waited} s (is the machine very busy?). Start a "
            "server once — `prefect server start` — and point the runs at it with "
            "PREFECT_API_URL=http://127.0.0.1:4200/api, or allow a longer start with "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS. `uniter run STAGE` runs one stage without Prefect."
        ) from None


def _run_all(args, cfg) -> int:
    from flows.dag import full_pipeline  # noqa: PLC0415

    started = time.time()
    with _temporary_server_errors():
        results = full_pipeline(config=config_document(cfg), force=args.force, until=getattr(args, "until", None))
    if args.json:
        _emit({"flow": "full-pipeline", "stages": results, "seconds": round(time.time() - started, 3)})
    else:
        for summary in results:
            _print_run(summary)
    return 0


def _print_run(summary: dict) -> None:
    con = _stderr_console()
    verb = "cached — nothing to do" if summary["status"] == "cached" else f"ran in {summary['seconds']:.1f} s"
    con.print(f"[bold]{summary['stage']}[/]: {verb} (key {summary['key'][:12]}…)")
    for out in summary["outputs"]:
        con.print(f"  {out['table']}: {out['rows']:,} rows in {out['files']} files → {out['uri']}")
    reasons = summary["counts"].get("reject_reasons") or {}
    if reasons:
        con.print("  reject reasons: " + ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items())))


def cmd_status(args) -> int:
    from pipeline.runner import stage_status  # noqa: PLC0415

    rows = stage_status(_config(args))
    if args.json:
        _emit({"stages": rows})
        return 0
    table = Table("stage", "status", "key", "detail")
    for row in rows:
        if row["status"] == "complete":
            detail = ", ".join(f"{t} {n:,} rows" for t, n in row["rows"].items())
        elif row["status"] == "partial":
            detail = f"{row['shards']} shards done; `uniter run {row['stage']}` resumes"
        elif row["status"] == "blocked":
            detail = "needs " + ", ".join(row["needs"])
        else:
            detail = ""
        table.add_row(row["stage"], row["status"], (row["key"] or "-")[:12], detail)
    Console().print(table)
    return 0


def cmd_diff(args) -> int:
    from pipeline.diff import diff_markdown, rebuild_diff  # noqa: PLC0415
    from pipeline.runner import storage_for  # noqa: PLC0415

    cfg = _config(args)
    diff = rebuild_diff(cfg, storage_for(cfg), against=args.against)
    if args.json:
        _emit(diff)
    else:
        sys.stdout.write(diff_markdown(diff))
        _stderr_console().print(f"published: {diff['uri']}", markup=False)
    return 0


def cmd_gc(args) -> int:
    from pipeline.gc import collect  # noqa: PLC0415
    from pipeline.runner import storage_for  # noqa: PLC0415

    if args.keep < 0:
        raise UniterError(f"gc: --keep must be 0 or more, got {args.keep}")
    configs = [load_config(path, args.set) for path in args.config]
    uris = {cfg.storage.uri for cfg in configs}
    if len(uris) > 1:
        raise UniterError(
            f"gc: the configs name different storages ({', '.join(sorted(uris))}); run gc once per storage"
        )
    summary = collect(storage_for(configs[0]), configs, args.keep, dry_run=args.dry_run)
    if args.json:
        _emit(summary)
        return 0
    con = _stderr_console()
    verb = "would remove" if args.dry_run else "removed"
    for row in summary["removed"]:
        state = "complete" if row["complete"] else "unfinished"
        con.print(f"{verb} {row['stage']} {row['key'][:12]}… ({state}, {row['objects']} objects)", markup=False)
    con.print(
        f"gc: kept {len(summary['kept'])} artifacts, {verb} {len(summary['removed'])}, "
        f"{summary['orphan_index_entries']} orphaned reuse-index entries",
        markup=False,
    )
    return 0


def cmd_sql(args) -> int:
    from pipeline.runner import catalog_tables, storage_for  # noqa: PLC0415

    cfg = _config(args)
    storage = storage_for(cfg)
    catalog = Catalog(storage, catalog_tables(cfg, storage))
    try:
        result = catalog.sql(args.query)
    finally:
        catalog.close()
    if args.json:
        _emit({"columns": result.columns, "rows": [dict(zip(result.columns, r, strict=True)) for r in result.rows]})
        return 0
    # Text, not str: Rich reads strings as markup and emoji codes, so `http://[fd00::1]/x.jpg` would
    # print as `http:///x.jpg` and `:cat:` as a cat; query results must print as they are.
    table = Table()
    for column in result.columns:
        table.add_column(Text(column))
    for row in result.rows:
        table.add_row(*(Text("NULL" if v is None else str(v)) for v in row))
    Console().print(table)
    return 0


def cmd_export(args) -> int:
    """Write the current `features` artifact in the reference's npz layout or LXMERT's TSV."""
    from feature_extraction.export import to_lxmert_tsv, to_npz  # noqa: PLC0415
    from feature_extraction.schema import unpack  # noqa: PLC0415
    from pipeline.runner import Planner, storage_for  # noqa: PLC0415

    cfg = _config(args)
    storage = storage_for(cfg)
    manifest = Planner(cfg, storage).manifest("extract")
    if manifest is None:
        raise MissingInputError(f"no features for this config yet: run `uniter run extract -c {args.config}` first")
    art = Artifact(storage, "extract", manifest.key)

    def rows():
        for f in manifest.tables["features"]:
            with storage.open(art.file_key(f.path)) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=256):
                    yield from (unpack(r) for r in batch.to_pylist())

    out = Path(args.out)
    n = to_npz(rows(), out) if args.format == "npz" else to_lxmert_tsv(rows(), out)
    summary = {"exported": n, "format": args.format, "out": str(out.resolve())}
    _emit(summary) if args.json else _stderr_console().print(f"exported {n} images as {args.format} to {out}")
    return 0


def cmd_demo(args) -> int:
    """What `make demo` runs: the whole DAG on the bundled sample, on local disk and Prefect's
    embedded server, then a look at the result through the catalog."""
    args.config = str(args.config or DEMO_CONFIG)
    args.stage = "all"
    args.force = False
    con = _stderr_console()
    con.print(f"[bold]uniter demo[/]: config {args.config}")
    with serve_sample() as web:
        con.print(f"serving the sample's web images (CC, SBU) at {web}")
        code = cmd_run(args)
    if code or args.json:
        return code
    con.print("\n[bold]pairs per source: ingested → in the clean corpus[/] (uniter sql):")
    args.query = (
        "select p.source, count(*) as ingested, count(c.pair_id) as kept from pairs p "
        "left join corpus_pairs c on c.pair_id = p.pair_id group by all order by all"
    )
    cmd_sql(args)
    from pipeline.runner import stage_status  # noqa: PLC0415

    cfg = _config(args)
    status = {r["stage"]: r for r in stage_status(cfg)}
    dedup = status["dedup"]
    if dedup["status"] == "complete":
        con.print(f"\nDecontamination report: {cfg.storage.uri}/artifacts/dedup/{dedup['key']}/files/report.md")
    evaluate = status.get("evaluate", {})
    if evaluate.get("status") == "complete":
        folder = f"{cfg.storage.uri}/artifacts/evaluate/{evaluate['key']}/files"
        report = Path(folder) / "report.md"
        if report.exists():
            con.print("\n[bold]evaluation[/] (the paper's columns; the demo fine-tunes VQA only):")
            con.print(report.read_text().split("\n\n")[0], markup=False)
        also = "report.md, report.json, meta_sum.png, finetune_curves.png"
        con.print(f"Evaluation report: {folder}/report.html (and {also})")
    con.print(f"Artifacts live under {cfg.storage.uri} — try `uniter status -c {args.config}`.")
    return 0


def cmd_analyze(args) -> int:
    """Attention maps of sample pairs, each head classified into the paper's six patterns."""
    from pipeline.attention import attention_report  # noqa: PLC0415
    from uniter.analysis import PATTERNS  # noqa: PLC0415

    cfg = _config(args)
    summary = attention_report(cfg, args.checkpoint, args.n, Path(args.out))
    if args.json:
        _emit(summary)
        return 0
    con = _stderr_console()
    con.print(f"{summary['examples']} pairs × {summary['layers']} layers × {summary['heads']} heads; maps per pattern:")
    con.print("layer  " + "  ".join(f"{p:>17}" for p in PATTERNS), markup=False)
    for i, row in enumerate(summary["per_layer"]):
        con.print(f"{i + 1:>5}  " + "  ".join(f"{row[p]:>17}" for p in PATTERNS), markup=False)
    con.print(f"pictures: {summary['out']}/attention_summary.png, attention_example_*.png")
    return 0


def cmd_check_weights(args) -> int:
    """Does a detector weights file fit the BUTD model, name by name and shape by shape? Before any
    extraction starts (exit 2 if a weight is missing or misshapen)."""
    from feature_extraction.butd import build_butd, butd_config  # noqa: PLC0415
    from feature_extraction.weights import check_weights, expected_weights  # noqa: PLC0415

    model = build_butd(butd_config())
    if args.list:
        for name, shape in expected_weights(model).items():
            print(f"{name} {list(shape)}")
        return 0
    if not args.file:
        raise ConfigError("check-weights: give a weights FILE (or --list for the names the model expects)")
    report = check_weights(model, args.file)
    if args.json:
        _emit(report)
    else:
        # (plain print: Rich would fold a long path and the names in the middle)
        print(f"{args.file}: {report['matched']} of {report['expected']} weights match", file=sys.stderr)
        for key, what in (("missing", "missing from the file"), ("unexpected", "in the file, unused by the model")):
            if report[key]:
                print(f"{len(report[key])} {what}, e.g. {', '.join(report[key][:5])}", file=sys.stderr)
        for name, shapes in list(report["wrong_shape"].items())[:5]:
            says = f"wrong shape: {name} is {shapes['file']} in the file, the model expects {shapes['model']}"
            print(says, file=sys.stderr)
    return 0 if report["ok"] else 2


def cmd_recipe(args) -> int:
    """The config's effective training settings beside the reference's UNITER-base all-data run,
    every difference flagged (the config's input files need not exist yet)."""
    from dataclasses import asdict  # noqa: PLC0415

    from pipeline.recipe import recipe  # noqa: PLC0415

    cfg = load_config(args.config, args.set, check_paths=args.corpus)  # only --corpus reads files
    lines = recipe(cfg, corpus=args.corpus)
    differs = [line for line in lines if line.status == "differs"]
    if args.json:
        _emit({"lines": [asdict(line) for line in lines], "differs": len(differs)})
    else:
        # plain print: values hold brackets and the table must not fold
        width = max(len(f"{line.stage} {line.setting}") for line in lines)
        ours, ref = (max(11, *(len(getattr(line, k)) for line in lines)) for k in ("ours", "reference"))
        print(f"{'setting':<{width}}  {'this config':<{ours}}  {'reference':<{ref}}  status")
        for line in lines:
            mark = {"same": "=", "explained": "explained", "differs": "DIFFERS", "info": ""}[line.status]
            print(f"{line.stage + ' ' + line.setting:<{width}}  {line.ours:<{ours}}  {line.reference:<{ref}}  {mark}")
            if line.why:
                print(f"{'':<{width}}    why: {line.why}")
        print(f"{len(differs)} unexplained difference(s) from the reference", file=sys.stderr)
    return 1 if differs and args.strict else 0


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniter", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, config_required=True):
        p.add_argument("-c", "--config", required=config_required, help="pipeline YAML config")
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set pretrain.steps=100 (repeatable; validated like the file)",
        )

    p = sub.add_parser("run", help="run one stage (or 'all' as a Prefect flow, or 'ablation')")
    p.add_argument("stage", help="stage name, 'all', or 'ablation' (every ablation.variants row, one Meta-Sum table)")
    p.add_argument(
        "--force", action="store_true", help="discard the stage's artifact for this key and rebuild it from scratch"
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another run is building this stage for the same key, wait for it (default: exit 2 naming it)",
    )
    p.add_argument("--until", metavar="STAGE", help="with 'all': stop after this stage (e.g. extract)")
    p.add_argument(
        "--deployment",
        action="store_true",
        help="trigger the deployment on the server (PREFECT_API_URL) and follow it; exit code = outcome",
    )
    common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="serve every flow's deployment from this process (corpus-rebuild on its schedule)")
    p.add_argument("--interval", type=float, help="schedule corpus-rebuild every N seconds instead of the cron")
    common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("deploy", help="register every flow's deployment to a work pool")
    p.add_argument("--pool", required=True, help="a process work pool (prefect work-pool create NAME --type process)")
    p.add_argument(
        "--gpu-pool", help="the pool for the training flows (train, downstream, pretrain, finetune, full-pipeline)"
    )
    p.add_argument("--interval", type=float, help="schedule corpus-rebuild every N seconds instead of the cron")
    common(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("status", help="per stage: complete, partial, missing or blocked")
    common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sql", help="query the catalog (views: pairs, rejects, …)")
    p.add_argument("query")
    common(p)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("export", help="write features as UNITER npz files or an LXMERT TSV")
    p.add_argument("what", choices=["features"])
    p.add_argument("--format", choices=["npz", "lxmert"], required=True)
    p.add_argument("--out", required=True, help="folder (npz) or .tsv file (lxmert)")
    common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("analyze", help="attention analysis: heatmaps and the six patterns per layer and head")
    p.add_argument("what", choices=["attention"])
    p.add_argument(
        "--checkpoint", help="a model folder (config.json + model.safetensors); default: the config's pretrained model"
    )
    p.add_argument("--n", type=int, default=16, help="image-text pairs (validation images first)")
    p.add_argument("--out", default="attention", help="folder for the pictures and attention.json")
    common(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("diff", help="what the last corpus rebuild changed: images and pairs added/removed, and why")
    p.add_argument("--against", metavar="KEY", help="a dedup key to compare with (default: the previous corpus)")
    common(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "gc",
        help="remove artifacts that no current key needs (never one a kept artifact points to)",
        description="Keeps the current keys of every config given (-c, repeatable), the --keep newest "
        "complete artifacts of each stage, artifacts being built, and everything those point to.",
    )
    p.add_argument("-c", "--config", action="append", required=True, help="pipeline YAML config (repeatable)")
    p.add_argument("--keep", type=int, default=1, help="newest complete artifacts kept per stage besides the current")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=cmd_gc, quiet=True)

    p = sub.add_parser("check-weights", help="does a detector weights file fit the BUTD model? (names and shapes)")
    p.add_argument("file", nargs="?", help="the weights: a Detectron2 pickle (.pkl) or a torch state dict")
    p.add_argument("--list", action="store_true", help="print every weight the model expects, with its shape")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_check_weights, quiet=True, verbose=False)

    p = sub.add_parser(
        "recipe",
        help="the config's effective training settings beside the paper's, each difference flagged",
        description="Per stage: tokens and examples per update, updates, the lr schedule, each "
        "dataset's sampling share, the fine-tuning tasks' updates, against the reference's "
        "UNITER-base all-data run. A difference is 'explained' when this project makes it on purpose.",
    )
    common(p)
    p.add_argument("--strict", action="store_true", help="exit 1 when a difference is unexplained")
    p.add_argument(
        "--corpus",
        action="store_true",
        help="also each source's examples, share, examples per update and epochs, from the built corpus "
        "(dedup and extract artifacts of this config)",
    )
    p.set_defaults(func=cmd_recipe, quiet=True)

    p = sub.add_parser("demo", help="run the pipeline on the bundled sample")
    common(p, config_required=False)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # NOTE: Prefect's temporary server sends telemetry from a background task that races the
    # flow for its SQLite file ("database is locked" tracebacks); nothing here needs it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", TEMPORARY_SERVER_TIMEOUT)
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if getattr(args, "stage", None) not in (None, "all", "ablation"):
        from pipeline.stages import get_stage  # noqa: PLC0415

        try:
            get_stage(args.stage)
        except UniterError as exc:
            print(f"uniter: error: {exc}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("uniter: interrupted; finished shards are kept and the next run resumes from them", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 — the one place that turns errors into exit codes
        if args.verbose:
            raise
        if isinstance(exc, (UniterError, StorageError, CatalogError)):
            print(f"uniter: error: {exc}", file=sys.stderr)
            return 2
        print(
            f"uniter: unexpected {type(exc).__name__}: {exc}\n(re-run with -v for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
