"""Ways in found by a review of the gateway and front hardening, each closed:

- JSON bodies of many small values: a 600 KB /v1/audio/speech body (or /clone-voice
  `context` field) of `[0,0,...]` made pydantic build one error per element (~0.5 GB,
  seconds on the event loop), and a body of `{}`s made json.loads build ~20x its size
  in objects. Bodies are now refused from their number of JSON values, before parsing.
- The KServe front ran uvicorn without a header deadline: a client that sends its
  headers a byte at a time, or nothing at all, kept its connection for ever.
- The gateway's body timeout was per gap between bytes: a body sent a byte every 25 s
  held a concurrency slot for ever (the keyless 4+8 bucket could be filled this way).
  A whole body now has a deadline (CSM_GATEWAY_BODY_TIMEOUT_S, 120 s), then 408.
- Context clips were each decoded up to their own 30 s before the 60 s total was
  checked: 16 clips decoded 480 s. Each clip is now read within what is left of the
  total, so decoding stops once the total is passed.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from conftest import kserve_front_process

from csm_clients.limits import DEFAULT_LIMITS
from csm_servers.gateway.guard import GatewayLimits

from .test_gateway_limits import (
    SMALL_UPLOAD,
    Served,
    decoded_peak,
    head,
    raw_request,
    unreachable_triton,
)

pytestmark = pytest.mark.security
ROOT = Path(__file__).resolve().parents[2]
# The documented limits: what the gateway checks with while its Triton cannot be asked.
MAX_CONTEXT_AUDIO_SECONDS = DEFAULT_LIMITS.MAX_CONTEXT_AUDIO_SECONDS
MAX_CONTEXT_TURNS, MAX_TURN_SECONDS = DEFAULT_LIMITS.MAX_CONTEXT_TURNS, DEFAULT_LIMITS.MAX_TURN_SECONDS


@pytest.fixture(scope="module")
def open_gateway():
    """No keys: the default, where anyone reaching the gateway may speak."""
    with Served(unreachable_triton(), limits=GatewayLimits(max_upload_bytes=8 * SMALL_UPLOAD)) as gateway:
        yield gateway


SPEECH = {"model": "csm-1b", "input": "Hi.", "voice": "alloy"}
MANY = 300_000


@pytest.mark.parametrize(
    "field, value, param",
    [
        ("context", [0] * MANY, "context"),  # one pydantic error per element
        ("voice", {f"k{i}": 0 for i in range(MANY)}, "voice"),  # one per value of the dict
        ("context", [{f"k{i}": 0 for i in range(MANY)}], "context"),  # one per extra key of a turn
        ("ignored", [{}] * 3_000_000, "ignored"),  # no error at all: json.loads' objects alone
    ],
)
def test_a_speech_body_of_many_json_values_is_refused_before_it_is_parsed(open_gateway, field, value, param):
    body = json.dumps({**SPEECH, field: value}, separators=(",", ":")).encode()
    assert len(body) < GatewayLimits(max_upload_bytes=8 * SMALL_UPLOAD).body_limit("POST", "/v1/audio/speech")
    response, seconds, peak = decoded_peak(
        lambda: httpx.post(
            f"{open_gateway.url}/v1/audio/speech",
            content=body,
            headers={"content-type": "application/json"},
            timeout=120,
        )
    )
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert "JSON values" in error["message"], error
    assert peak < 4 * len(body) + 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a {len(body) >> 20} MiB body"
    assert seconds < 3


def test_the_captioned_route_counts_json_values_before_parsing_too(open_gateway):
    body = json.dumps({**SPEECH, "context": [0] * MANY}, separators=(",", ":")).encode()
    response, seconds, peak = decoded_peak(
        lambda: httpx.post(
            f"{open_gateway.url}/v1/audio/speech/captioned",
            content=body,
            headers={"content-type": "application/json"},
            timeout=120,
        )
    )
    assert response.status_code == 400 and "JSON values" in response.json()["error"]["message"], response.text[:300]
    assert peak < 4 * len(body) + 16 * 2**20 and seconds < 3


def test_a_clone_voice_context_of_many_json_values_is_refused_before_it_is_parsed(open_gateway):
    context = "[" + ",".join(["0"] * MANY) + "]"  # 600 KB: under Starlette's 1 MB per form field
    form = {"text": (None, "Hi."), "context": (None, context)}  # multipart, as the page sends it
    response, seconds, peak = decoded_peak(
        lambda: httpx.post(f"{open_gateway.url}/clone-voice", files=form, timeout=120)
    )
    assert response.status_code == 400 and "JSON values" in response.json()["detail"], response.text[:300]
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB allocated"
    assert seconds < 3


def test_an_ordinary_speech_body_with_context_still_reaches_triton(open_gateway):
    body = {
        **SPEECH,
        "voice": {"id": "alloy"},
        "speaker": 1,
        "context": [{"voice": f"v{i}", "speaker": i % 2} for i in range(16)],
    }
    response = httpx.post(f"{open_gateway.url}/v1/audio/speech", json=body, timeout=60)
    assert response.status_code == 503, response.text  # past every check, on to the (absent) Triton


# --- the front: a deadline for the request head --------------------------------------------------
@pytest.fixture(scope="module")
def front_url():
    """The front as deployed (`python -m csm_servers.gateway.kserve_front`), a 1 s header deadline."""
    with kserve_front_process(unreachable_triton(), "--header-timeout-s", "1") as url:
        yield url


def closed_within(connection: socket.socket, seconds: float, dribble: bytes | None) -> bool:
    started = time.monotonic()
    connection.settimeout(0.2)
    while time.monotonic() - started < seconds:
        try:
            if dribble:
                connection.sendall(dribble)
            if connection.recv(1) == b"":
                return True
        except TimeoutError:
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


# --- the gateway: a deadline for the whole body ----------------------------------------------------
def answered_while_dribbling(connection: socket.socket, every: float, give_up: float) -> tuple[float, bytes]:
    """Sends one byte of body every `every` s until the gateway answers (or `give_up` s
    pass): (seconds until the answer began, the answer; b"" when none came)."""
    started = time.monotonic()
    connection.settimeout(every)
    data = b""
    while time.monotonic() - started < give_up:
        try:
            connection.sendall(b" ")
        except OSError:
            break
        try:
            data = connection.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        break
    seconds = time.monotonic() - started
    connection.settimeout(10)
    try:
        while data:  # to the end: a 408 closes the connection
            chunk = connection.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return seconds, data


def test_a_body_dribbled_a_byte_at_a_time_is_408_at_the_whole_body_deadline_and_frees_its_slot():
    deadline = 2.0
    # One keyless slot, no queue; the gap between bytes (0.5 s) is far inside the idle timeout.
    limits = GatewayLimits.from_environment(
        {"CSM_GATEWAY_BODY_TIMEOUT_S": str(deadline)},
        max_concurrency_open=1,
        max_queue_open=0,
        body_idle_timeout_s=30.0,
    )
    with Served(unreachable_triton(), limits=limits) as gateway:
        lines = ["Content-Type: application/json", "Content-Length: 1000"]
        with raw_request(gateway.url, head("POST", "/v1/audio/speech", *lines), timeout=30) as connection:
            seconds, answer = answered_while_dribbling(connection, every=0.5, give_up=deadline + 6)
        assert answer.startswith(b"HTTP/1.1 408"), (seconds, answer[:300])
        assert seconds < deadline + 2, f"answered after {seconds:.1f} s"
        assert b"did not arrive whole within 2 s" in answer, answer
        after = httpx.post(f"{gateway.url}/v1/audio/speech", json=SPEECH, timeout=30)
        assert after.status_code == 503, after.text  # the one slot is free again: on to (absent) Triton


def test_the_whole_body_deadline_has_its_environment_variable_and_flag(capsys):
    assert GatewayLimits().body_timeout_s == 120.0
    assert GatewayLimits.ENVIRONMENT["body_timeout_s"] == "CSM_GATEWAY_BODY_TIMEOUT_S"
    from csm_servers.gateway.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--body-timeout-s" in capsys.readouterr().out


# --- context clips: decoded within what is left of the total -------------------------------------
CLIP_RATE = 8_000


@pytest.fixture(scope="module")
def long_clip() -> str:
    """A clip of MAX_TURN_SECONDS (the most one clip may be), base64 of a FLAC: a few KB,
    so 16 of them fit /clone-voice's 1 MB form field."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(MAX_TURN_SECONDS * CLIP_RATE), np.float32), CLIP_RATE, format="FLAC")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture()
