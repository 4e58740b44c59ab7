"""The docker-compose stack and prefect.yaml, checked without a Docker daemon: services, pinned
images, env names that match .env.example and what the CLI reads, the GPU reservation, a config
that points at the stack, and a deployment per flow.

The stack's properties are checked on the parsed files, with compose's own variable rules
(`_interpolate`): every dependency waits until the service it needs is ready (healthy, or a one-shot
that exited 0), every variable is declared in .env.example and required (`${VAR:?…}`), no secret
is written in the compose file, the image keeps .env out, the bucket is named in one place, and the
Prefect UI calls the API on the port the server is published on."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import prefect
import pytest
import yaml

from flows.dag import ENTRYPOINTS, GPU_FLOWS
from pipeline.config import OrchestrationConfig, load_config
from storage.s3 import parse_s3_uri

ROOT = Path(__file__).resolve().parents[2]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN")
ONE_SHOT = "service_completed_successfully"


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env_example() -> dict[str, str]:
    rows = [
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return {k: v for k, v in rows}


# --- compose's interpolation: `$$` is a literal `$`; `${VAR}`, `$VAR`, `${VAR:-default}`, `${VAR-default}`,
# `${VAR:?error}`, `${VAR?error}` (the colon forms also treat an empty value as unset)
_REF = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)")


class MissingVariable(Exception):
    pass


def _strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _refs(node) -> list[tuple[str, str | None, str]]:
    """(name, operator, argument) of every variable reference in the parsed file's strings."""
    return [
        (m["name"] or m["bare"], m["op"], m["arg"] or "")
        for text in _strings(node)
        for m in _REF.finditer(text)
        if m.group() != "$$"
    ]


def _interpolate(node, env: dict[str, str]):
    def sub(m: re.Match) -> str:
        if m.group() == "$$":
            return "$"
        name, op, arg = m["name"] or m["bare"], m["op"], m["arg"] or ""
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":?", "?"):
            if unset:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return value
        if op in (":-", "-"):
            return arg if unset else value
        assert op is None, f"unsupported interpolation {m.group()!r}"
        return value or ""

    if isinstance(node, dict):
        return {_interpolate(k, env): _interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env) for v in node]
    if isinstance(node, str):
        return _REF.sub(sub, node)
    return node


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _setup_python() -> str:
    """The Python that the setup service runs before registering the pools and deployments."""
    script = _compose()["services"]["setup"]["command"][-1]
    return shlex.split(script[script.index("python -c") :])[2]


def test_services_and_pinned_images():
    services = _compose()["services"]
    assert set(services) == {"postgres", "prefect-server", "s3", "setup", "worker", "worker-gpu"}
    for name, svc in services.items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: image {image!r} is not pinned"
    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{prefect.__version__}-python3.11"  # = our client
    assert not any("minio" in svc["image"] for svc in services.values())
    for name in ("worker", "worker-gpu", "setup"):
        assert services[name]["build"] == "."
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert (
        "--pool uniter-gpu" in services["worker-gpu"]["command"]
        and "--pool uniter " in services["worker"]["command"] + " "
    )
    assert (
        "uniter deploy -c configs/compose.yaml --pool uniter --gpu-pool uniter-gpu" in services["setup"]["command"][-1]
    )


def test_environment_names_match_env_example_and_what_the_code_reads():
    compose = _compose()
    used = {name for name, _, _ in _refs(compose)}
    declared = set(_env_example())
    assert used == declared, (used - declared, declared - used)
    for name in ("worker", "worker-gpu", "setup"):
        env = compose["services"][name]["environment"]
        # Prefect's client and boto3's credential chain read exactly these names
        assert {
            "PREFECT_API_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "UNITER_CACHE_DIR",
        } <= set(env)
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def test_the_stack_config_points_at_the_stack():
    cfg = load_config(ROOT / "configs" / "compose.yaml")
    compose = _compose()
    assert cfg.storage.uri.startswith("s3://")
    s3_port = re.search(r"-s3\.port=(\d+)", " ".join(compose["services"]["s3"]["command"])).group(1)
    assert cfg.storage.endpoint_url == f"http://s3:{s3_port}"


