"""Locust load test of csm_tts through Triton's HTTP endpoint (KServe v2 JSON).

    make locust USERS=4 DURATION=60s      # headless, CSV under build/locust/ (LOCUST_CSV=...)
    make locust-ui                        # web UI on http://127.0.0.1:8089, this machine only
    locust -f loadtest/locustfile.py --host http://localhost:8000 --headless -u 4 -r 4 -t 60s --csv out/run

Each user picks, by weight: csm_tts with a stored voice (6), csm_tts with inline
reference audio (2), voice_list (1). Texts come from data/texts.txt; each request asks
for about as much audio as its text takes to say (MAX_AUDIO_SECONDS, at most
CSM_LOCUST_MAX_AUDIO_SECONDS, default 10). AUDIO comes back as binary (the JSON header
tells its shape).

At test start the clips in data/ are registered as stored voices with the admin token
from CSM_ADMIN_TOKEN, else from the file CSM_ADMIN_TOKEN_FILE names, else from make
serve's development token (build/runtime/admin-token): `make serve` then `make locust`
needs nothing else. Voices already there are reused; those this run registered are
deleted when it stops. The token goes only to the host Locust was started with (--host
or LOCUST_HOST; without one, a loopback host): a host typed into the web UI's form gets
the load but not the token, and the stored-voice requests fail with the reason
(token_host.py).

Custom metrics, as rows of their own (kept out of the Aggregated row):
- AUDIO "<task> audio ms": the audio each answer carried, in milliseconds;
- RTF "<task> real-time factor x1000": response time / audio duration, x1000 (under
  1000 is faster than real time).
At the end Locust prints the audio generated and the aggregate x real time; with --csv
it also writes <prefix>_summary.json and <prefix>_summary.md (machine, commit, command).

Environment: CSM_ADMIN_TOKEN (or CSM_ADMIN_TOKEN_FILE), CSM_LOCUST_MAX_AUDIO_SECONDS, CSM_LOCUST_WAIT ("min,max"
seconds between a user's tasks, default "0.5,1.5"), CSM_LOCUST_MODEL (tiny or full:
the label of the served model in the summary).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from pathlib import Path

from locust import FastHttpUser, between, events, task
from locust.runners import WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))  # workload.py, however locust was started
import token_host
import workload

LOG = logging.getLogger("csm-locust")
MAX_AUDIO_SECONDS = float(os.environ.get("CSM_LOCUST_MAX_AUDIO_SECONDS", "10"))
WAIT_SECONDS = [float(value) for value in os.environ.get("CSM_LOCUST_WAIT", "0.5,1.5").split(",")]
TEXTS = workload.load_texts()
REFERENCES = workload.load_references()
# Serialised once: a reference clip is ~60k floats of JSON.
REFERENCE_JSON = [json.dumps(workload.reference_inputs(reference)) for reference in REFERENCES]
JSON_HEADERS = {"Content-Type": "application/json"}


class Run:
    """What test_start learnt (module state: every user of this process shares it)."""

    voice_ids: list[str] = []
    created: list[str] = []
    started_host: str | None = None  # --host / LOCUST_HOST when Locust started: the token's only destination
    token_host: str | None = None  # where `created` were registered, so where they are deleted
    setup_error = ""
    load_before = 0.0  # 1-minute load average at test start: was the machine busy already?


def request_body(
    text: str, audio_seconds: float, voice_id: str | None = None, reference_json: str | None = None
) -> bytes:
    inputs = [json.dumps(item) for item in workload.tts_inputs(text, audio_seconds, random.randrange(2**31), voice_id)]
    if reference_json is not None:
        inputs.append(reference_json[1:-1])  # the items of the serialised list
    outputs = json.dumps(workload.AUDIO_AS_BINARY)
    return f'{{"inputs": [{", ".join(inputs)}], "outputs": {outputs}}}'.encode()


def record_audio(environment, task_name: str, audio_seconds: float, elapsed: float, size: int) -> None:
    """The custom metrics: logged straight into stats entries of their own, so the
    Aggregated row still counts only real requests."""
    environment.stats.get(f"{task_name} audio ms", "AUDIO").log(audio_seconds * 1000, size)
    environment.stats.get(f"{task_name} real-time factor x1000", "RTF").log(elapsed / audio_seconds * 1000, 0)


class CsmTtsUser(FastHttpUser):
    wait_time = between(*WAIT_SECONDS)
    network_timeout = workload.TIMEOUT_SECONDS
    connection_timeout = 30.0

    @task(6)
    def tts_stored_voice(self):
        if not Run.voice_ids:
            with self.client.post(
                "/v2/models/csm_tts/infer",
                name="csm_tts stored voice",
                catch_response=True,
                data=b"{}",
                headers=JSON_HEADERS,
            ) as response:
                response.failure(f"no stored voice to use: {Run.setup_error}")
            return
        self.speak("csm_tts stored voice", voice_id=random.choice(Run.voice_ids))

    @task(2)
    def tts_inline_reference(self):
        self.speak("csm_tts inline reference", reference_json=random.choice(REFERENCE_JSON))

    @task(1)
    def voice_list(self):
        with self.client.post(
            "/v2/models/voice_list/infer",
            data=b'{"inputs": []}',
            headers=JSON_HEADERS,
            name="voice_list",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(error_message(response))
                return
            voices = json.loads(response.json()["outputs"][0]["data"][0])
            if not isinstance(voices, list):
                response.failure(f"VOICES is not a JSON list: {voices!r:.100}")

    def speak(self, name: str, voice_id: str | None = None, reference_json: str | None = None) -> None:
        text = random.choice(TEXTS)
        audio_seconds = workload.audio_seconds_for(text, MAX_AUDIO_SECONDS)
        body = request_body(text, audio_seconds, voice_id, reference_json)
        started = time.perf_counter()
        with self.client.post(
            "/v2/models/csm_tts/infer", data=body, headers=JSON_HEADERS, name=name, catch_response=True
        ) as response:
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                response.failure(error_message(response))
                return
            try:
                samples = workload.audio_samples_in(
                    response.content, response.headers.get("Inference-Header-Content-Length")
                )
            except (ValueError, KeyError) as error:
                response.failure(f"unreadable answer: {error}")
                return
            if not 0 < samples <= workload.expected_samples(audio_seconds):
                response.failure(f"{samples} samples of audio for MAX_AUDIO_SECONDS={audio_seconds}")
                return
            record_audio(self.environment, name, samples / workload.SAMPLE_RATE, elapsed, samples * 4)


def error_message(response) -> str:
    try:
        return f"HTTP {response.status_code}: {response.json()['error']}"
    except Exception:  # noqa: BLE001 - not Triton's JSON error (connection error, proxy page)
        return f"HTTP {response.status_code}: {str(response.error or response.text)[:200]}"


@events.init.add_listener
def remember_host(environment, **_kwargs):
    """The host given at start, before the web UI's form can change environment.host."""
    Run.started_host = environment.host


