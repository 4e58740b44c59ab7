"""End to end on a real Prefect server: `prefect server start` (SQLite) on 127.0.0.1, every
deployment served by `uniter serve` in a subprocess, the demo's full pipeline triggered through
the API (`uniter run all --deployment`), re-triggered (all cached), every other deployment triggered
once (corpus-rebuild, train and the eight stage-<name> flows, all cached), the serving process killed
with SIGKILL mid-run and restarted (finished work is not redone; the artifacts equal those of the
uninterrupted run), and a run created by the corpus-rebuild schedule."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.dag import ALL_FLOWS, FLOW_STAGES
from pipeline.config import config_document, load_config
from pipeline.demo import serve_sample
from pipeline.runner import Planner, storage_for
from pipeline.stages import STAGES
from tests.conftest import demo_config

ROOT = Path(__file__).resolve().parents[2]
UNITER = str(Path(sys.executable).parent / "uniter")
PREFECT = str(Path(sys.executable).parent / "prefect")


# Trigger a deployment by name with its deployed parameters and wait: prints the final state and the run id.
RUN_DEPLOYMENT = """
import json, sys
from prefect.deployments import run_deployment
parameters = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
run = run_deployment(name=sys.argv[1], parameters=parameters, timeout=600)
print(run.state.name, run.id)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, seconds: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        PREFECT_UI_ENABLED="false",
        # SQLite serialises writers: ten flow runs at once on a loaded 2-core machine can wait longer
        # than the default 10 s for the lock (docker compose runs the server on PostgreSQL)
        PREFECT_SERVER_DATABASE_TIMEOUT="60",
    )
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"

    def healthy():
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait(healthy, 180, "prefect server start", proc)
        yield {"url": url, "env": dict(env, PREFECT_API_URL=url), "home": home}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def _tail(path: Path, chars: int = 6000) -> str:
    """The end of a log, for a failure's message (why a served flow run did not complete)."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"{path}: no log"


def _serve(server, cfg_path: Path, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(
        [UNITER, "serve", "-c", str(cfg_path), "--interval", "3600"],
        env=server["env"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@contextlib.contextmanager
def _client(server):
    """A client of the test's server (never Prefect's ephemeral one)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["url"]}), get_client(sync_client=True) as client:
        yield client


def _deployments(server) -> list[tuple[str, str]]:
    """(flow name, deployment name) of every deployment on the server."""
    with _client(server) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        return sorted((flows.get(d.flow_id, "?"), d.name) for d in client.read_deployments())


