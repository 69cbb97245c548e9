"""A text that arrives in pieces, spoken as one long text: the tail a piece leaves for the next.

A voice agent's text comes sentence by sentence while an LLM writes it, so it cannot be
sent to csm_tts_stream whole. Each piece goes in its own request instead, and the
chain of segments continues across requests exactly as inside one long text
(core.segments.SegmentChain): the next piece's first prompt holds the previous
segment's text turn and the codes generated for it, its seed is SEED + the segments
spoken before, and its first chunk is decoded with the codes before it as left
context. The audio of the pieces back to back is therefore the audio of the long
text split one piece per segment, sample for sample at a fixed seed on the CPU.

What the next piece needs (`ChainTail`) stays in the server, never with the client:
the codes are unwatermarked speech (any Mimi decoder turns them into audio), so they
must not leave it. The client gets an opaque id (`CONTINUATION`), good for one
continuation, and sends it back as `CONTINUE_FROM`. The store is bounded: at most
`max_entries` tails (the oldest dropped first) and `ttl_s` seconds each; a dropped or
used id is refused with a message that says so.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from csm_triton.errors import InvalidInput

__all__ = ["ChainTail", "ContinuationStore", "context_digest", "DEFAULT_MAX_ENTRIES", "DEFAULT_TTL_S"]

DEFAULT_MAX_ENTRIES = 256  # one per stream csm_tts_stream runs at once (max_concurrent_streams)
# Longer than any pause between two sentences of an LLM (the gateway closes a session
# idle for 30 s); short enough that an abandoned chain does not linger.
DEFAULT_TTL_S = 300.0
_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def context_digest(context_ids: np.ndarray, context_codes: np.ndarray, adapter_id: str = "") -> bytes:
    """What a chain was spoken with (voice reference, context turns, LoRA adapter voice): a
    continuation is refused for another voice or context, whose prompt it would not continue."""
    digest = hashlib.sha256(np.ascontiguousarray(context_ids, np.int64).tobytes())
    digest.update(np.ascontiguousarray(context_codes, np.int64).tobytes())
    digest.update(f"adapter:{adapter_id}".encode())
    return digest.digest()


@dataclass(frozen=True)
class ChainTail:
    """Where a chain stopped: enough to speak its next segment as the long text would."""

    context: bytes  # context_digest of the chain's voice and context turns
    segments: int  # segments spoken so far: the next one is number `segments` (its seed SEED + segments)
    generated_frames: int  # frames generated so far (a client MAX_AUDIO_SECONDS bounds the whole chain)
    previous_ids: np.ndarray | None  # the last segment's text turn (token ids), None when it made no codes
    previous_codes: np.ndarray | None  # the codes generated for it, [frames, NUM_CODEBOOKS]
    decoder_history: np.ndarray  # the codes the stream decoder keeps as left context

    def nbytes(self) -> int:
        arrays = (self.previous_ids, self.previous_codes, self.decoder_history)
        return sum(array.nbytes for array in arrays if array is not None)


class ContinuationStore:
    """Tails by id, bounded in count and age; thread-safe (csm_tts_stream runs a worker
    thread per stream)."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("a continuation store needs max_entries >= 1 and ttl_s > 0")
        self.max_entries, self.ttl_s, self._clock = max_entries, ttl_s, clock
        self._tails: OrderedDict[str, tuple[float, ChainTail]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._tails)

    def put(self, tail: ChainTail) -> str:
        """Keeps `tail`; the id to continue from (unguessable: whoever holds it may
        continue the chain, nothing else)."""
        name = secrets.token_urlsafe(24)
        with self._lock:
            self._expire()
            while len(self._tails) >= self.max_entries:
                self._tails.popitem(last=False)
            self._tails[name] = (self._clock() + self.ttl_s, tail)
        return name

    def take(self, name: str) -> ChainTail:
        """The tail kept under `name`, removed (an id continues one piece only)."""
        if not _ID.match(name):
            raise InvalidInput(
                "input 'CONTINUE_FROM' is not a continuation id: send the CONTINUATION of the "
                "previous piece's final response, or an empty string to start a chain"
            )
        with self._lock:
            self._expire()
            entry = self._tails.pop(name, None)
        if entry is None:
            raise InvalidInput(
                f"input 'CONTINUE_FROM' names no continuation this server holds: used already, "
                f"older than {self.ttl_s:g} s, dropped for newer ones, or made by another server"
            )
        return entry[1]

    def _expire(self) -> None:
        now = self._clock()
        while self._tails:
            name, (deadline, _) = next(iter(self._tails.items()))
            if deadline > now:
                break
            del self._tails[name]
