"""The gateway spends within limits: bodies refused before they are read, compression
bombs refused before they are decoded, /clone-voice keyed like /v1, per-key concurrency
answered 429 with Retry-After, and uvicorn's header deadline. Each test runs a real
gateway (uvicorn on a port, with the settings `python -m csm_servers.gateway` uses),
over the real tritonserver where the route gets that far."""

from __future__ import annotations

import base64
import io
import socket
import tempfile
import threading
import time
import tracemalloc

import httpx
import numpy as np
import pytest
import soundfile

from csm_servers.gateway.guard import GatewayLimits
from csm_triton.serving.process import free_ports

pytestmark = pytest.mark.security
KEY_A, KEY_B = "security-key-a", "security-key-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
AUTH_A = f"Authorization: Bearer {KEY_A}"  # as a raw header line
SMALL_UPLOAD = 1 << 20  # the gateways here accept 1 MB uploads: a runaway body shows at once


class Served:
    """create_app under uvicorn with __main__'s server settings, in a thread."""

    def __init__(self, triton_url: str, *, header_timeout_s: float | None = None, **options):
        import uvicorn

        from csm_servers.gateway import create_app
        from csm_servers.gateway.__main__ import uvicorn_settings

        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        settings = uvicorn_settings(header_timeout_s=header_timeout_s)
        config = uvicorn.Config(
            create_app(triton_url, **options),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            **settings,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def unreachable_triton() -> str:
    return f"127.0.0.1:{free_ports(1)[0]}"  # 503 from a route means it got past every guard


@pytest.fixture(scope="module")
def keyed():
    limits = GatewayLimits(max_upload_bytes=SMALL_UPLOAD)
    with Served(unreachable_triton(), api_keys=[KEY_A, KEY_B], limits=limits) as gateway:
        yield gateway


@pytest.fixture()
def spool(monkeypatch, tmp_path):
    """Where Starlette's multipart parser spools uploads (tempfile's folder), watched:
    `spool.largest` is the most bytes it ever held while the test ran."""
    folder = tmp_path / "spool"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))

    class Watch:
        largest = 0
        running = True

    def watch():
        while Watch.running:
            size = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
            Watch.largest = max(Watch.largest, size)
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield Watch
    Watch.running = False
    thread.join()


def raw_request(url: str, head: str, *, timeout: float = 10) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=timeout)
    connection.sendall(head.encode("latin-1"))
    return connection


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {name.lower(): value for name, value in headers.items()}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def head(method: str, path: str, *headers: str) -> str:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: gateway", *headers, "", ""])


MULTIPART = "Content-Type: multipart/form-data; boundary=xyz"


# --- bodies: refused before they are read ----------------------------------------------------
@pytest.mark.parametrize(
    "path, content_type",
    [
        ("/upload-voice", MULTIPART),
        ("/clone-voice", MULTIPART),
        ("/v1/audio/voices", MULTIPART),
        ("/v1/audio/speech", "Content-Type: application/json"),
    ],
)
def test_a_declared_3_gb_body_is_413_before_a_byte_of_it_is_read(keyed, spool, path, content_type):
    started = time.monotonic()
    connection = raw_request(
        keyed.url, head("POST", path, AUTH_A, content_type, "Content-Length: 3000000000") + "--xyz\r\n"
    )
    with connection:
        status, headers, body = read_response(connection)
        assert connection.recv(1) == b"", "the connection is closed: the rest of the body is never read"
    assert status == 413, body
    assert time.monotonic() - started < 3
    assert b"3,000,000,000 bytes" in body and b"CSM_GATEWAY_MAX_UPLOAD_MB" in body
    if path.startswith("/v1"):
        assert b'"code": "request_too_large"' in body
    assert spool.largest == 0


def test_without_a_key_even_the_first_byte_of_a_write_is_not_read(keyed, spool):
    connection = raw_request(keyed.url, head("POST", "/upload-voice", MULTIPART, "Content-Length: 3000000000"))
    with connection:
        status, headers, body = read_response(connection)
    assert status == 401 and headers["www-authenticate"] == "Bearer", body
    assert spool.largest == 0


