"""Decoding a stream of codes chunk by chunk so that the joins are inaudible.

Mimi's decoder is causal: audio for frame t depends on frames <= t only, through the
convolutions' reach and the transformer's 10 s attention window. Each chunk is
therefore decoded together with `context_frames` frames that were already streamed,
and only the new frames' samples are kept. With 125 frames of context (the whole
attention window) the streamed audio equals the whole-utterance decode; less context
trades a little fidelity for less decoding (measured in tests/model/test_streaming.py and
docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from csm_triton import constants as C

Decode = Callable[[np.ndarray], np.ndarray]  # codes [frames, 32] -> samples [frames * 1920]


class StreamDecoder:
    def __init__(
        self, decode: Decode, context_frames: int = C.STREAM_LEFT_CONTEXT_FRAMES, history: np.ndarray | None = None
    ):
        """`history`: codes streamed before (a text continued from an earlier request,
        core.continuation), the left context of the first chunk."""
        self.decode = decode
        self.context_frames = context_frames
        self._history = np.zeros((0, C.NUM_CODEBOOKS), np.int64)
        if history is not None and context_frames:
            self._history = np.asarray(history, np.int64).reshape(-1, C.NUM_CODEBOOKS)[-context_frames:]

    @property
    def history(self) -> np.ndarray:
        """The codes kept as the next chunk's left context (at most context_frames)."""
        return self._history[-self.context_frames :] if self.context_frames else self._history[:0]

    def push(self, codes: np.ndarray) -> np.ndarray:
        """The audio of `codes` (the next frames of the stream)."""
        new = len(codes)
        if not new:
            return np.zeros(0, np.float32)
        self._history = np.concatenate([self._history, codes])[-(self.context_frames + new) :]
        audio = np.asarray(self.decode(self._history), dtype=np.float32).reshape(-1)
        return audio[-new * C.SAMPLES_PER_FRAME :]


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Signal-to-noise ratio of `estimate` against `reference`, in dB."""
    noise = np.sum((reference - estimate) ** 2)
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(np.sum(reference**2) / noise))
