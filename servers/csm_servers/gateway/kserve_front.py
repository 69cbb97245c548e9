"""A front for Triton's KServe v2 HTTP API that refuses, with a 4xx, what Triton 2.51
itself mishandles, and forwards the rest to Triton's HTTP port: the body byte for byte,
of the headers only those on an allow-list.

    python -m csm_servers.gateway.kserve_front --triton-http localhost:8000 --port 8080

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
These bounds, and the reading of the headers, are kserve_limits.py's.

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
import contextlib
import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from urllib.parse import quote

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from csm_servers.gateway.kserve_checks import (
    DEFAULT_MAX_ELEMENTS,
    ModelSpec,
    Refused,
    check_generate,
    check_infer,
    parse_json,
)
from csm_servers.gateway.kserve_limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CHECKS,
    DEFAULT_MAX_INFLIGHT_BYTES,
    BodyBudget,
    Busy,
    forwarded_headers,
    request_headers,
    server_settings,
)

__all__ = [
    "ALL_MODELS",
    "DEFAULT_MODELS",
    "DEFAULT_SPEC_CACHE_SIZE",
    "KServeFront",
    "create_front",
    "main",
    "models_option",
]

DEFAULT_CONFIG_TTL_S = 60.0
DEFAULT_TIMEOUT_S = 300.0  # a long utterance on a busy server
MAX_CHECKS_ENV = "CSM_FRONT_MAX_CHECKS"
MAX_INFLIGHT_ENV = "CSM_FRONT_MAX_INFLIGHT_MB"
TRITON_HEADER_ENV = "CSM_FRONT_TRITON_HEADER"
MODELS_ENV = "CSM_FRONT_MODELS"
HEADER_TIMEOUT_ENV = "CSM_FRONT_HEADER_TIMEOUT_S"
# Mirror of csm_triton.constants.PUBLIC_MODELS (the clients never import the server's
# package; tests/security/test_kserve_front_unit.py keeps the two equal).
DEFAULT_MODELS = ("csm_tts", "csm_tts_stream", "voice_register", "voice_list", "voice_delete", "watermark_detect")
ALL_MODELS = "*"  # --models '*': every model Triton serves, internal stages included
# Configs kept (model, version); least recently used first out. Only allowed models get
# here, but with ALL_MODELS or many versions the names are the caller's to choose.
DEFAULT_SPEC_CACHE_SIZE = 64
_VERSION = re.compile(r"[0-9]{1,19}")


def _error(refused: Refused) -> JSONResponse:
    headers = {"retry-after": str(refused.retry_after_s)} if isinstance(refused, Busy) else None
    return JSONResponse({"error": str(refused)}, status_code=refused.status, headers=headers)


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

    def __init__(
        self,
        triton_http_url: str,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        config_ttl_s: float = DEFAULT_CONFIG_TTL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        triton_headers: Mapping[str, str] | None = None,
        models: Iterable[str] | str | None = None,
        spec_cache_size: int = DEFAULT_SPEC_CACHE_SIZE,
        max_checks: int = DEFAULT_MAX_CHECKS,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = triton_http_url if "://" in triton_http_url else f"http://{triton_http_url}"
        self.max_elements, self.config_ttl_s = max_elements, config_ttl_s
        self.budget = BodyBudget(
            max_body_bytes=max_body_bytes,
            max_checks=max_checks,
            max_inflight_bytes=max_inflight_bytes,
            body_timeout_s=body_timeout_s,
        )
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
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self.timeout,
                transport=self._transport,
                headers={"accept-encoding": "identity"},
            )
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
        return template[template.index("/v2") :].format(model=model, version=version)

    async def _send(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes | None = None, *, stream: bool = False
    ):
        try:
            sent = self.client.build_request(
                method, path, headers={**forwarded_headers(headers), **self.triton_headers}, content=body
            )
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

    def _check(self, spec: ModelSpec, path: str, body: bytes, header_length: str | None) -> None:
        if path.endswith("/infer"):
            if header_length is not None and int(header_length) > len(body):
                raise Refused(
                    f"Inference-Header-Content-Length must be a byte count within the body's "
                    f"{len(body)} bytes, got '{header_length[:40]}'"
                )
            split = len(body) if header_length is None else int(header_length)
            check_infer(
                spec, parse_json(body[:split], "the JSON header"), len(body) - split, max_elements=self.max_elements
            )
        else:
            check_generate(spec, parse_json(body), max_elements=self.max_elements)

    async def _inference(self, request: Request):
        try:
            path = self._triton_path(request)
            headers = request_headers(request.scope["headers"])
            if not path.endswith("/infer"):  # /generate has no binary part to split
                headers.pop("inference-header-content-length", None)
            held = self.budget.hold()
            try:
                body = await self.budget.read_body(request, headers, held)
                spec = await self.spec(request.path_params["model"], request.path_params.get("version"))
                # Linear in the body, but a 64 MiB body is still seconds of parsing: off the
                # event loop, so other requests (health checks, streams) keep moving; a few
                # at a time (DEFAULT_MAX_CHECKS), each holding many times its body in objects.
                async with self.budget.slots():
                    await run_in_threadpool(
                        self._check, spec, path, body, headers.get("inference-header-content-length")
                    )
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

    app = FastAPI(title="KServe v2 front of Triton", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(front.router)
    app.state.front = front

    @app.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"], include_in_schema=False
    )
    async def not_served(path: str):
        return _error(Refused(f"'/{path[:80]}' is not served by this front", 404))

    return app


def main(argv=None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m csm_servers.gateway.kserve_front",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--triton-http", default="localhost:8000", help="Triton's HTTP host:port")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: everyone)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20)
    parser.add_argument("--max-elements", type=int, default=DEFAULT_MAX_ELEMENTS, help="per input")
    parser.add_argument(
        "--max-checks",
        type=int,
        default=os.environ.get(MAX_CHECKS_ENV, DEFAULT_MAX_CHECKS),
        help=f"bodies checked at once, the others wait (also ${MAX_CHECKS_ENV})",
    )
    parser.add_argument(
        "--max-inflight-mb",
        type=float,
        default=os.environ.get(MAX_INFLIGHT_ENV, DEFAULT_MAX_INFLIGHT_BYTES / 2**20),
        help=f"request bodies held at once, all requests together; past it a 503 with Retry-After "
        f"(also ${MAX_INFLIGHT_ENV}; at least --max-body-mb)",
    )
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="a body must arrive whole within this, else 408",
    )
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=os.environ.get(HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT_S),
        help=f"a request's headers must arrive within this, else the connection is closed (also ${HEADER_TIMEOUT_ENV})",
    )
    parser.add_argument(
        "--triton-header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"a header sent to Triton with every request (also ${TRITON_HEADER_ENV}, which keeps "
        "a key out of the process list)",
    )
    parser.add_argument(
        "--models",
        default=os.environ.get(MODELS_ENV),
        help=f"comma-separated: the only models served (also ${MODELS_ENV}; default: the public "
        f"ones, {','.join(DEFAULT_MODELS)}; '{ALL_MODELS}': every model Triton serves, "
        "including the internal stages that skip the watermark)",
    )
    args = parser.parse_args(argv)
    headers = {}
    for item in args.triton_header + ([os.environ[TRITON_HEADER_ENV]] if os.environ.get(TRITON_HEADER_ENV) else []):
        name, equals, value = item.partition("=")
        if not (name.strip() and equals):
            parser.error(f"a Triton header is NAME=VALUE, got {item[:40]!r}")
        headers[name.strip()] = value
    if args.max_inflight_mb < args.max_body_mb or args.max_checks < 1:
        parser.error("--max-inflight-mb must be at least --max-body-mb, and --max-checks at least 1")
    app = create_front(
        args.triton_http,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_elements=args.max_elements,
        triton_headers=headers,
        models=args.models,
        max_checks=args.max_checks,
        max_inflight_bytes=int(args.max_inflight_mb * 2**20),
        body_timeout_s=args.body_timeout_s,
    )
    uvicorn.run(app, host=args.host, port=args.port, **server_settings(float(args.header_timeout_s)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
