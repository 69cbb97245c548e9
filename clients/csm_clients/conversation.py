"""Conversations: earlier turns (`Turn`) and the speaker of the text to speak, as tensors.

CSM conditions on earlier turns, each a text, its audio and a speaker id; that keeps a
voice and a prosody consistent across a dialogue. The server (docs/api.md) takes them as
ragged tensors: the turns' clips back to back in CONTEXT_AUDIO with CONTEXT_AUDIO_LENGTHS,
their texts in CONTEXT_TEXT, stored voices as turns in CONTEXT_VOICE_ID, and every turn's
speaker in CONTEXT_SPEAKER (stored voices first).

Two choices made here, both so that the model hears what the caller meant:
- the server places stored-voice turns before clip turns, so a context with a stored
  voice after a clip is refused rather than silently reordered;
- CONTEXT_SAMPLE_RATE is one rate for all clips: clips recorded at different rates are
  resampled to the model's 24 kHz here (soxr "HQ", what the server would do itself).

Every check is a server rule, against the server's numbers (`limits`: a connected
client's, else the documented ones; limits.py), and fails with InvalidRequest before
anything is sent; the server still checks all of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm_clients.audio import MODEL_SAMPLE_RATE, AudioSource, read_audio, resample
from csm_clients.errors import InvalidRequest
from csm_clients.limits import DEFAULT_LIMITS, Limits, check_speaker

__all__ = ["Turn", "check_context", "check_text", "check_turn_count", "context_inputs"]


@dataclass(frozen=True)
class Turn:
    """One earlier turn of a conversation: what was said, by which speaker, and its audio,
    either a clip (`Turn.from_file`, or samples with their rate) or a stored voice
    (`Turn.stored_voice`: the voice's transcript and audio are the turn)."""

    text: str | None = None
    speaker: int = 0
    audio: np.ndarray | None = None  # float32 mono
    sample_rate: int | None = None
    voice: str | None = None  # a stored voice id instead of text + audio

    @classmethod
    def from_file(cls, source: AudioSource, text: str, speaker: int = 0) -> Turn:
        """A clip in any soundfile format and what it says."""
        named = f"the context clip '{source}'" if isinstance(source, (str, Path)) else "a context clip"
        samples, rate = read_audio(source, named)
        return cls(text, speaker, samples, rate)

    @classmethod
    def stored_voice(cls, voice_id: str, speaker: int = 0) -> Turn:
        return cls(None, speaker, voice=voice_id)

    @property
    def seconds(self) -> float:
        return 0.0 if self.audio is None else np.asarray(self.audio).size / float(self.sample_rate or 1)


def check_text(text: str, name: str = "TEXT", limits: Limits = DEFAULT_LIMITS) -> None:
    """The server's length rule for a text, checked before sending (a book of 30,000
    characters should not travel to be refused); what a text must hold is the server's."""
    if not isinstance(text, str):
        raise InvalidRequest(f"input '{name}' must be a string, got {type(text).__name__}")
    if len(text) > limits.MAX_LONG_TEXT_CHARS:
        raise InvalidRequest(f"input '{name}' has {len(text)} characters; the limit is {limits.MAX_LONG_TEXT_CHARS}")


def check_turn_count(count: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """The server's bound on context turns (stored voices and clips together), checked
    once a request's turns are counted and before any clip is read or decoded."""
    if count > limits.MAX_CONTEXT_TURNS:
        raise InvalidRequest(f"{count} context turns; the limit is {limits.MAX_CONTEXT_TURNS}")


def _checked(turn: Turn, index: int, limits: Limits) -> Turn:
    where = f"context turn {index}"
    if not isinstance(turn, Turn):
        raise InvalidRequest(f"{where}: must be a Turn, got {type(turn).__name__}")
    check_speaker(turn.speaker, f"{where}: speaker", limits)
    if turn.voice is not None:
        if turn.audio is not None or turn.text is not None:
            raise InvalidRequest(
                f"{where}: give either a stored voice or a text with its audio, not both "
                "(a stored voice's turn is its own transcript and audio)"
            )
        if not isinstance(turn.voice, str) or not turn.voice.strip():
            raise InvalidRequest(f"{where}: the stored voice id is empty")
        return turn
    if turn.audio is None:
        # CSM's chat template gives every turn before the target its audio.
        raise InvalidRequest(
            f"{where}: has no audio; every context turn needs a clip of what was said or a stored voice"
        )
    if turn.text is None:
        raise InvalidRequest(f"{where}: has audio but no text (what the clip says)")
    if not isinstance(turn.text, str) or len(turn.text) > limits.MAX_TURN_TEXT_CHARS:
        length = f"{len(turn.text)} characters" if isinstance(turn.text, str) else type(turn.text).__name__
        raise InvalidRequest(
            f"{where}: its text has {length}; a turn's text is a string of at most "
            f"{limits.MAX_TURN_TEXT_CHARS} characters"
        )
    samples = np.asarray(turn.audio)
    if samples.ndim != 1:
        raise InvalidRequest(f"{where}: the audio must be mono (1-D samples), got shape {samples.shape}")
    if (
        not isinstance(turn.sample_rate, (int, np.integer))
        or isinstance(turn.sample_rate, bool)
        or turn.sample_rate <= 0
    ):
        raise InvalidRequest(
            f"{where}: give the sample rate of its audio (a positive integer), got {turn.sample_rate!r}"
        )
    if not limits.MIN_TURN_SECONDS <= turn.seconds <= limits.MAX_TURN_SECONDS:
        raise InvalidRequest(
            f"{where}: its clip is {turn.seconds:.2f} s long; a context clip must be "
            f"{limits.MIN_TURN_SECONDS:g}-{limits.MAX_TURN_SECONDS:g} s"
        )
    return turn


def check_context(
    context: Sequence[Turn] | None = None, speaker: int | None = None, limits: Limits = DEFAULT_LIMITS
) -> tuple[list[Turn], list[Turn]]:
    """Every client-side rule of a speaker and its context turns (InvalidRequest naming
    the first broken one), without building a tensor: (stored-voice turns, clip turns)."""
    if speaker is not None:
        check_speaker(speaker, "speaker", limits)
    if not context:
        return [], []
    if isinstance(context, Turn):
        raise InvalidRequest("context: give a list of turns, not one Turn")
    check_turn_count(len(context), limits)
    turns = [_checked(turn, index, limits) for index, turn in enumerate(context)]
    stored = [turn for turn in turns if turn.voice is not None]
    clips = [turn for turn in turns if turn.voice is None]
    first_clip = next((index for index, turn in enumerate(turns) if turn.voice is None), len(turns))
    if any(turn.voice is not None for turn in turns[first_clip:]):
        raise InvalidRequest(
            "context: stored-voice turns must come before the turns with clips "
            "(the server places CONTEXT_VOICE_ID turns first; reordering would change "
            "the conversation)"
        )
    seconds = sum(turn.seconds for turn in clips)  # stored voices' durations are the server's to add
    if seconds > limits.MAX_CONTEXT_AUDIO_SECONDS:
        raise InvalidRequest(
            f"the context turns hold {seconds:.1f} s of audio; the limit is {limits.MAX_CONTEXT_AUDIO_SECONDS:g} s"
        )
    return stored, clips


def context_inputs(
    context: Sequence[Turn] | None = None, speaker: int | None = None, limits: Limits = DEFAULT_LIMITS
) -> dict[str, np.ndarray]:
    """SPEAKER and the CONTEXT_* tensors of csm_tts / csm_tts_stream; nothing for None."""
    stored, clips = check_context(context, speaker, limits)
    inputs: dict[str, np.ndarray] = {}
    if speaker is not None:
        inputs["SPEAKER"] = np.array([speaker], np.int32)
    if not stored and not clips:
        return inputs
    inputs["CONTEXT_SPEAKER"] = np.array([turn.speaker for turn in stored + clips], np.int32)
    if stored:
        inputs["CONTEXT_VOICE_ID"] = np.array([turn.voice.encode("utf-8") for turn in stored], dtype=np.object_)
    if clips:
        rates = {int(turn.sample_rate) for turn in clips}
        rate = rates.pop() if len(rates) == 1 else MODEL_SAMPLE_RATE
        audio = [resample(np.asarray(turn.audio, np.float32), int(turn.sample_rate), rate) for turn in clips]
        inputs["CONTEXT_TEXT"] = np.array([turn.text.encode("utf-8") for turn in clips], dtype=np.object_)
        inputs["CONTEXT_AUDIO"] = np.ascontiguousarray(np.concatenate(audio), dtype=np.float32)
        inputs["CONTEXT_AUDIO_LENGTHS"] = np.array([clip.size for clip in audio], np.int32)
        inputs["CONTEXT_SAMPLE_RATE"] = np.array([rate], np.int32)
    return inputs
