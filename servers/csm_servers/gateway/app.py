"""FastAPI app: the original system's routes, each a thin call of AsyncVoiceCloner.

Voice writes (upload, delete) need one of the gateway's own API keys (`keys.ApiKeys`:
`Authorization: Bearer <key>`); without keys configured they are refused. /clone-voice
follows /v1's rule: with keys configured it needs one, without any it is open (the
gateway listens on 127.0.0.1 unless told otherwise). A stored voice belongs to the key
that wrote it: only that key (or an admin talking to Triton directly) deletes it. The
key, body-size and concurrency checks run before a route reads its body (guard.py);
audio is judged from its header, then decoded in a thread, a bounded number at once.
Numeric form fields are checked against the server's ranges before they become tensors.

Errors are JSON `{"detail": message}`: 400 for a bad request (a field named, or the
server's own message when Triton refused it), 401 for a missing or wrong API key, 403
for a refused voice write (no keys configured, Triton refused the admin token, or the
voice is another key's), 408 for a stalled body, 413 for an oversized upload or body,
429 (with Retry-After) when the caller's key has too many requests at work and waiting,
502 when Triton failed, 503 when it cannot be reached, and a JSON 500 for the gateway's
own bug (never a plain-text page).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import time
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Annotated, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from csm_clients.async_client import AsyncVoiceCloner
from csm_clients.audio import Reference, read_reference_clip
from csm_clients.errors import CsmClientError, InvalidRequest, PermissionDenied, ServerError, ServerUnavailable
from csm_clients.limits import Limits, check_sampling
from csm_clients.timestretch import check_speed, needs_stretch, stretch
from csm_servers.gateway.guard import DEFAULT_MAX_UPLOAD_MB, GatewayGuard, GatewayLimits
from csm_servers.gateway.keys import ApiKeys, MissingApiKey
from csm_servers.gateway.openai_api import openai_router
from csm_servers.gateway.speech_context import context_from_json, conversation
from csm_servers.gateway.text_stream_route import text_stream_router

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "GatewayLimits", "create_app"]

LOG = logging.getLogger("csm_servers.gateway")
_T = TypeVar("_T")


class UploadTooLarge(InvalidRequest):
    """An upload over the gateway's max_upload_bytes."""


_STATUS = [
    (UploadTooLarge, 413),
    (MissingApiKey, 401),
    (PermissionDenied, 403),
    (InvalidRequest, 400),
    (ServerUnavailable, 503),
    (ServerError, 502),
]


class _Upload(io.BytesIO):
    """An upload's bytes, named in libsndfile's errors by the file's name (its message
    would otherwise show `<_io.BytesIO object at 0x...>`)."""

    def __init__(self, data: bytes, filename: str | None):
        super().__init__(data)
        self.filename = filename or "the upload"

    def __repr__(self) -> str:
        return repr(self.filename)


def _status(error: CsmClientError) -> int:
    return next((code for kind, code in _STATUS if isinstance(error, kind)), 500)


def _field_errors(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "query"))
        parts.append(f"{where}: {item.get('msg', 'invalid')}" if where else item.get("msg", "invalid"))
    return "; ".join(parts)


def reference_from_upload(upload: io.BytesIO, transcript: str | None, limits: Limits) -> Reference:
    """An uploaded reference clip, judged by its header before it is decoded (a clip over
    the server's reference limit is refused without decoding it)."""
    return Reference(*read_reference_clip(upload, "the reference clip", limits), transcript)


