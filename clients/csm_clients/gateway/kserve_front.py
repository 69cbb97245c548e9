"""A front for Triton's KServe v2 HTTP API that refuses, with a 4xx, what Triton 2.51
itself mishandles, and forwards the rest to Triton's HTTP port: the body byte for byte,
of the headers only those on an allow-list.

    python -m csm_clients.gateway.kserve_front --triton-http localhost:8000 --port 8080

Triton 2.51 allocates a JSON input's buffer from its *declared* shape before reading
the data: `"shape": [1099511627776]` in an ~80-byte body aborts the whole server
(std::bad_alloc), `[2147483648]` holds 8 GB for seconds; wrongly typed JSON (a BYTES
input sent as INT16 numbers, a string in `parameters.priority`) answers 500, and
integers wider than the input's type wrap silently. Here every /infer and /generate
body is checked against the model's config (fetched from Triton, cached) first:
known input names, the config's datatype, rank and fixed dims, the batch size, every
input's element count (declared shape = data given, at most `max_elements`), each
JSON value's type and range, the binary extension's sizes, the body's size (while it is read, never after reading
it whole; gzip/deflate inflated as it arrives). The JSON
is read strictly (UTF-8, no repeated keys, at most MAX_JSON_DEPTH levels), every step
linear in the body's length. Refusals are Triton's own error shape, `{"error": "..."}`.
Shared memory is not offered.

Load: at most `max_checks` bodies are checked at once (the rest wait their turn), and
request bodies held at once add up to at most `max_inflight_bytes`; past that a request
is answered 503 with Retry-After instead of being read. A body must arrive whole within
`body_timeout_s` (else 408), so a slow sender cannot sit on the budget. Its headers must
arrive within --header-timeout-s (10 s), else the connection is closed (`main`).

Routes: GET /v2, /v2/health/{live,ready}, /v2/models/{m}[/versions/{v}][/ready,
/config]; POST .../infer, .../generate, .../generate_stream. Nothing else of Triton's
API is reachable: not repository load/unload/index, shared memory, trace, logging or
statistics (404). Query strings are not passed on (the KServe v2 routes take none).

Models: only the public ones by default (DEFAULT_MODELS: csm_tts, csm_tts_stream,
voice_register, voice_list, voice_delete, watermark_detect). The others are stages of
these; chained by hand (csm_prepare -> csm_generate -> mimi_decoder) they give cloned
speech without the watermark. `--models a,b` or $CSM_FRONT_MODELS lists others, `*`
opens every model Triton serves: a deliberate choice, for a trusted network only.

Headers: each one the front reads or passes on is given at most once and in visible
ASCII, and the body's framing is unambiguous (no Content-Length with
Transfer-Encoding), else a 400; only FORWARDED_HEADERS and the x-csm-* headers the
models read (the admin token) reach Triton, never e.g. a restricted-API key.
With `--triton-header NAME=KEY` and tritonserver's `--http-restricted-api=inference:NAME=KEY`
only the front gets through to Triton's inference routes (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import time
import zlib
from collections import OrderedDict
from typing import Iterable, Mapping
from urllib.parse import quote

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from csm_clients.gateway.kserve_checks import (DEFAULT_MAX_ELEMENTS, ModelSpec, Refused, check_generate,
                                               check_infer, parse_json)

__all__ = ["ALL_MODELS", "DEFAULT_BODY_TIMEOUT_S", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_CHECKS",
           "DEFAULT_MAX_INFLIGHT_BYTES", "DEFAULT_MODELS", "DEFAULT_SPEC_CACHE_SIZE", "FORWARDED_HEADERS",
           "RETRY_AFTER_S", "Busy", "KServeFront", "create_front", "forwarded_headers", "main", "models_option",
           "request_headers"]

# 64 MiB, the default of the --http-max-input-size that later Triton releases added:
# 120 s of 24 kHz FP32 audio is 11.5 MB in binary, ~60 MB as JSON text.
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_CONFIG_TTL_S = 60.0
DEFAULT_TIMEOUT_S = 300.0  # a long utterance on a busy server
# Bodies checked at once, each in a worker thread (the pool has ~40). Parsing turns the
# JSON text into Python objects several times its size (a float: 24 bytes plus an 8-byte
# slot, for 4-8 bytes of text), so one 64 MiB body can take up to ~1 GB while checked;
# more checks at once would not finish sooner either, they share the GIL. The others
# wait their turn, their bodies counted in the byte budget below.
DEFAULT_MAX_CHECKS = 2
# Request bodies held at once, all requests together, from the first byte read until
# Triton has answered (for a stream: until its headers). Without it, memory grows with
# every parallel 64 MiB body; past it a request is a 503 with Retry-After, never a wait
# in memory. Four bodies of the largest size; a TTS request's body is a few hundred bytes.
DEFAULT_MAX_INFLIGHT_BYTES = 4 * DEFAULT_MAX_BODY_BYTES
RETRY_AFTER_S = 2  # a large body takes about that long to check and hand on
# The whole body must arrive within this (else 408): the byte budget counts what is
# received, and a client that sends 60 MB and then stalls would hold its share for good.
# 64 MiB in 120 s is ~4.5 Mbit/s.
DEFAULT_BODY_TIMEOUT_S = 120.0
MAX_CHECKS_ENV = "CSM_FRONT_MAX_CHECKS"
MAX_INFLIGHT_ENV = "CSM_FRONT_MAX_INFLIGHT_MB"
TRITON_HEADER_ENV = "CSM_FRONT_TRITON_HEADER"
MODELS_ENV = "CSM_FRONT_MODELS"
HEADER_TIMEOUT_ENV = "CSM_FRONT_HEADER_TIMEOUT_S"
# A request's head must arrive within this (uvicorn has no such deadline of its own: a
# client sending its headers a byte at a time, or nothing, kept its connection for ever).
DEFAULT_HEADER_TIMEOUT_S = 10.0
# Mirror of csm_triton.constants.PUBLIC_MODELS (the clients never import the server's
# package; tests/security/test_kserve_front_unit.py keeps the two equal).
DEFAULT_MODELS = ("csm_tts", "csm_tts_stream", "voice_register", "voice_list", "voice_delete", "watermark_detect")
ALL_MODELS = "*"  # --models '*': every model Triton serves, internal stages included
# Configs kept (model, version); least recently used first out. Only allowed models get
# here, but with ALL_MODELS or many versions the names are the caller's to choose.
DEFAULT_SPEC_CACHE_SIZE = 64
# What reaches Triton of the client's headers: the body's type and its binary split and
# what the client accepts, plus those Triton hands the models as request parameters
# (mirror of csm_triton.constants.HEADER_FORWARD_PATTERN: the voice models' admin token).
# Not a restricted-API key, cookies or any other header. Content-Length is set anew for
# the body sent, which is the body checked (inflated if it came compressed).
FORWARDED_HEADERS = ("content-type", "accept", "inference-header-content-length")
_MODEL_HEADER = re.compile(r"x-csm-.*")
# Read by the front or passed on: each at most once, so the value checked is the value
# Triton reads (with two Inference-Header-Content-Length, Triton may split at the other).
_READ_HEADERS = frozenset({"content-length", "transfer-encoding", "content-encoding", *FORWARDED_HEADERS})
_VISIBLE_ASCII = re.compile(rb"[\t\x20-\x7e]*")
_BYTE_COUNT = re.compile(r"[0-9]{1,19}")  # ASCII digits: '²'.isdigit() is True, int('²') fails
_VERSION = re.compile(r"[0-9]{1,19}")


class Busy(Refused):
    """The front holds as many request bodies as it may: a 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message, 503)
        self.retry_after_s = retry_after_s


