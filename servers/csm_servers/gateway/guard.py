"""What a request may cost the gateway, decided before any route reads its body.

A pure ASGI middleware, outermost in the app, so it runs before FastAPI parses a form
(FastAPI reads and spools a multipart body before any dependency runs):

1. The API key. A route that needs one (`route_policy`) is refused here, 401/403, with
   nothing read; the key's id (keys.key_id) goes into `request.state.api_key_id`.
2. The body. Each route has a byte limit (`GatewayLimits.body_limit`): a declared
   Content-Length over it is refused at once, and a chunked body is counted as it
   streams and refused the moment it passes the limit (413), so neither memory nor
   the multipart spool in the temp folder holds more than the limit. A body must also
   arrive in time (408): no gap between its bytes longer than `body_idle_timeout_s`,
   and the whole of it within `body_timeout_s` of the route's first read, so a sender
   dribbling a byte now and then cannot hold a slot for ever.
3. Concurrency. The routes that make Triton work (POST, DELETE) take a slot of their
   key's bucket (callers without a key share one bucket); past the bucket's slots a
   request waits in its small queue, past the queue (or after waiting too long) it is
   answered 429 with Retry-After (the slots and queues: limiter.py). The slot is held
   until the answer is sent, a stream's last byte included. A WebSocket (the text stream) passes 1 and 3 before
   it is accepted, and holds its slot for the whole session.

Errors have the shape of the route: OpenAI's `{"error": {...}}` under /v1, the
original `{"detail"}` elsewhere. Every limit has an environment variable
(`GatewayLimits.from_environment`) and `python -m csm_servers.gateway` flags.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from csm_clients.errors import PermissionDenied
from csm_servers.gateway.keys import ApiKeys, MissingApiKey
from csm_servers.gateway.limiter import OPEN_BUCKET, Busy, KeyedLimiter

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "GatewayGuard", "GatewayLimits", "RoutePolicy", "route_policy"]

DEFAULT_MAX_UPLOAD_MB = 32.0  # the gateway's own guard on memory, not a model limit
# Text fields, multipart boundaries, a JSON body's own bytes: 20,000 characters of text
# and 16 context turns of 2,000 are well under this.
_FORM_SLACK_BYTES = 1 << 20
# Routes that take no upload (GET, DELETE, unknown paths) take no more than this.
_SMALL_BODY_BYTES = 64 << 10


def _base64_bytes(size: int) -> int:
    return 4 * -(-size // 3)


@dataclass(frozen=True)
class GatewayLimits:
    """Every bound the gateway puts on one process; the environment variable of each is
    `ENVIRONMENT[field]`."""

    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20)  # one audio file (or all context clips)
    max_concurrency_per_key: int = 4  # requests of one key at work at once
    max_queue_per_key: int = 8  # and waiting for a slot
    max_concurrency_open: int = 4  # every caller without a key together (open mode)
    max_queue_open: int = 8
    queue_timeout_s: float = 30.0  # a queued request waits at most this, then 429
    retry_after_s: int = 2  # what a 429 tells the caller
    max_concurrent_decodes: int = 2  # audio decodes in threads at once (the CPU's work)
    body_idle_timeout_s: float = 30.0  # a body that sends nothing for this long is dropped (408)
    body_timeout_s: float = 120.0  # a body not whole this long after the route began reading it: 408
    # The WebSocket text stream (gateway/text_stream_route.py); its text is at most the
    # server's long-text limit (limits.MAX_LONG_TEXT_CHARS).
    ws_max_message_bytes: int = 64 << 10  # one message (uvicorn's own bound is 1 MiB)
    ws_idle_timeout_s: float = 30.0  # no message this long, with nothing left to speak: closed
    ws_max_session_s: float = 600.0  # a session's whole length, its slot held throughout
    ws_max_sentences: int = 500  # sentences spoken in one session (each one generation)

    ENVIRONMENT = {
        "max_upload_bytes": "CSM_GATEWAY_MAX_UPLOAD_MB",  # in MB
        "max_concurrency_per_key": "CSM_GATEWAY_MAX_CONCURRENCY_PER_KEY",
        "max_queue_per_key": "CSM_GATEWAY_MAX_QUEUE_PER_KEY",
        "max_concurrency_open": "CSM_GATEWAY_MAX_CONCURRENCY_OPEN",
        "max_queue_open": "CSM_GATEWAY_MAX_QUEUE_OPEN",
        "queue_timeout_s": "CSM_GATEWAY_QUEUE_TIMEOUT_S",
        "retry_after_s": "CSM_GATEWAY_RETRY_AFTER_S",
        "max_concurrent_decodes": "CSM_GATEWAY_MAX_CONCURRENT_DECODES",
        "body_idle_timeout_s": "CSM_GATEWAY_BODY_IDLE_TIMEOUT_S",
        "body_timeout_s": "CSM_GATEWAY_BODY_TIMEOUT_S",
        "ws_max_message_bytes": "CSM_GATEWAY_WS_MAX_MESSAGE_BYTES",
        "ws_idle_timeout_s": "CSM_GATEWAY_WS_IDLE_TIMEOUT_S",
        "ws_max_session_s": "CSM_GATEWAY_WS_MAX_SESSION_S",
        "ws_max_sentences": "CSM_GATEWAY_WS_MAX_SENTENCES",
    }

    def __post_init__(self):
        for item in fields(self):
            value = getattr(self, item.name)
            least = 0 if item.name.startswith("max_queue") else 1
            if value < least:
                raise ValueError(f"{item.name} must be at least {least}, got {value}")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **overrides) -> GatewayLimits:
        """The defaults, then the environment, then `overrides` (flags; None: not given)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable in cls.ENVIRONMENT.items():
            text = environ.get(variable, "").strip()
            if not text:
                continue
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"${variable} must be a number, got {text!r}") from None
            values[name] = int(number * 2**20) if name == "max_upload_bytes" else number
        values.update({name: value for name, value in overrides.items() if value is not None})
        kinds = {item.name: item.type for item in fields(cls)}
        return cls(
            **{
                name: (float(value) if kinds[name] in ("float", float) else int(value))
                for name, value in values.items()
            }
        )

    def with_upload_bytes(self, max_upload_bytes: int) -> GatewayLimits:
        return replace(self, max_upload_bytes=int(max_upload_bytes))

    def body_limit(self, method: str, path: str) -> int:
        """The most bytes the route's body may have."""
        upload = self.max_upload_bytes
        if method == "POST":
            if path == "/clone-voice":  # a reference upload and base64 context clips
                return upload + _base64_bytes(upload) + _FORM_SLACK_BYTES
            if path in ("/upload-voice", "/v1/audio/voices"):
                return upload + _FORM_SLACK_BYTES
            if path in ("/v1/audio/speech", "/v1/audio/speech/captioned"):  # JSON: context clips in base64
                return _base64_bytes(upload) + _FORM_SLACK_BYTES
        return _SMALL_BODY_BYTES