def _trigger(server, cfg_path: Path, *extra: str) -> dict:
    done = subprocess.run(
        [UNITER, "run", "all", "--deployment", "-c", str(cfg_path), "--json", *extra],
        env=server["env"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _markdown_artifacts(server, flow_run_id: str) -> dict[str, str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client(server) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a.data for a in arts if a.type == "markdown"}


def _summary_markdown(server, flow_run_id: str) -> str:
    """The flow run's summary (not its corpus diff, which runs that rebuilt dedup also publish)."""
    return next(md for key, md in _markdown_artifacts(server, flow_run_id).items() if key != "uniter-corpus-diff")


def _contents(cfg) -> dict[str, str]:
    planner = Planner(cfg, storage_for(cfg))
    return {s: planner.manifest(s).content_sha256 for s in STAGES}


def test_deployments_end_to_end(server, tmp_path):
    cfg_path, _ = demo_config(tmp_path, quick=True)
    cfg = load_config(cfg_path)
    with serve_sample():
        serving = _serve(server, cfg_path, tmp_path / "serve.log")
        try:
            deployed = _wait(
                lambda: d if len(d := _deployments(server)) == 11 else None, 120, "11 deployments", serving
            )
            assert deployed == sorted((name, "uniter") for name in ALL_FLOWS)  # a deployment per flow

            first = _trigger(server, cfg_path)
            assert first["state"] == "Completed"
            md = _summary_markdown(server, first["flow_run"])
            assert md.count("| ran |") == 8 and "evaluate" in md and "report.html" in md
            diff = _markdown_artifacts(server, first["flow_run"])["uniter-corpus-diff"]
            assert "against the previous corpus none (first build)" in diff
            uninterrupted = _contents(cfg)

            again = _trigger(server, cfg_path)
            assert again["state"] == "Completed"
            assert _summary_markdown(server, again["flow_run"]).count("| cached |") == 8

            # every other deployment loads its flow and runs it (all cached here), at once: the two
            # groups through Prefect's own run_deployment, each stage through `uniter run STAGE --deployment`
            groups = {name: names for name, names in FLOW_STAGES.items() if name in ("corpus-rebuild", "train")}
            group_runs = {
                name: subprocess.Popen(
                    [sys.executable, "-c", RUN_DEPLOYMENT, f"{name}/uniter"],
                    env=server["env"],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for name in groups
            }
            stages = list(STAGES)
            runs = [
                subprocess.Popen(
                    [UNITER, "run", s, "--deployment", "-c", str(cfg_path), "--json"],
                    env=server["env"],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for s in stages
            ]
            for stage, run in zip(stages, runs, strict=True):
                out, err = run.communicate(timeout=600)
                assert run.returncode == 0, (stage, out, err[-3000:], _tail(tmp_path / "serve.log"))
                assert json.loads(out)["flow"] == f"stage-{stage}"
                assert f"| {stage} | cached |" in _summary_markdown(server, json.loads(out)["flow_run"])
            for name, run in group_runs.items():
                out, err = run.communicate(timeout=600)
                state, flow_run_id = out.strip().splitlines()[-1].split()
                assert run.returncode == 0 and state == "Completed", (name, err[-3000:])
                md = _summary_markdown(server, flow_run_id)
                assert all(f"| {stage} | cached |" in md for stage in groups[name]), md

            # kill the serving process in the middle of a forced rebuild, start it again, trigger again
            storage = storage_for(cfg)
            forced = subprocess.Popen(
                [UNITER, "run", "all", "--deployment", "--force", "-c", str(cfg_path), "--json"],
                env=server["env"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            before = Planner(cfg, storage).manifest("dedup").created_at

            def rebuilt_dedup():  # the forced run has rebuilt ingest, crawl and dedup: it is in extract
                m = Planner(cfg, storage).manifest("dedup")
                return m is not None and m.created_at != before

            _wait(rebuilt_dedup, 300, "the forced run to rebuild dedup")
            os.killpg(serving.pid, signal.SIGKILL)
            serving.wait()
            forced.kill()
            forced.wait()
            done_before = {s: Planner(cfg, storage).manifest(s) is not None for s in ("ingest", "crawl", "dedup")}
            assert all(done_before.values())
        finally:
            if serving.poll() is None:
                os.killpg(serving.pid, signal.SIGKILL)
                serving.wait()

        serving = _serve(server, cfg_path, tmp_path / "serve2.log")
        try:
            time.sleep(5)  # the restarted process registers its deployments again (they persist on the server)
            resumed = _trigger(server, cfg_path)
            assert resumed["state"] == "Completed"
            md = _summary_markdown(server, resumed["flow_run"])
            for stage in ("ingest", "crawl", "dedup"):  # finished before the kill: not redone
                assert f"| {stage} | cached |" in md, md
            assert _contents(cfg) == uninterrupted  # byte-identical artifacts

            # the schedule: corpus-rebuild has runs created by the server's scheduler
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowFilter, FlowFilterName

            with _client(server) as client:
                rebuild = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=["corpus-rebuild"])))
                assert rebuild and rebuild[0].schedules, "corpus-rebuild carries a schedule"
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[rebuild[0].id]))
                )
            assert any(r.auto_scheduled for r in runs), [(r.name, r.state_name) for r in runs]
        finally:
            os.killpg(serving.pid, signal.SIGKILL)
            serving.wait()