def _error(refused: Refused) -> JSONResponse:
    headers = {"retry-after": str(refused.retry_after_s)} if isinstance(refused, Busy) else None
    return JSONResponse({"error": str(refused)}, status_code=refused.status, headers=headers)


class _Held:
    """The bytes of the front's in-flight budget that one request holds."""

    def __init__(self, front: "KServeFront"):
        self.front, self.bytes = front, 0

    def grow_to(self, size: int) -> None:
        more = size - self.bytes
        if more > 0:
            self.front._reserve(more)
            self.bytes = size

    def release(self) -> None:
        self.front._inflight_bytes -= self.bytes
        self.bytes = 0


def request_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The headers the front reads or passes on (lower-case names), from a request's raw
    ASGI headers; Refused (400) for one given twice, one holding anything but visible
    ASCII (httpx cannot send it: an unhandled 500 before), or ambiguous framing."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1").lower()
        if name not in _READ_HEADERS and not _MODEL_HEADER.fullmatch(name):
            continue
        shown = name[:60]
        if name in headers:
            raise Refused(f"the header '{shown}' is given more than once; the front accepts it once")
        if not _VISIBLE_ASCII.fullmatch(raw_value):
            raise Refused(f"the header '{shown}' holds bytes other than visible ASCII")
        headers[name] = raw_value.decode("ascii").strip()
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise Refused("a request with both Content-Length and Transfer-Encoding is ambiguous")
        if headers["transfer-encoding"].lower() != "chunked":
            raise Refused(f"Transfer-Encoding '{headers['transfer-encoding'][:40]}' is not accepted (chunked only)")
    for name in ("content-length", "inference-header-content-length"):
        if name in headers and not _BYTE_COUNT.fullmatch(headers[name]):
            raise Refused(f"{name.title()} must be a byte count, got '{headers[name][:40]}'")
    return headers


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Of request_headers' answer, those sent on to Triton."""
    return {name: value for name, value in headers.items()
            if name in FORWARDED_HEADERS or _MODEL_HEADER.fullmatch(name)}


