"""The deployment files refer to things that exist: no Docker engine needed.

docker-compose.yml is parsed as YAML; every ``ctr-ad`` command in it is parsed by the real argparse
parser of its subcommand; paths, ports, volumes, healthchecks and the Prometheus target are checked
against the repository, the Dockerfile, .dockerignore and the service's routes.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctr_ad.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
OUR_IMAGE = "ctr-ad:latest"


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads Compose's ``!reset`` / ``!override`` merge tags."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})
_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node))


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def ctr_ad_invocations(command: list[str] | str) -> list[list[str]]:
    """Every ``ctr-ad ...`` command line in a service command (exec form or ``sh -c`` script)."""
    if isinstance(command, str):
        command = shlex.split(command)
    if command[:2] == ["sh", "-c"]:
        script = command[2]
        # Split the script into simple commands at shell operators; keep the ctr-ad ones.
        parts = re.split(r"\|\||&&|;|\(|\)", script)
        return [shlex.split(p.strip()) for p in parts if p.strip().startswith("ctr-ad ")]
    return [command] if command and command[0] == "ctr-ad" else []


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """Parse ``ctr-ad SUB ARGS`` with the subcommand's own parser (argparse exits on an unknown flag)."""
    assert argv[0] == "ctr-ad" and argv[1] in COMMANDS, argv
    module = importlib.import_module(COMMANDS[argv[1]][0])
    parser = argparse.ArgumentParser(prog=f"ctr-ad {argv[1]}", exit_on_error=False)
    module.add_arguments(parser)
    return parser.parse_args(argv[2:])


def all_invocations(services: dict[str, Any]) -> dict[str, list[argparse.Namespace]]:
    out: dict[str, list[argparse.Namespace]] = {}
    for name, svc in services.items():
        if "command" in svc:
            out[name] = [parse_cli(argv) for argv in ctr_ad_invocations(svc["command"])]
    return out


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def in_build_context(rel: str) -> bool:
    """Whether ``rel`` (repo-relative) reaches the Docker build context (not excluded by .dockerignore)."""
    parts = Path(rel).parts
    for pattern in dockerignore_patterns():
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/")):
                return False
    return True


def copied_by_dockerfile(rel: str) -> bool:
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    return any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in sources)


# ------------------------------------------------------------------------------------------ tests
def test_services_and_image(services: dict[str, Any]) -> None:
    assert {"ingest", "train", "api", "prometheus"} <= set(services)
    for name in ("ingest", "train", "api"):
        svc = services[name]
        assert svc["image"] == OUR_IMAGE
        assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert services["prometheus"]["image"].startswith("prom/prometheus:")


def test_every_ctr_ad_command_parses(services: dict[str, Any]) -> None:
    found = all_invocations(services)  # parse_cli fails on an unknown subcommand or flag
    assert len(found["ingest"]) == 1 and len(found["train"]) == 2 and len(found["api"]) == 1
    for name in ("ingest", "train", "api"):
        for argv in ctr_ad_invocations(services[name]["command"]):
            assert argv[1] in COMMANDS, f"{name}: unknown subcommand {argv[1]}"


