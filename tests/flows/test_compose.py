"""The docker-compose stack and prefect.yaml, checked without a Docker daemon: services, pinned
images, env names that match .env.example and what the CLI reads, the GPU reservation, a config
that points at the stack, and a deployment per flow."""

from __future__ import annotations

import re
from pathlib import Path

import prefect
import yaml

from flows.dag import ENTRYPOINTS, GPU_FLOWS
from pipeline.config import OrchestrationConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env_example() -> dict[str, str]:
    rows = [
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return {k: v for k, v in rows}


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
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{(\w+)\}", text))
    declared = set(_env_example())
    assert used == declared, (used - declared, declared - used)
    for name in ("worker", "worker-gpu", "setup"):
        env = _compose()["services"][name]["environment"]
        # Prefect's client and boto3's credential chain read exactly these names
        assert {
            "PREFECT_API_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "UNITER_CACHE_DIR",
        } <= set(env)
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    for secret in ("AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD"):  # never a literal in the compose file
        assert re.search(rf"{secret}:\s*\$\{{{secret}\}}", text)


def test_the_stack_config_points_at_the_stack():
    cfg = load_config(ROOT / "configs" / "compose.yaml")
    compose = _compose()
    assert cfg.storage.uri.startswith("s3://")
    s3_port = re.search(r"-s3\.port=(\d+)", " ".join(compose["services"]["s3"]["command"])).group(1)
    assert cfg.storage.endpoint_url == f"http://s3:{s3_port}"
    assert cfg.storage.uri.split("/")[2] == _env_example()["UNITER_BUCKET"]


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
