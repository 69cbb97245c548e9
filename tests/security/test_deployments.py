"""What each shipped deployment exposes, checked offline (no Docker, no cluster).

Raw Triton must be reachable through nothing a deployment publishes: its HTTP parser is
what the front protects (docs/deploy.md, "Exposure and the front"), and its internal
models can be called in turn (csm_prepare -> csm_generate -> mimi_decoder) to get speech
without the watermark. So: compose publishes only the gateway and the front, on 127.0.0.1
by default; the chart's Triton Service is ClusterIP behind a NetworkPolicy and no Ingress;
KServe routes the front with Triton on the pod's loopback; the image is a Triton release
with the 2026 fixes and runs as a user; no default Grafana password; no deployment widens
the front to the internal models.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.test_deploy import COMPOSE_FILE, DOCKERFILE, ROOT, container_launch, published_ports, resolved
from tests.deploy.test_kubernetes import (
    EVERYTHING,
    FULLNAME,
    PROFILE_FILES,
    by_kind,
    kserve,
    kserve_container,
    merged,
    pod_specs,
    profile_values,
    render,
)

pytestmark = pytest.mark.security

TRITON_PORTS = {8000, 8001, 8002}  # HTTP, gRPC, metrics (compose and the chart)
LOOPBACK = "127.0.0.1"
# Host addresses a published port may have in docker-compose.yml: loopback, or a variable
# that defaults to it.
LOOPBACK_BY_DEFAULT = re.compile(r"127\.0\.0\.1|\$\{[A-Z][A-Z0-9_]*:-127\.0\.0\.1\}")
MIN_NGC_RELEASE = (26, 7)  # Triton 2.71: docker/Dockerfile says why
PUBLIC_MODELS = {"csm_tts", "csm_tts_stream", "voice_register", "voice_list", "voice_delete", "watermark_detect"}


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


# --- docker compose ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_defaults() -> dict:
    """Every service, with nothing set in the environment."""
    return resolved("loadtest", "monitoring")["services"]


def test_no_service_publishes_tritons_ports(compose_defaults):
    assert not compose_defaults["triton"].get("ports"), "Triton publishes a port"
    for name, service in compose_defaults.items():
        for address, published, target in published_ports(service):
            assert published not in TRITON_PORTS and not (name == "triton" or target in TRITON_PORTS), (
                name,
                address,
                published,
                target,
            )


def test_only_the_gateway_and_the_front_can_be_opened():
    for name, service in raw_compose()["services"].items():
        for port in service.get("ports") or []:
            # ADDRESS:HOST_PORT:CONTAINER_PORT, either part before the last a ${VAR:-default}.
            parsed = re.fullmatch(r"(\$\{[^}]*\}|[^:$]+):(\$\{[^}]*\}|\d+):(\d+)", str(port))
            assert parsed, f"{name}: {port!r} has no host address (every interface)"
            address = parsed.group(1)
            assert LOOPBACK_BY_DEFAULT.fullmatch(address), f"{name}: {port!r} is not on 127.0.0.1 by default"
            if name not in ("gateway", "front"):
                assert address == LOOPBACK, f"{name}: {port!r} can be opened (no authentication)"


def test_every_published_port_binds_loopback_by_default(compose_defaults):
    published = {name: published_ports(service) for name, service in compose_defaults.items() if service.get("ports")}
    assert set(published) == {"gateway", "front", "locust", "prometheus", "grafana"}
    for name, ports in published.items():
        assert {address for address, _, _ in ports} == {LOOPBACK}, (name, ports)


def test_the_publish_address_opens_the_gateway_and_the_front_only():
    services = resolved("loadtest", "monitoring", CSM_PUBLISH_ADDRESS="0.0.0.0")["services"]
    for name, service in services.items():
        addresses = {address for address, _, _ in published_ports(service)}
        if name in ("gateway", "front"):
            assert addresses == {"0.0.0.0"}, name
        elif addresses:
            assert addresses == {LOOPBACK}, name


def test_triton_is_alone_on_an_internal_network_with_its_clients(compose_defaults):
    networks = raw_compose()["networks"]
    assert networks["backend"]["internal"] is True  # no route out, nothing publishable
    assert list(compose_defaults["triton"]["networks"]) == ["backend"]
    on_backend = {name for name, service in compose_defaults.items() if "backend" in (service.get("networks") or {})}
    # Prometheus scrapes the metrics port; Grafana (its data sources can point anywhere)
    # and Locust (its UI starts load at will) are not there.
    assert on_backend == {"triton", "gateway", "front", "prometheus"}
    assert "triton:8002" in (ROOT / "monitoring" / "prometheus" / "prometheus.yml").read_text()
    assert "backend" not in compose_defaults["grafana"]["networks"]


def test_locust_goes_through_the_front(compose_defaults):
    command = compose_defaults["locust"]["command"]
    assert command[command.index("--host") + 1] == "http://front:8080"


def test_grafana_has_no_default_password(compose_defaults, tmp_path):
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"GRAFANA_ADMIN_PASSWORD:-[^}]", text), "a default Grafana password"
    grafana = compose_defaults["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == ""
    # ... and the container refuses to start with an empty one (compose's $$ is a $).
    shell, flag, script, name = [part.replace("$$", "$") for part in raw_compose()["services"]["grafana"]["entrypoint"]]
    grafana_run = tmp_path / "run.sh"
    grafana_run.write_text("#!/bin/sh\necho grafana started\n")
    grafana_run.chmod(0o755)
    script = script.replace("/run.sh", str(grafana_run))
    for password, started in (("", False), ("s3cret", True)):
        result = subprocess.run(
            [shell, flag, script, name],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin", "GF_SECURITY_ADMIN_PASSWORD": password},
        )
        assert (result.returncode == 0) is started, result
        assert ("grafana started" in result.stdout) is started
        if not started:
            assert "GRAFANA_ADMIN_PASSWORD" in result.stderr
    assert (
        resolved("monitoring", GRAFANA_ADMIN_PASSWORD="s3cret")["services"]["grafana"]["environment"][
            "GF_SECURITY_ADMIN_PASSWORD"
        ]
        == "s3cret"
    )


def test_the_model_control_key_reaches_triton_from_the_environment():
    triton = resolved(CSM_MODEL_CONTROL_KEY="k3y")["services"]["triton"]
    assert triton["environment"]["CSM_MODEL_CONTROL_KEY"] == "k3y"


# --- the Helm chart ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[*sorted(PROFILE_FILES), "everything"])
def chart(request) -> list[dict]:
    if request.param == "everything":
        return render(merged(profile_values("a100-80gb"), EVERYTHING))
    return render(profile_values(request.param))


def pod_labels(objects: list[dict], component: str) -> dict:
    return by_kind(objects, "Deployment")[f"{FULLNAME}-{component}"]["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart uses matchLabels only
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_tritons_service_is_cluster_ip_and_the_only_one_selecting_triton(chart):
    services = by_kind(chart, "Service")
    assert services[f"{FULLNAME}-triton"]["spec"]["type"] == "ClusterIP"
    triton = pod_labels(chart, "triton")
    for name, service in services.items():
        if service["spec"]["selector"].items() <= triton.items():
            assert name == f"{FULLNAME}-triton" and service["spec"]["type"] == "ClusterIP", name


@pytest.mark.parametrize("kind", ["NodePort", "LoadBalancer"])
def test_the_schema_refuses_to_publish_triton(kind):
    import helm_python as helm

    with pytest.raises(helm.HelmError):
        render({"triton": {"service": {"type": kind}}})
    with pytest.raises(helm.HelmError):
        render({"service": {"type": kind}})  # the old shared setting


def test_network_policy_lets_only_gateway_and_front_pods_reach_triton(chart):
    (policy,) = by_kind(chart, "NetworkPolicy").values()
    spec = policy["spec"]
    assert selects(spec["podSelector"], pod_labels(chart, "triton"))
    assert "Ingress" in spec["policyTypes"]
    gateway, front = pod_labels(chart, "gateway"), pod_labels(chart, "front")
    allowed = {}
    for rule in spec["ingress"]:
        ports = {port["port"] for port in rule["ports"]}
        assert rule.get("from"), f"a rule open to every source: {rule}"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, rule
            if "namespaceSelector" in peer:  # another namespace: Prometheus, for metrics only
                assert ports == {8002}, rule
                continue
            selector = peer["podSelector"]
            if selects(selector, gateway):
                allowed.setdefault("gateway", set()).update(ports)
            elif selects(selector, front):
                allowed.setdefault("front", set()).update(ports)
            else:
                assert ports == {8002}, f"pods other than the gateway's and the front's reach {ports}: {peer}"
    assert allowed == {"gateway": {8001}, "front": {8000}}


def test_prometheus_selectors_are_configurable():
    objects = render(
        {
            "networkPolicy": {
                "metrics": {
                    "namespaceSelector": {"matchLabels": {"team": "obs"}},
                    "podSelector": {"matchLabels": {"app": "prom"}},
                }
            }
        }
    )
    (policy,) = by_kind(objects, "NetworkPolicy").values()
    (metrics,) = [rule for rule in policy["spec"]["ingress"] if any("namespaceSelector" in p for p in rule["from"])]
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"team": "obs"}}, "podSelector": {"matchLabels": {"app": "prom"}}}
    ]
    assert metrics["ports"] == [{"protocol": "TCP", "port": 8002}]


def test_no_ingress_routes_to_triton(chart):
    for name, ingress in by_kind(chart, "Ingress").items():
        backends = [
            path["backend"]["service"]["name"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]
        ]
        backends += [ingress["spec"].get("defaultBackend", {}).get("service", {}).get("name")]
        assert f"{FULLNAME}-triton" not in backends, name
        assert "nginx.ingress.kubernetes.io/backend-protocol" not in ingress["metadata"].get("annotations", {}), name


def test_every_pod_runs_as_a_user_without_privileges(chart):
    for name, pod in pod_specs(chart).items():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context.get("runAsUser", 1) != 0, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert security["readOnlyRootFilesystem"] is True, name
            assert not security.get("privileged"), name


def test_the_model_control_key_is_a_secret_file():
    objects = render(merged(profile_values("h100"), EVERYTHING))
    pod = pod_specs(objects)[f"Deployment/{FULLNAME}-triton"]
    (container,) = pod["containers"]
    env = {v["name"]: v for v in container["env"]}
    assert "CSM_MODEL_CONTROL_KEY" not in env and "valueFrom" not in env["CSM_MODEL_CONTROL_KEY_FILE"]
    volume = next(v for v in pod["volumes"] if v["name"] == "model-control-key")
    assert volume["secret"]["secretName"] == "csm-model-control"
    assert "CSM_MODEL_CONTROL_KEY_FILE" in container["command"][2]  # read into the environment at start


# --- KServe -----------------------------------------------------------------------------------
def last_value(argv: list[str], flag: str) -> str:
    """Triton takes the last of a repeated flag."""
    return [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")][-1]


def test_kserve_routes_the_front_and_keeps_triton_on_loopback(tmp_path):
    triton, front = kserve_container("kserve-container"), kserve_container("transformer-container")
    assert front["command"][:3] == ["python3", "-m", "csm_servers.gateway.kserve_front"]
    assert front["ports"][0]["containerPort"] == 8080
    args = triton["args"]
    http, grpc = args[args.index("--http-port") + 1], args[args.index("--grpc-port") + 1]
    environment = {v["name"]: v["value"] for v in triton["env"]}
    argv = container_launch(args, tmp_path, environment)  # what tritonserver is given
    assert last_value(argv, "--http-address") == LOOPBACK and last_value(argv, "--grpc-address") == LOOPBACK
    assert last_value(argv, "--metrics-address") == "0.0.0.0"  # Prometheus scrapes the pod
    assert any(a.startswith("--http-restricted-api=") for a in argv)  # the admin APIs keyed
    # Only the metrics port is declared on the pod's address; none of Triton's is routed.
    assert {p["containerPort"] for p in triton["ports"]} == {8002}
    assert {int(http), int(grpc)}.isdisjoint({p["containerPort"] for p in front["ports"]})
    assert front["command"][front["command"].index("--triton-http") + 1] == f"127.0.0.1:{http}"


def test_kserve_manifests_expose_no_triton_port():
    service = kserve("service.yaml")
    assert [port["targetPort"] for port in service["spec"]["ports"]] == [8002]  # metrics only
    runtime = kserve("servingruntime.yaml")["spec"]
    assert "grpc-v2" not in runtime["protocolVersions"]  # Triton's gRPC is not served
    policy = kserve("networkpolicy.yaml")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "csm-tts"}
    open_ports = {port["port"] for rule in policy["ingress"] if not rule.get("from") for port in rule["ports"]}
    assert open_ports == {8080}  # the front; metrics only from Prometheus


# --- the front serves the public models only --------------------------------------------------
def front_commands() -> dict[str, list[str]]:
    commands = {
        "compose": raw_compose()["services"]["front"]["command"],
        "kserve": kserve_container("transformer-container")["command"],
    }
    (front,) = by_kind(render(), "Deployment")[f"{FULLNAME}-front"]["spec"]["template"]["spec"]["containers"]
    commands["chart"] = front["command"] + front["args"]
    return commands


@pytest.mark.parametrize("deployment", ["compose", "chart", "kserve"])
def test_no_deployment_widens_the_front_to_internal_models(deployment):
    command = front_commands()[deployment]
    assert "csm_servers.gateway.kserve_front" in command
    if "--models" in command:
        assert set(command[command.index("--models") + 1].split(",")) <= PUBLIC_MODELS
    assert not any(
        part.startswith("--models=") and not set(part.split("=", 1)[1].split(",")) <= PUBLIC_MODELS for part in command
    )
    assert "CSM_FRONT_MODELS" not in COMPOSE_FILE.read_text()
    assert "CSM_FRONT_MODELS" not in (ROOT / "deploy" / "kubernetes" / "kserve" / "servingruntime.yaml").read_text()


# --- the image ---------------------------------------------------------------------------------
def test_the_base_image_has_tritons_2026_fixes():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG TRITON_IMAGE=(\S+)$", text, re.M).group(1)
    release = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", base)
    assert release, f"the base image must be a pinned NGC <yy.mm>-py3 release, got {base}"
    assert (int(release.group(1)), int(release.group(2))) >= MIN_NGC_RELEASE, base
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}$", text, re.M)


def test_the_image_runs_as_a_user():
    users = re.findall(r"^USER (\S+)$", DOCKERFILE.read_text(), re.M)
    assert users and users[-1] not in ("root", "0"), users
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_image", ROOT / "docker" / "check_image.py")
    check_image = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_image)
    assert check_image.RUN_AS_USER == users[-1]
    assert check_image.MIN_TRITON_VERSION >= (2, 71)


def test_the_build_context_leaves_out_env_files():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert ".env" in ignored and "**/.env" in ignored


def test_check_image_refuses_an_old_triton(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_image", ROOT / "docker" / "check_image.py")
    check_image = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_image)
    monkeypatch.setenv("TRITON_SERVER_VERSION", "2.62.0")  # 25.10, the image before
    with pytest.raises(SystemExit, match="predates"):
        check_image.check_triton_release()
    monkeypatch.setenv("TRITON_SERVER_VERSION", "2.71.0")
    assert check_image.check_triton_release() == "Triton 2.71.0"


def test_docs_describe_the_exposure():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for phrase in ("CSM_PUBLISH_ADDRESS", "NetworkPolicy", "26.07", "GRAFANA_ADMIN_PASSWORD"):
        assert phrase in text, phrase
    assert not Path(ROOT / "docs" / "deploy.md").read_text().count("publishes Triton's 8000/8001/8002")
