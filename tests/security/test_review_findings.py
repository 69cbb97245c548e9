"""Ways in found by a review of the gateway and front hardening, each closed:

- JSON bodies of many small values: a 600 KB /v1/audio/speech body (or /clone-voice
  `context` field) of `[0,0,...]` made pydantic build one error per element (~0.5 GB,
  seconds on the event loop), and a body of `{}`s made json.loads build ~20x its size
  in objects. Bodies are now refused from their number of JSON values, before parsing.
- The KServe front ran uvicorn without a header deadline: a client that sends its
  headers a byte at a time, or nothing at all, kept its connection for ever.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest

from csm_clients.gateway.guard import GatewayLimits
from csm_triton.serving.process import free_ports

from .test_gateway_limits import SMALL_UPLOAD, Served, unreachable_triton

pytestmark = pytest.mark.security
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def open_gateway():
    """No keys: the default, where anyone reaching the gateway may speak."""
    with Served(unreachable_triton(), limits=GatewayLimits(max_upload_bytes=8 * SMALL_UPLOAD)) as gateway:
        yield gateway


def peak_of(request) -> tuple[httpx.Response, float, int]:
    tracemalloc.start()
    started = time.monotonic()
    try:
        response = request()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return response, time.monotonic() - started, peak


SPEECH = {"model": "csm-1b", "input": "Hi.", "voice": "alloy"}
MANY = 300_000


@pytest.mark.parametrize("field, value, param", [
    ("context", [0] * MANY, "context"),  # one pydantic error per element
    ("voice", {f"k{i}": 0 for i in range(MANY)}, "voice"),  # one per value of the dict
    ("context", [{f"k{i}": 0 for i in range(MANY)}], "context"),  # one per extra key of a turn
    ("ignored", [{}] * 3_000_000, "ignored"),  # no error at all: json.loads' objects alone
])
def test_a_speech_body_of_many_json_values_is_refused_before_it_is_parsed(open_gateway, field, value, param):
    body = json.dumps({**SPEECH, field: value}, separators=(",", ":")).encode()
    assert len(body) < GatewayLimits(max_upload_bytes=8 * SMALL_UPLOAD).body_limit("POST", "/v1/audio/speech")
    response, seconds, peak = peak_of(lambda: httpx.post(
        f"{open_gateway.url}/v1/audio/speech", content=body, headers={"content-type": "application/json"},
        timeout=120))
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert "JSON values" in error["message"], error
    assert peak < 4 * len(body) + 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a {len(body) >> 20} MiB body"
    assert seconds < 3


def test_a_clone_voice_context_of_many_json_values_is_refused_before_it_is_parsed(open_gateway):
    context = "[" + ",".join(["0"] * MANY) + "]"  # 600 KB: under Starlette's 1 MB per form field
    form = {"text": (None, "Hi."), "context": (None, context)}  # multipart, as the page sends it
    response, seconds, peak = peak_of(lambda: httpx.post(f"{open_gateway.url}/clone-voice", files=form, timeout=120))
    assert response.status_code == 400 and "JSON values" in response.json()["detail"], response.text[:300]
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB allocated"
    assert seconds < 3


def test_an_ordinary_speech_body_with_context_still_reaches_triton(open_gateway):
    body = {**SPEECH, "voice": {"id": "alloy"}, "speaker": 1,
            "context": [{"voice": f"v{i}", "speaker": i % 2} for i in range(16)]}
    response = httpx.post(f"{open_gateway.url}/v1/audio/speech", json=body, timeout=60)
    assert response.status_code == 503, response.text  # past every check, on to the (absent) Triton


# --- the front: a deadline for the request head --------------------------------------------------
@pytest.fixture(scope="module")
def front_url():
    """The front as deployed (`python -m csm_clients.gateway.kserve_front`), a 1 s header deadline."""
    port = free_ports(1)[0]
    process = subprocess.Popen([sys.executable, "-m", "csm_clients.gateway.kserve_front", "--triton-http",
                                unreachable_triton(), "--port", str(port), "--header-timeout-s", "1"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/v2/health/live", timeout=1)
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline, "the front did not start"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def closed_within(connection: socket.socket, seconds: float, dribble: bytes | None) -> bool:
    started = time.monotonic()
    connection.settimeout(0.2)
    while time.monotonic() - started < seconds:
        try:
            if dribble:
                connection.sendall(dribble)
            if connection.recv(1) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


@pytest.mark.parametrize("dribble", [b"X-Slow: 1\r\n", None])
def test_the_front_cuts_off_a_client_that_does_not_finish_its_headers(front_url, dribble):
    host, port = front_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        if dribble:
            connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: front\r\n")
        assert closed_within(connection, 5, dribble), "the connection is still open after 5 s"
    assert httpx.get(f"{front_url}/v2/health/live", timeout=30).status_code == 503, "others are served"
