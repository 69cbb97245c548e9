"""Smoke runs of the load tools against the test server, each as a user runs it: a 10 s
headless Locust run, a short perf_analyzer sweep, a streaming benchmark at small
concurrency. Each must finish without a failed request and report a sane figure."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from csm_triton import constants as C
from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the loadtest package lives beside src/, not in the venv
from loadtest import workload  # noqa: E402

ONE_SECOND_OF_AUDIO = workload.expected_samples(1.0) / workload.SAMPLE_RATE  # 13 frames = 1.04 s


def run_tool(arguments: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, workload.ADMIN_TOKEN_ENV: ADMIN_TOKEN, **env}
    result = subprocess.run(arguments, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{arguments[:4]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def server_arguments(triton_server) -> list[str]:
    return ["--http", triton_server.http_url, "--grpc", triton_server.grpc_url, "--model", "tiny"]


def loadtest_voices(triton_server) -> list[str]:
    voices = workload.list_voices(workload.TritonHTTP(triton_server.http_url))
    return [v["voice_id"] for v in voices if v["voice_id"].startswith(workload.VOICE_PREFIX)]


def test_the_workload_mirrors_the_constants_and_its_texts_are_varied():
    # workload.py is standard-library only (Locust may run without the project installed).
    assert (workload.SAMPLE_RATE, workload.FRAME_RATE_HZ) == (C.SAMPLE_RATE, C.FRAME_RATE_HZ)
    assert (workload.ADMIN_TOKEN_HEADER, workload.ADMIN_TOKEN_ENV) == (C.ADMIN_TOKEN_HEADER, "CSM_ADMIN_TOKEN")
    assert all(C.VOICE_ID_PATTERN.match(r.voice_id) for r in workload.load_references())
    texts = workload.load_texts()
    assert len(texts) >= 20
    assert min(map(len, texts)) <= 20 and max(map(len, texts)) >= 300  # commands and paragraphs
    assert sum(any(c.isdigit() for c in t) for t in texts) >= 5
    assert sum(any(ord(c) > 127 for c in t) for t in texts) >= 5
    assert all(C.MIN_REFERENCE_SECONDS <= r.seconds <= C.MAX_REFERENCE_SECONDS for r in workload.load_references())
    assert all(len(t) <= C.MAX_TEXT_CHARS for t in texts)


def test_locust_headless_run(triton_server, tmp_path):
    prefix = tmp_path / "locust"
    locust = Path(sys.executable).parent / "locust"
    run_tool(
        [
            str(locust),
            "-f",
            "loadtest/locustfile.py",
            "--host",
            f"http://{triton_server.http_url}",
            "--headless",
            "--users",
            "3",
            "--spawn-rate",
            "3",
            "--run-time",
            "10s",
            "--stop-timeout",
            "30",
            "--csv",
            str(prefix),
            "--only-summary",
        ],
        timeout=80,
        CSM_LOCUST_MAX_AUDIO_SECONDS="1",
        CSM_LOCUST_WAIT="0.1,0.3",
        CSM_LOCUST_MODEL="tiny",
    )

    with open(f"{prefix}_stats.csv", newline="") as handle:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}
    total = rows[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0 and int(total["Request Count"]) >= 4
    assert int(rows[("POST", "csm_tts stored voice")]["Request Count"]) >= 1
    audio = [row for (kind, _), row in rows.items() if kind == "AUDIO"]
    assert audio and all(
        float(row["Average Response Time"]) == pytest.approx(ONE_SECOND_OF_AUDIO * 1000) for row in audio
    )
    rtf = [float(row["Average Response Time"]) / 1000 for (kind, _), row in rows.items() if kind == "RTF"]
    assert rtf and all(0.01 < value < 30 for value in rtf)

    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    assert summary["failures"] == 0 and summary["audio_seconds"] > 0 and summary["aggregate_x_real_time"] > 0
    assert loadtest_voices(triton_server) == [], "the run deletes the voices it registered"


def test_perf_analyzer_sweep(triton_server, tmp_path):
    run_tool(
        [
            sys.executable,
            "-m",
            "loadtest.perf_analyzer.sweep",
            *server_arguments(triton_server),
            "--scenarios",
            "mimi_decoder_4f,csm_tts_stream_grpc",
            "--concurrency",
            "1,2",
            "--no-warmup",
            "--no-stable",
            "--decoder-requests-per-client",
            "10",
            "--tts-requests-per-client",
            "1",
            "--max-audio-seconds",
            "1",
            "--out",
            str(tmp_path),
        ],
        timeout=120,
    )

    report = json.loads((tmp_path / "perf_analyzer_tiny_cpu.json").read_text())
    runs = {(run["scenario"], run["concurrency"]): run for run in report["runs"]}
    assert set(runs) == {(s, c) for s in ("mimi_decoder_4f", "csm_tts_stream_grpc") for c in (1, 2)}
    assert all(run["failures"] == 0 and "error" not in run for run in runs.values())
    assert runs[("mimi_decoder_4f", 1)]["requests"] == 10 and runs[("mimi_decoder_4f", 2)]["requests"] == 20
    assert all(runs[("mimi_decoder_4f", c)]["throughput_per_s"] > 5 for c in (1, 2))  # one decode is ~10 ms
    stream = runs[("csm_tts_stream_grpc", 1)]
    assert 0 < stream["ttfa_ms"]["p50"] < stream["latency_ms"]["p50"]
    with open(tmp_path / "perf_analyzer_tiny_cpu.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert loadtest_voices(triton_server) == []


def test_streaming_benchmark(triton_server, tmp_path):
    run_tool(
        [
            sys.executable,
            "-m",
            "loadtest.bench",
            *server_arguments(triton_server),
            "--concurrency",
            "1,2",
            "--requests-per-client",
            "1",
            "--max-audio-seconds",
            "1",
            "--out",
            str(tmp_path),
        ],
        timeout=120,
    )

    report = json.loads((tmp_path / "bench_stream_tiny_cpu.json").read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["failures"] == 0 and level["requests"] == level["concurrency"]
        assert 0 < level["ttfa_ms"]["p50"] < level["latency_ms"]["p50"]
        assert level["audio_seconds"] == pytest.approx(ONE_SECOND_OF_AUDIO * level["requests"])
        assert level["aggregate_x_real_time"] > 0
        served = {row["model"]: row for row in level["triton"]}
        assert (
            served["csm_lm"]["requests"] == level["requests"]
            and served["mimi_decoder"]["requests"] >= level["requests"]
        )
    assert report["commit"] and report["command"].startswith("python -m loadtest.bench")
    for plot in ("latency", "throughput"):
        assert (tmp_path / f"bench_stream_tiny_cpu_{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "noise" in (tmp_path / "bench_stream_tiny_cpu.md").read_text()


def test_soak_smoke(triton_server, tmp_path):
    # A few seconds of the mix against the test server (a remote server to the tool: no
    # RSS sampling here; `make soak` starts its own and samples every process).
    run_tool(
        [
            sys.executable,
            "-m",
            "loadtest.soak",
            *server_arguments(triton_server),
            "--duration",
            "6s",
            "--warmup",
            "2s",
            "--clients",
            "2",
            "--max-audio-seconds",
            "0.5",
            "--out",
            str(tmp_path),
        ],
        timeout=180,
    )

    report = json.loads((tmp_path / "soak_tiny_cpu.json").read_text())
    assert report["failures"] == 0 and report["requests"] >= 2
    assert sum(kind["requests"] for kind in report["per_kind"].values()) == report["requests"]
    assert "requests, 0 failures" in (tmp_path / "soak_tiny_cpu.md").read_text()
    assert loadtest_voices(triton_server) == []  # the soak's own voices are deleted again
