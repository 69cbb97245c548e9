"""The OpenAI-compatible speech API under /v1: a client changes `base_url` and nothing else.

    POST   /v1/audio/speech          text -> audio (whole, chunked audio, or SSE events)
    GET    /v1/models                the accepted model names
    GET    /v1/audio/voices          the stored voices
    POST   /v1/audio/voices          store one (multipart: name, audio_sample, transcript)
    DELETE /v1/audio/voices/{id}     remove one

Every answer that is not audio is OpenAI's JSON; every error is OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with its status (400 naming the field
in `param`, 401 for a missing or wrong key, 403 for a refused voice write, 404 for an
unknown model, 413 for an oversized upload, 502/503 when Triton failed or is down). The
route class (openai_errors.py) converts errors itself, so the original routes keep their
`{"detail"}`.

Keys (gateway/keys.py): voice writes always need `Authorization: Bearer <key>`; with keys
configured every /v1 route does (checked by guard.py before the body is read, and again
here). A voice belongs to the key that stored it: only that key deletes it (403 for
another's). 413 for an oversized body, 429 with Retry-After when the key is busy.
Limits are the server's: the gateway checks only what it must before building tensors
(sampling ranges, the OpenAI-only fields), and maps the tensor a Triton refusal names
back to the body's field.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from csm_clients.async_client import AsyncVoiceCloner
from csm_clients.audio import Reference, Speech, read_reference_clip
from csm_clients.errors import CsmClientError, FieldError, InvalidRequest
from csm_clients.limits import Limits, check_sampling
from csm_clients.timestretch import MAX_SPEED, MIN_SPEED, TimeStretcher, needs_stretch, stretch
from csm_servers.gateway.encoding import FORMATS, StreamEncoder, encode
from csm_servers.gateway.keys import ApiKeys
from csm_servers.gateway.openai_errors import OpenAIError, OpenAIRoute
from csm_servers.gateway.speech_context import ContextTurn, conversation, refused_field

LOG = logging.getLogger("csm_servers.gateway.openai")

__all__ = ["MODELS", "OPENAI_VOICES", "SpeechRequest", "openai_router"]

# Accepted `model` names: OpenAI's TTS models (so existing code runs unchanged) and ours.
# All of them are the one CSM-1B deployment.
MODELS = ("csm-1b", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# OpenAI's built-in voices speak in the model's default voice (no VOICE_ID sent).
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse", "marin", "cedar"}
)
SAMPLES_PER_FRAME = 1_920  # Mimi: 24 kHz / 12.5 Hz; SSE usage counts generated frames


class SpeechRequest(BaseModel):
    """OpenAI's speech body, and the extra fields peers accept (documented in docs/api.md)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str
    voice: str | dict[str, str]
    instructions: str | None = None  # accepted, not used: CSM takes no style prompt
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    # Pitch-preserving time-stretch of the answer (timestretch.py); null is 1.0. Strict:
    # true or "2" is refused rather than read as a number; NaN and infinities too.
    speed: float | None = Field(1.0, strict=True, allow_inf_nan=False, ge=MIN_SPEED, le=MAX_SPEED)
    stream_format: Literal["audio", "sse"] | None = None
    # Extras (as vLLM-omni, Kokoro-FastAPI and Orpheus servers pass them, at the top level):
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    max_audio_seconds: float | None = None
    speaker: int | None = None  # 0-255, the speaker id of `input`
    context: list[ContextTurn] | None = None  # earlier turns (gateway/speech_context.py)
    # false: `input` is spoken as written (default: numbers, money, dates... as words)
    normalize: bool = Field(True, strict=True)

    def voice_id(self) -> str | None:
        """The stored voice to send as VOICE_ID; None: the model's default voice."""
        voice = self.voice.get("id") if isinstance(self.voice, dict) else self.voice
        if not isinstance(voice, str) or not voice.strip():
            raise OpenAIError(400, "voice: give a stored voice id or one of OpenAI's voice names", param="voice")
        return None if voice.lower() in OPENAI_VOICES else voice

    def options(self, limits: Limits) -> dict[str, Any]:
        """The sampling values (checked as the server would) and how the text is read."""
        values = {
            "seed": self.seed,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "max_audio_seconds": self.max_audio_seconds,
        }
        try:
            check_sampling(**values, limits=limits)
        except InvalidRequest as error:
            raise OpenAIError(400, str(error), param=str(error).split(":", 1)[0]) from None
        return {**values, "normalize": None if self.normalize else False}


def _check(body: SpeechRequest) -> None:
    if body.model not in MODELS:
        raise OpenAIError(
            404,
            f"The model '{body.model}' does not exist; this server speaks with {', '.join(MODELS)} (all CSM-1B)",
            param="model",
            code="model_not_found",
        )
    if not body.input.strip():
        raise OpenAIError(400, "input: is empty", param="input")


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


async def _in_thread(work: Callable, *args):
    return await asyncio.to_thread(work, *args)