def test_jobs_are_one_shot_and_chained(services: dict[str, Any]) -> None:
    for name in ("ingest", "train"):
        assert services[name]["restart"] == "no"
    assert services["train"]["depends_on"]["ingest"]["condition"] == "service_completed_successfully"
    assert services["api"]["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert services["prometheus"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_data_flows_from_ingest_to_train_to_api(services: dict[str, Any]) -> None:
    found = all_invocations(services)
    (ingest,) = found["ingest"]
    primary, shadow = found["train"]
    (api,) = found["api"]
    assert primary.data == shadow.data == str(ingest.out)
    assert api.bundle == primary.out and api.shadow == shadow.out and primary.out != shadow.out
    # The replicas differ only in their seeds.
    assert primary.config == shadow.config
    seeds = [sorted(o for o in t.overrides if "seed" in o) for t in (primary, shadow)]
    assert seeds[0] != seeds[1] and len(seeds[0]) == 2
    # Repo files the jobs read exist and are in the image.
    for rel in [*map(str, ingest.input), primary.config]:
        assert (REPO / rel).is_file(), rel
        assert in_build_context(rel) and copied_by_dockerfile(rel), rel


def test_volumes_exist(compose: dict[str, Any], services: dict[str, Any]) -> None:
    named = set(compose.get("volumes", {}))
    for name, svc in services.items():
        for spec in svc.get("volumes", []):
            source, target = spec.split(":")[:2]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in named, f"{name}: volume {source} not declared"
            assert target.startswith("/")
    # Every job writes under the volume it mounts.
    found = all_invocations(services)
    assert str(found["ingest"][0].out).startswith("/runs/")
    assert all(t.out.startswith("/runs/") for t in found["train"])


def test_train_requests_a_gpu_and_cpu_override_drops_it(services: dict[str, Any]) -> None:
    devices = services["train"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] >= 1
    assert all_invocations(services)["train"][0].device == "auto"  # CPU when no GPU is visible
    override = load_yaml(REPO / "deploy" / "compose.cpu.yml")
    assert override["services"]["train"]["deploy"] == {"__reset__": True}


def test_api_binds_its_published_port_and_healthcheck_uses_readyz(services: dict[str, Any]) -> None:
    from service.routers import info

    api = services["api"]
    (args,) = all_invocations(services)["api"]
    assert args.host == "0.0.0.0"  # inside the container; published on the host's loopback only
    host_ip, _host_port, container_port = api["ports"][0].split(":")
    assert host_ip == "127.0.0.1" and int(container_port) == args.port
    check = " ".join(api["healthcheck"]["test"])
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", check)
    assert m and int(m.group(1)) == args.port and m.group(2) == "/readyz"
    routes = {r.path for r in info.router.routes}
    assert {"/readyz", "/healthz", "/metrics"} <= routes
    assert f"EXPOSE {args.port}" in DOCKERFILE.read_text()


def test_prometheus_scrapes_the_api(services: dict[str, Any]) -> None:
    from service.routers import info

    prom = services["prometheus"]
    mounts = {spec.split(":")[1]: spec.split(":")[0] for spec in prom["volumes"]}
    config_path = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    config_file = REPO / mounts[config_path]
    config = yaml.safe_load(config_file.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] in {r.path for r in info.router.routes}
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    (api_args,) = all_invocations(services)["api"]
    assert host == "api" and int(port) == api_args.port
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, f"rule file {rule_file} is not mounted"
        rules = yaml.safe_load((REPO / mounts[rule_file]).read_text())
        exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
        for metric in re.findall(r"ctr_ad_\w+", exprs):
            assert metric.removesuffix("_bucket") in SERVICE_METRICS, metric


SERVICE_METRICS = {
    "ctr_ad_http_requests_total", "ctr_ad_http_request_duration_seconds", "ctr_ad_instances_scored_total",
    "ctr_ad_component_spread", "ctr_ad_shadow_abs_diff", "ctr_ad_shadow_rel_diff", "ctr_ad_model_info",
    "ctr_ad_ready", "ctr_ad_live_pd_rel", "ctr_ad_offline_pd_rel", "ctr_ad_reproducibility_alert",
}


def test_service_metric_names_match_the_code() -> None:
    source = (REPO / "service" / "monitoring.py").read_text()
    for name in SERVICE_METRICS:
        base = name.removesuffix("_total")
        assert f'"{name}"' in source or f'"{base}"' in source, name


def test_dockerfile_copies_existing_paths_and_installs_the_cli() -> None:
    text = DOCKERFILE.read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src
                assert in_build_context(src), f"{src} is excluded by .dockerignore"
    assert 'pip install ".${EXTRAS}"' in text and 'ARG EXTRAS=""' in text  # the project, plus extras if asked
    assert 'ctr-ad = "ctr_ad.cli:main"' in (REPO / "pyproject.toml").read_text()


def test_ray_profile_is_optional_and_its_ingest_runs_on_the_cluster(services: dict[str, Any]) -> None:
    """docker compose --profile ray: a head, workers and an ingest job on them; plain `up` is unchanged."""
    ray_services = {name for name, svc in services.items() if "ray" in svc.get("profiles", [])}
    assert ray_services == {"ray-head", "ray-worker", "ingest-ray"}
    assert all("profiles" not in svc for name, svc in services.items() if name not in ray_services)
    head_port = next(a.split("=")[1] for a in services["ray-head"]["command"] if a.startswith("--port="))
    for name in ray_services:
        svc = services[name]
        assert svc["build"]["args"]["EXTRAS"] == "[ray]" and svc["image"] != OUR_IMAGE
        assert "runs:/runs" in svc["volumes"]  # spills beside --out: every node sees them
        assert svc["environment"]["RAY_AUTH_MODE"] == "token"
    (ingest,) = all_invocations(services)["ingest-ray"]
    assert ingest.engine == "ray" and str(ingest.out).startswith("/runs/")
    assert services["ingest-ray"]["environment"]["RAY_ADDRESS"] == f"ray-head:{head_port}"
    assert f"--address=ray-head:{head_port}" in services["ray-worker"]["command"][2]
    for rel in map(str, ingest.input):
        assert (REPO / rel).is_file() and in_build_context(rel) and copied_by_dockerfile(rel), rel
