"""Audio in and out: any file libsndfile reads, and WAV bytes for answers.

Reference clips are mixed down to mono and, when recorded above the model's rate,
resampled down to it before sending: the server would do exactly that (soxr, "HQ"), so
the model hears the same audio and the request is smaller. Slower clips are sent as
recorded; the server resamples them and judges every rate and duration limit.

A caller that decodes what strangers send (the gateway) gives `read_audio` a
`max_seconds`: the duration, channels and rate are then judged from the container's
header before anything is decoded (a FLAC or Ogg of an hour of silence is a few hundred
KB and would expand thousands of times), and decoding stops one block after the limit,
so a header that lies about its length costs no more than an honest one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import soxr

from csm_clients.errors import InvalidRequest
from csm_clients.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "MAX_DECODE_CHANNELS",
    "MODEL_SAMPLE_RATE",
    "AudioSource",
    "AudioTooLong",
    "Reference",
    "Speech",
    "read_reference_clip",
    "read_audio",
    "resample",
]

# csm_tts's SAMPLE_RATE output (Mimi's rate, docs/api.md). Only used to avoid sending
# more samples than the model keeps; the rate of an answer is read from the answer.
MODEL_SAMPLE_RATE = 24_000
# A bounded read refuses more channels than this: a WAV header may claim 65,535, and each
# decoded block is frames x channels floats. Everything is mixed down to mono anyway.
MAX_DECODE_CHANNELS = 8
_BLOCK_SAMPLES = 1 << 18  # per decoded block, all channels together (1 MiB of float32)
# libsndfile reports a length it cannot know (a streamed FLAC) as the largest count.
_UNKNOWN_FRAMES = 2**62


class AudioTooLong(InvalidRequest):
    """A clip over the duration a bounded read allows (the gateway answers 400).
    `seconds`: its length, from its header when `by_header`, else at least this much
    (decoding stopped there)."""

    def __init__(self, message: str, seconds: float = 0.0, by_header: bool = False):
        super().__init__(message)
        self.seconds, self.by_header = seconds, by_header


AudioSource = str | Path | bytes | BinaryIO


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if from_rate == to_rate:
        return samples
    return np.ascontiguousarray(soxr.resample(samples, from_rate, to_rate, quality="HQ"), dtype=np.float32)


def read_audio(
    source: AudioSource,
    name: str = "audio",
    *,
    max_seconds: float | None = None,
    limit_name: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[np.ndarray, int]:
    """Any soundfile format (WAV, FLAC, OGG, MP3, ...) from a path, bytes or a file
    object -> (float32 mono samples, rate), at most MODEL_SAMPLE_RATE.

    `max_seconds`: refuse (AudioTooLong) a clip longer than this, judged from its header
    before decoding and enforced while decoding; its channels (MAX_DECODE_CHANNELS) and
    rate (the server's input range, from `limits`) are judged from the header too.
    `limit_name` is the limit's name in the message (MAX_REFERENCE_SECONDS)."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with soundfile.SoundFile(source if hasattr(source, "read") else str(source)) as sound:
            rate = int(sound.samplerate)
            if max_seconds is None:
                samples = sound.read(dtype="float32", always_2d=True)
            else:
                samples = _bounded_read(sound, name, max_seconds, limit_name, limits)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise InvalidRequest(f"cannot read {name} as audio: {error}") from None
    mono = samples.mean(axis=1, dtype=np.float32)
    if rate > MODEL_SAMPLE_RATE:
        return resample(mono, rate, MODEL_SAMPLE_RATE), MODEL_SAMPLE_RATE
    return np.ascontiguousarray(mono), int(rate)


def read_reference_clip(source: AudioSource, name: str, limits: Limits = DEFAULT_LIMITS) -> tuple[np.ndarray, int]:
    """A voice's reference clip, refused past the server's MAX_REFERENCE_SECONDS by its
    header before it is decoded (read_audio)."""
    return read_audio(
        source,
        name,
        max_seconds=limits.MAX_REFERENCE_SECONDS,
        limit_name="REFERENCE_AUDIO's, MAX_REFERENCE_SECONDS",
        limits=limits,
    )


def _too_long(name: str, seconds: float, max_seconds: float, limit_name: str | None, how: str) -> AudioTooLong:
    limit = f" ({limit_name})" if limit_name else ""
    return AudioTooLong(
        f"{name} is {how} {seconds:.2f} s long; the limit is {max_seconds:g} s{limit}",
        seconds,
        how == "(by its header)",
    )


def _bounded_read(
    sound: soundfile.SoundFile, name: str, max_seconds: float, limit_name: str | None, limits: Limits
) -> np.ndarray:
    rate, channels, frames = int(sound.samplerate), int(sound.channels), int(sound.frames)
    if not 1 <= channels <= MAX_DECODE_CHANNELS:
        raise InvalidRequest(f"{name} has {channels} channels; the gateway decodes at most {MAX_DECODE_CHANNELS}")
    if not limits.MIN_INPUT_SAMPLE_RATE <= rate <= limits.MAX_INPUT_SAMPLE_RATE:
        raise InvalidRequest(
            f"{name} is sampled at {rate} Hz; the accepted rates are "
            f"{limits.MIN_INPUT_SAMPLE_RATE}-{limits.MAX_INPUT_SAMPLE_RATE} Hz"
        )
    # (a hair of slack: a budget of seconds left after other clips carries float rounding)
    max_frames = int(max(0.0, max_seconds) * rate + 1e-6)
    if 0 < frames < _UNKNOWN_FRAMES and frames > max_frames:
        raise _too_long(name, frames / rate, max_seconds, limit_name, "(by its header)")
    # Whatever the header said, never decode more than the limit allows, plus one block
    # to notice that there is more.
    block = max(1, _BLOCK_SAMPLES // channels)
    parts, total = [], 0
    while True:
        part = sound.read(block, dtype="float32", always_2d=True)
        if len(part) == 0:
            break
        total += len(part)
        if total > max_frames:
            raise _too_long(name, total / rate, max_seconds, limit_name, "at least")
        parts.append(part.mean(axis=1, dtype=np.float32, keepdims=True))  # mono now: a channel's memory
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


@dataclass(frozen=True)
class Reference:
    """A voice given inline: a clip and what it says."""

    samples: np.ndarray  # float32 mono
    sample_rate: int
    transcript: str | None  # None: not sent (the server names what is missing)

    @classmethod
    def from_file(cls, source: AudioSource, transcript: str | None) -> Reference:
        samples, rate = read_audio(source, "the reference clip")
        return cls(samples, rate, transcript)


@dataclass(frozen=True)
class Speech:
    """Synthesized audio: float32 mono samples and their rate (from the server)."""

    audio: np.ndarray
    sample_rate: int
    # csm_tts's FINISH_REASONS and SEGMENT_FRAMES, one per segment of the text
    # (end_of_speech, max_frames, max_audio_seconds, not_started: docs/api.md); empty
    # for stream chunks and for servers that do not send them.
    finish_reasons: tuple[str, ...] = ()
    segment_frames: tuple[int, ...] = ()
    # A stream's final response only: each segment's text as spoken (NORMALIZED_TEXT), and
    # for a piece of a text sent in pieces (`continue_from`) the id the next piece
    # continues from (CONTINUATION; docs/api.md).
    normalized_text: tuple[str, ...] = ()
    continuation: str | None = None
    # Per segment: (start, end) seconds of its speech in the audio (SEGMENT_TIMES): captions.
    segment_times: tuple[tuple[float, float], ...] = ()

    @property
    def seconds(self) -> float:
        return self.audio.size / self.sample_rate

    def to_wav_bytes(self, subtype: str = "PCM_16") -> bytes:
        """16-bit PCM by default: what every browser and player accepts."""
        buffer = io.BytesIO()
        soundfile.write(buffer, np.clip(self.audio, -1.0, 1.0), self.sample_rate, format="WAV", subtype=subtype)
        return buffer.getvalue()

    def save(self, path: str | Path, sample_rate: int | None = None) -> Path:
        """Written in the format the suffix names (.wav, .flac, .ogg ...), resampled if asked."""
        rate = sample_rate or self.sample_rate
        soundfile.write(str(path), np.clip(resample(self.audio, self.sample_rate, rate), -1.0, 1.0), rate)
        return Path(path)
