"""Monitoring: the Prometheus config and the provisioned Grafana dashboard parse, point
at what compose runs, and name only metrics (and labels, and models) that the server
really exports: a scrape of the test server after a csm_tts request.

GPU metrics are not exported by a server without a GPU. Those the dashboard uses must
be names Triton documents as GPU metrics (GPU_METRICS below); where the scrape has
GPU metrics (a GPU machine), they are checked against the scrape like the rest.
"""

from __future__ import annotations

import json
import queue
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http
import yaml

from csm_triton import constants as C

from .conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "csm-triton.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "csm-triton.json"

# Triton's GPU metric families and their label, as its metrics guide lists them
# (docs/user_guide/metrics.md, "GPU Metrics", Triton 2.51 through 2.62 = NGC 25.10).
GPU_METRICS = {
    "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage",
    "nv_gpu_power_limit",
    "nv_energy_consumption",
}
GPU_LABEL = "gpu_uuid"
# What the brief for the dashboard asks it to show, by the metrics that carry it.
REQUIRED = {
    "throughput": "nv_inference_request_success",
    "queue time": "nv_inference_queue_duration_us",
    "GPU use": "nv_gpu_utilization",
    "active streams": "csm_active_streams",
    "audio seconds": "csm_audio_seconds_total",
    "real-time factor": "csm_generation_seconds_total",
    "prefix-cache hit rate": "csm_prefix_cache_hits_total",
    "time to first frame": "csm_time_to_first_frame_seconds_bucket",
}
METRIC_NAME = re.compile(r"\b(?:nv|csm)_[a-z0-9_]+\b")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(server) -> list[tuple[str, dict[str, str], float]]:
    """(metric name, labels, value) of every sample in a scrape."""
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            found.append((match.group(1), dict(LABEL.findall(match.group(2) or "")), float(match.group(3))))
    return found


def scrape(server) -> dict[str, list[dict[str, str]]]:
    """metric name -> the label sets of its samples."""
    series: dict[str, list[dict[str, str]]] = {}
    for name, labels, _ in samples(server):
        series.setdefault(name, []).append(labels)
    return series


def engine_values(server, names) -> dict[str, float]:
    """csm_lm's value of each metric (summed over devices)."""
    values = dict.fromkeys(names, 0.0)
    for name, labels, value in samples(server):
        if name in values and labels.get("model") == "csm_lm":
            values[name] += value
    return values


def infer_inputs(**arrays) -> list:
    inputs = []
    for name, array in arrays.items():
        array = np.asarray(array)
        datatype = "BYTES" if array.dtype == object else {"float32": "FP32", "int32": "INT32"}[array.dtype.name]
        tensor = http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@pytest.fixture(scope="module")
def exported(triton_server, http_client):
    # Per-model metrics exist from the model's load; a request makes sure the request
    # and engine metrics have moved past their initial values.
    inputs = infer_inputs(
        TEXT=np.array([b"Metrics, please."], dtype=object), MAX_AUDIO_SECONDS=np.array([0.5], np.float32)
    )
    audio = http_client.infer("csm_tts", inputs).as_numpy("AUDIO")
    assert audio.size > 0
    series = scrape(triton_server)
    successes = [s for s in series.get("nv_inference_request_success", []) if s.get("model") == "csm_tts"]
    assert successes, "nv_inference_request_success has no csm_tts series"
    return series


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found += [panel] + panel.get("panels", [])  # a collapsed row holds its panels
    return [p for p in found if p.get("type") != "row"]


def expressions(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]


def metric_names(expr: str) -> list[str]:
    return METRIC_NAME.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr))  # not inside label values