def test_every_dependency_waits_until_what_it_needs_is_ready():
    """A long-running service is needed once healthy (so it has a health check); a one-shot one once it
    exited 0. `service_started` (or the short list form, which means it) would race the service."""
    services = _compose()["services"]
    edges = {}
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on as a list only waits for the start"
        for dep, spec in deps.items():
            assert dep in services and dep != name, (name, dep)
            edges[name, dep] = spec["condition"]
            if services[dep].get("restart") == "no":  # a one-shot
                assert spec["condition"] == ONE_SHOT, (name, dep, spec)
            else:
                assert spec["condition"] == "service_healthy", (name, dep, spec)
                assert services[dep]["healthcheck"]["test"], f"{dep} is needed healthy but has no health check"
    assert edges == {
        ("prefect-server", "postgres"): "service_healthy",
        ("setup", "prefect-server"): "service_healthy",
        ("setup", "s3"): "service_healthy",
        **{(w, "prefect-server"): "service_healthy" for w in ("worker", "worker-gpu")},
        **{(w, "s3"): "service_healthy" for w in ("worker", "worker-gpu")},
        **{(w, "setup"): ONE_SHOT for w in ("worker", "worker-gpu")},
    }
    assert services["setup"]["restart"] == "no" and services["worker"]["restart"] == "unless-stopped"


def test_health_checks_have_a_start_period_and_probe_the_right_port():
    services = _compose()["services"]
    for name in ("postgres", "prefect-server", "s3"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["retries"] >= 1, name
        assert _seconds(check["interval"]) > 0 and _seconds(check["timeout"]) > 0, name
        assert _seconds(check["start_period"]) > 0, f"{name}: no start_period"
    # the server migrates its database on the first start: give it time before failures count
    assert _seconds(services["prefect-server"]["healthcheck"]["start_period"]) >= 30
    server_port = re.search(r"--port (\d+)", services["prefect-server"]["command"]).group(1)
    assert f"localhost:{server_port}/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    # SeaweedFS: the S3 gateway itself answers, on its port; it listens on loopback only if told to bind everywhere
    s3_command = " ".join(services["s3"]["command"])
    s3_port = re.search(r"-s3\.port=(\d+)", s3_command).group(1)
    probe = " ".join(services["s3"]["healthcheck"]["test"])
    assert re.search(rf"http://(127\.0\.0\.1|localhost):{s3_port}/(status|healthz)\b", probe), probe
    assert "-ip.bind=0.0.0.0" in s3_command


def test_every_variable_is_declared_and_required():
    """Each `${VAR}` is declared in .env.example and guarded (`${VAR:?message}`): no empty password, no empty
    mount. With .env.example's values the whole file interpolates to literal text."""
    compose = _compose()
    for name, op, arg in _refs(compose):
        assert op == ":?" and arg.strip(), f"${{{name}}} is not required: use ${{{name}:?message}}"
    done = _interpolate(compose, _env_example())
    # `$$` is the container's own `$`: the health check expands POSTGRES_USER in postgres' environment
    assert "pg_isready -U ${POSTGRES_USER} -d ${POSTGRES_DB}" in done["services"]["postgres"]["healthcheck"]["test"]
    assert done["services"]["worker"]["volumes"][0] == f"{_env_example()['DATASETS_DIR']}:/datasets:ro"


@pytest.mark.parametrize("name", sorted(_env_example()))
@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_a_missing_variable_stops_compose(name, value):
    env = dict(_env_example())
    if value is None:
        del env[name]
    else:
        env[name] = value
    with pytest.raises(MissingVariable, match=rf"\b{name}\b"):
        _interpolate(_compose(), env)


def test_no_secret_is_written_in_the_compose_file():
    compose = _compose()
    text = (ROOT / "docker-compose.yml").read_text()
    example = _env_example()
    secrets = {name for name in example if SECRET_NAME.search(name)}
    assert {"POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secrets
    for name in secrets:
        literal = rf"(?<![\w-]){re.escape(example[name])}(?![\w-])"
        assert not re.search(literal, text), f"{name}'s example value is written in docker-compose.yml"
    for service, svc in compose["services"].items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{service}: environment as a list hides values from this check"
        for key, value in env.items():
            if SECRET_NAME.search(key):
                refs = _refs(value)
                assert len(refs) == 1 and refs[0][0] in secrets, f"{service}.{key} = {value!r}: not a secret reference"
                assert value == f"${{{refs[0][0]}:?{refs[0][2]}}}", f"{service}.{key}: more than the reference"
    for value in _strings(compose):  # no user:password@ in a URL, unless the password is a reference
        for password in re.findall(r"://[^\s/:@]+:([^\s/@]+)@", value):
            assert password.startswith("${"), value


def _docker_ignored(path: str) -> bool:
    """Docker's .dockerignore rule for these patterns: the last matching line wins, `!` includes again, a
    pattern matches a path or a folder above it, `*` stays within a path component, `**/` is any folders."""
    parts = path.split("/")
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip("/").split("/")
        anywhere = pattern[0] == "**"
        pattern = pattern[1:] if anywhere else pattern
        starts = range(len(parts)) if anywhere else [0]
        hit = any(
            len(parts) - i >= len(pattern)
            and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts[i : i + len(pattern)], pattern))
            for i in starts
        )
        if hit:
            ignored = not negate
    return ignored


