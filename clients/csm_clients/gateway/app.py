"""FastAPI app: the original system's routes, each a thin call of AsyncVoiceCloner.

Errors are JSON `{"detail": message}`: 400 for a bad request (the server's own message
when Triton refused it), 403 for a refused voice write, 413 for an oversized upload,
502 when Triton failed, 503 when it cannot be reached.
"""

from __future__ import annotations

import contextlib
import time
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from csm_clients.audio import Reference
from csm_clients.client import AsyncVoiceCloner
from csm_clients.errors import (CsmClientError, InvalidRequest, PermissionDenied, ServerError,
                                ServerUnavailable)

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "create_app"]

DEFAULT_MAX_UPLOAD_MB = 32.0  # the gateway's own guard on memory, not a model limit


class UploadTooLarge(InvalidRequest):
    """An upload over the gateway's max_upload_bytes."""


_STATUS = [(UploadTooLarge, 413), (PermissionDenied, 403), (InvalidRequest, 400), (ServerUnavailable, 503),
           (ServerError, 502)]


def _status(error: CsmClientError) -> int:
    return next((code for kind, code in _STATUS if isinstance(error, kind)), 500)


def _field_errors(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "query"))
        parts.append(f"{where}: {item.get('msg', 'invalid')}" if where else item.get("msg", "invalid"))
    return "; ".join(parts)


def create_app(triton_url: str = "localhost:8001", *, admin_token: str | None = None,
               max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20)) -> FastAPI:
    state: dict[str, AsyncVoiceCloner] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state["cloner"] = AsyncVoiceCloner(triton_url, "grpc", admin_token=admin_token)
        try:
            yield
        finally:
            await state.pop("cloner").close()

    app = FastAPI(title="CSM-1B voice cloning", lifespan=lifespan,
                  description=f"The original REST API, served by Triton at {triton_url} (gRPC).")

    @app.exception_handler(CsmClientError)
    async def client_error(_request: Request, error: CsmClientError):
        return JSONResponse({"detail": str(error)}, status_code=_status(error))

    @app.exception_handler(RequestValidationError)
    async def form_error(_request: Request, error: RequestValidationError):
        return JSONResponse({"detail": _field_errors(error)}, status_code=400)

    async def read_upload(upload: UploadFile) -> bytes:
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise UploadTooLarge(f"'{upload.filename}' is larger than {max_upload_bytes / 2**20:g} MB")
        return data

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

    @app.post("/clone-voice", response_class=Response,
              responses={200: {"content": {"audio/wav": {}}, "description": "16-bit PCM WAV"}})
    async def clone_voice(
        text: Annotated[str, Form(description="what to say")],
        voice_name: Annotated[str | None, Form(description="a stored voice")] = None,
        reference_audio: Annotated[UploadFile | None, File(description="or a reference clip (any format)")] = None,
        reference_text: Annotated[str | None, Form(description="what the reference clip says")] = None,
        seed: Annotated[int | None, Form()] = None,
        temperature: Annotated[float | None, Form()] = None,
        top_k: Annotated[int | None, Form()] = None,
        max_audio_seconds: Annotated[float | None, Form()] = None,
    ):
        """Speak `text` in a stored voice, in the voice of an uploaded clip, or in the
        model's default voice; answers audio/wav."""
        voice: str | Reference | None = voice_name or None
        if reference_audio is not None and reference_audio.filename:
            if voice is not None:
                raise InvalidRequest("give either voice_name or reference_audio, not both")
            voice = Reference.from_file(await read_upload(reference_audio), reference_text)
        started = time.perf_counter()
        speech = await state["cloner"].synthesize(text, voice=voice, seed=seed, temperature=temperature,
                                                  top_k=top_k, max_audio_seconds=max_audio_seconds)
        return Response(speech.to_wav_bytes(), media_type="audio/wav", headers={
            "Content-Disposition": 'attachment; filename="speech.wav"',
            "X-Audio-Seconds": f"{speech.seconds:.3f}",
            "X-Synthesis-Seconds": f"{time.perf_counter() - started:.3f}",
        })

    @app.post("/upload-voice")
    async def upload_voice(
        voice_name: Annotated[str, Form(description="the id to store it under")],
        reference_audio: Annotated[UploadFile, File(description="a clip of the voice (any format)")],
        reference_text: Annotated[str, Form(description="what the clip says")],
    ):
        """Store a voice for later use by name."""
        clip = await read_upload(reference_audio)
        return {"voice": await state["cloner"].register_voice(voice_name, clip, reference_text)}

    @app.delete("/voices/{voice_name}")
    async def delete_voice(voice_name: str):
        """Remove a stored voice; answers the removed voice's description."""
        return {"voice": await state["cloner"].delete_voice(voice_name)}

    return app
