"""The REST gateway (the original system's API on :7860) against the real tritonserver:
every route, good and bad uploads, its own API keys for voice writes, form fields
checked before conversion, and errors as HTTP codes with a JSON message."""

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

from .client_fixtures import GATEWAY_API_KEY, Gateway, gateway, long_clip, speech_clip
from .conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KEY = {"Authorization": f"Bearer {GATEWAY_API_KEY}"}
NO_KEY = {"Authorization": ""}


@pytest.fixture(scope="module")
def http(gateway):
    # The gateway has keys, so /clone-voice needs one too (as /v1 does); a test that
    # means to go without overrides the header.
    with httpx.Client(base_url=gateway.url, timeout=60, headers=KEY) as client:
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
    cloned = http.post(
        "/clone-voice", data={**form, "reference_text": speech_clip.transcript}, files=clip_file(speech_clip)
    )
    assert wav_seconds(cloned) == pytest.approx(0.56) and float(cloned.headers["x-audio-seconds"]) == 0.56

    stored = http.post(
        "/upload-voice",
        data={"voice_name": "gateway-voice", "reference_text": speech_clip.transcript},
        files=clip_file(speech_clip),
        headers=KEY,
    )
    assert stored.status_code == 200 and stored.json()["voice"]["voice_id"] == "gateway-voice"
    assert "gateway-voice" in {voice["voice_id"] for voice in http.get("/voices").json()["voices"]}
    assert wav_seconds(http.post("/clone-voice", data={**form, "voice_name": "gateway-voice"})) == pytest.approx(0.56)
    refused(
        http.post(
            "/upload-voice",
            data={"voice_name": "gateway-voice", "reference_text": "Again."},
            files=clip_file(speech_clip),
            headers=KEY,
        ),
        400,
        "gateway-voice",
    )

    refused(http.delete("/voices/gateway-voice", headers=NO_KEY), 401, "Authorization: Bearer <key>")
    deleted = http.delete("/voices/gateway-voice", headers=KEY)
    assert deleted.status_code == 200 and deleted.json()["voice"]["voice_id"] == "gateway-voice"
    assert "gateway-voice" not in {voice["voice_id"] for voice in http.get("/voices").json()["voices"]}
    refused(http.delete("/voices/gateway-voice", headers=KEY), 400, "gateway-voice")
    refused(http.post("/clone-voice", data={**form, "voice_name": "gateway-voice"}), 400, "unknown voice")


def test_bad_uploads_and_forms_are_400_with_a_message(http, speech_clip, long_clip):
    text = {"text": "Hi.", "max_audio_seconds": "0.5"}
    not_audio = {"reference_audio": ("notes.wav", b"these are notes, not audio", "audio/wav")}
    named = refused(
        http.post("/clone-voice", data={**text, "reference_text": "x"}, files=not_audio),
        400,
        "cannot read the reference clip as audio",
        "'notes.wav'",
    )
    assert "BytesIO" not in named
    refused(
        http.post("/upload-voice", data={"voice_name": "junk", "reference_text": "x"}, files=not_audio, headers=KEY),
        400,
        "cannot read the reference clip as audio",
        "'notes.wav'",
    )
    too_long = {"reference_audio": ("long.flac", long_clip.read_bytes(), "audio/flac")}
    refused(http.post("/clone-voice", data={**text, "reference_text": "x"}, files=too_long), 400, "REFERENCE_AUDIO")
    refused(
        http.post("/upload-voice", data={"voice_name": "long", "reference_text": "x"}, files=too_long, headers=KEY),
        400,
        "REFERENCE_AUDIO",
    )
    refused(http.post("/clone-voice", data=text, files=clip_file(speech_clip)), 400, "REFERENCE_TEXT")
    refused(
        http.post("/upload-voice", data={"voice_name": "no-transcript"}, files=clip_file(speech_clip), headers=KEY),
        400,
        "reference_text",
        "Field required",
    )
    refused(http.post("/clone-voice", data={"max_audio_seconds": "0.5"}), 400, "text")
    refused(http.post("/clone-voice", data={**text, "temperature": "0"}), 400, "'TEMPERATURE' must be in")
    refused(http.post("/clone-voice", data={**text, "temperature": "warm"}), 400, "temperature")
    refused(http.post("/clone-voice", data={**text, "voice_name": "nobody"}), 400, "unknown voice 'nobody'")
    refused(
        http.post(
            "/clone-voice", data={**text, "voice_name": "x", "reference_text": "x"}, files=clip_file(speech_clip)
        ),
        400,
        "not both",
    )
    refused(
        http.post(
            "/upload-voice",
            data={"voice_name": "../up", "reference_text": "x"},
            files=clip_file(speech_clip),
            headers=KEY,
        ),
        400,
        "VOICE_ID",
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("seed", str(2**63), "seed: input 'SEED' must be in [0, 9223372036854775807]"),
        ("top_k", str(2**31), "top_k: input 'TOP_K' must be in [1, 2048], got 2147483648"),
        ("top_k", str(10**20), "top_k: input 'TOP_K' must be in [1, 2048]"),
        ("top_k", "1e20", "top_k: Input should be a valid integer"),
        ("max_audio_seconds", "1e39", "max_audio_seconds: input 'MAX_AUDIO_SECONDS' must be in (0, 90]"),
    ],
)
def test_numeric_fields_out_of_range_are_400_naming_the_field_never_a_plain_500(http, field, value, message):
    response = http.post("/clone-voice", data={"text": "Hi.", "max_audio_seconds": "0.5", field: value})
    refused(response, 400, message)