def openai_router(
    cloner: Callable[[], AsyncVoiceCloner], keys: ApiKeys, *, max_upload_bytes: int, decoded: Callable = _in_thread
) -> APIRouter:
    """`cloner()`: the app's AsyncVoiceCloner (made in its lifespan); `keys`: the gateway's;
    `decoded(work, *args)`: runs an audio decode off the event loop (the app bounds how
    many at once)."""

    async def require_key_if_configured(request: Request) -> None:
        if keys:
            keys.check(request.headers.get("authorization"), "the OpenAI-compatible API needs an API key")

    async def require_key_for_writes(request: Request) -> None:
        keys.check(request.headers.get("authorization"), "this route changes voices")

    if not keys:  # said at start-up: an open speech API is a choice, not an accident
        LOG.warning(
            "the OpenAI-compatible API under /v1 needs no key (no API keys configured); its voice writes are refused"
        )
    router = APIRouter(
        prefix="/v1",
        route_class=OpenAIRoute,
        tags=["OpenAI-compatible"],
        dependencies=[Depends(require_key_if_configured)],
    )

    @router.get("/models")
    async def models():
        """The accepted `model` names (all of them this one CSM-1B deployment)."""
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "csm-triton"} for name in MODELS],
        }

    @router.post(
        "/audio/speech",
        response_class=Response,
        responses={200: {"content": {audio.media_type: {} for audio in FORMATS.values()} | {"text/event-stream": {}}}},
    )
    async def speech(body: SpeechRequest):
        """Text -> speech in `response_format`; `stream_format` "audio" streams the encoded
        audio as it is generated, "sse" sends OpenAI's speech.audio.delta/done events."""
        return await _answer(body, _speak)

    @router.post("/audio/speech/captioned")
    async def captioned_speech(body: SpeechRequest):
        """The same body as /audio/speech, answered whole as JSON: the encoded audio (base64)
        and one caption per segment of the text, as spoken, with its start and end seconds
        (csm_tts's SEGMENT_TIMES and NORMALIZED_TEXT; divided by `speed`)."""
        if body.stream_format is not None:
            raise OpenAIError(400, "stream_format: captioned speech is answered whole", param="stream_format")
        return await _answer(body, _captioned)

    async def _answer(body: SpeechRequest, answer: Callable) -> Any:
        """Both speech routes: the body checked and decoded, then `answer`; a refused voice names its field."""
        _check(body)
        limits = await cloner().limits()  # the server's, read once
        voice, sampling = body.voice_id(), body.options(limits)
        sampling.update(await decoded(conversation, body.input, body.speaker, body.context, max_upload_bytes, limits))
        try:
            return await answer(body, voice, sampling)
        except FieldError:
            raise
        except InvalidRequest as error:  # an unknown context voice reads like an unknown `voice`
            param = refused_field(str(error), voice, body.context)
            if param is None:
                raise
            raise OpenAIError(400, str(error), param=param) from None

    async def _whole(body: SpeechRequest, voice: str | None, sampling: dict) -> tuple[Speech, bytes, float]:
        spoken = await cloner().synthesize(body.input, voice=voice, **sampling)  # long texts too (client.py)
        data, seconds = await asyncio.to_thread(_encoded_whole, spoken, FORMATS[body.response_format], body.speed)
        return spoken, data, seconds

    async def _captioned(body: SpeechRequest, voice: str | None, sampling: dict) -> dict:
        # one caption per sentence, each timed exactly: every sentence is spoken as a segment
        spoken, data, seconds = await _whole(body, voice, {**sampling, "sentence_segments": True})
        speed = body.speed or 1.0
        return {
            "audio": base64.b64encode(data).decode(),
            "response_format": body.response_format,
            "audio_seconds": round(seconds, 3),
            "finish_reasons": list(spoken.finish_reasons),
            "segments": [
                {"text": text, "start": round(start / speed, 3), "end": round(end / speed, 3)}
                for (start, end), text in zip(spoken.segment_times, spoken.normalized_text)
            ],
        }

    async def _speak(body: SpeechRequest, voice: str | None, sampling: dict) -> Response:
        audio_format = FORMATS[body.response_format]
        if body.stream_format is None:
            spoken, data, seconds = await _whole(body, voice, sampling)
            return Response(
                data,
                media_type=audio_format.media_type,
                headers={"X-Audio-Seconds": f"{seconds:.3f}", "X-Finish-Reasons": ",".join(spoken.finish_reasons)},
            )
        chunks = cloner().stream(body.input, voice=voice, **sampling)
        try:  # the first chunk before answering: a refused request is a real 400, not a broken stream
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()
            raise
        audio = _encoded(chunks, first, audio_format, body.speed)
        if body.stream_format == "sse":
            return StreamingResponse(
                _events(audio), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return StreamingResponse(_just_bytes(audio), media_type=audio_format.media_type)

    @router.get("/audio/voices")
    async def list_voices():
        """The stored voices, usable as `voice` (OpenAI's names are the default voice)."""
        stored = await cloner().list_voices()
        return {"object": "list", "data": [_voice(item) for item in stored]}

    @router.post("/audio/voices", dependencies=[Depends(require_key_for_writes)])
    async def create_voice(
        request: Request,
        name: str = Form(description="the id to store the voice under (then usable as `voice`)"),
        transcript: str = Form(description="what the clip says"),
        audio_sample: UploadFile = File(description="a clip of the voice (any format libsndfile reads)"),
        consent: str | None = Form(None, description="accepted (OpenAI's field), not used"),
    ):
        """Store a voice from a reference clip and its transcript (needs an API key; the
        voice is that key's)."""
        data = await audio_sample.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise OpenAIError(
                413,
                f"audio_sample: '{audio_sample.filename}' is larger than {max_upload_bytes / 2**20:g} MB",
                param="audio_sample",
            )
        try:
            samples, rate = await decoded(read_reference_clip, data, "audio_sample", await cloner().limits())
        except InvalidRequest as error:
            raise OpenAIError(400, str(error), param="audio_sample") from None
        stored = await cloner().register_voice(
            name, Reference(samples, rate, transcript), transcript, owner=request.state.api_key_id
        )
        return _voice(stored)

    @router.delete("/audio/voices/{voice_id}", dependencies=[Depends(require_key_for_writes)])
    async def delete_voice(request: Request, voice_id: str):
        """Remove a stored voice of the caller's key (needs an API key)."""
        removed = await cloner().delete_voice(voice_id, owner=request.state.api_key_id)
        return {"id": removed.get("voice_id", voice_id), "object": "audio.voice.deleted", "deleted": True}

    return router


def _voice(stored: dict) -> dict:
    created = stored.get("created_at")
    if isinstance(created, str):
        try:
            created = int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())
        except ValueError:
            created = 0
    return {
        "id": stored["voice_id"],
        "object": "audio.voice",
        "name": stored["voice_id"],
        "type": "audio_sample",
        "created_at": int(created or 0),
        "transcript": stored.get("transcript"),
        "duration_seconds": stored.get("duration_seconds"),
    }