@dataclass(frozen=True)
class RoutePolicy:
    key: str  # "always" (a write), "if_configured" (speech: open when no key is configured), "never"
    bounded: bool  # takes a concurrency slot
    openai: bool  # errors in OpenAI's shape
    what: str = ""  # the refusal's words


def route_policy(method: str, path: str) -> RoutePolicy:
    """The key rule of each route. Writes (voice upload and deletion) always need a key;
    speech (/clone-voice and all of /v1) needs one when keys are configured and is open
    otherwise; the page, /health, /docs and GET /voices need none. A WebSocket session
    (method "WEBSOCKET") is work: it holds a slot while it lasts."""
    work = method in ("POST", "DELETE", "PUT", "PATCH", "WEBSOCKET")
    if path == "/v1" or path.startswith("/v1/"):
        if work and (path == "/v1/audio/voices" or path.startswith("/v1/audio/voices/")):
            return RoutePolicy("always", True, True, "this route changes voices")
        return RoutePolicy("if_configured", work, True, "the OpenAI-compatible API needs an API key")
    if path == "/clone-voice":
        return RoutePolicy("if_configured", work, False, "/clone-voice needs an API key")
    if work and (path == "/upload-voice" or path.startswith("/voices/")):
        return RoutePolicy("always", True, False, "this route changes voices")
    return RoutePolicy("never", work, False)


def _json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> tuple[dict, dict]:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    if status in (408, 413):  # the body is left unread: the connection cannot carry another request
        raw.append((b"connection", b"close"))
    return (
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": data},
    )


_OPENAI_KINDS = {
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    400: ("invalid_request_error", None),
    408: ("invalid_request_error", "request_timeout"),
}


def _error(policy: RoutePolicy, status: int, message: str, headers: dict[str, str] | None = None):
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    if policy.openai:
        kind, code = _OPENAI_KINDS[status]
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    else:
        body = {"detail": message}
    return _json_response(status, body, headers)


