"""Conversations: the speaker of the target turn and the context turns before it.

CSM conditions on earlier turns (text + audio, each with a speaker id); a request
gives them as ragged tensors (docs/api.md):

    SPEAKER                 [1] INT32    speaker id of the turn to speak (default 0)
    CONTEXT_VOICE_ID        [m] BYTES    stored voices, each a turn (its transcript + codes)
    CONTEXT_TEXT            [n] BYTES    the text of each inline turn
    CONTEXT_AUDIO           [total] FP32 the inline turns' audio back to back ...
    CONTEXT_AUDIO_LENGTHS   [n] INT32    ... each turn's sample count (> 0: CSM's chat
                                          template gives every context turn its audio)
    CONTEXT_SAMPLE_RATE     [1] INT32    the sample rate of CONTEXT_AUDIO
    CONTEXT_SPEAKER         [m + n] INT32 the speaker of every context turn, stored voices
                                          first (default: all 0)

The turns are ordered oldest first: the voice reference (VOICE_ID or REFERENCE_*, spoken
by SPEAKER), then the CONTEXT_VOICE_ID turns, then the CONTEXT_TEXT turns, then the
target. That order keeps the stable parts at the front of the prompt, where a prefix
cache can find them. Every rule failure is InvalidInput (INVALID_ARG).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from csm_triton import constants as C
from csm_triton.core import validation
from csm_triton.core.audio import prepare_reference_audio
from csm_triton.core.prompt import Turn
from csm_triton.errors import InvalidInput

__all__ = ["speaker_id", "spoken_text", "context_turns", "CONTEXT_INPUTS"]

CONTEXT_INPUTS = (
    "SPEAKER",
    "CONTEXT_TEXT",
    "CONTEXT_SPEAKER",
    "CONTEXT_AUDIO",
    "CONTEXT_AUDIO_LENGTHS",
    "CONTEXT_SAMPLE_RATE",
    "CONTEXT_VOICE_ID",
)

# voice id -> (transcript, codes [frames, 32]); raises InvalidInput for an unknown voice
VoiceLookup = Callable[[str], tuple[str, np.ndarray]]
# 24 kHz float32 mono -> codes [frames, 32]
Encoder = Callable[[np.ndarray], np.ndarray]


def _integers(value, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise InvalidInput(f"input '{name}' must be an integer tensor, got {array.dtype}")
    return array.reshape(-1).astype(np.int64)


def _speaker(value: int, name: str) -> int:
    if not 0 <= value <= C.MAX_SPEAKER_ID:
        raise InvalidInput(f"input '{name}' holds speaker id {value}; speaker ids are 0-{C.MAX_SPEAKER_ID}")
    return int(value)


def speaker_id(value=None) -> int:
    """SPEAKER: one id in [0, MAX_SPEAKER_ID]; absent -> DEFAULT_SPEAKER_ID."""
    if value is None:
        return C.DEFAULT_SPEAKER_ID
    values = _integers(value, "SPEAKER")
    if values.size != 1:
        raise InvalidInput(f"input 'SPEAKER' must hold exactly one value, got {values.size}")
    return _speaker(int(values[0]), "SPEAKER")


def spoken_text(value: str, name: str, max_chars: int = C.MAX_TEXT_CHARS) -> str:
    """A text that has something to say: at least one letter or digit (only punctuation
    or whitespace gives the model nothing to speak and it babbles to the frame cap)."""
    if not value.strip():
        raise InvalidInput(f"input '{name}' is empty")
    if len(value) > max_chars:
        raise InvalidInput(f"input '{name}' has {len(value)} characters; the limit is {max_chars}")
    if "\x00" in value:
        raise InvalidInput(f"input '{name}' contains a NUL character")
    if not any(ch.isalnum() for ch in value):
        raise InvalidInput(f"input '{name}' has only punctuation or whitespace: nothing to speak")
    return value


def context_turns(
    *,
    texts: Sequence[str] | None = None,
    speakers=None,
    audio=None,
    audio_lengths=None,
    sample_rate=None,
    voice_ids: Sequence[str] | None = None,
    lookup_voice: VoiceLookup,
    encode: Encoder,
) -> list[Turn]:
    """The context turns of a request, checked, as prompt turns (oldest first).

    Cheap rules first (counts, lengths, speakers, texts, the audio total), so that a bad
    request costs no voice lookup and no encoding."""
    voice_ids = list(voice_ids or [])
    texts = list(texts or [])
    turn_count = len(voice_ids) + len(texts)
    if turn_count > C.MAX_CONTEXT_TURNS:
        raise InvalidInput(f"{turn_count} context turns; the limit is {C.MAX_CONTEXT_TURNS}")
    if speakers is None:
        turn_speakers = [C.DEFAULT_SPEAKER_ID] * turn_count
    else:
        turn_speakers = [_speaker(int(s), "CONTEXT_SPEAKER") for s in _integers(speakers, "CONTEXT_SPEAKER")]
        if len(turn_speakers) != turn_count:
            raise InvalidInput(
                f"input 'CONTEXT_SPEAKER' has {len(turn_speakers)} values for {turn_count} context turns "
                f"({len(voice_ids)} CONTEXT_VOICE_ID + {len(texts)} CONTEXT_TEXT)"
            )
    for index, text in enumerate(texts):
        spoken_text(text, f"CONTEXT_TEXT[{index}]")
    clips = _split_audio(texts, audio, audio_lengths, sample_rate)
    voice_ids = [validation.voice_id(v, "CONTEXT_VOICE_ID") for v in voice_ids]

    turns: list[Turn] = []
    audio_frames = 0
    for voice_id, speaker in zip(voice_ids, turn_speakers):
        transcript, codes = lookup_voice(voice_id)
        audio_frames += len(codes)
        turns.append(Turn(transcript, speaker, validation.audio_codes(np.asarray(codes), "CONTEXT_VOICE_ID")))
    _check_audio_total(audio_frames / C.FRAME_RATE_HZ + sum(c.size for c in clips) / _rate(sample_rate, clips))
    for index, (text, clip) in enumerate(zip(texts, clips)):
        speaker = turn_speakers[len(voice_ids) + index]
        samples = prepare_reference_audio(
            clip, sample_rate, name=f"CONTEXT_AUDIO (turn {index})", rate_name="CONTEXT_SAMPLE_RATE"
        )
        codes = validation.audio_codes(np.asarray(encode(samples)), "encoded context audio")
        turns.append(Turn(text, speaker, codes))
    return turns


def _rate(sample_rate, clips) -> float:
    if not clips:
        return 1.0
    return float(validation.input_sample_rate(sample_rate, "CONTEXT_SAMPLE_RATE"))


def _check_audio_total(seconds: float) -> None:
    if seconds > C.MAX_CONTEXT_AUDIO_SECONDS:
        raise InvalidInput(
            f"the context turns hold {seconds:.1f} s of audio; the limit is {C.MAX_CONTEXT_AUDIO_SECONDS:g} s"
        )


def _split_audio(texts, audio, audio_lengths, sample_rate) -> list[np.ndarray | None]:
    """CONTEXT_AUDIO cut by CONTEXT_AUDIO_LENGTHS, one clip per CONTEXT_TEXT."""
    if audio is None and audio_lengths is None:
        if sample_rate is not None:
            raise InvalidInput("'CONTEXT_SAMPLE_RATE' was given without 'CONTEXT_AUDIO'")
        if texts:  # CSM's chat template: every turn before the target has text and audio
            raise InvalidInput(
                "'CONTEXT_TEXT' needs 'CONTEXT_AUDIO' and 'CONTEXT_AUDIO_LENGTHS': "
                "every context turn carries the audio of what was said"
            )
        return []
    if audio is None or audio_lengths is None:
        raise InvalidInput("'CONTEXT_AUDIO' and 'CONTEXT_AUDIO_LENGTHS' come together")
    if not texts:
        raise InvalidInput("'CONTEXT_AUDIO' was given without 'CONTEXT_TEXT', the transcript of each turn")
    lengths = _integers(audio_lengths, "CONTEXT_AUDIO_LENGTHS")
    if len(lengths) != len(texts):
        raise InvalidInput(
            f"input 'CONTEXT_AUDIO_LENGTHS' has {len(lengths)} values for {len(texts)} CONTEXT_TEXT turns"
        )
    if (lengths <= 0).any():
        raise InvalidInput("input 'CONTEXT_AUDIO_LENGTHS' holds a length <= 0; every context turn needs audio")
    samples = np.asarray(audio).reshape(-1)
    if int(lengths.sum()) != samples.size:
        raise InvalidInput(
            f"input 'CONTEXT_AUDIO_LENGTHS' adds up to {int(lengths.sum())} samples, but 'CONTEXT_AUDIO' "
            f"holds {samples.size}"
        )
    if sample_rate is None:
        raise InvalidInput("'CONTEXT_AUDIO' needs 'CONTEXT_SAMPLE_RATE', its sample rate in Hz")
    clips = np.split(samples, np.cumsum(lengths)[:-1])
    return list(clips)