def test_a_chunked_body_that_never_ends_is_413_once_it_passes_the_limit(keyed, spool):
    route_limit = GatewayLimits(max_upload_bytes=SMALL_UPLOAD).body_limit("POST", "/upload-voice")
    connection = raw_request(keyed.url, head("POST", "/upload-voice", AUTH_A, MULTIPART, "Transfer-Encoding: chunked"))
    sent = {"bytes": 0}
    part = b'--xyz\r\nContent-Disposition: form-data; name="reference_audio"; filename="a.wav"\r\n\r\n'
    chunk = b"\0" * 65536

    def send_forever():
        try:
            connection.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            while sent["bytes"] < 3_000_000_000:
                connection.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent["bytes"] += len(chunk)
        except OSError:  # the gateway closed the connection: what the test waits for
            pass

    started = time.monotonic()
    sender = threading.Thread(target=send_forever, daemon=True)
    sender.start()
    with connection:
        status, headers, body = read_response(connection)
    sender.join(timeout=10)
    assert status == 413, body
    assert b"passed" in body and f"{route_limit:,}".encode() in body
    assert time.monotonic() - started < 10
    # What was read is bounded by the limit (plus what sat in socket buffers), never the stream.
    assert spool.largest <= route_limit
    assert sent["bytes"] < route_limit + 16 * 2**20


def test_a_stalled_body_is_dropped_408_and_frees_its_slot(spool):
    limits = GatewayLimits(
        max_upload_bytes=SMALL_UPLOAD, body_idle_timeout_s=1.0, max_concurrency_per_key=1, max_queue_per_key=0
    )
    with Served(unreachable_triton(), api_keys=[KEY_A], limits=limits) as gateway:
        connection = raw_request(
            gateway.url, head("POST", "/upload-voice", AUTH_A, MULTIPART, "Content-Length: 5000") + "--xyz\r\n"
        )
        with connection:
            status, _, body = read_response(connection)
        assert status == 408, body
        after = httpx.delete(f"{gateway.url}/voices/anyone", headers=A, timeout=30)
        assert after.status_code == 503, after.text  # the slot is free again: on to (absent) Triton