class GatewayGuard:
    """The middleware (module doc). `keys`: the gateway's; `limits`: its bounds."""

    def __init__(self, app, keys: ApiKeys, limits: GatewayLimits):
        self.app, self.keys, self.limits = app, keys, limits
        self.limiter = KeyedLimiter(limits)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        policy = route_policy(method, path)
        headers = _headers(scope)

        async def answer(status: int, message: str, extra: dict[str, str] | None = None) -> None:
            start, body = _error(policy, status, message, extra)
            await send(start)
            await send(body)

        key, refusal = self._checked_key(policy, headers)
        if refusal is not None:
            return await answer(*refusal)
        scope.setdefault("state", {})["api_key_id"] = key

        limit = self.limits.body_limit(method, path)
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await answer(400, f"Content-Length is not a number: {declared[:40]!r}")
            if int(declared) > limit:
                return await answer(413, _too_large(int(declared), limit, "declares"))

        sent = _Sent(send)
        if not policy.bounded:
            return await self.app(scope, self._counted(receive, limit, sent, policy), sent)
        try:
            async with self.limiter.slot(key or OPEN_BUCKET):
                await self.app(scope, self._counted(receive, limit, sent, policy), sent)
        except Busy as error:
            await answer(429, f"too many requests: {error}", {"Retry-After": str(self.limits.retry_after_s)})

    def _checked_key(self, policy: RoutePolicy, headers: dict) -> tuple[str | None, tuple[int, str] | None]:
        """The caller's key id (None: no key needed), or the refusal its route's policy
        wants: (401, ...) without a key, (403, ...) with a wrong one."""
        if not (policy.key == "always" or (policy.key == "if_configured" and self.keys)):
            return None, None
        try:
            return self.keys.check(headers.get("authorization"), policy.what), None
        except MissingApiKey as error:
            return None, (401, str(error))
        except PermissionDenied as error:
            return None, (403, str(error))

    async def _websocket(self, scope, receive, send):
        """A WebSocket's handshake: the key and a slot of its bucket, as for HTTP, before
        it is accepted; refused with the HTTP status and JSON body an HTTP route gets
        (uvicorn's denial-response extension), else with close code 1008. The slot is
        held until the session ends; its message limits are the route's."""
        policy = route_policy("WEBSOCKET", scope["path"])
        headers = _headers(scope)

        async def refuse(status: int, message: str, extra: dict[str, str] | None = None) -> None:
            await receive()  # websocket.connect: answered by the refusal
            start, body = _error(policy, status, message, extra)
            if "websocket.http.response" in scope.get("extensions", {}):
                await send({**start, "type": "websocket.http.response.start"})
                await send({**body, "type": "websocket.http.response.body"})
            else:
                await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})

        key, refusal = self._checked_key(policy, headers)
        if refusal is not None:
            return await refuse(*refusal)
        scope.setdefault("state", {})["api_key_id"] = key
        if not policy.bounded:
            return await self.app(scope, receive, send)
        try:
            async with self.limiter.slot(key or OPEN_BUCKET):
                await self.app(scope, receive, send)
        except Busy as error:
            await refuse(429, f"too many requests: {error}", {"Retry-After": str(self.limits.retry_after_s)})

    def _counted(self, receive, limit: int, sent: _Sent, policy: RoutePolicy):
        """`receive` that counts body bytes; past `limit` the guard answers 413 (when it
        can: the app has not begun its answer) and the app is told the client is gone,
        so it stops reading (Starlette raises ClientDisconnect) and spools nothing
        more. A body that stalls for body_idle_timeout_s, or is not whole body_timeout_s
        after the first read, is answered 408 the same way (a slow sender must not hold
        a slot; the idle timeout alone let a byte every few seconds hold one for ever);
        once the body is whole, `receive` is only the disconnect signal a streaming
        answer listens for, and is not timed."""
        seen, refused, whole = 0, False, False
        idle, whole_within = self.limits.body_idle_timeout_s, self.limits.body_timeout_s
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # set at the first read

        async def too_slow(message: str) -> dict:
            nonlocal refused
            refused = True
            await sent.replace(*_error(policy, 408, message))
            return {"type": "http.disconnect"}

        async def counted():
            nonlocal seen, refused, whole, deadline
            if refused:  # never read on
                return {"type": "http.disconnect"}
            if whole:
                return await receive()
            if deadline is None:
                deadline = loop.time() + whole_within
            left = deadline - loop.time()
            late = f"the request body did not arrive whole within {whole_within:g} s"
            if left <= 0:
                return await too_slow(late)
            try:
                message = await asyncio.wait_for(receive(), min(idle, left))
            except TimeoutError:
                return await too_slow(late if idle >= left else f"the request body sent nothing for {idle:g} s")
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                whole = not message.get("more_body", False)
                if seen > limit:
                    refused = True
                    await sent.replace(*_error(policy, 413, _too_large(seen, limit, "passed")))
                    return {"type": "http.disconnect"}
            return message

        return counted


def _headers(scope) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}


def _too_large(size: int, limit: int, how: str) -> str:
    return (
        f"the request body {how} {size:,} bytes; this route accepts at most {limit:,} bytes "
        f"(the gateway's upload limit is set by --max-upload-mb / CSM_GATEWAY_MAX_UPLOAD_MB)"
    )


class _Sent:
    """`send` that knows whether the answer has begun, and drops the app's messages
    once the guard has answered in its place."""

    def __init__(self, send):
        self._send, self.started, self.replaced = send, False, False

    async def __call__(self, message) -> None:
        if self.replaced:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def replace(self, start: dict, body: dict) -> None:
        if not self.started:
            await self._send(start)
            await self._send(body)
        self.replaced = True
