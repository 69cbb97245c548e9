"""The Kubernetes deployment (deploy/kubernetes), checked without a cluster.

The Helm chart is rendered by Helm's own Go template engine (helm-python-sdk: Helm
v4's Go SDK behind a C ABI, from PyPI) for every GPU profile and with every option
on; each rendered object and each KServe manifest is validated offline against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields refused). The
ServiceMonitor is checked against the Prometheus operator's CRD models (cloudcoil's,
generated from the CRD's schema). KServe's CRDs have no schema package on the
registries the set-up uses (PyPI, Debian, npm): their Pod-shaped parts (the runtime's
containers and volumes) are validated as a Pod, the rest field by field below.
Nothing rendered is written to the checkout.

The metric names the autoscaler uses are compared with a real scrape in
tests/integration/test_kubernetes_metrics.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

from csm_triton.serving.flags import server_arguments
from export.model_config import PROFILES
from tests.deploy.test_deploy import TEST_KEY, container_launch, resolved, triton_environment

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "kubernetes" / "csm-triton"
KSERVE = ROOT / "deploy" / "kubernetes" / "kserve"
PROFILE_FILES = {path.stem: path for path in sorted((CHART / "profiles").glob("*.yaml"))}
RELEASE, NAMESPACE = "tts", "speech"
FULLNAME = f"{RELEASE}-csm-triton"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion: preStop sleep) and the newest schemas.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CONTAINER_REPOSITORY = "/models/model_repository"
# Every option on: secrets, ingress (gateway and front), ServiceMonitor, autoscaling with both metrics.
EVERYTHING = {
    "secrets": {
        "adminToken": {"existingSecret": "csm-admin"},
        "hfToken": {"existingSecret": "hf"},
        "gatewayApiKeys": {"existingSecret": "gateway-keys"},
        "modelControlKey": {"existingSecret": "csm-model-control"},
    },
    "ingress": {"enabled": True, "tlsSecret": "tts-tls", "frontHost": "kserve.tts.example.com"},
    "serviceMonitor": {"enabled": True},
    "autoscaling": {"enabled": True, "queueTime": {"enabled": True}},
    "export": {"checkpointClaim": "csm-checkpoint", "checkpoint": "/checkpoint"},
}
METRIC = re.compile(r"\b(?:nv|csm)_[a-z0-9_]+\b")


def profile_values(profile: str) -> dict:
    return yaml.safe_load(PROFILE_FILES[profile].read_text())


def merged(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render(values: dict | None = None) -> list[dict]:
    """Every object the chart renders (hooks included), as Helm's engine renders it."""
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    return {
        f"{o['kind']}/{o['metadata']['name']}": o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    }


def kserve(name: str) -> dict:
    return yaml.safe_load((KSERVE / name).read_text())


def kserve_container(name: str) -> dict:
    """A container of the ServingRuntime: kserve-container (Triton) or transformer-container (the front)."""
    return next(c for c in kserve("servingruntime.yaml")["spec"]["containers"] if c["name"] == name)