def _clean_copy(tmp_path: Path) -> Path:
    """The repository as a worker pulls it: `git archive` of the commit, no build outputs, no venv."""
    src = tmp_path / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src


def _run_on_worker(server, env: dict, deployment: str, pool: str, cwd: Path, parameters: dict | None = None) -> str:
    """Trigger `deployment`, let one `prefect worker start --run-once` on `pool` run it; its final state."""
    trigger = subprocess.Popen(
        [sys.executable, "-c", RUN_DEPLOYMENT, deployment, json.dumps(parameters or {})],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with _client(server) as client:
        found = client.read_deployment_by_name(deployment)
    assert found.work_pool_name == pool, found.work_pool_name
    _wait(lambda: _flow_runs(server, found.id), 120, f"the flow run of {deployment}", trigger)
    worker = subprocess.run(
        [PREFECT, "worker", "start", "-p", pool, "--run-once"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out, err = trigger.communicate(timeout=600)
    assert trigger.returncode == 0, (worker.stdout[-3000:], worker.stderr[-3000:], err[-2000:])
    state, _ = out.strip().splitlines()[-1].split()
    assert state == "Completed", (worker.stdout[-3000:], worker.stderr[-3000:], err[-2000:])
    return found.entrypoint


def test_deploy_to_a_work_pool_from_a_clean_copy_and_run_on_a_worker(server, tmp_path):
    """`uniter deploy --pool P` from a copy of the repository as a worker would pull it (`git archive`),
    then a process worker (`prefect worker start --run-once`) runs a triggered deployment to Completed."""
    src = _clean_copy(tmp_path)
    cfg_path, doc = demo_config(tmp_path, quick=True)
    doc["orchestration"] = {"deployment_name": "pool"}
    cfg_path.write_text(yaml.safe_dump(doc))
    env = server["env"]
    subprocess.run([PREFECT, "work-pool", "create", "uniter-e2e", "--type", "process"], env=env, check=True)

    deployed = subprocess.run(
        [sys.executable, "-m", "cli", "deploy", "-c", str(cfg_path), "--pool", "uniter-e2e", "--json"],
        env=env,
        cwd=src,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    summary = json.loads(deployed.stdout)  # stdout holds the one JSON object, nothing else
    assert summary["work_pool"] == "uniter-e2e" and len(summary["deployments"]) == len(ALL_FLOWS)

    entrypoint = _run_on_worker(server, env, "stage-ingest/pool", "uniter-e2e", tmp_path)
    assert entrypoint == "flows/dag.py:stage_ingest"
    # the worker built this config's artifact: the CLI now finds it cached, with the same content
    again = subprocess.run(
        [UNITER, "run", "ingest", "-c", str(cfg_path), "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "cached", again.stderr[-2000:]


def test_prefect_deploy_all_from_a_clean_copy_and_run_on_a_worker(server, tmp_path):
    """`prefect deploy --all` (prefect.yaml) in a `git archive` copy, with UNITER_HOME naming it as the
    docs say; a process worker runs a deployment given this run's config as its parameter."""
    src = _clean_copy(tmp_path)
    env = dict(server["env"], UNITER_HOME=str(src))
    for pool in ("uniter", "uniter-gpu"):
        subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, check=True)
    deployed = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=src, capture_output=True, text=True, timeout=600
    )
    assert deployed.returncode == 0, (deployed.stdout[-3000:], deployed.stderr[-3000:])

    cfg_path, _ = demo_config(tmp_path, quick=True)
    document = config_document(load_config(cfg_path))
    _run_on_worker(server, env, "stage-ingest/uniter", "uniter", tmp_path, {"config": document})
    again = subprocess.run(
        [UNITER, "run", "ingest", "-c", str(cfg_path), "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "cached", again.stderr[-2000:]


def _flow_runs(server, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with _client(server) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
