"""stream_text: speak an LLM's output while it is still being written, through the gateway.

    from csm_clients.text_stream import FLUSH, stream_text

    speech = stream_text("http://localhost:7860", llm_deltas(), voice="alice", api_key=KEY)
    for audio in speech:          # bytes of `response_format` (pcm: 24 kHz s16le mono), as they come
        player.write(audio)
    for sentence in speech.sentences:   # once it has ended: each sentence's times and ending
        print(sentence.start, sentence.end, sentence.text)

The deltas (any iterable of strings; `FLUSH` among them speaks what is pending at once)
are sent from a thread as the iterable yields them, while the audio is received here:
the first sentence is heard while the LLM still writes the next. The gateway's route
(/v1/audio/speech/stream-text, docs/api.md) speaks each sentence once it is complete.
Errors raise the package's exceptions: InvalidRequest (a limit, a bad option, an unknown
voice), PermissionDenied (the API key), ServerUnavailable (429, Triton down), ServerError.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from csm_clients.errors import (
    CsmClientError,
    InvalidRequest,
    PermissionDenied,
    ServerError,
    ServerUnavailable,
    missing_extra,
)

try:  # websockets is the client distribution's `pipe` extra: MissingExtra names it when absent
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import ClientConnection, connect
except ImportError as error:
    raise missing_extra("websockets", "pipe", "csm_clients.text_stream (csm-tts pipe)") from error

__all__ = ["FLUSH", "ROUTE", "SentenceTiming", "TextStream", "stream_text"]

ROUTE = "/v1/audio/speech/stream-text"
FLUSH = object()  # among the deltas: speak what is pending now, a whole sentence or not


@dataclass(frozen=True)
class SentenceTiming:
    """One spoken sentence: where it lies in the session's audio (seconds) and how it ended."""

    index: int
    text: str
    normalized_text: str
    start: float
    end: float
    finish_reasons: tuple[str, ...]
    frames: int

    @classmethod
    def from_message(cls, message: dict) -> SentenceTiming:
        return cls(
            int(message["index"]),
            message["text"],
            message.get("normalized_text", ""),
            float(message["start"]),
            float(message["end"]),
            tuple(message.get("finish_reasons", ())),
            int(message.get("frames", 0)),
        )


def _error(message: str, code: str | None) -> CsmClientError:
    """The gateway's `error` message as an exception: its `code` tells whose fault it is."""
    if code == "service_unavailable":
        return ServerUnavailable(message)
    if code in ("server_error", "internal_error"):
        return ServerError(message)
    return InvalidRequest(message)


def _refused(error: InvalidStatus) -> CsmClientError:
    """The handshake's HTTP refusal (the gateway's guard: 401, 403, 429) as an exception."""
    status = error.response.status_code
    try:
        message = json.loads(error.response.body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"the gateway refused the WebSocket with HTTP {status}"
    if status in (401, 403):
        return PermissionDenied(message)
    if status in (429, 503):
        return ServerUnavailable(message)
    return InvalidRequest(message) if 400 <= status < 500 else ServerError(message, str(status))


def websocket_url(url: str) -> str:
    """http(s)://host:port or ws(s)://host:port (with or without the route's path) -> the route's URL."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") or ROUTE, parts.query, ""))


class TextStream:
    """Iterate it for audio bytes as they arrive. Once it has ended: `sentences` (each a
    SentenceTiming, also filled as each sentence ends), `audio_seconds`, and `done`, the
    gateway's final message. `close()` (or leaving the loop early) ends the session: the
    gateway cancels the sentence being generated."""

    def __init__(self, connection: ClientConnection, deltas: Iterable, timeout: float | None):
        self._connection, self._timeout = connection, timeout
        self.sentences: list[SentenceTiming] = []
        self.audio_seconds = 0.0
        self.done: dict | None = None
        self._send_error: BaseException | None = None
        self._sender = threading.Thread(target=self._send_all, args=(deltas,), name="csm-text-stream", daemon=True)
        self._sender.start()

    def _send_all(self, deltas: Iterable) -> None:
        try:
            for delta in deltas:
                if delta is FLUSH:
                    self._connection.send(json.dumps({"type": "flush"}))
                elif delta:
                    self._connection.send(json.dumps({"type": "text", "text": str(delta)}))
            self._connection.send(json.dumps({"type": "close"}))
        except ConnectionClosed:
            pass  # the gateway ended the session; the receiving side says why
        except BaseException as error:  # noqa: BLE001 - the deltas' own failure ends the session
            self._send_error = error
            self._connection.close(1001, "the text source failed")

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        while self.done is None:
            try:
                message = self._connection.recv(timeout=self._timeout)
            except TimeoutError:
                self.close()
                raise ServerError(f"no message from the gateway within {self._timeout:g} s") from None
            except ConnectionClosed as closed:
                if self._send_error is not None:
                    raise self._send_error from closed
                reason = closed.rcvd.reason if closed.rcvd else ""
                raise ServerError(f"the gateway closed the session before its end ({reason or closed})") from None
            if isinstance(message, bytes):
                return message
            self._event(json.loads(message))
        raise StopIteration

    def _event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "sentence":
            self.sentences.append(SentenceTiming.from_message(event))
        elif kind == "done":
            self.sentences = [SentenceTiming.from_message(item) for item in event.get("sentences", ())]
            self.audio_seconds = float(event.get("audio_seconds", 0.0))
            self.done = event
            self._connection.close()
        elif kind == "error":
            error = event.get("error", {})
            self._connection.close()
            raise _error(error.get("message", "the gateway failed"), error.get("code"))

    def read_all(self) -> bytes:
        """Every audio byte of the session, once it has ended."""
        return b"".join(self)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_text(
    url: str,
    deltas: Iterable,
    *,
    voice: str | None = None,
    api_key: str | None = None,
    response_format: str = "pcm",
    seed: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    speaker: int | None = None,
    open_timeout: float = 10.0,
    timeout: float | None = 300.0,
) -> TextStream:
    """Opens a session on the gateway at `url` (http://host:7860, or the route's ws:// URL)
    and starts sending `deltas` (strings, and FLUSH) as they come. `voice`: a stored voice
    id (OpenAI's names and None: the default voice); `timeout`: the longest wait for any
    message from the gateway."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        connection = connect(
            websocket_url(url), additional_headers=headers, open_timeout=open_timeout, max_size=None, legacy=True
        )
    except InvalidStatus as error:
        raise _refused(error) from None
    except OSError as error:
        raise ServerUnavailable(f"cannot reach the gateway at {url}: {error}") from None
    options = {
        "voice": voice,
        "response_format": response_format,
        "seed": seed,
        "temperature": temperature,
        "top_k": top_k,
        "speaker": speaker,
    }
    connection.send(json.dumps({"type": "start", **{k: v for k, v in options.items() if v is not None}}))
    return TextStream(connection, deltas, timeout)