def decoded_frames(monkeypatch):
    """Every frame libsndfile decodes in this process (the gateway runs in a thread here)."""
    counted = {"frames": 0}
    read = soundfile.SoundFile.read

    def counting(self, *args, **kwargs):
        out = read(self, *args, **kwargs)
        counted["frames"] += len(out)
        return out

    monkeypatch.setattr(soundfile.SoundFile, "read", counting)
    return counted


@pytest.mark.parametrize("route", ["/v1/audio/speech", "/clone-voice"])
def test_context_clips_are_decoded_only_up_to_the_total_limit(open_gateway, long_clip, decoded_frames, route):
    turns = [{"audio": long_clip, "text": "x", "speaker": index % 2} for index in range(MAX_CONTEXT_TURNS)]
    if route == "/clone-voice":
        response = httpx.post(
            f"{open_gateway.url}/clone-voice", timeout=60, data={"text": "Hi.", "context": json.dumps(turns)}
        )
        assert response.status_code == 400, response.text[:300]
        message = response.json()["detail"]
    else:
        response = httpx.post(f"{open_gateway.url}/v1/audio/speech", json={**SPEECH, "context": turns}, timeout=60)
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        message = error["message"]
        assert error["param"] == "context", error
    assert f"the limit is {MAX_CONTEXT_AUDIO_SECONDS:g} s" in message and "MAX_CONTEXT_AUDIO_SECONDS" in message, (
        message
    )
    assert "context[2]" in message, message  # the clip that passed the total
    # The total's worth (two whole clips; the third is refused by its header), not 16 clips' 480 s.
    assert 0 < decoded_frames["frames"] <= int(MAX_CONTEXT_AUDIO_SECONDS * CLIP_RATE), decoded_frames
