"""The KServe v2 front's own defences, without a server: parsing linear in the body
(a repeated key at the end of 1 MB once took 23 s), one reading of every header it
checks or passes on, a header allow-list towards Triton, the public models only by
default, a bounded config cache, bounded load (checks a few at a time, bodies in flight
within a byte budget, sizes enforced while reading). The same ways in against a real tritonserver:
test_kserve_front_server.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import zlib

import httpx
import pytest
from fastapi.testclient import TestClient

from csm_servers.gateway import kserve_front, kserve_limits
from csm_servers.gateway.kserve_checks import MAX_JSON_DEPTH, Refused, json_depth, parse_json
from csm_servers.gateway.kserve_front import ALL_MODELS, DEFAULT_MODELS, create_front, models_option
from csm_servers.gateway.kserve_limits import forwarded_headers, request_headers
from csm_triton import constants as C

pytestmark = pytest.mark.security

INTERNAL_MODELS = ("csm_prepare", "csm_generate", "csm_lm", "mimi_encoder", "mimi_decoder", "watermark")
WATERMARK_DETECT = {
    "name": "watermark_detect",
    "max_batch_size": 0,
    "input": [
        {"name": "AUDIO", "data_type": "TYPE_FP32", "dims": [-1]},
        {"name": "SAMPLE_RATE", "data_type": "TYPE_INT32", "dims": [1]},
    ],
}
VALID = json.dumps({"inputs": [{"name": "AUDIO", "datatype": "FP32", "shape": [2], "data": [0, 0]}]}).encode()


def many_keys(size: int, repeat_first: bool) -> bytes:
    """A JSON object of ~`size` bytes of distinct keys, optionally ending with the first again."""
    count = size // len('"a100000":0,')
    return ("{" + ",".join(f'"a{i}":0' for i in range(count)) + (',"a0":1' if repeat_first else "") + "}").encode()


def timed_refusal(raw: bytes) -> tuple[str | None, float]:
    started = time.perf_counter()
    try:
        parse_json(raw)
        message = None
    except Refused as refused:
        message = str(refused)
    return message, time.perf_counter() - started


# --- parsing: linear in the body --------------------------------------------------------------
def test_a_repeated_key_after_1_mb_of_keys_is_refused_in_well_under_a_second():
    message, seconds = timed_refusal(many_keys(1 << 20, repeat_first=True))
    assert message == "the JSON repeats the key 'a0'" and seconds < 1.0


def test_1_mb_of_distinct_keys_parses_in_well_under_a_second():
    message, seconds = timed_refusal(many_keys(1 << 20, repeat_first=False))
    assert message is None and seconds < 1.0


def test_repeated_keys_are_found_in_nested_objects_too():
    assert timed_refusal(b'{"inputs":[{"name":"A","name":"B"}]}')[0] == "the JSON repeats the key 'name'"


@pytest.mark.parametrize(
    "raw",
    [
        b'"' + b'\\"' * 500_000,  # an unterminated string of escaped quotes: each quote once a restart
        b"[" * 1_000_000,  # unbalanced
        b'["' + b"[" * 1_000_000 + b'"]',  # brackets inside a string do not nest
        b'{"x":' + b"[0," * 300_000 + b"0" + b"]" * 300_000 + b"}",
    ],
)
def test_pathological_bodies_are_judged_in_linear_time(raw):
    _, seconds = timed_refusal(raw)
    assert seconds < 1.0


def test_nesting_is_bounded_by_the_fronts_own_limit_not_pythons_stack():
    def nested(depth: int) -> bytes:  # depth counts the outer object
        return b'{"x":' + b"[" * (depth - 1) + b"0" + b"]" * (depth - 1) + b"}"

    assert json_depth(nested(MAX_JSON_DEPTH)) == MAX_JSON_DEPTH
    parse_json(nested(MAX_JSON_DEPTH))
    message, _ = timed_refusal(nested(MAX_JSON_DEPTH + 1))
    assert message and "too deeply" in message and str(MAX_JSON_DEPTH) in message
    assert json_depth(b'{"a":"[[[{{{","b":"\\"["}') == 1


# --- headers: read once, only the allowed ones go on --------------------------------------------
def raw_headers(*pairs: tuple[str, bytes | str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode(), value if isinstance(value, bytes) else value.encode()) for name, value in pairs]


def test_only_the_allow_listed_headers_are_forwarded():
    headers = request_headers(
        raw_headers(
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            ("Inference-Header-Content-Length", "12"),
            ("Content-Length", "20"),
            ("X-CSM-Admin-Token", "t0ken"),
            ("Triton-Front-Key", "guess"),
            ("Authorization", "Bearer x"),
            ("Cookie", "a=b"),
            ("Host", "evil.example"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("Connection", "close"),
            ("Accept-Encoding", "gzip"),
            ("Content-Encoding", "gzip"),
            ("X-Other", "1"),
        )
    )
    assert forwarded_headers(headers) == {
        "content-type": "application/json",
        "accept": "application/json",
        "inference-header-content-length": "12",
        C.ADMIN_TOKEN_HEADER: "t0ken",
    }


def test_the_forwarded_model_headers_are_those_triton_hands_the_models():
    assert kserve_limits._MODEL_HEADER.pattern == C.HEADER_FORWARD_PATTERN
    assert kserve_limits._MODEL_HEADER.fullmatch(C.ADMIN_TOKEN_HEADER)


@pytest.mark.parametrize(
    "pairs, expected",
    [
        (
            (("Inference-Header-Content-Length", "10"), ("Inference-Header-Content-Length", "99")),
            "'inference-header-content-length' is given more than once",
        ),
        ((("Content-Type", "a"), ("content-type", "b")), "'content-type' is given more than once"),
        ((("X-CSM-Admin-Token", "a"), ("x-csm-admin-token", "b")), "'x-csm-admin-token' is given more than once"),
        ((("Content-Length", "5"), ("Transfer-Encoding", "chunked")), "both Content-Length and Transfer-Encoding"),
        ((("Transfer-Encoding", "gzip, chunked"),), "chunked only"),
        ((("Inference-Header-Content-Length", "²"),), "holds bytes other than visible ASCII"),
        ((("Inference-Header-Content-Length", b"\xb2"),), "holds bytes other than visible ASCII"),
        ((("X-CSM-Admin-Token", b"\xb2"),), "holds bytes other than visible ASCII"),
        ((("Content-Type", b"a\x00b"),), "holds bytes other than visible ASCII"),
        ((("Inference-Header-Content-Length", "1e3"),), "Inference-Header-Content-Length must be a byte count"),
        ((("Inference-Header-Content-Length", "10, 20"),), "must be a byte count"),
        ((("Content-Length", "-1"),), "Content-Length must be a byte count"),
    ],
)
def test_a_header_the_front_reads_or_forwards_is_read_one_way_or_refused(pairs, expected):
    with pytest.raises(Refused, match=expected) as caught:
        request_headers(raw_headers(*pairs))
    assert caught.value.status == 400


def test_odd_bytes_in_a_header_the_front_ignores_do_no_harm():
    assert request_headers(raw_headers(("X-Other", b"\xb2\xff"), ("User-Agent", b"caf\xe9"))) == {}


# --- models: the public ones unless the operator says otherwise ---------------------------------
def test_the_default_models_are_the_public_ones():
    assert DEFAULT_MODELS == C.PUBLIC_MODELS and not set(INTERNAL_MODELS) & set(DEFAULT_MODELS)
    assert models_option(None) == models_option("") == frozenset(C.PUBLIC_MODELS)
    assert models_option("csm_tts, mimi_decoder") == {"csm_tts", "mimi_decoder"}
    assert models_option(ALL_MODELS) is None  # every model: only when asked for by name


def test_the_cli_and_the_environment_choose_the_models(monkeypatch):
    chosen = {}
    monkeypatch.setattr(kserve_front, "create_front", lambda url, **options: chosen.update(options))
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: None)
    monkeypatch.delenv(kserve_front.MODELS_ENV, raising=False)
    kserve_front.main([])
    assert models_option(chosen["models"]) == frozenset(C.PUBLIC_MODELS)
    kserve_front.main(["--models", "csm_tts,mimi_decoder"])
    assert models_option(chosen["models"]) == {"csm_tts", "mimi_decoder"}
    monkeypatch.setenv(kserve_front.MODELS_ENV, "*")
    kserve_front.main([])
    assert models_option(chosen["models"]) is None


# --- against a fake Triton: what reaches it ------------------------------------------------------
class FakeTriton:
    def __init__(self):
        self.received: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.received.append(request)
        model = request.url.path.split("/")[3] if request.url.path.startswith("/v2/models/") else ""
        if request.url.path.endswith("/config"):
            return httpx.Response(200, json={**WATERMARK_DETECT, "name": model})
        return httpx.Response(200, json={"model_name": model, "outputs": []})


@pytest.fixture
def triton():
    return FakeTriton()


def test_client_headers_off_the_allow_list_never_reach_triton(triton):
    app = create_front("triton:8000", transport=httpx.MockTransport(triton), triton_headers={"triton-front-key": "k"})
    with TestClient(app) as front:
        answer = front.post(
            "/v2/models/watermark_detect/infer?x=1",
            content=VALID,
            headers={
                "content-type": "application/json",
                C.ADMIN_TOKEN_HEADER: "t",
                "triton-front-key": "guess",
                "authorization": "Bearer x",
                "cookie": "c=1",
                "x-other": "1",
                "x-forwarded-for": "1.2.3.4",
            },
        )
        assert answer.status_code == 200
    sent = triton.received[-1]
    assert sent.url.query == b"" and sent.content == VALID
    assert {name for name in sent.headers} <= {
        "host",
        "accept",
        "accept-encoding",
        "connection",
        "user-agent",
        "content-length",
        "content-type",
        C.ADMIN_TOKEN_HEADER,
        "triton-front-key",
    }
    assert sent.headers["triton-front-key"] == "k" and sent.headers[C.ADMIN_TOKEN_HEADER] == "t"
    assert sent.headers["content-length"] == str(len(VALID))


@pytest.mark.parametrize(
    "headers",
    [
        [("x-csm-admin-token", b"\xb2")],
        [("inference-header-content-length", "²".encode())],
        [("inference-header-content-length", "10"), ("inference-header-content-length", "10")],
    ],
)
def test_odd_or_repeated_headers_are_a_400_not_a_500_and_reach_nobody(triton, headers):
    with TestClient(create_front("triton:8000", transport=httpx.MockTransport(triton))) as front:
        answer = front.post("/v2/models/watermark_detect/infer", content=VALID, headers=headers)
        assert answer.status_code == 400 and "header" in answer.json()["error"]
        assert front.get("/v2/models/watermark_detect", headers=headers).status_code == 400
    assert triton.received == []


def test_internal_models_are_refused_by_default_naming_the_allow_list(triton):
    with TestClient(create_front("triton:8000", transport=httpx.MockTransport(triton))) as front:
        for model in INTERNAL_MODELS:
            for answer in (
                front.post(f"/v2/models/{model}/infer", content=VALID),
                front.post(f"/v2/models/{model}/generate", json={}),
                front.get(f"/v2/models/{model}/config"),
                front.get(f"/v2/models/{model}/versions/1"),
            ):
                assert answer.status_code == 404, model
                assert answer.json()["error"] == (
                    f"model '{model}' is not served by this front (it serves: {', '.join(sorted(C.PUBLIC_MODELS))})"
                )
        assert front.get("/v2/models/stats").status_code == 404
        assert front.get("/v2/models/watermark_detect/stats").status_code == 404
    assert triton.received == []


def test_the_config_cache_is_bounded_and_holds_only_allowed_models(triton):
    app = create_front("triton:8000", transport=httpx.MockTransport(triton), spec_cache_size=4)
    with TestClient(app) as front:
        for index in range(50):
            assert front.post(f"/v2/models/not_public_{index}/infer", content=VALID).status_code == 404
        assert triton.received == [] and len(app.state.front._specs) == 0
        for model in C.PUBLIC_MODELS:
            front.post(f"/v2/models/{model}/infer", content=VALID)
        assert list(app.state.front._specs) == [f"{model}/" for model in C.PUBLIC_MODELS[-4:]]

    everything = create_front(
        "triton:8000", transport=httpx.MockTransport(triton), models=ALL_MODELS, spec_cache_size=8
    )
    with TestClient(everything) as front:
        for index in range(100):
            assert front.post(f"/v2/models/any_{index}/versions/{index}/infer", content=VALID).status_code == 200
        assert len(everything.state.front._specs) == 8


# --- load: checks a few at a time, in-flight bodies within a byte budget, sizes while reading ----
def run_against(app, scenario):
    """`scenario(client)` against the front's app in one event loop (httpx's ASGITransport
    pulls a request's body only as the front reads it)."""

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front") as client:
            try:
                return await scenario(client)
            finally:
                await app.state.front.aclose()

    return asyncio.run(main())


