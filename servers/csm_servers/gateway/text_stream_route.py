"""WebSocket /v1/audio/speech/stream-text: text in as an LLM writes it, speech out as it is made.

Client -> gateway, JSON text messages (docs/api.md has the whole protocol):
    {"type": "start", "voice": ..., "response_format": "pcm", "seed": ...}   optional, first
    {"type": "text", "text": "<delta>"}       any number, any sizes
    {"type": "flush"}                        speak what is pending now, sentence or not
    {"type": "close"}                        the text is whole: speak the rest, then end
Gateway -> client: binary messages of audio (response_format, one stream across the
whole session; pcm: 24 kHz 16-bit little-endian mono), a `sentence` message after each
sentence's audio, one `done` message with every sentence's ending and times, then close
1000; or one `error` message, then close (1008 the client's fault, 1009 a message too
large, 1003 a binary message, 1011 the server failed, 1013 Triton unavailable).

Each sentence is spoken once it is complete (csm_servers.gateway.sentences finds them as the
server does) through csm_tts_stream, one request per sentence, chained by
CONTINUE_FROM: the server speaks each as the next segment of one long text (the
previous segment and its codes as context, SEED + its number, its frame budget, its
first chunk decoded after the codes before it), so the session's audio is, sample for
sample at a fixed seed, the long-text path's with one sentence per segment.

Key and slot: the guard (guard.py) checks the API key and takes a slot of the key's
bucket before the handshake is accepted; the slot is held for the session. Limits,
each checked before the work it guards: a message's size, the session's text
(MAX_LONG_TEXT_CHARS), its sentences, an idle timeout (no message while nothing is
left to speak) and the session's length. A client that goes away mid-sentence gets its
Triton stream cancelled at once, which frees the KV slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, ValidationError

from csm_clients.async_client import AsyncVoiceCloner
from csm_clients.errors import CsmClientError, FieldError, InvalidRequest, ServerUnavailable
from csm_clients.limits import DEFAULT_LIMITS, check_sampling, check_speaker
from csm_servers.gateway.encoding import StreamEncoder
from csm_servers.gateway.guard import GatewayLimits
from csm_servers.gateway.keys import ApiKeys
from csm_servers.gateway.openai_api import MODELS, OPENAI_VOICES
from csm_servers.gateway.sentences import SentenceSplitter, speakable
from csm_servers.gateway.speech_context import check_json_values

__all__ = ["ROUTE", "text_stream_router"]

LOG = logging.getLogger("csm_servers.gateway.text_stream")
ROUTE = "/v1/audio/speech/stream-text"
MESSAGE_TYPES = ("start", "text", "flush", "close")


class StartMessage(BaseModel):
    """The session's options; every field optional, an unknown one refused (a typo is
    named rather than ignored)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["start"]
    model: str = "csm-1b"
    voice: str | None = None  # a stored voice id; OpenAI's names (and none) are the default voice
    response_format: Literal["pcm", "wav", "mp3", "opus", "aac", "flac"] = "pcm"
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    speaker: int | None = None