def test_the_image_leaves_credentials_and_local_state_out():
    for path in (".env", ".env.local", ".env.production", ".venv/bin/python", ".venv-bench/lib/x.py"):
        assert _docker_ignored(path), path
    for path in ("data/shards/part-0.parquet", ".git/config", "flows/__pycache__/dag.cpython-311.pyc"):
        assert _docker_ignored(path), path
    needed = ("requirements.lock", "pyproject.toml", "scripts/install_detectron2.sh", "configs/compose.yaml")
    needed += ("flows/dag.py", "pipeline/config.py", "sample/coco/captions_train2014.json", "prefect.yaml")
    for path in needed:
        assert not _docker_ignored(path), path
    assert "COPY . ." in (ROOT / "Dockerfile").read_text()


def test_the_bucket_is_named_in_one_place(s3_endpoint, tmp_path, monkeypatch):
    """configs/compose.yaml names the bucket; no variable does. The setup service's bucket step, run against
    an S3 server, creates exactly the config's bucket (and a second run leaves it)."""
    compose = _compose()
    assert not [name for name in _env_example() if "BUCKET" in name]
    for svc in compose["services"].values():
        assert not [key for key in svc.get("environment", {}) if "BUCKET" in key]
    code = _setup_python()
    assert "load_config('configs/compose.yaml')" in code and "create_bucket" in code

    config = yaml.safe_load((ROOT / "configs" / "compose.yaml").read_text())
    config["storage"]["endpoint_url"] = s3_endpoint  # the stack's `s3`, here a local S3 server
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "compose.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "sample").symlink_to(ROOT / "sample")  # the config's inputs, as in the image
    bucket, _ = parse_s3_uri(config["storage"]["uri"])
    monkeypatch.chdir(tmp_path)  # the image's WORKDIR
    for _ in range(2):
        exec(compile(code, "setup", "exec"), {})
    from storage.s3 import S3Storage

    names = [b["Name"] for b in S3Storage(config["storage"]["uri"], s3_endpoint).client.list_buckets()["Buckets"]]
    assert bucket in names


