"""The KServe v2 front as deployed (`python -m csm_servers.gateway.kserve_front`, uvicorn)
in front of the real tritonserver: large bodies of keys are judged at once, a header is
read one way only, the internal models (the way around the watermark) and Triton's
administrative routes are out of reach, odd header bytes are a 4xx."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from conftest import kserve_front_process
from fastapi.testclient import TestClient

from csm_servers.gateway.kserve_front import ALL_MODELS, create_front
from csm_triton import constants as C

from .test_kserve_front_unit import INTERNAL_MODELS, VALID, many_keys

pytestmark = pytest.mark.security
ROOT = Path(__file__).resolve().parents[2]
INFER = "/v2/models/watermark_detect/infer"


@pytest.fixture(scope="module")
def front(triton_server, tmp_path_factory):
    """The front's URL, run as a deployment runs it (default models, its own HTTP server)."""
    with kserve_front_process(triton_server.http_url, log_path=tmp_path_factory.mktemp("front") / "front.log") as url:
        # Passes the front (its config now cached); watermark_detect finds 2 samples too short.
        assert httpx.post(url + INFER, content=VALID, timeout=60).status_code == 400
        yield url


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request written byte for byte (headers httpx would merge or refuse): status, body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head.encode("latin-1").replace(b"\n", b"\r\n") + b"\r\n" + body)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_a_megabyte_of_keys_is_judged_in_under_a_second(front, triton_server):
    for repeat_first in (True, False):
        body = many_keys(1 << 20, repeat_first)
        started = time.perf_counter()
        answer = httpx.post(front + INFER, content=body, timeout=30)
        seconds = time.perf_counter() - started
        assert answer.status_code == 400 and seconds < 1.0, (repeat_first, seconds, answer.text[:200])
        expected = "repeats the key 'a0'" if repeat_first else "must have 'inputs'"
        assert expected in answer.json()["error"]
    assert httpx.get(front + "/v2/health/ready", timeout=5).status_code == 200  # nothing left stalled


def test_two_inference_header_lengths_are_refused(front):
    header = VALID
    status, body = raw_request(
        front,
        f"POST {INFER} HTTP/1.1\nHost: x\nConnection: close\n"
        f"Content-Length: {len(header)}\n"
        f"Inference-Header-Content-Length: {len(header)}\n"
        "Inference-Header-Content-Length: 5\n",
        header,
    )
    assert status == 400 and b"given more than once" in body


def test_content_length_with_transfer_encoding_is_refused(front):
    chunked = f"{len(VALID):x}\r\n".encode() + VALID + b"\r\n0\r\n\r\n"
    status, _ = raw_request(
        front,
        f"POST {INFER} HTTP/1.1\nHost: x\nConnection: close\n"
        f"Content-Length: {len(VALID)}\nTransfer-Encoding: chunked\n",
        chunked,
    )
    assert 400 <= status < 500


@pytest.mark.parametrize(
    "header",
    [
        "X-CSM-Admin-Token: \xb2",
        "Inference-Header-Content-Length: \xb2",
        "Content-Type: \xb2",
        "Accept: caf\xe9",
        "X-Anything: \xb2",
    ],
)
def test_a_header_with_odd_bytes_is_a_4xx_never_a_500(front, header):
    status, body = raw_request(
        front, f"POST {INFER} HTTP/1.1\nHost: x\nConnection: close\nContent-Length: {len(VALID)}\n{header}\n", VALID
    )
    assert status < 500, body
    if not header.startswith("X-Anything"):  # a header the front ignores is simply not sent on
        assert status == 400 and b"visible ASCII" in body


def test_the_internal_models_are_out_of_reach_so_the_watermark_cannot_be_skipped(front, triton_server):
    # Loaded and ready on Triton itself: the front is what keeps them away.
    for model in INTERNAL_MODELS:
        assert httpx.get(f"http://{triton_server.http_url}/v2/models/{model}/ready", timeout=10).status_code == 200
    for model in INTERNAL_MODELS:
        for answer in (
            httpx.post(f"{front}/v2/models/{model}/infer", json={"inputs": []}, timeout=10),
            httpx.post(f"{front}/v2/models/{model}/generate", json={}, timeout=10),
            httpx.get(f"{front}/v2/models/{model}/config", timeout=10),
            httpx.get(f"{front}/v2/models/{model}/versions/1/ready", timeout=10),
        ):
            assert answer.status_code == 404, (model, answer.text)
            error = answer.json()["error"]
            assert f"model '{model}' is not served by this front" in error
            assert all(public in error for public in C.PUBLIC_MODELS)
    for model in C.PUBLIC_MODELS:
        assert httpx.get(f"{front}/v2/models/{model}/ready", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v2/repository/models/x/load"),
        ("POST", "/v2/repository/models/watermark_detect/unload"),
        ("POST", "/v2/repository/index"),
        ("GET", "/v2/logging"),
        ("POST", "/v2/logging"),
        ("GET", "/v2/trace/setting"),
        ("POST", "/v2/trace/setting"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("POST", "/v2/systemsharedmemory/region/r/register"),
        ("GET", "/v2/cudasharedmemory/status"),
        ("GET", "/v2/models/stats"),
        ("GET", "/v2/models/watermark_detect/stats"),
        ("POST", "/v2/models/watermark_detect/trace/setting"),
    ],
)
def test_tritons_administrative_routes_are_not_served(front, triton_server, method, path):
    answer = httpx.request(method, front + path, json={}, timeout=10)
    assert answer.status_code in (404, 405), answer.text
    assert (
        httpx.get(f"http://{triton_server.http_url}/v2/models/watermark_detect/ready", timeout=10).status_code == 200
    )  # still loaded


def test_the_config_cache_stays_bounded_over_many_model_names(triton_server, served_models):
    app = create_front(triton_server.http_url, models=ALL_MODELS, spec_cache_size=3)
    with TestClient(app) as client:
        for model in served_models:
            assert client.post(f"/v2/models/{model}/infer", content=b"{}").status_code == 400  # no 'inputs'
        for index in range(30):  # unknown names: Triton's own 404, nothing cached
            assert client.post(f"/v2/models/nosuch_{index}/infer", content=b"{}").status_code in (400, 404)
        assert len(app.state.front._specs) == 3