class GatedTriton(FakeTriton):
    """Holds every /infer until `gate` is set: the bodies stay in flight meanwhile."""

    def __init__(self):
        super().__init__()
        self.gate: asyncio.Event | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/infer"):
            await self.gate.wait()
        return self(request)


async def chunks(payload: bytes, size: int = 100):
    for start in range(0, len(payload), size):
        yield payload[start : start + size]


def test_bodies_past_the_in_flight_budget_are_a_503_with_retry_after_and_the_budget_comes_back():
    triton = GatedTriton()
    app = create_front(
        "triton:8000", max_body_bytes=1000, max_inflight_bytes=1000, transport=httpx.MockTransport(triton.handle)
    )
    front = app.state.front
    padded = VALID + b" " * (600 - len(VALID))
    url = "/v2/models/watermark_detect/infer"

    async def scenario(client: httpx.AsyncClient):
        triton.gate = asyncio.Event()
        first = asyncio.create_task(client.post(url, content=padded))
        while front.budget.inflight_bytes < 600:  # read, checked, waiting for Triton
            await asyncio.sleep(0.01)
        declared = await client.post(url, content=padded)  # Content-Length 600: refused unread
        streamed = await client.post(url, content=chunks(padded))  # chunked: refused once past the budget
        small = asyncio.create_task(client.post(url, content=VALID))  # fits beside the first
        while front.budget.inflight_bytes < 600 + len(VALID):
            await asyncio.sleep(0.01)
        triton.gate.set()
        done = [await first, await small]
        after = front.budget.inflight_bytes
        again = await client.post(url, content=padded)
        return declared, streamed, done, after, again

    declared, streamed, done, after, again = run_against(app, scenario)
    for busy in (declared, streamed):
        assert busy.status_code == 503 and busy.headers["retry-after"] == str(kserve_limits.RETRY_AFTER_S)
        assert "as many request bodies as it may at once (1000 bytes)" in busy.json()["error"]
    assert [answer.status_code for answer in done] == [200, 200] and after == 0
    assert again.status_code == 200 and front.budget.inflight_bytes == 0
    assert [request.content for request in triton.received if request.url.path.endswith("/infer")] == [
        padded,
        VALID,
        padded,
    ]