@events.test_start.add_listener
def register_voices(environment, **_kwargs):
    """On every node (master and workers alike): each needs the ids; registering is idempotent."""
    Run.load_before = os.getloadavg()[0]
    host = environment.host or "http://localhost:8000"
    refusal = token_host.token_refusal(host, Run.started_host)
    if refusal:
        Run.voice_ids, Run.setup_error = [], f"not registering voices (the admin token stays here): {refusal}"
        LOG.error("stored voices: %s", Run.setup_error)
        return
    token = workload.admin_token()
    created: list[str] = []
    try:
        http = workload.TritonHTTP(host, timeout=120)
        Run.voice_ids, created = workload.register_voices(http, REFERENCES, token)
        Run.setup_error = "" if Run.voice_ids else f"none registered: {workload.no_token_reason()}"
    except Exception as error:  # noqa: BLE001 - reported by every stored-voice request
        Run.voice_ids, Run.setup_error = [], f"registering the voices failed: {error}"
    Run.created, Run.token_host = Run.created + created, host
    if Run.setup_error:
        LOG.error("stored voices: %s", Run.setup_error)
    else:
        LOG.info("stored voices %s (registered now: %s)", Run.voice_ids, created or "none")


@events.test_stop.add_listener
def delete_voices(environment, **_kwargs):
    if Run.created and Run.token_host:
        http = workload.TritonHTTP(Run.token_host, timeout=60)
        workload.delete_voices(http, Run.created, workload.admin_token())
        Run.created = []