def _encoded_whole(spoken: Speech, audio_format, speed: float | None) -> tuple[bytes, float]:
    """The whole answer at `speed` (1.0: the generated samples themselves) and its seconds."""
    audio = stretch(spoken.audio, spoken.sample_rate, speed) if needs_stretch(speed) else spoken.audio
    return encode(audio, spoken.sample_rate, audio_format), audio.size / spoken.sample_rate


async def _encoded(
    chunks: AsyncIterator[Speech], first: Speech | None, audio_format, speed: float | None = 1.0
) -> AsyncIterator[tuple[bytes, int]]:
    """(encoded bytes, samples generated so far) as each chunk is generated; the Triton
    stream is closed whatever ends this (the end, an error, or the client gone: its KV
    slot freed). Another speed than 1.0 goes through one TimeStretcher for the whole
    stream (continuous across chunks; a few ms of CPU per second of audio, so it runs
    here like the encoder), flushed before the encoder finishes."""
    encoder = stretcher = None
    samples = 0
    try:
        chunk = first
        while chunk is not None:
            if encoder is None:
                encoder = StreamEncoder(audio_format, chunk.sample_rate)
                stretcher = TimeStretcher(speed, chunk.sample_rate) if needs_stretch(speed) else None
            samples += chunk.audio.size
            data = encoder.feed(stretcher.push(chunk.audio) if stretcher else chunk.audio)
            if data:
                yield data, samples
            chunk = await anext(chunks, None)
        if encoder is not None:
            tail = encoder.feed(stretcher.flush()) if stretcher else b""
            yield tail + encoder.finish(), samples
    finally:
        await chunks.aclose()
        if encoder is not None:
            encoder.close()


async def _just_bytes(audio: AsyncIterator[tuple[bytes, int]]) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(audio):
        async for data, _ in audio:
            if data:
                yield data


async def _events(audio: AsyncIterator[tuple[bytes, int]]) -> AsyncIterator[bytes]:
    """OpenAI's SSE: speech.audio.delta (base64 of the encoded bytes) ... speech.audio.done."""
    samples = 0
    async with contextlib.aclosing(audio):
        try:
            async for data, samples in audio:  # noqa: B007 - the last count is read after the loop
                if data:
                    yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        except CsmClientError as error:  # after the 200: the error travels as an event
            yield _sse(
                {"type": "error", "error": {"message": str(error), "type": "server_error", "param": None, "code": None}}
            )
            return
    frames = -(-samples // SAMPLES_PER_FRAME)
    # Input tokens are the server's business (its tokenizer); the gateway counts Mimi frames.
    yield _sse(
        {"type": "speech.audio.done", "usage": {"input_tokens": 0, "output_tokens": frames, "total_tokens": frames}}
    )
