"""The REST gateway (the original system's API on :7860) against the real tritonserver:
every route, good and bad uploads, and errors as HTTP codes with a JSON message."""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import soundfile

from csm_clients import VoiceCloner
from csm_triton.serving.process import free_ports

from .client_fixtures import Gateway, gateway, long_clip, speech_clip  # noqa: F401 - fixtures
from .conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


def clip_file(speech_clip, name="fox.wav"):
    return {"reference_audio": (name, speech_clip.path.read_bytes(), "audio/wav")}


def wav_seconds(response) -> float:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    samples, rate = soundfile.read(io.BytesIO(response.content))
    assert rate == 24_000 and samples.ndim == 1 and abs(samples).max() > 0
    return samples.size / rate


def refused(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert all(fragment in detail for fragment in fragments), detail
    assert "Traceback" not in detail
    return detail


def test_page_health_docs(http):
    page = http.get("/")
    assert page.status_code == 200 and "<audio" in page.text and page.headers["content-type"].startswith("text/html")
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/docs").status_code == 200
    routes = http.get("/openapi.json").json()["paths"]
    assert {"/health", "/voices", "/clone-voice", "/upload-voice", "/voices/{voice_name}"} <= set(routes)


@pytest.fixture()
def gateway_voice(triton_server):
    """The id the test stores through the gateway; removed after if the test did not."""
    yield "gateway-voice"
    with VoiceCloner(triton_server.grpc_url, admin_token=ADMIN_TOKEN) as cloner:
        if "gateway-voice" in {voice["voice_id"] for voice in cloner.list_voices()}:
            cloner.delete_voice("gateway-voice")


def test_clone_voice_with_default_voice_upload_and_stored_voice(http, speech_clip, gateway_voice):
    form = {"text": "Hello from the gateway.", "max_audio_seconds": "0.5", "seed": "1"}
    assert wav_seconds(http.post("/clone-voice", data=form)) == pytest.approx(0.56)
    cloned = http.post("/clone-voice", data={**form, "reference_text": speech_clip.transcript},
                       files=clip_file(speech_clip))
    assert wav_seconds(cloned) == pytest.approx(0.56) and float(cloned.headers["x-audio-seconds"]) == 0.56

    stored = http.post("/upload-voice", data={"voice_name": "gateway-voice", "reference_text": speech_clip.transcript},
                       files=clip_file(speech_clip))
    assert stored.status_code == 200 and stored.json()["voice"]["voice_id"] == "gateway-voice"
    assert "gateway-voice" in {voice["voice_id"] for voice in http.get("/voices").json()["voices"]}
    assert wav_seconds(http.post("/clone-voice", data={**form, "voice_name": "gateway-voice"})) == pytest.approx(0.56)
    refused(http.post("/upload-voice", data={"voice_name": "gateway-voice", "reference_text": "Again."},
                      files=clip_file(speech_clip)), 400, "gateway-voice")

    deleted = http.delete("/voices/gateway-voice")
    assert deleted.status_code == 200 and deleted.json()["voice"]["voice_id"] == "gateway-voice"
    assert "gateway-voice" not in {voice["voice_id"] for voice in http.get("/voices").json()["voices"]}
    refused(http.delete("/voices/gateway-voice"), 400, "gateway-voice")
    refused(http.post("/clone-voice", data={**form, "voice_name": "gateway-voice"}), 400, "unknown voice")


def test_bad_uploads_and_forms_are_400_with_a_message(http, speech_clip, long_clip):
    text = {"text": "Hi.", "max_audio_seconds": "0.5"}
    not_audio = {"reference_audio": ("notes.wav", b"these are notes, not audio", "audio/wav")}
    refused(http.post("/clone-voice", data={**text, "reference_text": "x"}, files=not_audio), 400,
            "cannot read the reference clip as audio")
    refused(http.post("/upload-voice", data={"voice_name": "junk", "reference_text": "x"}, files=not_audio), 400,
            "cannot read the reference clip as audio")
    too_long = {"reference_audio": ("long.flac", long_clip.read_bytes(), "audio/flac")}
    refused(http.post("/clone-voice", data={**text, "reference_text": "x"}, files=too_long), 400, "REFERENCE_AUDIO")
    refused(http.post("/upload-voice", data={"voice_name": "long", "reference_text": "x"}, files=too_long), 400,
            "REFERENCE_AUDIO")
    refused(http.post("/clone-voice", data=text, files=clip_file(speech_clip)), 400, "REFERENCE_TEXT")
    refused(http.post("/upload-voice", data={"voice_name": "no-transcript"}, files=clip_file(speech_clip)), 400,
            "reference_text", "Field required")
    refused(http.post("/clone-voice", data={"max_audio_seconds": "0.5"}), 400, "text")
    refused(http.post("/clone-voice", data={**text, "temperature": "0"}), 400, "'TEMPERATURE' must be in")
    refused(http.post("/clone-voice", data={**text, "temperature": "warm"}), 400, "temperature")
    refused(http.post("/clone-voice", data={**text, "voice_name": "nobody"}), 400, "unknown voice 'nobody'")
    refused(http.post("/clone-voice", data={**text, "voice_name": "x", "reference_text": "x"},
                      files=clip_file(speech_clip)), 400, "not both")
    refused(http.post("/upload-voice", data={"voice_name": "../up", "reference_text": "x"},
                      files=clip_file(speech_clip)), 400, "VOICE_ID")


def test_voice_upload_without_the_gateway_token_is_403(triton_server, speech_clip):
    with Gateway(triton_server.grpc_url, admin_token=None) as anonymous:
        response = httpx.post(f"{anonymous.url}/upload-voice", data={"voice_name": "x", "reference_text": "x"},
                              files=clip_file(speech_clip), timeout=60)
    refused(response, 403, "permission denied")
    with Gateway(triton_server.grpc_url, admin_token=None) as anonymous:
        response = httpx.delete(f"{anonymous.url}/voices/anyone", timeout=60)
    refused(response, 403, "permission denied")


def test_oversized_upload_is_413(triton_server, speech_clip):
    with Gateway(triton_server.grpc_url, max_upload_bytes=10_000) as small:
        response = httpx.post(f"{small.url}/clone-voice", data={"text": "Hi.", "reference_text": "x"},
                              files=clip_file(speech_clip), timeout=60)
    refused(response, 413, "fox.wav", "MB")


def test_triton_down_is_503(speech_clip):
    with Gateway(f"127.0.0.1:{free_ports(1)[0]}") as orphan:
        with httpx.Client(base_url=orphan.url, timeout=30) as http:
            refused(http.get("/health"), 503, "not ready")
            refused(http.get("/voices"), 503, "failed to connect")
            refused(http.post("/clone-voice", data={"text": "Hi."}), 503, "failed to connect")


def test_make_gateway_starts_the_module_that_serves_it(triton_server, tmp_path):
    """`make gateway` runs `python -m csm_clients.gateway`; run that command as make would
    (with the ports swapped), check it serves, then stop it."""
    port = free_ports(1)[0]
    dry_run = subprocess.run(["make", "-n", "gateway", f"TRITON_GRPC_URL={triton_server.grpc_url}",
                              f"GATEWAY_PORT={port}"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    command = next(line for line in dry_run.stdout.splitlines() if "csm_clients.gateway" in line)
    assert command.endswith(f"-m csm_clients.gateway --triton-url {triton_server.grpc_url} --port {port}")
    log = tmp_path / "gateway.log"
    with open(log, "w") as output:
        process = subprocess.Popen(["bash", "-c", command], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, "CSM_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert health.status_code == 200 and health.json()["triton"] == triton_server.grpc_url
    finally:
        process.terminate()
        process.wait(timeout=20)