# --- audio: judged by its header, decoded within the limit ---------------------------------------
def silence(seconds: float, rate: int, audio_format: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    zeros = np.zeros(rate * 60, np.float32)
    with soundfile.SoundFile(buffer, "w", rate, 1, format=audio_format, subtype=subtype) as out:
        for _ in range(int(seconds // 60)):
            out.write(zeros)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def flac_hour() -> bytes:
    return silence(3600, 8_000, "FLAC", "PCM_16")  # ~90 KB; decoded: 115 MB of float32


@pytest.fixture(scope="module")
def ogg_ten_minutes() -> bytes:
    return silence(600, 8_000, "OGG", "VORBIS")


def headerless(flac: bytes) -> bytes:
    """The same FLAC with its STREAMINFO's total-samples field zeroed: the header no
    longer says how long it is (a streamed FLAC), so only the decoding bound can stop it."""
    data = bytearray(flac)
    field = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


def test_the_bomb_fixtures_are_what_they_claim(flac_hour):
    assert len(flac_hour) < 200_000 and soundfile.info(io.BytesIO(flac_hour)).duration == 3600
    assert soundfile.info(io.BytesIO(headerless(flac_hour))).frames > 2**62  # libsndfile: unknown


def decoded_peak(request) -> tuple[httpx.Response, float, int]:
    """(the response, seconds, peak bytes Python allocated meanwhile; numpy's arrays count)."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        response = request()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return response, time.monotonic() - started, peak


@pytest.mark.parametrize("bomb", ["flac_hour", "ogg_ten_minutes", "headerless_flac"])
@pytest.mark.parametrize("route", ["/clone-voice", "/upload-voice", "/v1/audio/voices"])
def test_a_compression_bomb_is_refused_without_being_decoded(keyed, request, bomb, route):
    data = (
        headerless(request.getfixturevalue("flac_hour")) if bomb == "headerless_flac" else request.getfixturevalue(bomb)
    )
    form, name = {"text": "Hi.", "reference_text": "x"}, "reference_audio"
    if route == "/upload-voice":
        form = {"voice_name": "bomb", "reference_text": "x"}
    elif route.startswith("/v1"):
        form, name = {"name": "bomb", "transcript": "x"}, "audio_sample"
    response, seconds, peak = decoded_peak(
        lambda: httpx.post(
            keyed.url + route, data=form, files={name: ("quiet.flac", data, "audio/flac")}, headers=A, timeout=60
        )
    )
    assert response.status_code == 400, response.text
    message = response.text
    assert "the limit is 30 s" in message and "MAX_REFERENCE_SECONDS" in message
    assert ("(by its header)" in message) == (bomb != "headerless_flac")
    assert seconds < 5
    assert peak < 40 * 2**20, f"{peak / 2**20:.0f} MiB allocated: the bomb was decoded"


def test_a_context_clip_bomb_is_refused_without_being_decoded(keyed, flac_hour):
    clip = base64.b64encode(headerless(flac_hour)).decode()
    body = {"model": "csm-1b", "input": "Hi.", "voice": "alloy", "context": [{"audio": clip, "text": "x"}]}
    response, seconds, peak = decoded_peak(
        lambda: httpx.post(f"{keyed.url}/v1/audio/speech", json=body, headers=A, timeout=60)
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "context[0].audio", response.text
    assert "the limit is 30 s" in response.json()["error"]["message"]
    assert seconds < 5 and peak < 40 * 2**20
    form = {"text": "Hi.", "context": f'[{{"audio": "{base64.b64encode(flac_hour).decode()}", "text": "x"}}]'}
    refused = httpx.post(f"{keyed.url}/clone-voice", data=form, headers=A, timeout=60)
    assert refused.status_code == 400 and "(by its header) 3600.00 s" in refused.json()["detail"], refused.text


def test_too_many_channels_or_an_odd_rate_are_refused_from_the_header(keyed):
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((800, 16), np.float32), 8_000, format="WAV")
    response = httpx.post(
        f"{keyed.url}/clone-voice",
        data={"text": "Hi.", "reference_text": "x"},
        headers=A,
        files={"reference_audio": ("many.wav", buffer.getvalue(), "audio/wav")},
        timeout=60,
    )
    assert response.status_code == 400 and "16 channels" in response.json()["detail"], response.text
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(800, np.float32), 4_000, format="WAV")
    response = httpx.post(
        f"{keyed.url}/clone-voice",
        data={"text": "Hi.", "reference_text": "x"},
        headers=A,
        files={"reference_audio": ("slow.wav", buffer.getvalue(), "audio/wav")},
        timeout=60,
    )
    assert response.status_code == 400 and "4000 Hz" in response.json()["detail"], response.text


# --- keys: /clone-voice as /v1 -----------------------------------------------------------------
def test_clone_voice_needs_a_key_when_keys_are_configured(keyed, spool):
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401), (A, 503)):
        response = httpx.post(f"{keyed.url}/clone-voice", data={"text": "Hi."}, headers=headers, timeout=60)
        assert response.status_code == status, response.text
        speech = httpx.post(
            f"{keyed.url}/v1/audio/speech",
            headers=headers,
            timeout=60,
            json={"model": "csm-1b", "input": "Hi.", "voice": "alloy"},
        )
        assert speech.status_code == status, speech.text
    assert "/clone-voice needs an API key" in httpx.post(f"{keyed.url}/clone-voice", data={"text": "Hi."}).text
    assert httpx.get(f"{keyed.url}/health", timeout=30).status_code == 503, "reads of health need no key"


def test_without_keys_speech_is_open_and_writes_are_refused():
    with Served(unreachable_triton(), limits=GatewayLimits(max_upload_bytes=SMALL_UPLOAD)) as gateway:
        assert httpx.post(f"{gateway.url}/clone-voice", data={"text": "Hi."}, timeout=60).status_code == 503
        refused = httpx.post(
            f"{gateway.url}/upload-voice", data={"voice_name": "x", "reference_text": "x"}, headers=A, timeout=60
        )
        assert refused.status_code == 403 and "CSM_GATEWAY_API_KEYS" in refused.json()["detail"]


# --- concurrency: per key, 429 with Retry-After -------------------------------------------------
def hold(url: str, key: dict | None) -> socket.socket:
    """A request that takes a slot and keeps it: its body is promised and never sent."""
    lines = ["Content-Type: application/json", "Content-Length: 1000"]
    if key:
        lines.append("Authorization: " + key["Authorization"])
    connection = raw_request(url, head("POST", "/v1/audio/speech", *lines) + '{"model":', timeout=30)
    return connection


def speech(url: str, key: dict | None) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/audio/speech",
        headers=key or {},
        timeout=120,
        json={
            "model": "csm-1b",
            "input": "Hi.",
            "voice": "alloy",
            "response_format": "wav",
            "max_audio_seconds": 0.5,
            "seed": 1,
        },
    )


def test_over_limit_concurrency_of_one_key_is_429_with_retry_after(triton_server):
    limits = GatewayLimits(
        max_upload_bytes=SMALL_UPLOAD,
        max_concurrency_per_key=2,
        max_queue_per_key=1,
        queue_timeout_s=1.0,
        retry_after_s=3,
    )
    with Served(triton_server.grpc_url, api_keys=[KEY_A, KEY_B], limits=limits) as gateway:
        held = [hold(gateway.url, A) for _ in range(2)]
        try:
            time.sleep(0.3)  # both at work (waiting for their bodies)
            queued = hold(gateway.url, A)  # the one place in the queue
            time.sleep(0.1)
            started = time.monotonic()
            over = speech(gateway.url, A)
            assert over.status_code == 429 and over.headers["retry-after"] == "3", over.text
            assert over.json()["error"]["type"] == "rate_limit_error" and time.monotonic() - started < 1
            status, headers, body = read_response(queued)  # waited its queue_timeout_s, then 429
            assert status == 429 and headers["retry-after"] == "3", body
            queued.close()
            other = speech(gateway.url, B)  # another key has its own slots
            assert other.status_code == 200 and other.headers["content-type"] == "audio/wav", other.text
        finally:
            for connection in held:
                connection.close()
        time.sleep(0.3)
        again = speech(gateway.url, A)
        assert again.status_code == 200, again.text


def test_without_keys_all_callers_share_one_bounded_bucket(triton_server):
    limits = GatewayLimits(max_upload_bytes=SMALL_UPLOAD, max_concurrency_open=1, max_queue_open=0)
    with Served(triton_server.grpc_url, limits=limits) as gateway:
        held = hold(gateway.url, None)
        try:
            time.sleep(0.3)
            over = httpx.post(f"{gateway.url}/clone-voice", data={"text": "Hi."}, timeout=60)
            assert over.status_code == 429 and "retry-after" in over.headers, over.text
            assert "too many requests" in over.json()["detail"]
            assert httpx.get(f"{gateway.url}/health", timeout=30).status_code == 200, "reads are not bounded"
        finally:
            held.close()
        time.sleep(0.3)
        assert speech(gateway.url, None).status_code == 200


# --- uvicorn: headers must arrive in time ------------------------------------------------------
def test_a_client_dribbling_its_headers_is_cut_off(keyed):
    with Served(unreachable_triton(), header_timeout_s=1.0) as gateway:
        connection = raw_request(gateway.url, "GET /health HTTP/1.1\r\nHost: x\r\n")
        with connection:
            started = time.monotonic()
            try:
                while time.monotonic() - started < 5:
                    connection.sendall(b"X-Slow: 1\r\n")
                    time.sleep(0.2)
                closed = False
            except OSError:
                closed = True
            if not closed:
                connection.settimeout(1)
                closed = connection.recv(1) == b""
        assert closed and time.monotonic() - started < 4
        assert httpx.get(f"{gateway.url}/health", timeout=30).status_code == 503, "others are served"


def test_the_captioned_route_takes_the_speech_routes_body_limit_and_others_the_small_one():
    limits = GatewayLimits(max_upload_bytes=SMALL_UPLOAD)
    assert limits.body_limit("POST", "/v1/audio/speech/captioned") == limits.body_limit("POST", "/v1/audio/speech")
    assert limits.body_limit("POST", "/v1/audio/speech/other") == 64 << 10