def test_voice_writes_through_the_gateway_need_its_own_key(triton_server, gateway, speech_clip):
    form = {"voice_name": "keyed", "reference_text": speech_clip.transcript}
    for headers, status, message in (
        ({}, 401, "'Authorization: Bearer <key>'"),
        ({"Authorization": "Bearer not-a-key"}, 401, "wrong API key"),
        ({"x-csm-admin-token": ADMIN_TOKEN}, 401, "'Authorization: Bearer <key>'"),
    ):
        response = httpx.post(
            f"{gateway.url}/upload-voice", data=form, files=clip_file(speech_clip), headers=headers, timeout=60
        )
        refused(response, status, message)
        assert response.headers["www-authenticate"] == "Bearer"
    with VoiceCloner(triton_server.grpc_url) as cloner:
        assert "keyed" not in {voice["voice_id"] for voice in cloner.list_voices()}


def test_without_api_keys_configured_voice_writes_are_403_saying_how_to_enable_them(triton_server, speech_clip):
    with Gateway(triton_server.grpc_url, admin_token=ADMIN_TOKEN) as keyless:
        upload = httpx.post(
            f"{keyless.url}/upload-voice",
            data={"voice_name": "x", "reference_text": "x"},
            files=clip_file(speech_clip),
            headers=KEY,
            timeout=60,
        )
        delete = httpx.delete(f"{keyless.url}/voices/anyone", headers=KEY, timeout=60)
        reads = httpx.get(f"{keyless.url}/voices", timeout=60)
    for response in (upload, delete):
        detail = refused(response, 403, "permission denied", "CSM_GATEWAY_API_KEYS=<key>")
        assert ADMIN_TOKEN not in detail
    assert reads.status_code == 200


def test_a_keyed_write_without_the_admin_token_is_refused_by_triton_with_403(triton_server, speech_clip):
    with Gateway(triton_server.grpc_url, admin_token=None, api_keys=[GATEWAY_API_KEY]) as tokenless:
        upload = httpx.post(
            f"{tokenless.url}/upload-voice",
            data={"voice_name": "x", "reference_text": "x"},
            files=clip_file(speech_clip),
            headers=KEY,
            timeout=60,
        )
        delete = httpx.delete(f"{tokenless.url}/voices/anyone", headers=KEY, timeout=60)
    refused(upload, 403, "permission denied", "x-csm-admin-token")
    refused(delete, 403, "permission denied", "x-csm-admin-token")


def test_oversized_upload_is_413(triton_server, speech_clip):
    with Gateway(triton_server.grpc_url, max_upload_bytes=10_000) as small:
        response = httpx.post(
            f"{small.url}/clone-voice",
            data={"text": "Hi.", "reference_text": "x"},
            files=clip_file(speech_clip),
            timeout=60,
        )
    refused(response, 413, "fox.wav", "MB")


def test_triton_down_is_503(speech_clip):
    with Gateway(f"127.0.0.1:{free_ports(1)[0]}") as orphan:
        with httpx.Client(base_url=orphan.url, timeout=30) as http:
            refused(http.get("/health"), 503, "not ready")
            refused(http.get("/voices"), 503, "failed to connect")
            refused(http.post("/clone-voice", data={"text": "Hi."}), 503, "failed to connect")


def test_make_gateway_starts_the_module_that_serves_it(triton_server, tmp_path):
    """`make gateway` runs `python -m csm_servers.gateway`; run that command as make would
    (with the ports swapped), check it serves, then stop it."""
    port = free_ports(1)[0]
    dry_run = subprocess.run(
        ["make", "-n", "gateway", f"TRITON_GRPC_URL={triton_server.grpc_url}", f"GATEWAY_PORT={port}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    script = dry_run.stdout.replace("\\\n", " ")  # one command, continued over lines
    command = next(line for line in script.splitlines() if "csm_servers.gateway" in line)
    assert command.endswith(f"-m csm_servers.gateway --triton-url {triton_server.grpc_url} --port {port}")
    # No admin token in its environment: it reads the token file make serve writes.
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    environment = {key: value for key, value in os.environ.items() if key != "CSM_ADMIN_TOKEN"}
    environment.update(CSM_ADMIN_TOKEN_FILE=str(token_file), CSM_GATEWAY_API_KEYS=GATEWAY_API_KEY)
    log = tmp_path / "gateway.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            ["bash", "-c", command], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=environment
        )
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
        # The admin token came from the file: a keyed write reaches the store (and its
        # refusal is the store's own "unknown voice", not "permission denied").
        refused(
            httpx.delete(f"http://127.0.0.1:{port}/voices/nobody-here", headers=KEY, timeout=30),
            400,
            "unknown voice 'nobody-here'",
        )
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
        if listening.returncode == 0:
            assert f"127.0.0.1:{port}" in listening.stdout and f"0.0.0.0:{port}" not in listening.stdout
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert "1 API key(s)" in log.read_text()
