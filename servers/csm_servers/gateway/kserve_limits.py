"""What the KServe v2 front (kserve_front.py) takes in of a request before it checks
the JSON, and how much of it at once.

Kept apart from the routing and forwarding because these are the front's defences of
its own resources, each with its own reason: a header read once in visible ASCII so
the value checked is the value Triton reads; an allow-list of headers towards Triton;
a body refused as soon as it passes the size limit (gzip/deflate inflated as it
arrives, never after reading it whole) or its arrival deadline; request bodies held
at once within a byte budget (past it a 503 with Retry-After, never a wait in
memory); a few bodies checked at once; and a deadline on each request's head, which
uvicorn lacks.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Iterable, Mapping

from starlette.requests import ClientDisconnect, Request

from csm_servers.gateway.kserve_checks import Refused

__all__ = [
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_HEADER_TIMEOUT_S",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CHECKS",
    "DEFAULT_MAX_INFLIGHT_BYTES",
    "FORWARDED_HEADERS",
    "RETRY_AFTER_S",
    "BodyBudget",
    "Busy",
    "Held",
    "forwarded_headers",
    "request_headers",
    "server_settings",
]

# 64 MiB, the default of the --http-max-input-size that later Triton releases added:
# 120 s of 24 kHz FP32 audio is 11.5 MB in binary, ~60 MB as JSON text.
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
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
# A request's head must arrive within this (uvicorn has no such deadline of its own: a
# client sending its headers a byte at a time, or nothing, kept its connection for ever).
DEFAULT_HEADER_TIMEOUT_S = 10.0
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


class Busy(Refused):
    """The front holds as many request bodies as it may: a 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message, 503)
        self.retry_after_s = retry_after_s


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
    return {
        name: value for name, value in headers.items() if name in FORWARDED_HEADERS or _MODEL_HEADER.fullmatch(name)
    }


class Held:
    """The bytes of the budget that one request holds."""

    def __init__(self, budget: BodyBudget):
        self.budget, self.bytes = budget, 0

    def grow_to(self, size: int) -> None:
        more = size - self.bytes
        if more > 0:
            self.budget.reserve(more)
            self.bytes = size

    def release(self) -> None:
        self.budget.inflight_bytes -= self.bytes
        self.bytes = 0


class BodyBudget:
    """Request bodies read within their size limit and deadline, the bytes held at once
    by all requests together, and the slots of the bodies checked at once."""

    def __init__(
        self,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_checks: int = DEFAULT_MAX_CHECKS,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ):
        if max_checks < 1:
            raise ValueError(f"max_checks must be at least 1, got {max_checks}")
        if max_inflight_bytes < max_body_bytes:  # else the largest body would be a 503 forever
            raise ValueError(
                f"max_inflight_bytes ({max_inflight_bytes}) must be at least max_body_bytes ({max_body_bytes})"
            )
        self.max_body_bytes, self.max_checks = max_body_bytes, max_checks
        self.max_inflight_bytes, self.body_timeout_s = max_inflight_bytes, body_timeout_s
        self.inflight_bytes = 0  # touched in the event loop only
        self._check_slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    def hold(self) -> Held:
        return Held(self)

    def reserve(self, size: int) -> None:
        """Count `size` more bytes in flight, or Busy when the budget has no room."""
        if self.inflight_bytes + size > self.max_inflight_bytes:
            raise self.busy()
        self.inflight_bytes += size

    def busy(self) -> Busy:
        return Busy(
            f"the front holds as many request bodies as it may at once ({self.max_inflight_bytes} bytes); "
            f"retry in {RETRY_AFTER_S} s"
        )

    def slots(self) -> asyncio.Semaphore:
        """The check slots, made in the loop that serves (a TestClient starts a loop of its own)."""
        loop = asyncio.get_running_loop()
        if self._check_slots is None or self._check_slots[0] is not loop:
            self._check_slots = (loop, asyncio.Semaphore(self.max_checks))
        return self._check_slots[1]

    async def read_body(self, request: Request, headers: Mapping[str, str], held: Held) -> bytes:
        """The body, inflated, read chunk by chunk: refused (413) as soon as it passes the
        size limit, (503) as soon as it no longer fits the in-flight budget, (408) when
        it has not arrived within body_timeout_s."""
        limit = self.max_body_bytes
        declared = int(headers.get("content-length") or 0)
        if declared > limit:
            raise Refused(f"the request body is {declared} bytes; the front's limit is {limit}", 413)
        if self.inflight_bytes + declared > self.max_inflight_bytes:
            raise self.busy()  # at once, unread; bytes are counted as they arrive, not as declared
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


def server_settings(header_timeout_s: float) -> dict:
    """uvicorn's settings: the gateway's h11 protocol with its header deadline, and its
    bound on a request head's size."""
    from csm_servers.gateway.__main__ import request_head_settings

    if not header_timeout_s > 0:
        raise SystemExit(f"--header-timeout-s must be positive, got {header_timeout_s}")
    return request_head_settings(header_timeout_s)
