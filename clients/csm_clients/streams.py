"""What a client's `stream()` returns: the audio chunks of csm_tts_stream as they are
generated, and, once the stream has ended, how each segment of the text ended (the
final response's FINISH_REASONS and SEGMENT_FRAMES, which carries no audio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import numpy as np

from csm_clients.audio import Speech
from csm_clients.errors import ServerError

__all__ = ["AsyncSpeechStream", "SpeechStream", "joined"]


class SpeechStream:
    """What `VoiceCloner.stream` returns: Speech chunks as they are generated (iterate it;
    `close()` or leaving the loop early cancels the generation). Once it has ended,
    `finish_reasons` and `segment_frames` say how each segment of the text ended, as
    csm_tts's outputs do (empty when the stream was left early)."""

    def __init__(self, chunks: Iterator[Speech] | AsyncIterator[Speech]):
        self._chunks = chunks
        self.finish_reasons: tuple[str, ...] = ()
        self.segment_frames: tuple[int, ...] = ()
        self.normalized_text: tuple[str, ...] = ()  # each segment as spoken
        self.continuation: str | None = None  # with `continue_from`: what the next piece continues from
        self.segment_times: tuple[tuple[float, float], ...] = ()  # each segment's (start, end) in the audio

    def _audio(self, chunk: Speech) -> bool:
        """True for a chunk of audio; a response without (the final one) is kept."""
        if chunk.audio.size:
            return True
        if chunk.finish_reasons:
            self.finish_reasons, self.segment_frames = chunk.finish_reasons, chunk.segment_frames
            self.normalized_text, self.continuation = chunk.normalized_text, chunk.continuation
            self.segment_times = chunk.segment_times
        return False

    def __iter__(self) -> SpeechStream:
        return self

    def __next__(self) -> Speech:
        while not self._audio(chunk := next(self._chunks)):
            pass
        return chunk

    def close(self) -> None:
        self._chunks.close()


class AsyncSpeechStream(SpeechStream):
    """`AsyncVoiceCloner.stream`'s: `async for chunk in ...`, `aclose()`; the same attributes."""

    def __aiter__(self) -> AsyncSpeechStream:
        return self

    async def __anext__(self) -> Speech:
        while not self._audio(chunk := await self._chunks.__anext__()):
            pass
        return chunk

    async def aclose(self) -> None:
        await self._chunks.aclose()


def joined(chunks: list[Speech], stream: SpeechStream) -> Speech:
    """A collected stream as one Speech, with how its segments ended."""
    if not chunks:
        raise ServerError("the server ended the stream before any audio")
    return Speech(
        np.concatenate([chunk.audio for chunk in chunks]),
        chunks[0].sample_rate,
        stream.finish_reasons,
        stream.segment_frames,
        stream.normalized_text,
        segment_times=stream.segment_times,
    )
