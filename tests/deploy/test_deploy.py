"""The container deployment, checked without a Docker engine: docker-compose.yml is
validated by Debian's docker-compose (installed by make setup-test) and read back
as compose resolves it; the container's tritonserver launch (docker/serve.sh) and
the embedded launcher (`csm-triton-server serve`) must pass the same
server arguments; the export job's command must be one export.build_repository
accepts. What needs Docker and a GPU (building the image, starting the stack) is
listed in docs/deploy.md."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from csm_triton import constants as C
from csm_triton.serving import cli, flags
from csm_triton.serving.flags import read_args_file, server_arguments
from export.model_config import PROFILES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SERVE_SCRIPT = ROOT / "docker" / "serve.sh"
EXPORT_SCRIPT = ROOT / "docker" / "export.sh"
IMAGE_ROOT = "/opt/csm-triton"  # where docker/Dockerfile puts the project
CONTAINER_REPOSITORY = "/models/model_repository"
# Flags only the embedded server has: where its own install lives, and the /dev/shm
# prefix that lets it remove its stubs' regions after a crash.
EMBEDDED_ONLY = ("--backend-directory", "--cache-directory", "--backend-config=shm-region-prefix-name")
# The model-control key the launches are given (else each start makes a random one).
TEST_KEY = "test-model-control-key-0123456789"
# Compose variables a developer's shell may hold; the tests set their own.
COMPOSE_VARIABLES = (
    "CSM_IMAGE",
    "CSM_CHECKPOINT",
    "CSM_CHECKPOINT_DIR",
    "CSM_PROFILE",
    "CSM_ADMIN_TOKEN",
    "HF_TOKEN_FILE",
    "CSM_HTTP_PORT",
    "CSM_GRPC_PORT",
    "CSM_METRICS_PORT",
    "LOCUST_PORT",
    "PROMETHEUS_PORT",
    "GRAFANA_PORT",
    "GRAFANA_ADMIN_PASSWORD",
    "COMPOSE_PROFILES",
    "COMPOSE_FILE",
    "COMPOSE_PROJECT_NAME",
    "CSM_PUBLISH_ADDRESS",
    "CSM_GATEWAY_PORT",
    "CSM_FRONT_PORT",
    "CSM_MODEL_CONTROL_KEY",
    "CSM_GATEWAY_API_KEYS",
)


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose is not installed: run make setup-test (it installs Debian's docker-compose)")
    return found


def compose(*args: str, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}
    env.update(environment or {})
    return subprocess.run(
        [docker_compose(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def resolved(*profiles: str, **environment: str) -> dict:
    """docker-compose.yml as compose resolves it (variables substituted, defaults applied)."""
    result = compose(*[a for p in profiles for a in ("--profile", p)], "config", environment=environment)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def services() -> dict:
    return resolved("loadtest", "monitoring", CSM_ADMIN_TOKEN="token-from-the-environment")["services"]


def published_ports(service: dict) -> set[tuple[str, int | None, int]]:
    """(host address, host port, container port) of each port a resolved service
    publishes: compose writes `ADDRESS:PUBLISHED:TARGET/tcp` or the long form. An empty
    address is every interface; a None host port is a random one (every interface too)."""
    ports = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            ports.add((port.get("host_ip", ""), port.get("published"), int(port["target"])))
            continue
        parts = str(port).split("/")[0].rsplit(":", 2)
        address, published = (["", ""] + parts[:-1])[-2:]
        ports.add((address, int(published) if published else None, int(parts[-1])))
    return ports


def with_python_first(extra: Path | None = None) -> dict[str, str]:
    """An environment whose `python3` is this venv's (the image's is the system one)."""
    path = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    if extra is not None:
        path.insert(0, str(extra))
    return {**os.environ, "PATH": os.pathsep.join(path)}


def fake_program(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / name
    program.write_text("#!/bin/sh\n" + body)
    program.chmod(0o755)
    return program


# --- the compose file -------------------------------------------------------------------
def test_compose_file_is_valid_for_every_profile():
    for profiles in ([], ["loadtest"], ["monitoring"], ["loadtest", "monitoring"]):
        result = compose(*[a for p in profiles for a in ("--profile", p)], "config", "-q")
        assert result.returncode == 0, f"profiles {profiles}: {result.stderr}"


def test_a_broken_compose_file_is_refused(tmp_path):
    # The validator really validates: a misspelt key fails.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("shm_size:", "shm_sise:"))
    result = subprocess.run([docker_compose(), "-f", str(broken), "config", "-q"], capture_output=True, text=True)
    assert result.returncode != 0 and "shm_sise" in result.stderr


def test_default_profile_runs_the_export_job_triton_the_gateway_and_the_front(services):
    assert sorted(name for name, service in services.items() if not service.get("profiles")) == [
        "export",
        "front",
        "gateway",
        "triton",
    ]


def test_gateway_serves_7860_from_tritons_grpc_port_once_triton_is_healthy(services):
    gateway = services["gateway"]
    command = gateway["command"]
    assert command[:3] == ["python3", "-m", "csm_servers.gateway"]
    assert command[command.index("--triton-url") + 1] == "triton:8001"
    assert command[command.index("--port") + 1] == "7860"
    assert published_ports(gateway) == {("127.0.0.1", 7860, 7860)}
    assert gateway["depends_on"] == {"triton": {"condition": "service_healthy"}}
    assert gateway["environment"]["CSM_ADMIN_TOKEN"] == "token-from-the-environment"  # voice writes
    assert any("localhost:7860/health" in part for part in gateway["healthcheck"]["test"])


def test_front_serves_8080_from_tritons_http_port_once_triton_is_healthy(services):
    front = services["front"]
    command = front["command"]
    assert command[:3] == ["python3", "-m", "csm_servers.gateway.kserve_front"]
    assert command[command.index("--triton-http") + 1] == "triton:8000"
    assert command[command.index("--port") + 1] == "8080"
    assert published_ports(front) == {("127.0.0.1", 8080, 8080)}
    assert front["depends_on"] == {"triton": {"condition": "service_healthy"}}
    assert any("localhost:8080/v2/health/live" in part for part in front["healthcheck"]["test"])


def test_optional_services_sit_behind_their_profiles(services):
    assert services["locust"]["profiles"] == ["loadtest"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]


def test_triton_starts_after_a_successful_export_into_the_same_volume(services):
    triton, export = services["triton"], services["export"]
    assert triton["depends_on"] == {"export": {"condition": "service_completed_successfully"}}
    assert "model-repository:/models:rw" in export["volumes"]
    assert "--out" in export["command"] and CONTAINER_REPOSITORY in export["command"]
    assert any(v.startswith("model-repository:/models") for v in triton["volumes"])
    assert export["restart"] == "no"  # a one-shot job


def test_triton_reserves_gpus_and_shared_memory(services):
    triton = services["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    shm = re.fullmatch(r"(\d+)([kmg])b?", str(triton["shm_size"]).lower())
    assert shm and int(shm.group(1)) * {"k": 2**10, "m": 2**20, "g": 2**30}[shm.group(2)] >= 2**30


def test_triton_publishes_nothing_and_is_reached_on_the_internal_network(services):
    # tests/security/test_deployments.py checks the exposure in depth.
    assert not services["triton"].get("ports")
    assert set(services["triton"]["networks"]) == {"backend"}
    assert {name for name, service in services.items() if "backend" in (service.get("networks") or {})} == {
        "triton",
        "gateway",
        "front",
        "prometheus",
    }


def test_triton_is_health_checked_on_readiness_and_restarted(services):
    triton = services["triton"]
    assert any("/v2/health/ready" in part for part in triton["healthcheck"]["test"])
    assert triton["healthcheck"]["start_period"]  # loading CSM-1B takes minutes
    assert triton["restart"] == "unless-stopped"
    assert triton["init"] is True  # signals reach tritonserver; its stubs are reaped


def test_admin_token_comes_from_the_environment_and_is_empty_without_it(services):
    assert services["triton"]["environment"]["CSM_ADMIN_TOKEN"] == "token-from-the-environment"
    unset = resolved()["services"]["triton"]["environment"]["CSM_ADMIN_TOKEN"]
    assert unset == ""  # no token: voice writes are refused (csm_triton.core.write_policy)


def test_hf_token_is_a_secret_file_never_an_environment_variable(tmp_path):
    token_file = tmp_path / "hf_token"
    token_file.write_text("hf_test\n")
    config = resolved(HF_TOKEN_FILE=str(token_file))
    assert config["secrets"]["hf_token"]["file"] == str(token_file)
    assert {"source": "hf_token"} in config["services"]["export"]["secrets"]
    for name, service in config["services"].items():
        assert "HF_TOKEN" not in (service.get("environment") or {}), name


def test_export_profile_is_selectable_and_defaults_to_a100():
    command = resolved()["services"]["export"]["command"]
    assert command[command.index("--profile") + 1] == "a100"
    command = resolved(CSM_PROFILE="h100")["services"]["export"]["command"]
    assert command[command.index("--profile") + 1] == "h100" and "h100" in PROFILES


def test_locust_serves_the_projects_locustfile_on_8089_against_the_front(services):
    locust = services["locust"]
    command = locust["command"]
    locustfile = command[command.index("-f") + 1]
    assert locustfile == f"{IMAGE_ROOT}/loadtest/locustfile.py"  # loadtest/locustfile.py in the image
    assert command[command.index("--host") + 1] == "http://front:8080"  # as users come: public models only
    assert command[command.index("--web-port") + 1] == "8089"
    assert published_ports(locust) == {("127.0.0.1", 8089, 8089)}
    assert locust["depends_on"] == {"front": {"condition": "service_healthy"}}


def test_monitoring_mounts_files_that_exist(services):
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which is not in the project"
                assert Path(source).resolve().is_relative_to(ROOT / "monitoring")


def test_every_image_is_pinned(services):
    for name, service in services.items():
        image = service["image"]
        if image == "csm-triton:latest":  # the project's own image, built by compose
            continue
        assert re.fullmatch(r"[\w./-]+:v?\d[\w.-]*", image), f"{name}: image {image} is not pinned to a release"
    base = re.search(r"^ARG TRITON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    release = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", base)
    assert release, f"the base image must be a pinned NGC <yy.mm>-py3 release, got {base}"
    # 24.10 (Triton 2.51) and earlier are Ubuntu 22.04 with Python 3.10, which
    # pyproject's requires-python (>=3.11,<3.13) rules out; the python backend's stub
    # embeds the image's Python.
    assert (int(release.group(1)), int(release.group(2))) > (24, 10)
    assert "FROM ${TRITON_IMAGE}" in DOCKERFILE.read_text()


def test_build_context_leaves_out_local_environments_and_builds():
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".triton", "build", ".git", ".env"} <= ignored


# --- one set of server arguments ----------------------------------------------------------
def container_launch(command: list[str], tmp_path: Path, environment: dict | None = None) -> list[str]:
    """The tritonserver argv docker/serve.sh execs for a compose command (a stand-in
    tritonserver on PATH prints its arguments), with the container's environment and
    TEST_KEY as the model-control key."""
    assert command[0] == f"{IMAGE_ROOT}/docker/serve.sh"
    fake_program(tmp_path / "bin", "tritonserver", 'printf "%s\\n" "$@"\n')
    env = {
        k: v
        for k, v in with_python_first(tmp_path / "bin").items()
        if k not in (C.MODEL_CONTROL_KEY_ENV, C.LISTEN_ADDRESS_ENV)
    }
    env.update(
        {
            C.MODEL_CONTROL_KEY_ENV: TEST_KEY,
            **{k: str(v) for k, v in (environment or {}).items() if k == C.LISTEN_ADDRESS_ENV},
        }
    )
    result = subprocess.run([str(SERVE_SCRIPT), *command[1:]], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def embedded_launch(arguments: list[str], monkeypatch) -> list[str]:
    """The argv `csm-triton-server serve ARGUMENTS` starts (Popen intercepted)."""
    started = []

    class Process:
        def __init__(self, command, **_):
            started.append(list(command))

        def wait(self):
            return 0

        def poll(self):
            return 0

        def send_signal(self, _):
            pass

    monkeypatch.setattr(cli.subprocess, "Popen", Process)
    monkeypatch.setenv(C.MODEL_CONTROL_KEY_ENV, TEST_KEY)
    assert cli.main(["serve", *arguments]) == 0
    (command,) = started
    return command[1:]  # without the binary


def flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def triton_environment(service: dict) -> dict:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_container_launch_passes_exactly_server_arguments(services, tmp_path):
    triton = services["triton"]
    argv = container_launch(triton["command"], tmp_path, triton_environment(triton))
    # On the container's address (the internal network reaches it), the admin APIs keyed.
    assert argv == server_arguments(
        CONTAINER_REPOSITORY,
        model_control="none",
        gpu=True,
        exit_timeout=30,
        listen_address="0.0.0.0",
        model_control_key=TEST_KEY,
    )


def test_container_and_embedded_launchers_use_the_same_server_arguments(services, tmp_path, monkeypatch):
    command, environment = services["triton"]["command"], triton_environment(services["triton"])
    container = container_launch(command, tmp_path, environment)
    # The embedded launcher given the compose service's options (its environment's listen address) ...
    local = embedded_launch([*command[1:], "--listen-address", environment[C.LISTEN_ADDRESS_ENV]], monkeypatch)
    # ... passes the same flags, plus only those that locate its own install.
    assert [f for f in local if not f.startswith(EMBEDDED_ONLY)] == container
    # The shared flags are src/csm_triton/serving/tritonserver.args verbatim, header forwarding included.
    shared = read_args_file()
    for argv in (container, local):
        start = argv.index(shared[0])
        assert argv[start : start + len(shared)] == shared
    assert f"--http-header-forward-pattern={C.HEADER_FORWARD_PATTERN}" in shared
    assert f"--grpc-header-forward-pattern={C.HEADER_FORWARD_PATTERN}" in shared


def test_make_serve_differs_from_the_container_only_in_deployment_flags(services, tmp_path, monkeypatch):
    # `make serve` runs serve with its defaults (explicit model control, GPU auto).
    container = container_launch(services["triton"]["command"], tmp_path)
    local = embedded_launch(["--model-repository", str(tmp_path / "repository")], monkeypatch)
    differing = {flag_name(f) for f in set(container) ^ set(local)}
    assert differing <= flags._DEPLOYMENT_FLAGS | {"--backend-config"}, differing
    assert set(read_args_file()) <= set(container) & set(local)


def test_args_prints_server_arguments_one_per_line(capsys, monkeypatch):
    monkeypatch.setenv(C.MODEL_CONTROL_KEY_ENV, TEST_KEY)
    assert (
        cli.main(["args", "--model-repository", "/m", "--no-gpu", "--model-control", "poll", "--", "--log-verbose=1"])
        == 0
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed == server_arguments(
        "/m", model_control="poll", gpu=False, extra=["--log-verbose=1"], model_control_key=TEST_KEY
    )


def test_image_default_command_is_the_compose_command(services):
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.M).group(1)
    assert json.loads(cmd) == services["triton"]["command"]


# --- the export job -------------------------------------------------------------------------
def test_export_command_is_accepted_by_build_repository(services):
    command = services["export"]["command"]
    assert command[0] == f"{IMAGE_ROOT}/docker/export.sh"
    # argparse checks each argument (the profile against its choices) before --help exits.
    result = subprocess.run(
        [str(EXPORT_SCRIPT), *command[1:], "--help"],
        capture_output=True,
        text=True,
        env=with_python_first(),
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--checkpoint" in result.stdout


def test_export_reads_hf_token_from_the_secret_file(tmp_path):
    fake_program(tmp_path / "bin", "python3", 'echo "HF_TOKEN=${HF_TOKEN:-}"; echo "ARGS=$*"\n')
    secret = tmp_path / "hf_token"
    secret.write_text("  hf_from_secret\n")
    env = {**with_python_first(tmp_path / "bin"), "HF_TOKEN_FILE": str(secret)}
    env.pop("HF_TOKEN", None)
    result = subprocess.run(
        [str(EXPORT_SCRIPT), "--checkpoint", "sesame/csm-1b"], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "HF_TOKEN=hf_from_secret",
        "ARGS=-m export.build_repository --checkpoint sesame/csm-1b",
    ]
    secret.write_text("")  # the default /dev/null secret: no token, nothing set
    result = subprocess.run([str(EXPORT_SCRIPT)], capture_output=True, text=True, env=env, timeout=30)
    assert result.stdout.splitlines()[0] == "HF_TOKEN="


def test_the_test_setup_installs_docker_compose():
    defaults = re.search(
        r"^TEST_APT_PACKAGES=\(\$\{TEST_APT_PACKAGES:-([^}]*)\}\)$", (ROOT / "scripts" / "setup.sh").read_text(), re.M
    ).group(1)
    assert "docker-compose" in defaults.split()


# --- the image's packages ---------------------------------------------------------------------
def test_image_installs_the_projects_pins_locust_and_real_torchaudio():
    import tomllib

    sys.path.insert(0, str(ROOT / "docker"))
    try:
        from image_requirements import image_requirements, requirement_name
    finally:
        sys.path.remove(str(ROOT / "docker"))
    requirements = image_requirements(ROOT / "pyproject.toml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]
    # The thin client is installed from clients/ (not on PyPI): its requirement becomes its pins.
    own = [r for r in project["dependencies"] if requirement_name(r) != "csm-tts-client"]
    assert len(own) == len(project["dependencies"]) - 1
    assert requirements[: len(own)] == own  # exact pins, unchanged
    names = {requirement_name(r) for r in requirements}
    assert "csm-tts-client" not in names
    assert {requirement_name(r) for r in client["dependencies"]} <= names
    assert {"locust", "torchaudio", "torch", "resemble-perth", "transformers", "av", "websockets"} <= names
    assert len(names) == len(requirements)  # each package once
    assert not names & {"pytest", "onnxruntime-gpu"}
    assert "torchaudio==2.11.0" in requirements
    assert "image_requirements.py pyproject.toml > /tmp/requirements.txt" in DOCKERFILE.read_text()
    assert "COPY clients/pyproject.toml clients/" in DOCKERFILE.read_text()
    assert "pip install --no-deps --no-build-isolation -e ./clients -e ." in DOCKERFILE.read_text()