class SessionError(Exception):
    """Ends the session: one `error` message, then the close code."""

    def __init__(self, code: str, message: str, close_code: int = 1008, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.close_code, self.kind = code, close_code, kind


class ClientGone(Exception):
    """The client closed the connection or vanished: nothing more can be sent."""


def _from_client_error(error: CsmClientError) -> SessionError:
    if isinstance(error, InvalidRequest):
        return SessionError("invalid_request", str(error))
    if isinstance(error, ServerUnavailable):
        return SessionError("service_unavailable", str(error), 1013, "server_error")
    return SessionError("server_error", str(error), 1011, "server_error")


class TextStreamSession:
    """One WebSocket session: a reader (messages -> sentences), a speaker (sentences ->
    audio, in order), and `run`, which ends the session whichever stops first."""

    def __init__(self, websocket: WebSocket, cloner: AsyncVoiceCloner, limits: GatewayLimits):
        self.websocket, self.cloner, self.limits = websocket, cloner, limits
        self.server_limits = DEFAULT_LIMITS  # the server's, read as the session opens (run)
        self.options = StartMessage(type="start")
        self.splitter = SentenceSplitter()
        self.sentences: asyncio.Queue[str | None] = asyncio.Queue()
        self.spoken: list[dict] = []
        self.text_chars = self.queued = self.samples = 0
        self.carry = ""  # a "sentence" without a letter or digit, spoken with the next one
        self.started = self.closing = self.speaking = False
        self.last_activity = asyncio.get_running_loop().time()  # a message, or audio
        self.encoder: StreamEncoder | None = None
        self.sample_rate = 24_000

    async def run(self) -> None:
        await self.websocket.accept()
        self.server_limits = await self.cloner.limits()
        reader, speaker = asyncio.create_task(self._read()), asyncio.create_task(self._speak())
        error: SessionError | None = None
        try:
            done, _ = await asyncio.wait(
                {reader, speaker}, timeout=self.limits.ws_max_session_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                raise SessionError(
                    "session_timeout",
                    f"the session passed its limit of "
                    f"{self.limits.ws_max_session_s:g} s (CSM_GATEWAY_WS_MAX_SESSION_S)",
                )
            (speaker if speaker in done else reader).result()  # the reader only ends by raising
        except ClientGone:
            return
        except SessionError as failure:
            error = failure
        except CsmClientError as failure:
            error = _from_client_error(failure)
        except Exception as failure:
            LOG.exception("the text stream failed")
            error = SessionError(
                "internal_error", f"the gateway failed ({type(failure).__name__}); see its log", 1011, "server_error"
            )
        finally:
            # First of all: a sentence being spoken has its Triton stream cancelled (its KV slot freed).
            for task in (reader, speaker):
                task.cancel()
            await asyncio.gather(reader, speaker, return_exceptions=True)
            if self.encoder is not None:
                self.encoder.close()
        await self._end(error)

    async def _end(self, error: SessionError | None) -> None:
        try:
            if error is None:
                await self.websocket.send_json(
                    {
                        "type": "done",
                        "sentences": self.spoken,
                        "audio_seconds": round(self.samples / self.sample_rate, 6),
                        "sample_rate": self.sample_rate,
                        "response_format": self.options.response_format,
                    }
                )
                await self.websocket.close(1000)
            else:
                await self.websocket.send_json(
                    {
                        "type": "error",
                        "error": {"message": str(error), "type": error.kind, "param": None, "code": error.code},
                    }
                )
                await self.websocket.close(error.close_code, error.code)
        except Exception:  # noqa: BLE001 - the client left meanwhile: nobody to tell
            pass

    # --- reading --------------------------------------------------------------------
    def _busy(self) -> bool:
        return self.closing or self.speaking or not self.sentences.empty()

    async def _read(self) -> None:
        """Messages until the client goes (or an error); the idle clock runs from the
        later of the last message and the last audio, and only while nothing is left
        to speak."""
        idle, loop = self.limits.ws_idle_timeout_s, asyncio.get_running_loop()
        pending = asyncio.ensure_future(self.websocket.receive())
        try:
            while True:
                left = idle - (loop.time() - self.last_activity)
                done, _ = await asyncio.wait({pending}, timeout=max(left, 0.01))
                if not done:
                    if self._busy():
                        self.last_activity = loop.time()
                    elif loop.time() - self.last_activity >= idle:
                        raise SessionError(
                            "idle_timeout",
                            f"no message for {idle:g} s and nothing left to speak "
                            "(CSM_GATEWAY_WS_IDLE_TIMEOUT_S): send text, flush or close",
                        )
                    continue
                message = pending.result()
                if message["type"] == "websocket.disconnect":
                    raise ClientGone()
                self.last_activity = loop.time()
                pending = asyncio.ensure_future(self.websocket.receive())
                self._handle(message)
        finally:
            pending.cancel()

    def _handle(self, message: dict) -> None:
        if self.closing:
            raise SessionError("message_after_close", "a message arrived after close: the text was whole")
        raw = message.get("text")
        if raw is None:
            raise SessionError(
                "binary_message",
                f"binary messages are not taken: send JSON text messages ({', '.join(MESSAGE_TYPES)})",
                1003,
            )
        size, limit = len(raw.encode("utf-8", "surrogatepass")), self.limits.ws_max_message_bytes
        if size > limit:
            raise SessionError(
                "message_too_large",
                f"a message of {size:,} bytes; the limit is {limit:,} "
                "(CSM_GATEWAY_WS_MAX_MESSAGE_BYTES): send the text in smaller pieces",
                1009,
            )
        try:
            check_json_values(raw, "the message")
            data = json.loads(raw)
        except FieldError as error:
            raise SessionError("invalid_message", str(error)) from None
        except ValueError as error:
            raise SessionError("invalid_json", f"the message is not JSON: {error}") from None
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in MESSAGE_TYPES:
            raise SessionError(
                "unknown_message_type",
                f'a message\'s "type" is one of {", ".join(MESSAGE_TYPES)}; '
                f"got {json.dumps(kind)[:60] if isinstance(data, dict) else 'no JSON object'}",
            )
        if kind == "start":
            self._start(data)
        elif kind == "text":
            self._text(data.get("text"))
        else:
            self._queue(self.splitter.flush())
            if kind == "close":
                self.closing = True
                self.sentences.put_nowait(None)
        self.started = True

    def _start(self, data: dict) -> None:
        if self.started:
            raise SessionError("late_start", "start must be the first message of the session")
        try:
            options = StartMessage.model_validate(data)
            check_sampling(
                seed=options.seed, temperature=options.temperature, top_k=options.top_k, limits=self.server_limits
            )
            if options.speaker is not None:
                check_speaker(options.speaker, limits=self.server_limits)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            raise SessionError("invalid_start", f"start: {where}: {first.get('msg')}") from None
        except InvalidRequest as error:
            raise SessionError("invalid_start", f"start: {error}") from None
        if options.model not in MODELS:
            raise SessionError(
                "model_not_found",
                f"start: model '{options.model}' does not exist; this server "
                f"speaks with {', '.join(MODELS)} (all CSM-1B)",
            )
        self.options = options

    def _text(self, text) -> None:
        if not isinstance(text, str):
            raise SessionError(
                "invalid_message", 'a text message carries the text as a string: {"type": "text", "text": "..."}'
            )
        self.text_chars += len(text)
        if self.text_chars > self.server_limits.MAX_LONG_TEXT_CHARS:
            raise SessionError(
                "text_too_long",
                f"the session's text passed {self.server_limits.MAX_LONG_TEXT_CHARS:,} characters, "
                "the server's limit for one text (MAX_LONG_TEXT_CHARS)",
            )
        self._queue(self.splitter.feed(text))

    def _queue(self, sentences: list[str]) -> None:
        for sentence in sentences:
            text, self.carry = self.carry + sentence, ""
            if not speakable(text):
                self.carry = text
                continue
            self.queued += 1
            if self.queued > self.limits.ws_max_sentences:
                raise SessionError(
                    "too_many_sentences",
                    f"more than {self.limits.ws_max_sentences} sentences in one session (CSM_GATEWAY_WS_MAX_SENTENCES)",
                )
            self.sentences.put_nowait(text.strip())

    # --- speaking -------------------------------------------------------------------
    async def _speak(self) -> None:
        continuation = ""
        while (sentence := await self.sentences.get()) is not None:
            self.speaking = True
            continuation = await self._sentence(sentence, continuation)
            self.speaking, self.last_activity = False, asyncio.get_running_loop().time()
        if self.encoder is not None:
            tail = self.encoder.finish()
            if tail:
                await self._send_bytes(tail)

    async def _sentence(self, text: str, continue_from: str) -> str:
        """Speaks one sentence as the next segment of the session's text; the id the next
        one continues from."""
        options, start = self.options, self.samples
        voice = options.voice if options.voice and options.voice.lower() not in OPENAI_VOICES else None
        chunks = self.cloner.stream(
            text,
            voice=voice,
            seed=options.seed,
            temperature=options.temperature,
            top_k=options.top_k,
            speaker=options.speaker,
            continue_from=continue_from,
        )
        try:
            async for chunk in chunks:
                if self.encoder is None:
                    self.sample_rate = chunk.sample_rate
                    self.encoder = StreamEncoder(options.response_format, chunk.sample_rate)
                self.samples += chunk.audio.size
                data = self.encoder.feed(chunk.audio)
                if data:
                    await self._send_bytes(data)
        finally:
            await chunks.aclose()
        if not chunks.continuation:
            raise SessionError(
                "server_error",
                "Triton's csm_tts_stream did not answer CONTINUATION: it predates "
                "the text stream (update the model repository)",
                1011,
                "server_error",
            )
        sentence = {
            "index": len(self.spoken),
            "text": text,
            "normalized_text": " ".join(chunks.normalized_text),
            "finish_reasons": list(chunks.finish_reasons),
            "frames": sum(chunks.segment_frames),
            "start": round(start / self.sample_rate, 6),
            "end": round(self.samples / self.sample_rate, 6),
        }
        self.spoken.append(sentence)
        await self._send_json({"type": "sentence", **sentence})
        return chunks.continuation

    async def _send_bytes(self, data: bytes) -> None:
        try:
            await self.websocket.send_bytes(data)
        except Exception:  # noqa: BLE001 - the connection is gone (uvicorn's or Starlette's error)
            raise ClientGone() from None

    async def _send_json(self, data: dict) -> None:
        try:
            await self.websocket.send_json(data)
        except Exception:  # noqa: BLE001
            raise ClientGone() from None


def text_stream_router(cloner: Callable[[], AsyncVoiceCloner], keys: ApiKeys, limits: GatewayLimits) -> APIRouter:
    """`cloner()`: the app's AsyncVoiceCloner; the key and the slot are the guard's."""
    router = APIRouter(tags=["OpenAI-compatible"])

    @router.websocket(ROUTE)
    async def stream_text(websocket: WebSocket):
        if keys:  # the guard checked it before the handshake; checked again here, as /v1 does
            try:
                keys.check(websocket.headers.get("authorization"), "the OpenAI-compatible API needs an API key")
            except CsmClientError as error:
                await websocket.close(1008, str(error)[:120])
                return
        await TextStreamSession(websocket, cloner(), limits).run()

    return router
