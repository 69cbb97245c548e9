"""Audio in and out: any file libsndfile reads, and WAV bytes for answers.

Reference clips are mixed down to mono and, when recorded above the model's rate,
resampled down to it before sending: the server would do exactly that (soxr, "HQ"), so
the model hears the same audio and the request is smaller. Slower clips are sent as
recorded; the server resamples them and judges every rate and duration limit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import soundfile
import soxr

from csm_clients.errors import InvalidRequest

__all__ = ["MODEL_SAMPLE_RATE", "AudioSource", "Reference", "Speech", "read_audio", "resample"]

# csm_tts's SAMPLE_RATE output (Mimi's rate, docs/api.md). Only used to avoid sending
# more samples than the model keeps; the rate of an answer is read from the answer.
MODEL_SAMPLE_RATE = 24_000

AudioSource = Union[str, Path, bytes, BinaryIO]


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if from_rate == to_rate:
        return samples
    return np.ascontiguousarray(soxr.resample(samples, from_rate, to_rate, quality="HQ"), dtype=np.float32)


def read_audio(source: AudioSource, name: str = "audio") -> tuple[np.ndarray, int]:
    """Any soundfile format (WAV, FLAC, OGG, MP3, ...) from a path, bytes or a file
    object -> (float32 mono samples, rate), at most MODEL_SAMPLE_RATE."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        samples, rate = soundfile.read(source if hasattr(source, "read") else str(source),
                                       dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise InvalidRequest(f"cannot read {name} as audio: {error}") from None
    mono = samples.mean(axis=1, dtype=np.float32)
    if rate > MODEL_SAMPLE_RATE:
        return resample(mono, rate, MODEL_SAMPLE_RATE), MODEL_SAMPLE_RATE
    return np.ascontiguousarray(mono), int(rate)


@dataclass(frozen=True)
class Reference:
    """A voice given inline: a clip and what it says."""

    samples: np.ndarray  # float32 mono
    sample_rate: int
    transcript: str | None  # None: not sent (the server names what is missing)

    @classmethod
    def from_file(cls, source: AudioSource, transcript: str | None) -> "Reference":
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