@pytest.mark.parametrize("port", ["4200", "8080", "14200"])
def test_the_ui_calls_the_api_on_the_published_port(port, monkeypatch):
    env = {**_env_example(), "PREFECT_PORT": port, "POSTGRES_PASSWORD": "p@ss/w:rd%"}
    server = _interpolate(_compose(), env)["services"]["prefect-server"]
    host_port, container_port = server["ports"][0].rsplit(":", 1)
    assert host_port == port and f"--port {container_port}" in server["command"]
    assert server["environment"]["PREFECT_SERVER_UI_API_URL"] == f"http://localhost:{port}/api"

    # what the server makes of its environment: the UI's API URL, and the database (password escaped)
    from prefect.settings import Settings
    from sqlalchemy.engine import make_url

    for key in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in server["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.server.ui.api_url == f"http://localhost:{port}/api"
    url = make_url(settings.server.database.connection_url.get_secret_value())
    assert (url.drivername, url.host, url.port) == ("postgresql+asyncpg", "postgres", 5432)
    assert (url.username, url.password, url.database) == (env["POSTGRES_USER"], "p@ss/w:rd%", env["POSTGRES_DB"])


def test_the_gpu_worker_gets_the_driver_and_the_image_brings_cuda():
    services = _compose()["services"]
    gpu = services["worker-gpu"]
    assert gpu["environment"]["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert set(gpu["environment"]["NVIDIA_DRIVER_CAPABILITIES"].split(",")) >= {"compute", "utility"}
    assert gpu["image"] == services["worker"]["image"] and gpu["build"] == services["worker"]["build"]
    # one slim image for both workers holds only because torch's wheel brings its CUDA runtime and cuDNN along
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M) and base.startswith("python:3.11")
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    assert any(line.startswith("torch==") for line in lock)
    for package in ("nvidia-cuda-runtime==", "nvidia-cudnn-cu", "nvidia-cublas=="):
        assert any(line.startswith(package) for line in lock), package


def test_workers_run_flows_from_the_project_in_the_image():
    """prefect.yaml's pull step changes to $UNITER_HOME: the project folder in the image."""
    pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    assert pull[0]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $UNITER_HOME }}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    assert re.search(rf"\bUNITER_HOME={re.escape(workdir)}(\s|$)", dockerfile)
    for name in ("setup", "worker", "worker-gpu"):
        assert _compose()["services"][name]["environment"]["UNITER_HOME"] == workdir, name


def test_docs_name_every_variable_and_how_to_pin_digests():
    readme = (ROOT / "README.md").read_text()
    for name in [*_env_example(), "UNITER_HOME"]:
        assert f"`{name}`" in readme, f"README does not name {name}"
    for path in ("docker-compose.yml", "Dockerfile"):
        assert "docker buildx imagetools inspect" in (ROOT / path).read_text(), path


def test_prefect_yaml_matches_the_stage_list():
    """prefect.yaml is written by hand for `prefect deploy --all`; it must describe exactly the flows
    derived from pipeline/stages.py: one deployment per flow, the training flows on the GPU pool,
    only corpus-rebuild scheduled (with the config's default cron)."""
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_attr = {attr: name for name, attr in ENTRYPOINTS.items()}
    deployed = {}
    for d in doc["deployments"]:
        path, attr = d["entrypoint"].split(":")
        assert path == "flows/dag.py" and attr in by_attr, d["entrypoint"]
        deployed[by_attr[attr]] = d
    assert set(deployed) == set(ENTRYPOINTS) and len(doc["deployments"]) == len(ENTRYPOINTS)
    assert deployed["corpus-rebuild"]["schedules"][0]["cron"] == OrchestrationConfig().corpus_rebuild_cron
    assert all("schedules" not in d for name, d in deployed.items() if name != "corpus-rebuild")
    for name, d in deployed.items():
        assert d["work_pool"]["name"] == ("uniter-gpu" if name in GPU_FLOWS else "uniter"), name