def summary(environment) -> dict:
    stats = environment.stats
    audio = [entry for entry in stats.entries.values() if entry.method == "AUDIO"]
    rtf = [entry for entry in stats.entries.values() if entry.method == "RTF"]
    audio_seconds = sum(entry.total_response_time for entry in audio) / 1000
    elapsed = max(1e-9, (stats.total.last_request_timestamp or time.time()) - stats.total.start_time)
    return {
        "host": environment.host,
        "model": os.environ.get("CSM_LOCUST_MODEL", "unknown"),
        "machine": workload.machine(),
        "commit": workload.commit(),
        "command": workload.command_line(),
        "contention": f"1-minute load average {Run.load_before:.2f} at the start" if Run.load_before >= 0.5 else None,
        "users": environment.runner.target_user_count if environment.runner else None,
        "requests": stats.total.num_requests,
        "failures": stats.total.num_failures,
        "requests_per_second": round(stats.total.num_requests / elapsed, 3),
        "wall_seconds": round(elapsed, 1),
        "audio_seconds": round(audio_seconds, 2),
        "aggregate_x_real_time": round(audio_seconds / elapsed, 3),
        "real_time_factor": {
            entry.name.replace(" real-time factor x1000", ""): {
                "median": entry.get_response_time_percentile(0.5) / 1000,
                "p95": entry.get_response_time_percentile(0.95) / 1000,
            }
            for entry in rtf
            if entry.num_requests
        },
        "latency_ms": {
            entry.name: {
                "median": entry.get_response_time_percentile(0.5),
                "p95": entry.get_response_time_percentile(0.95),
                "p99": entry.get_response_time_percentile(0.99),
                "requests": entry.num_requests,
                "failures": entry.num_failures,
            }
            for entry in stats.entries.values()
            if entry.method == "POST"
        },
    }


def summary_markdown(report: dict) -> str:
    lines = [
        "# Locust: csm_tts over HTTP (KServe v2 JSON)",
        "",
        f"- host: {report['host']}; model: {report['model']}; machine: {report['machine']}",
        f"- commit: `{report['commit']}`",
        f"- command: `{report['command']}`",
        *([f"- **measured under contention**: {report['contention']}"] if report["contention"] else []),
        f"- {report['users']} users, {report['wall_seconds']} s: {report['requests']} requests, "
        f"{report['failures']} failures, {report['requests_per_second']} requests/s",
        f"- audio generated: {report['audio_seconds']} s = **{report['aggregate_x_real_time']}x real time** "
        "(audio seconds per wall second, all users together)",
        "",
        "| request | requests | failures | median ms | p95 ms | p99 ms | real-time factor median / p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in sorted(report["latency_ms"].items()):
        rtf = report["real_time_factor"].get(name)
        rtf_text = f"{rtf['median']:.2f} / {rtf['p95']:.2f}" if rtf else "-"
        lines.append(
            f"| {name} | {row['requests']} | {row['failures']} | {row['median']} | {row['p95']} | "
            f"{row['p99']} | {rtf_text} |"
        )
    if report["model"] == "tiny":
        lines += [
            "",
            "The tiny random-weight model's audio is noise and never ends early: every request "
            "generates exactly its MAX_AUDIO_SECONDS. The figures measure the serving path, not speech.",
        ]
    return "\n".join(lines) + "\n"


@events.quitting.add_listener
def report(environment, **_kwargs):
    if isinstance(environment.runner, WorkerRunner):
        return
    result = summary(environment)
    LOG.info(
        "audio: %.1f s in %.1f s = %.3fx real time; %d requests, %d failures",
        result["audio_seconds"],
        result["wall_seconds"],
        result["aggregate_x_real_time"],
        result["requests"],
        result["failures"],
    )
    prefix = getattr(environment.parsed_options, "csv_prefix", None) if environment.parsed_options else None
    if prefix:
        Path(f"{prefix}_summary.json").write_text(json.dumps(result, indent=2) + "\n")
        Path(f"{prefix}_summary.md").write_text(summary_markdown(result))