@pytest.fixture(scope="module", params=sorted(PROFILE_FILES))
def profile(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def rendered(profile) -> list[dict]:
    return render(profile_values(profile))


@pytest.fixture(scope="module")
def everything() -> list[dict]:
    return render(merged(profile_values("a100-80gb"), EVERYTHING))


@pytest.fixture(scope="module")
def triton(everything) -> dict:
    return by_kind(everything, "Deployment")[f"{FULLNAME}-triton"]["spec"]["template"]["spec"]


def validate(obj: dict) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


# --- the chart renders, lints and validates ---------------------------------------------
def test_profiles_are_the_three_gpus():
    assert set(PROFILE_FILES) == {"a100-40gb", "a100-80gb", "h100"}


def test_helm_lint_is_clean():
    for values in [None, *map(profile_values, PROFILE_FILES), merged(profile_values("h100"), EVERYTHING)]:
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        assert not report["errors"], report
        # INFO (severity 1) is only "icon is recommended"; warnings and errors fail.
        assert [m for m in report["messages"] if m["severity"] > 1] == [], report["messages"]


def test_every_rendered_object_is_valid_kubernetes(rendered):
    kinds = {o["kind"] for o in rendered}
    assert {
        "Deployment",
        "Service",
        "Job",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "ConfigMap",
        "NetworkPolicy",
    } <= kinds
    for obj in rendered:
        validate(obj)


def test_every_object_with_every_option_is_valid(everything):
    kinds = {o["kind"] for o in everything}
    assert {"Ingress", "HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds
    for obj in everything:
        if obj["kind"] == "ServiceMonitor":
            continue  # a CRD: the next test
        validate(obj)


def test_service_monitor_matches_the_prometheus_operator_crd(everything):
    (monitor,) = by_kind(everything, "ServiceMonitor").values()
    parsed = ServiceMonitor.model_validate(monitor)  # types and required fields of the CRD's schema
    # pydantic drops unknown fields; a round trip that loses one means the CRD has no such field.
    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == monitor
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    triton_service = by_kind(everything, "Service")[f"{FULLNAME}-triton"]
    assert "metrics" in {p["name"] for p in triton_service["spec"]["ports"]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= triton_service["metadata"]["labels"].items()


def test_a_mutable_image_tag_is_refused():
    with pytest.raises(helm.HelmError, match="immutable tag"):
        render({"image": {"tag": "latest"}})


@pytest.mark.parametrize(
    "values, field",
    [
        ({"profile": {"export": "a100-80gb"}}, "export"),  # a GPU profile where an export profile goes
        ({"autoscaling": {"minReplicas": 0}}, "minReplicas"),  # minutes of loading: never to zero
        ({"triton": {"extraServerFlags": ["log-verbose=1"]}}, "extraServerFlags"),
        ({"triton": {"service": {"type": "LoadBalancer"}}}, "type"),  # Triton is never published
        ({"service": {"type": "NodePort"}}, "service"),  # removed: one type for gateway and Triton
        ({"ingress": {"grpcHost": "grpc.example.com"}}, "grpcHost"),  # removed: Triton's gRPC on the Ingress
        ({"triton": {"podSecurityContext": {"runAsNonRoot": False}}}, "runAsNonRoot"),
    ],
)
def test_values_schema_refuses_mistakes(values, field):
    with pytest.raises(helm.HelmError, match=field):
        render(values)


def test_values_schema_knows_every_export_profile():
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["profile"]["properties"]["export"]["enum"]) == set(PROFILES)


def test_chart_defaults_are_the_a100_80gb_profile():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert merged(defaults, profile_values("a100-80gb")) == defaults


# --- the profiles match docs/model_config.md --------------------------------------------
def test_profiles_export_the_matching_configs(profile, rendered):
    values = profile_values(profile)
    expected = {"a100-40gb": "a100", "a100-80gb": "a100", "h100": "h100"}[profile]
    assert values["profile"]["export"] == expected and expected in PROFILES
    (job,) = by_kind(rendered, "Job").values()
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--profile") + 1] == expected
    assert command[command.index("--out") + 1] == CONTAINER_REPOSITORY


def test_profiles_state_the_committed_memory_fraction_and_documented_slots(profile, rendered):
    values = profile_values(profile)["profile"]
    committed = (ROOT / "model_repository" / "csm_lm" / "config.pbtxt").read_text()
    fraction = re.search(r'key: "gpu_memory_fraction" value: \{ string_value: "([0-9.]+)" \}', committed).group(1)
    assert values["gpuMemoryFraction"] == fraction
    # Memory alone would give more slots than max_slots on every one of these GPUs
    # (docs/model_config.md: ~400 on an A100 40 GB, ~850 on 80 GB), so the cap is what they get.
    max_slots = int(re.search(r'key: "max_slots" value: \{ string_value: "(\d+)" \}', committed).group(1))
    assert values["expectedKvSlots"] == max_slots
    annotations = by_kind(rendered, "Deployment")[f"{FULLNAME}-triton"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["csm-triton/expected-kv-slots"] == str(values["expectedKvSlots"])


def test_profiles_size_memory_and_shm(profile, rendered):
    pod = by_kind(rendered, "Deployment")[f"{FULLNAME}-triton"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    gib = lambda q: int(q.removesuffix("Gi"))  # noqa: E731
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    # /dev/shm is memory counted in the container's limit: the limit leaves room beyond it.
    assert gib(container["resources"]["limits"]["memory"]) >= gib(container["resources"]["requests"]["memory"]) + gib(
        shm["sizeLimit"]
    )
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == profile_values(profile)["profile"]["gpuProduct"]


# --- one source of server flags ---------------------------------------------------------
def container_environment(container: dict) -> dict:
    return {v["name"]: v["value"] for v in container.get("env", []) if "value" in v}


def test_triton_flags_are_every_other_deployments(rendered, tmp_path):
    (container,) = by_kind(rendered, "Deployment")[f"{FULLNAME}-triton"]["spec"]["template"]["spec"]["containers"]
    chart = container_launch(container["args"], tmp_path, container_environment(container))
    # On the pod's address (the NetworkPolicy decides who reaches it), the admin APIs keyed.
    assert chart == server_arguments(
        CONTAINER_REPOSITORY,
        model_control="none",
        gpu=True,
        exit_timeout=30,
        listen_address="0.0.0.0",
        model_control_key=TEST_KEY,
    )
    # ... the very flags compose's triton service gets.
    compose_triton = resolved()["services"]["triton"]
    assert chart == container_launch(compose_triton["command"], tmp_path, triton_environment(compose_triton))


def test_extra_server_flags_pass_through_server_arguments(tmp_path):
    objects = render({"triton": {"extraServerFlags": ["--log-verbose=1"], "gpu": False, "exitTimeoutSeconds": 45}})
    (container,) = by_kind(objects, "Deployment")[f"{FULLNAME}-triton"]["spec"]["template"]["spec"]["containers"]
    assert container_launch(container["args"], tmp_path, container_environment(container)) == server_arguments(
        CONTAINER_REPOSITORY,
        model_control="none",
        gpu=False,
        exit_timeout=45,
        extra=["--log-verbose=1"],
        listen_address="0.0.0.0",
        model_control_key=TEST_KEY,
    )


def test_kserve_runtime_flags_come_from_server_arguments(tmp_path):
    container = kserve_container("kserve-container")
    # HTTP and gRPC on the pod's loopback (only the front, in the same pod, reaches them).
    assert container_launch(container["args"], tmp_path, container_environment(container)) == server_arguments(
        "/mnt/models",
        http_port=8085,
        grpc_port=9000,
        metrics_port=8002,
        model_control="none",
        gpu=True,
        exit_timeout=30,
        listen_address="127.0.0.1",
        model_control_key=TEST_KEY,
        extra=["--metrics-address=0.0.0.0"],
    )


@pytest.mark.parametrize("token", ["s3cret", None])
@pytest.mark.parametrize("command", ["chart", "kserve"])
def test_the_secret_files_become_the_servers_environment(triton, tmp_path, token, command):
    container = triton["containers"][0] if command == "chart" else kserve_container("kserve-container")
    files = {"CSM_ADMIN_TOKEN": tmp_path / "admin-token", "CSM_MODEL_CONTROL_KEY": tmp_path / "model-control-key"}
    if token:
        for name, path in files.items():
            path.write_text(f"{token}-{name}\n")
    shell, flag, script, name = container["command"]
    result = subprocess.run(
        [shell, flag, script, name, "env"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **{f"{k}_FILE": str(v) for k, v in files.items()}},
    )
    assert result.returncode == 0, result.stderr
    environment = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    for variable in files:
        assert environment.get(variable) == (f"{token}-{variable}" if token else None)


# --- pods: GPU, shm, probes, shutdown, hardening, secrets -----------------------------------
def test_triton_pod_has_one_gpu_memory_shm_and_load_sized_probes(triton):
    (container,) = triton["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    shm = next(v for v in triton["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # compose's 10 min start period
    assert container["livenessProbe"]["exec"]["command"] == ["csm-triton-server", "check", "--url", "localhost:8000"]
    assert "--stop-server-on-dead-stub" not in container["livenessProbe"]["exec"]["command"]  # the kubelet restarts


def test_streams_get_time_to_finish(triton):
    (container,) = triton["containers"]
    args = container["args"]
    drain = int(args[args.index("--exit-timeout") + 1])
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert triton["terminationGracePeriodSeconds"] > pause + drain


def test_every_pod_is_non_root_read_only_without_capabilities(everything):
    for name, pod in pod_specs(everything).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, name


def test_secrets_are_files_never_environment_variables(everything):
    for name, pod in pod_specs(everything).items():
        for container in pod["containers"]:
            for variable in container.get("env", []):
                assert "valueFrom" not in variable, (name, variable)
                assert "TOKEN" not in variable["name"] or variable["name"].endswith("_FILE"), (name, variable)
    mounted = {
        v["secret"]["secretName"] for pod in pod_specs(everything).values() for v in pod["volumes"] if "secret" in v
    }
    assert mounted == {"csm-admin", "hf", "gateway-keys", "csm-model-control"}
    (triton,) = pod_specs(everything)[f"Deployment/{FULLNAME}-triton"]["containers"]
    env = {v["name"]: v["value"] for v in triton["env"]}
    assert env["CSM_MODEL_CONTROL_KEY_FILE"].startswith("/run/secrets/model-control/")  # serve.sh's key
    export = pod_specs(everything)[f"Job/{FULLNAME}-export"]["containers"][0]
    env = {v["name"]: v["value"] for v in export["env"]}
    assert env["HF_TOKEN_FILE"].startswith("/run/secrets/hf/")  # docker/export.sh reads it


def test_repository_is_exported_before_the_servers_and_mounted_read_only(everything, triton):
    (job,) = by_kind(everything, "Job").values()
    assert "pre-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][0] == "/opt/csm-triton/docker/export.sh"
    claim = by_kind(everything, "PersistentVolumeClaim")[f"{FULLNAME}-repository"]
    # The claim is a hook of an earlier weight, so it exists when the Job runs; kept on uninstall.
    assert int(claim["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (container,) = triton["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[CONTAINER_REPOSITORY]["readOnly"] is True
    # voice_dir "runtime/voices" resolves next to the repository, on the ReadWriteMany claim.
    assert mounts["/models/runtime/voices"]["name"] == "voices"
    voices = by_kind(everything, "PersistentVolumeClaim")[f"{FULLNAME}-voices"]
    assert voices["spec"]["accessModes"] == ["ReadWriteMany"]


def test_a_pre_exported_volume_needs_no_export():
    objects = render({"repository": {"existingClaim": "csm-exported"}, "export": {"enabled": False}})
    assert not by_kind(objects, "Job")
    assert f"{FULLNAME}-repository" not in by_kind(objects, "PersistentVolumeClaim")
    pod = by_kind(objects, "Deployment")[f"{FULLNAME}-triton"]["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert "csm-exported" in claims


# --- gateway, services, ingress, PDB ------------------------------------------------------
def test_gateway_is_its_own_deployment_on_tritons_grpc_service(everything):
    gateway = by_kind(everything, "Deployment")[f"{FULLNAME}-gateway"]["spec"]["template"]["spec"]
    (container,) = gateway["containers"]
    assert container["command"] == ["python3", "-m", "csm_servers.gateway"]
    args = container["args"]
    assert args[args.index("--triton-url") + 1] == f"{FULLNAME}-triton:8001"
    env = {v["name"]: v["value"] for v in container["env"]}
    assert env["CSM_GATEWAY_API_KEY_FILE"].startswith("/run/secrets/gateway/")
    assert env["CSM_ADMIN_TOKEN_FILE"].startswith("/run/secrets/csm/")
    services = by_kind(everything, "Service")
    assert {p["name"]: p["port"] for p in services[f"{FULLNAME}-triton"]["spec"]["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    assert services[f"{FULLNAME}-gateway"]["spec"]["ports"][0]["port"] == 7860


def test_front_is_its_own_deployment_on_tritons_http_service(everything):
    front = by_kind(everything, "Deployment")[f"{FULLNAME}-front"]["spec"]["template"]["spec"]
    (container,) = front["containers"]
    assert container["command"] == ["python3", "-m", "csm_servers.gateway.kserve_front"]
    args = container["args"]
    assert args[args.index("--triton-http") + 1] == f"{FULLNAME}-triton:8000"
    assert args[args.index("--port") + 1] == "8080"
    service = by_kind(everything, "Service")[f"{FULLNAME}-front"]
    assert service["spec"]["ports"][0]["port"] == 8080
    assert (
        service["spec"]["selector"].items()
        <= by_kind(everything, "Deployment")[f"{FULLNAME}-front"]["spec"]["template"]["metadata"]["labels"].items()
    )


def test_gateway_and_front_service_types_are_their_own():
    objects = render({"gateway": {"service": {"type": "LoadBalancer"}}, "front": {"service": {"type": "NodePort"}}})
    services = by_kind(objects, "Service")
    assert services[f"{FULLNAME}-gateway"]["spec"]["type"] == "LoadBalancer"
    assert services[f"{FULLNAME}-front"]["spec"]["type"] == "NodePort"
    assert services[f"{FULLNAME}-triton"]["spec"]["type"] == "ClusterIP"


def test_ingresses_route_the_gateway_and_front_with_stream_timeouts(everything):
    ingresses = by_kind(everything, "Ingress")
    assert set(ingresses) == {f"{FULLNAME}-gateway", f"{FULLNAME}-front"}
    for component, ingress in ((name.rsplit("-", 1)[1], i) for name, i in ingresses.items()):
        annotations = ingress["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
        assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
        (rule,) = ingress["spec"]["rules"]
        assert rule["http"]["paths"][0]["backend"]["service"] == {
            "name": f"{FULLNAME}-{component}",
            "port": {"name": "http"},
        }
    # Without a frontHost the front stays inside the cluster.
    default = render({"ingress": {"enabled": True}})
    assert set(by_kind(default, "Ingress")) == {f"{FULLNAME}-gateway"}


def test_disruption_budgets_cover_triton_and_the_gateway(everything):
    budgets = by_kind(everything, "PodDisruptionBudget")
    assert budgets[f"{FULLNAME}-triton"]["spec"]["maxUnavailable"] == 1
    deployments = by_kind(everything, "Deployment")
    for name, budget in budgets.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --- autoscaling ---------------------------------------------------------------------------
def adapter_rules(objects: list[dict]) -> list[dict]:
    configmap = by_kind(objects, "ConfigMap")[f"{FULLNAME}-adapter-rules"]
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"]


def adapter_metric_names(objects: list[dict]) -> set[str]:
    """The server's metrics the adapter rules query."""
    rules = adapter_rules(objects)
    return {
        name
        for rule in rules
        for field in ("seriesQuery", "metricsQuery")
        for name in METRIC.findall(re.sub(r'"[^"]*"', '""', rule[field]))
    } - {rule["name"]["as"] for rule in rules}


def adapter_models(objects: list[dict]) -> set[str]:
    """The models the adapter rules select by Triton's `model` label."""
    return {
        model for rule in adapter_rules(objects) for model in re.findall(r'\bmodel="([^"]+)"', rule["metricsQuery"])
    }


def test_hpa_scales_triton_on_metrics_the_adapter_rules_define(everything):
    (hpa,) = by_kind(everything, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-triton",
    }
    defined = {rule["name"]["as"] for rule in adapter_rules(everything)}
    used = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert used == {"csm_kv_slot_demand", "csm_queue_time_per_request_us"} and used <= defined
    triton = by_kind(everything, "Deployment")[f"{FULLNAME}-triton"]
    assert "replicas" not in triton["spec"]  # the HPA owns it


def test_adapter_rules_are_well_formed(everything):
    for rule in adapter_rules(everything):
        assert re.fullmatch(r"\^[a-z0-9_]+\$", rule["name"]["matches"])
        series = rule["seriesQuery"].split("{")[0].strip("'")
        assert re.fullmatch(rule["name"]["matches"], series)
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    assert adapter_metric_names(everything) == {
        "csm_kv_slots_in_use",
        "csm_requests_waiting",
        "csm_kv_slots_total",
        "nv_inference_queue_duration_us",
        "nv_inference_request_success",
    }


def test_autoscaling_without_adapter_rules_is_refused():
    with pytest.raises(helm.HelmError, match="prometheusAdapterRules"):
        render({"autoscaling": {"enabled": True}, "prometheusAdapterRules": {"enabled": False}})


# --- KServe ---------------------------------------------------------------------------------
def test_kserve_manifests_parse_and_the_core_ones_validate():
    for name in ("service.yaml", "hpa.yaml", "networkpolicy.yaml"):
        validate(kserve(name))


def test_kserve_runtime_pod_parts_are_valid_kubernetes():
    runtime = kserve("servingruntime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    spec = runtime["spec"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "runtime"},
        "spec": {key: spec[key] for key in ("containers", "volumes", "tolerations")},
    }
    validate(pod)
    # KServe merges the predictor (model, GPU) into kserve-container, Triton, and routes the
    # collocated transformer-container's port: the front's.
    assert [c["name"] for c in spec["containers"]] == ["kserve-container", "transformer-container"]
    triton, front = kserve_container("kserve-container"), kserve_container("transformer-container")
    assert front["ports"][0]["containerPort"] == 8080  # the port KServe routes (v2 REST)
    assert front["command"][:3] == ["python3", "-m", "csm_servers.gateway.kserve_front"]
    assert front["command"][front["command"].index("--triton-http") + 1] == "127.0.0.1:8085"
    assert spec["protocolVersions"] == ["v2"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]["medium"] == "Memory"
    for container in (triton, front):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["runAsNonRoot"] is True


def test_inference_service_uses_the_runtime_and_never_scales_to_zero():
    service = kserve("inferenceservice.yaml")
    runtime = kserve("servingruntime.yaml")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    predictor = service["spec"]["predictor"]
    assert predictor["minReplicas"] >= 1
    assert predictor["timeout"] >= 600
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert re.match(r"^(pvc|s3|gs|https?)://", model["storageUri"])
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert service["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    assert service["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    # ... so kserve/hpa.yaml is its autoscaler, on the chart's adapter metric.
    hpa = kserve("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{service['metadata']['name']}-predictor"
    assert (
        hpa["spec"]["minReplicas"] == predictor["minReplicas"]
        and hpa["spec"]["maxReplicas"] == predictor["maxReplicas"]
    )
    defined = {rule["name"]["as"] for rule in adapter_rules(render())}
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= defined
    extra = kserve("service.yaml")
    assert extra["spec"]["selector"] == {"serving.kserve.io/inferenceservice": service["metadata"]["name"]}