def labels_used(expr: str) -> set[str]:
    """Label names in `by (...)`/`without (...)` clauses and `{label=...}` matchers."""
    names = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        names |= {name.strip() for name in group.split(",") if name.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return names


def test_prometheus_config_scrapes_triton_where_compose_runs_it():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "triton"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == ["triton:8002"]  # the compose service and Triton's metrics port
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "triton" in compose["services"]
    assert (
        "./monitoring/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in compose["services"]["prometheus"]["volumes"]
    )


def test_grafana_provisioning_parses_and_matches_the_dashboard(dashboard):
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


def test_dashboard_shows_what_operators_need(dashboard):
    named = {name for expr in expressions(dashboard) for name in metric_names(expr)}
    missing = {what: metric for what, metric in REQUIRED.items() if metric not in named}
    assert not missing, f"the dashboard shows nothing of {missing}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"]
    for expr in expressions(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_every_metric_the_dashboard_names_is_exported(dashboard, exported):
    gpu_exported = any(name.startswith("nv_gpu_") for name in exported)
    for expr in expressions(dashboard):
        for name in metric_names(expr):
            if name in GPU_METRICS and not gpu_exported:
                continue  # documented GPU metric, not exported by a server without a GPU
            assert name in exported, (
                f"{name} (in {expr!r}) is not exported; the server exports "
                f"{sorted(n for n in exported if n.startswith(('nv_', 'csm_')))}"
            )


def test_gpu_metrics_used_are_documented_triton_names(dashboard):
    for expr in expressions(dashboard):
        for name in metric_names(expr):
            if name.startswith(("nv_gpu_", "nv_energy_")):
                assert name in GPU_METRICS, f"{name} is not one of Triton's GPU metrics"


def test_labels_and_models_the_dashboard_filters_on_exist(dashboard, exported, served_models):
    for expr in expressions(dashboard):
        names = metric_names(expr)
        for label in labels_used(expr):
            if (
                all(name in GPU_METRICS for name in names)
                and label == GPU_LABEL
                and "nv_gpu_utilization" not in exported
            ):
                continue
            carried = [name for name in names if any(label in sample for sample in exported.get(name, []))]
            assert carried, f"no metric of {expr!r} carries the label {label!r}"
        for alternatives in re.findall(r'model=~"([^"]+)"', expr):
            for model in alternatives.split("|"):
                assert model in served_models, f"{expr!r} filters on {model!r}, which is not a served model"


def test_engine_metrics_carry_the_model_and_device_labels(exported):
    # One series per engine: with several GPUs, the device label keeps them apart.
    for name in (
        "csm_active_streams",
        "csm_kv_slots_in_use",
        "csm_kv_slots_total",
        "csm_requests_waiting",
        "csm_audio_seconds_total",
        "csm_generation_seconds_total",
        "csm_last_real_time_factor",
        "csm_prefix_cache_hits_total",
        "csm_prefix_cache_misses_total",
        "csm_time_to_first_frame_seconds_count",
    ):
        series = exported.get(name, [])
        assert {"model": "csm_lm", "device": "cpu"} in series, f"{name} has no csm_lm series per device: {series}"


def test_a_stored_voice_misses_the_prefix_cache_once_then_hits_and_first_frames_are_timed(triton_server, http_client):
    t = np.arange(int(1.5 * C.SAMPLE_RATE)) / C.SAMPLE_RATE
    reference = (0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.2 * t))).astype(np.float32)
    http_client.infer(
        "voice_register",
        infer_inputs(
            VOICE_ID=np.array([b"monitoring-voice"], dtype=object),
            REFERENCE_AUDIO=reference,
            REFERENCE_SAMPLE_RATE=np.array([C.SAMPLE_RATE], np.int32),
            REFERENCE_TEXT=np.array([b"A voice for the metrics."], dtype=object),
        ),
        headers={C.ADMIN_TOKEN_HEADER: ADMIN_TOKEN},
    )
    names = (
        "csm_prefix_cache_hits_total",
        "csm_prefix_cache_misses_total",
        "csm_time_to_first_frame_seconds_count",
        "csm_time_to_first_frame_seconds_sum",
    )
    before = engine_values(triton_server, names)
    for words in (b"First with this voice.", b"Second with the same voice."):
        http_client.infer(
            "csm_tts",
            infer_inputs(
                TEXT=np.array([words], dtype=object),
                VOICE_ID=np.array([b"monitoring-voice"], dtype=object),
                MAX_AUDIO_SECONDS=np.array([0.3], np.float32),
            ),
        )
    after = engine_values(triton_server, names)
    grown = {name: after[name] - before[name] for name in names}
    assert grown["csm_prefix_cache_misses_total"] >= 1, grown  # the voice's first request
    assert grown["csm_prefix_cache_hits_total"] >= 1, grown  # the same voice again
    assert grown["csm_time_to_first_frame_seconds_count"] >= 2, grown
    assert grown["csm_time_to_first_frame_seconds_sum"] > 0, grown


CAPACITY = ("csm_kv_slots_in_use", "csm_kv_slots_total", "csm_requests_waiting", "csm_active_streams")


def poll(server, until, timeout: float) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Scrapes csm_lm's capacity gauges until `until(values)` holds or `timeout` passes:
    (the last values, every scrape)."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        values = engine_values(server, CAPACITY)
        seen.append(values)
        if until(values) or time.monotonic() > deadline:
            return values, seen
        time.sleep(0.2)


def test_capacity_gauges_are_live_while_requests_run(triton_server):
    """More long streams than the cpu profile's 4 KV slots: while they run (not only
    when one arrives or ends) a scrape shows every slot in use and requests waiting,
    and once they are cancelled the gauges fall back to idle."""
    slots = int(engine_values(triton_server, ["csm_kv_slots_total"])["csm_kv_slots_total"])
    assert slots == 4, "the cpu profile's csm_lm max_slots"
    streams = []
    try:
        for number in range(slots + 3):
            client = grpc.InferenceServerClient(triton_server.grpc_url)
            answers: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error, answers=answers: answers.put(error))
            inputs = []
            for name, value, datatype in (
                ("TEXT", np.array([f"Stream {number}, long.".encode()], object), "BYTES"),
                ("MAX_AUDIO_SECONDS", np.array([60.0], np.float32), "FP32"),
            ):
                tensor = grpc.InferInput(name, list(value.shape), datatype)
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
            client.async_stream_infer("csm_tts_stream", inputs)
            streams.append((client, answers))

        def full(v):  # (active = in use + waiting: the three are set together)
            return (
                v["csm_kv_slots_in_use"] == slots
                and v["csm_requests_waiting"] > 0
                and v["csm_active_streams"] == slots + v["csm_requests_waiting"]
            )

        values, seen = poll(triton_server, full, timeout=30)
        assert values["csm_kv_slots_in_use"] == values["csm_kv_slots_total"] == slots, seen[-5:]
        assert values["csm_requests_waiting"] > 0 and full(values), seen[-5:]
        # A second later, mid-generation, with nothing arriving or ending: still the truth.
        time.sleep(1.0)
        later = engine_values(triton_server, CAPACITY)
        assert later["csm_kv_slots_in_use"] == slots and later["csm_requests_waiting"] > 0, later
        errors = [answers.get_nowait() for _, answers in streams if not answers.empty()]
        assert not [error for error in errors if error is not None], errors
    finally:
        for client, _ in streams:
            client.stop_stream(cancel_requests=True)
            client.close()
    idle, seen = poll(triton_server, lambda v: v["csm_active_streams"] == 0, timeout=30)
    assert idle["csm_kv_slots_in_use"] == idle["csm_requests_waiting"] == idle["csm_active_streams"] == 0, seen[-5:]