def create_app(
    triton_url: str = "localhost:8001",
    *,
    admin_token: str | None = None,
    api_keys: ApiKeys | Iterable[str] | None = None,
    max_upload_bytes: int | None = None,
    limits: GatewayLimits | None = None,
) -> FastAPI:
    """admin_token: sent to Triton with voice writes. api_keys: what the gateway's voice
    writes (and, when there are any, its speech routes) need from their caller.
    limits: the gateway's bounds (guard.GatewayLimits; default: its defaults);
    max_upload_bytes, when given, replaces theirs."""
    state: dict = {}
    keys = api_keys if isinstance(api_keys, ApiKeys) else ApiKeys(api_keys or ())
    limits = limits or GatewayLimits()
    if max_upload_bytes is not None:
        limits = limits.with_upload_bytes(max_upload_bytes)
    max_upload_bytes = limits.max_upload_bytes
    voice_write = Depends(keys.dependency())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state["cloner"] = AsyncVoiceCloner(triton_url, "grpc", admin_token=admin_token)
        state["decodes"] = anyio.CapacityLimiter(limits.max_concurrent_decodes)
        try:
            yield
        finally:
            await state.pop("cloner").close()

    async def decoded(work: Callable[..., _T], *args) -> _T:
        """`work(*args)` (decoding audio: CPU for a while) in a thread, a bounded number
        at once; a cancelled request waits for its thread, so the bound holds."""
        return await anyio.to_thread.run_sync(functools.partial(work, *args), limiter=state["decodes"])

    app = FastAPI(
        title="CSM-1B voice cloning",
        lifespan=lifespan,
        description=f"The original REST API, served by Triton at {triton_url} (gRPC).",
    )
    app.add_middleware(GatewayGuard, keys=keys, limits=limits)

    @app.exception_handler(CsmClientError)
    async def client_error(_request: Request, error: CsmClientError):
        status = _status(error)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": str(error)}, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def gateway_bug(_request: Request, error: Exception):
        # The traceback goes to the gateway's log (the server re-raises it); the caller
        # gets JSON without internals.
        LOG.error("unexpected error in the gateway: %s: %s", type(error).__name__, error)
        return JSONResponse({"detail": f"the gateway failed ({type(error).__name__}); see its log"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def form_error(_request: Request, error: RequestValidationError):
        return JSONResponse({"detail": _field_errors(error)}, status_code=400)

    async def read_upload(upload: UploadFile) -> _Upload:
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise UploadTooLarge(f"'{upload.filename}' is larger than {max_upload_bytes / 2**20:g} MB")
        return _Upload(data, upload.filename)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        """Whether Triton answers and is ready."""
        if not await state["cloner"].is_ready():
            raise ServerUnavailable(f"Triton at {triton_url} is not ready")
        return {"status": "ok", "triton": triton_url}

    @app.get("/voices")
    async def voices():
        """The stored voices."""
        return {"voices": await state["cloner"].list_voices()}

    @app.post(
        "/clone-voice",
        response_class=Response,
        responses={200: {"content": {"audio/wav": {}}, "description": "16-bit PCM WAV"}},
    )
    async def clone_voice(
        text: Annotated[str, Form(description="what to say")],
        voice_name: Annotated[str | None, Form(description="a stored voice")] = None,
        reference_audio: Annotated[UploadFile | None, File(description="or a reference clip (any format)")] = None,
        reference_text: Annotated[str | None, Form(description="what the reference clip says")] = None,
        seed: Annotated[int | None, Form()] = None,
        temperature: Annotated[float | None, Form()] = None,
        top_k: Annotated[int | None, Form()] = None,
        max_audio_seconds: Annotated[float | None, Form()] = None,
        speaker: Annotated[int | None, Form(description="speaker id of `text`, 0-255 (default 0)")] = None,
        context: Annotated[
            str | None, Form(description="earlier turns: a JSON list as /v1/audio/speech's `context` (docs/api.md)")
        ] = None,
        speed: Annotated[float | None, Form(description="0.25-4.0, pitch kept (default 1.0: as generated)")] = None,
    ):
        """Speak `text` in a stored voice, in the voice of an uploaded clip, or in the
        model's default voice, optionally after earlier turns of a conversation, at
        `speed` (pitch-preserving); answers audio/wav."""
        sampling = {"seed": seed, "temperature": temperature, "top_k": top_k, "max_audio_seconds": max_audio_seconds}
        limits = await state["cloner"].limits()  # the server's, read once
        check_sampling(**sampling, limits=limits)  # before they become INT32/INT64/FP32 tensors
        if speed is not None:
            check_speed(speed)  # before Triton works: a NaN or 5 is refused at once
        sampling.update(
            await decoded(conversation, text, speaker, context_from_json(context), max_upload_bytes, limits)
        )
        voice: str | Reference | None = voice_name or None
        if reference_audio is not None and reference_audio.filename:
            if voice is not None:
                raise InvalidRequest("give either voice_name or reference_audio, not both")
            voice = await decoded(reference_from_upload, await read_upload(reference_audio), reference_text, limits)
        started = time.perf_counter()
        speech = await state["cloner"].synthesize(text, voice=voice, **sampling)
        if needs_stretch(speed):
            speech = dataclasses.replace(speech, audio=await decoded(stretch, speech.audio, speech.sample_rate, speed))
        return Response(
            speech.to_wav_bytes(),
            media_type="audio/wav",
            headers={
                "Content-Disposition": 'attachment; filename="speech.wav"',
                "X-Audio-Seconds": f"{speech.seconds:.3f}",
                "X-Synthesis-Seconds": f"{time.perf_counter() - started:.3f}",
                "X-Finish-Reasons": ",".join(speech.finish_reasons),  # one per segment (docs/api.md)
            },
        )

    @app.post("/upload-voice", dependencies=[voice_write])
    async def upload_voice(
        request: Request,
        voice_name: Annotated[str, Form(description="the id to store it under")],
        reference_audio: Annotated[UploadFile, File(description="a clip of the voice (any format)")],
        reference_text: Annotated[str, Form(description="what the clip says")],
    ):
        """Store a voice for later use by name (needs a gateway API key; the voice is that key's)."""
        upload, limits = await read_upload(reference_audio), await state["cloner"].limits()
        reference = await decoded(reference_from_upload, upload, reference_text, limits)
        return {
            "voice": await state["cloner"].register_voice(
                voice_name, reference, reference_text, owner=request.state.api_key_id
            )
        }

    @app.delete("/voices/{voice_name}", dependencies=[voice_write])
    async def delete_voice(request: Request, voice_name: str):
        """Remove a stored voice of the caller's key (needs a gateway API key); answers
        the removed voice's description."""
        return {"voice": await state["cloner"].delete_voice(voice_name, owner=request.state.api_key_id)}

    app.include_router(openai_router(lambda: state["cloner"], keys, max_upload_bytes=max_upload_bytes, decoded=decoded))
    # WebSocket /v1/audio/speech/stream-text: text in as an LLM writes it (docs/api.md)
    app.include_router(text_stream_router(lambda: state["cloner"], keys, limits))
    return app