def test_checks_run_a_few_at_a_time_and_the_others_wait_their_turn(monkeypatch):
    app = create_front("triton:8000", max_checks=2, transport=httpx.MockTransport(FakeTriton()))
    front, lock = app.state.front, threading.Lock()
    running, most = [0], [0]
    check = front._check

    def slow_check(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return check(*args)

    monkeypatch.setattr(front, "_check", slow_check)

    async def scenario(client: httpx.AsyncClient):
        return await asyncio.gather(
            *(client.post("/v2/models/watermark_detect/infer", content=VALID) for _ in range(8))
        )

    answers = run_against(app, scenario)
    assert [answer.status_code for answer in answers] == [200] * 8 and most[0] == 2


def test_an_endless_body_is_a_413_after_the_limit_not_after_reading_it():
    triton = FakeTriton()
    app = create_front("triton:8000", max_body_bytes=1 << 20, transport=httpx.MockTransport(triton))
    sent = [0]

    async def endless(piece: bytes = b" " * 65536):
        while True:
            sent[0] += len(piece)
            yield piece

    async def scenario(client: httpx.AsyncClient):
        plain = await client.post("/v2/models/watermark_detect/infer", content=endless())
        plain_sent, sent[0] = sent[0], 0
        declared = await client.post(
            "/v2/models/watermark_detect/infer", content=endless(), headers={"content-length": str(1 << 30)}
        )
        declared_sent, sent[0] = sent[0], 0
        # Compressed: 1 MiB of input inflates to far more; refused once past the limit.
        bomb = zlib.compress(b" " * (64 << 20), 9)
        inflated = await client.post(
            "/v2/models/watermark_detect/infer", content=chunks(bomb, 4096), headers={"content-encoding": "deflate"}
        )
        return plain, plain_sent, declared, declared_sent, inflated

    plain, plain_sent, declared, declared_sent, inflated = run_against(app, scenario)
    assert plain.status_code == 413 and "over the front's limit" in plain.json()["error"]
    assert plain_sent <= (1 << 20) + 65536  # read up to the limit and one piece, then refused
    assert declared.status_code == 413 and declared_sent == 0  # refused on its Content-Length, unread
    assert inflated.status_code == 413 and "inflates past" in inflated.json()["error"]
    assert triton.received == [] and app.state.front.budget.inflight_bytes == 0


def test_a_body_that_stalls_is_a_408_and_gives_its_bytes_back():
    app = create_front("triton:8000", body_timeout_s=0.2, transport=httpx.MockTransport(FakeTriton()))

    async def stalls():
        yield VALID[:10]
        await asyncio.sleep(30)
        yield VALID[10:]

    async def scenario(client: httpx.AsyncClient):
        answer = await client.post("/v2/models/watermark_detect/infer", content=stalls())
        return answer, app.state.front.budget.inflight_bytes

    answer, held = run_against(app, scenario)
    assert answer.status_code == 408 and "within 0.2 s" in answer.json()["error"] and held == 0


def test_the_load_bounds_are_options_and_environment(monkeypatch):
    chosen = {}
    monkeypatch.setattr(kserve_front, "create_front", lambda url, **options: chosen.update(options))
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: None)
    for name in (kserve_front.MAX_CHECKS_ENV, kserve_front.MAX_INFLIGHT_ENV):
        monkeypatch.delenv(name, raising=False)
    kserve_front.main([])
    assert (chosen["max_checks"], chosen["max_inflight_bytes"], chosen["body_timeout_s"]) == (
        kserve_limits.DEFAULT_MAX_CHECKS,
        kserve_limits.DEFAULT_MAX_INFLIGHT_BYTES,
        kserve_limits.DEFAULT_BODY_TIMEOUT_S,
    )
    monkeypatch.setenv(kserve_front.MAX_CHECKS_ENV, "3")
    monkeypatch.setenv(kserve_front.MAX_INFLIGHT_ENV, "512")
    kserve_front.main(["--body-timeout-s", "30"])
    assert (chosen["max_checks"], chosen["max_inflight_bytes"], chosen["body_timeout_s"]) == (3, 512 << 20, 30.0)
    with pytest.raises(SystemExit):
        kserve_front.main(["--max-inflight-mb", "32"])  # below the 64 MiB body limit: nothing large would pass
    with pytest.raises(ValueError):
        kserve_front.KServeFront("triton:8000", max_body_bytes=100, max_inflight_bytes=99)
