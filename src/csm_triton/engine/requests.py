"""One request's side of the engine: what is asked (GenerationRequest), what comes
back (FrameChunk, GenerationResult) and the caller's handle on it (RequestHandle).

The engine thread delivers chunks through the handle; the caller reads them (or
gets them through a callback) and may cancel at any time.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from csm_triton import constants as C

__all__ = [
    "CancellationPoller",
    "Deliveries",
    "FinishReason",
    "FrameChunk",
    "GenerationRequest",
    "GenerationResult",
    "RequestHandle",
]


class FinishReason(str, enum.Enum):
    END_OF_SPEECH = "end_of_speech"
    MAX_FRAMES = "max_frames"
    CANCELLED = "cancelled"
    ERROR = "error"
    SHUTDOWN = "shutdown"
    # The device failed for the whole process (engine.faults): retry, the model reloads.
    DEVICE_FAILURE = "device_failure"


@dataclass
class GenerationRequest:
    input_ids: np.ndarray  # [tokens] with AUDIO placeholders (csm_triton.core.prompt)
    audio_codes: np.ndarray  # [placeholders, 32]
    max_frames: int
    temperature: float = C.DEFAULT_TEMPERATURE
    top_k: int = C.DEFAULT_TOP_K
    seed: int | None = None
    greedy: bool = False
    stream_every: int = 0  # emit a chunk every N frames; 0: one chunk at the end
    first_chunk_frames: int = 0  # a smaller first chunk (time to first audio); 0: stream_every
    request_id: str = ""
    # Store at most this many leading context turns in the prefix cache (None: all): a
    # long text's later segments pass the previous generated segment as a turn, which no
    # later request will repeat, so it would only push reusable turns out.
    prefix_cache_turns: int | None = None
    # A LoRA adapter voice (its id in the voice store): its rows add that adapter's
    # low-rank products (engine.lora); None: the base model.
    adapter: str | None = None
    # Polled every few frames (e.g. Triton's response_sender.is_cancelled): True cancels.
    is_cancelled: Callable[[], bool] | None = None


@dataclass
class FrameChunk:
    codes: np.ndarray  # [frames, 32] int64
    finished: bool = False
    reason: FinishReason | None = None
    error: str | None = None
    # Seconds from submission (queueing included) to the request's first frame; None before it.
    time_to_first_frame: float | None = None


@dataclass
class GenerationResult:
    codes: np.ndarray
    reason: FinishReason
    error: str | None = None


class RequestHandle:
    """The caller's side of one request: chunks in order, and cancel()."""

    def __init__(self, request: GenerationRequest, callback: Callable[[FrameChunk], None] | None):
        self.request = request
        self._callback = callback
        self._chunks: queue.Queue[FrameChunk] = queue.Queue()
        self._cancelled = threading.Event()
        self.submitted_at = time.perf_counter()
        self.time_to_first_frame: float | None = None

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _deliver(self, chunk: FrameChunk) -> None:
        chunk.time_to_first_frame = self.time_to_first_frame
        if self._callback is not None:
            self._callback(chunk)
        else:
            self._chunks.put(chunk)

    def _end(self, reason: FinishReason, error: str | None = None, frames: list | None = None) -> None:
        """Deliver the last chunk: the frames not yet delivered (maybe none) and why it ended."""
        codes = np.stack(frames).astype(np.int64) if frames else np.zeros((0, C.NUM_CODEBOOKS), np.int64)
        self._deliver(FrameChunk(codes, True, reason, error))

    def chunks(self, timeout: float | None = None) -> Iterator[FrameChunk]:
        while True:
            chunk = self._chunks.get(timeout=timeout)
            yield chunk
            if chunk.finished:
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        parts, last = [], None
        for last in self.chunks(timeout):
            parts.append(last.codes)
        codes = np.concatenate(parts) if parts else np.zeros((0, C.NUM_CODEBOOKS), np.int64)
        return GenerationResult(codes, last.reason, last.error)


class CancellationPoller:
    """Asks running requests' clients whether they are gone (GenerationRequest.is_cancelled:
    an IPC round trip each in Triton), spread over frames and capped per frame.

    Each slot is asked once every `every` frames on average (a credit of n/every polls a
    frame for n slots, taken in turn), but never more than `per_frame` times a frame: at
    4 slots that is one poll a frame, at 256 slots 8 (instead of 64 every 4th frame), and
    a vanished client is noticed within n/per_frame frames (32 at 256 slots, ~0.3 s on a
    GPU)."""

    def __init__(self, every: int = 4, per_frame: int = 8):
        self.every, self.per_frame = every, per_frame
        self._credit, self._cursor = 0.0, 0
        self.polls = 0  # for tests and stats

    def poll(self, handles: list[RequestHandle]) -> None:
        if not handles:
            self._credit = 0.0
            return
        self._credit = min(self._credit + len(handles) / self.every, self.per_frame)
        for _ in range(min(int(self._credit), len(handles))):
            handle = handles[self._cursor % len(handles)]
            self._cursor += 1
            self._credit -= 1
            self.polls += 1
            ask = handle.request.is_cancelled
            if ask is not None and ask():
                handle.cancel()


class Deliveries:
    """Runs the engine's hand-offs (chunks and endings to their requests' callbacks,
    stats to metrics: an IPC round trip each in Triton) on a thread of their own, in the
    order they were sent, so the engine thread launches the next frame meanwhile.
    Before start() (or after stop()) a hand-off runs at once on the caller's thread: the
    engine stepped by hand, as in tests, delivers synchronously."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="csm-deliveries", daemon=True)
        self._thread.start()

    def send(self, function: Callable, *args) -> None:
        if self._thread is None:
            _call(function, args)
        else:
            self._queue.put((function, args))

    def drain(self, timeout: float | None = None) -> bool:
        """Waits until everything sent so far was handed off; False on timeout."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put((done.set, ()))
        return done.wait(timeout)

    def stop(self, timeout: float | None = None) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            _call(*item)


def _call(function: Callable, args: tuple) -> None:
    try:
        function(*args)
    except Exception:
        logging.getLogger(__name__).exception("a delivery failed")