def models_option(value: str | None) -> frozenset[str] | None:
    """--models / $CSM_FRONT_MODELS: comma-separated names, ALL_MODELS for every model
    (None), empty or absent for DEFAULT_MODELS."""
    if value is None or not value.strip():
        return frozenset(DEFAULT_MODELS)
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    return None if ALL_MODELS in names else names


_PASSED_BACK = ("content-type", "inference-header-content-length")


class KServeFront:
    """The routes, the cached model specs and the connection to Triton's HTTP port."""

    def __init__(self, triton_http_url: str, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_elements: int = DEFAULT_MAX_ELEMENTS, config_ttl_s: float = DEFAULT_CONFIG_TTL_S,
                 timeout_s: float = DEFAULT_TIMEOUT_S, triton_headers: Mapping[str, str] | None = None,
                 models: Iterable[str] | str | None = None, spec_cache_size: int = DEFAULT_SPEC_CACHE_SIZE,
                 max_checks: int = DEFAULT_MAX_CHECKS, max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = triton_http_url if "://" in triton_http_url else f"http://{triton_http_url}"
        self.max_body_bytes, self.max_elements, self.config_ttl_s = max_body_bytes, max_elements, config_ttl_s
        if max_checks < 1:
            raise ValueError(f"max_checks must be at least 1, got {max_checks}")
        if max_inflight_bytes < max_body_bytes:  # else the largest body would be a 503 forever
            raise ValueError(f"max_inflight_bytes ({max_inflight_bytes}) must be at least max_body_bytes "
                             f"({max_body_bytes})")
        self.max_checks, self.max_inflight_bytes, self.body_timeout_s = max_checks, max_inflight_bytes, body_timeout_s
        self._inflight_bytes = 0  # touched in the event loop only
        self._check_slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)
        # Sent with every request, over the client's: the key of tritonserver's
        # --http-restricted-api=inference:<name>=<key>, so only the front gets through.
        self.triton_headers = {k.lower(): v for k, v in (triton_headers or {}).items()}
        # None: every model Triton serves, only when ALL_MODELS is asked for by name.
        self.models = models_option(models if isinstance(models, str) or models is None else ",".join(models))
        self._transport = transport  # tests: a fake Triton
        self._client: httpx.AsyncClient | None = None  # made in the serving event loop
        self.spec_cache_size = spec_cache_size
        self._specs: OrderedDict[str, tuple[float, ModelSpec]] = OrderedDict()
        self.router = APIRouter()
        for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
            self.router.add_api_route(path, self._forward_get, methods=["GET"], include_in_schema=False)
        # Statistics are left out: per-model counts and timings are the operator's
        # (Triton's metrics port), not the callers'.
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            for tail in ("", "/ready", "/config"):
                self.router.add_api_route(model + tail, self._forward_get, methods=["GET"], include_in_schema=False)
            for tail in ("/infer", "/generate", "/generate_stream"):
                self.router.add_api_route(model + tail, self._inference, methods=["POST"], include_in_schema=False)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, transport=self._transport,
                                             headers={"accept-encoding": "identity"})
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _triton_path(self, request: Request) -> str:
        """Triton's path for a request: its route's template, filled in (quoted)."""
        template = request.scope["route"].path
        version, model = request.path_params.get("version"), request.path_params.get("model")
        if version is not None and not _VERSION.fullmatch(version):
            raise Refused(f"a model version is a number, got '{version[:40]}'", 404)
        if model is not None:
            if self.models is not None and model not in self.models:
                served = ", ".join(sorted(self.models)) or "none"
                raise Refused(f"model '{model[:80]}' is not served by this front (it serves: {served})", 404)
            if model == "stats":  # Triton's GET /v2/models/stats: every model's statistics
                raise Refused("'/v2/models/stats' is not served by this front", 404)
        model = quote(model or "", safe="")
        return template[template.index("/v2"):].format(model=model, version=version)

    async def _send(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None = None, *,
                    stream: bool = False):
        try:
            sent = self.client.build_request(method, path, headers={**forwarded_headers(headers),
                                                                    **self.triton_headers}, content=body)
            upstream = await self.client.send(sent, stream=stream)
        except httpx.TimeoutException:
            raise Refused(f"Triton at {self.base_url} did not answer in time", 504) from None
        except httpx.HTTPError as error:
            raise Refused(f"Triton at {self.base_url} is not reachable ({type(error).__name__})", 503) from None
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in _PASSED_BACK}
        if not stream:
            return Response(upstream.content, status_code=upstream.status_code, headers=headers)

        async def relay():
            try:
                async for chunk in upstream.aiter_bytes():
                    yield chunk
            finally:
                await upstream.aclose()  # a client gone closes Triton's stream too
        return StreamingResponse(relay(), status_code=upstream.status_code, headers=headers)

    async def _forward_get(self, request: Request):
        try:
            path = self._triton_path(request)
            return await self._send("GET", path, request_headers(request.scope["headers"]))
        except Refused as refused:
            return _error(refused)

    async def spec(self, model: str, version: str | None) -> ModelSpec:
        key = f"{model}/{version or ''}"
        cached = self._specs.get(key)
        if cached and time.monotonic() - cached[0] < self.config_ttl_s:
            self._specs.move_to_end(key)
            return cached[1]
        path = f"/v2/models/{quote(model, safe='')}" + (f"/versions/{version}" if version else "") + "/config"
        try:
            answer = await self.client.get(path, headers=self.triton_headers)
        except httpx.HTTPError as error:
            raise Refused(f"Triton at {self.base_url} is not reachable ({type(error).__name__})", 503) from None
        if answer.status_code != 200:  # unknown model or version: Triton's own words and status
            message = answer.json().get("error", answer.text) if answer.content.startswith(b"{") else answer.text
            raise Refused(message, answer.status_code if 400 <= answer.status_code < 500 else 502)
        spec = ModelSpec.from_config(answer.json())
        self._specs[key] = (time.monotonic(), spec)
        self._specs.move_to_end(key)
        while len(self._specs) > self.spec_cache_size:
            self._specs.popitem(last=False)
        return spec

    def _reserve(self, size: int) -> None:
        """Count `size` more bytes in flight, or Busy when the budget has no room."""
        if self._inflight_bytes + size > self.max_inflight_bytes:
            raise self._busy()
        self._inflight_bytes += size

    def _busy(self) -> Busy:
        return Busy(f"the front holds as many request bodies as it may at once ({self.max_inflight_bytes} bytes); "
                    f"retry in {RETRY_AFTER_S} s")

    def _slots(self) -> asyncio.Semaphore:
        """The check slots, made in the loop that serves (a TestClient starts a loop of its own)."""
        loop = asyncio.get_running_loop()
        if self._check_slots is None or self._check_slots[0] is not loop:
            self._check_slots = (loop, asyncio.Semaphore(self.max_checks))
        return self._check_slots[1]

    async def _body(self, request: Request, headers: Mapping[str, str], held: _Held) -> bytes:
        """The body, inflated, read chunk by chunk: refused (413) as soon as it passes the
        size limit, (503) as soon as it no longer fits the in-flight budget, (408) when
        it has not arrived within body_timeout_s."""
        limit = self.max_body_bytes
        declared = int(headers.get("content-length") or 0)
        if declared > limit:
            raise Refused(f"the request body is {declared} bytes; the front's limit is {limit}", 413)
        if self._inflight_bytes + declared > self.max_inflight_bytes:
            raise self._busy()  # at once, unread; bytes are counted as they arrive, not as declared
        encoding = headers.get("content-encoding", "identity").lower()
        wbits = {"": None, "identity": None, "gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding, 0)
        if wbits == 0:
            raise Refused(f"Content-Encoding '{encoding[:40]}' is not accepted (gzip, deflate or none)")
        inflate = zlib.decompressobj(wbits) if wbits else None
        body, received = bytearray(), 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        raise Refused(f"the request body is over the front's limit of {limit} bytes", 413)
                    if inflate is not None:
                        try:  # at most one byte past the limit comes out, whatever the ratio
                            chunk = inflate.decompress(chunk, limit + 1 - len(body))
                        except zlib.error:
                            raise Refused(f"the request body is not valid {encoding} data") from None
                        if len(body) + len(chunk) > limit:
                            raise Refused(f"the request body inflates past the front's limit of {limit} bytes", 413)
                    held.grow_to(len(body) + len(chunk))
                    body += chunk
        except TimeoutError:
            raise Refused(f"the request body did not arrive whole within {self.body_timeout_s:g} s", 408) from None
        except ClientDisconnect:  # nobody to answer; no traceback in the log either
            raise Refused("the client left before its body arrived whole") from None
        if inflate is not None and not inflate.eof:
            raise Refused(f"the request body is not valid {encoding} data (it ends early)")
        return bytes(body)

    def _check(self, spec: ModelSpec, path: str, body: bytes, header_length: str | None) -> None:
        if path.endswith("/infer"):
            if header_length is not None and int(header_length) > len(body):
                raise Refused(f"Inference-Header-Content-Length must be a byte count within the body's "
                              f"{len(body)} bytes, got '{header_length[:40]}'")
            split = len(body) if header_length is None else int(header_length)
            check_infer(spec, parse_json(body[:split], "the JSON header"), len(body) - split,
                        max_elements=self.max_elements)
        else:
            check_generate(spec, parse_json(body), max_elements=self.max_elements)

    async def _inference(self, request: Request):
        try:
            path = self._triton_path(request)
            headers = request_headers(request.scope["headers"])
            if not path.endswith("/infer"):  # /generate has no binary part to split
                headers.pop("inference-header-content-length", None)
            held = _Held(self)
            try:
                body = await self._body(request, headers, held)
                spec = await self.spec(request.path_params["model"], request.path_params.get("version"))
                # Linear in the body, but a 64 MiB body is still seconds of parsing: off the
                # event loop, so other requests (health checks, streams) keep moving; a few
                # at a time (DEFAULT_MAX_CHECKS), each holding many times its body in objects.
                async with self._slots():
                    await run_in_threadpool(self._check, spec, path, body,
                                            headers.get("inference-header-content-length"))
                return await self._send("POST", path, headers, body, stream=path.endswith("_stream"))
            finally:
                held.release()
        except Refused as refused:
            return _error(refused)


def create_front(triton_http_url: str = "localhost:8000", **options) -> FastAPI:
    """The front as an app of its own (options: those of KServeFront)."""
    front = KServeFront(triton_http_url, **options)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await front.aclose()

    app = FastAPI(title="KServe v2 front of Triton", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.include_router(front.router)
    app.state.front = front

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"],
                   include_in_schema=False)
    async def not_served(path: str):
        return _error(Refused(f"'/{path[:80]}' is not served by this front", 404))

    return app


def main(argv=None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m csm_clients.gateway.kserve_front", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-http", default="localhost:8000", help="Triton's HTTP host:port")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: everyone)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20)
    parser.add_argument("--max-elements", type=int, default=DEFAULT_MAX_ELEMENTS, help="per input")
    parser.add_argument("--max-checks", type=int, default=os.environ.get(MAX_CHECKS_ENV, DEFAULT_MAX_CHECKS),
                        help=f"bodies checked at once, the others wait (also ${MAX_CHECKS_ENV})")
    parser.add_argument("--max-inflight-mb", type=float,
                        default=os.environ.get(MAX_INFLIGHT_ENV, DEFAULT_MAX_INFLIGHT_BYTES / 2**20),
                        help=f"request bodies held at once, all requests together; past it a 503 with Retry-After "
                             f"(also ${MAX_INFLIGHT_ENV}; at least --max-body-mb)")
    parser.add_argument("--body-timeout-s", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="a body must arrive whole within this, else 408")
    parser.add_argument("--header-timeout-s", type=float,
                        default=os.environ.get(HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT_S),
                        help=f"a request's headers must arrive within this, else the connection is closed "
                             f"(also ${HEADER_TIMEOUT_ENV})")
    parser.add_argument("--triton-header", action="append", default=[], metavar="NAME=VALUE",
                        help=f"a header sent to Triton with every request (also ${TRITON_HEADER_ENV}, which keeps "
                             "a key out of the process list)")
    parser.add_argument("--models", default=os.environ.get(MODELS_ENV),
                        help=f"comma-separated: the only models served (also ${MODELS_ENV}; default: the public "
                             f"ones, {','.join(DEFAULT_MODELS)}; '{ALL_MODELS}': every model Triton serves, "
                             "including the internal stages that skip the watermark)")
    args = parser.parse_args(argv)
    headers = {}
    for item in args.triton_header + ([os.environ[TRITON_HEADER_ENV]] if os.environ.get(TRITON_HEADER_ENV) else []):
        name, equals, value = item.partition("=")
        if not (name.strip() and equals):
            parser.error(f"a Triton header is NAME=VALUE, got {item[:40]!r}")
        headers[name.strip()] = value
    if args.max_inflight_mb < args.max_body_mb or args.max_checks < 1:
        parser.error("--max-inflight-mb must be at least --max-body-mb, and --max-checks at least 1")
    app = create_front(args.triton_http, max_body_bytes=int(args.max_body_mb * 2**20), max_elements=args.max_elements,
                       triton_headers=headers, models=args.models, max_checks=args.max_checks,
                       max_inflight_bytes=int(args.max_inflight_mb * 2**20), body_timeout_s=args.body_timeout_s)
    uvicorn.run(app, host=args.host, port=args.port, **_server_settings(float(args.header_timeout_s)))
    return 0


def _server_settings(header_timeout_s: float) -> dict:
    """uvicorn's settings: the gateway's h11 protocol with its header deadline, and its
    bound on a request head's size."""
    from csm_clients.gateway.__main__ import MAX_HEADER_BYTES, HeaderDeadlineProtocol

    if not header_timeout_s > 0:
        raise SystemExit(f"--header-timeout-s must be positive, got {header_timeout_s}")
    protocol = type("FrontH11Protocol", (HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s})
    return {"http": protocol, "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "server_header": False}


if __name__ == "__main__":
    raise SystemExit(main())
