"""Audio I/O and the one path every voice reference takes to Mimi's input format.

`prepare_reference_audio` is used by the server (voice registration, inline
reference audio); `read_audio_file` is for clients and tests. Resampling uses
soxr (libsoxr's high-quality polyphase resampler): small, no torch, and the
same result on every machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soxr

from csm_triton import constants as C
from csm_triton.core import validation

__all__ = ["peak_normalise", "prepare_reference_audio", "read_audio_file", "resample"]

# Mimi expects samples in [-1, 1]; a louder clip is scaled down to exactly this peak.
_FULL_SCALE = 1.0


def resample(samples: np.ndarray, from_rate: int, to_rate: int = C.SAMPLE_RATE) -> np.ndarray:
    """1-D float32 samples at `from_rate` -> float32 at `to_rate` (ceil(n * to / from) samples)."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if from_rate == to_rate:
        return samples
    return np.ascontiguousarray(soxr.resample(samples, from_rate, to_rate, quality="HQ"), dtype=np.float32)


def peak_normalise(samples: np.ndarray) -> np.ndarray:
    """Scaled down to full scale only if it clips; quieter audio is left as recorded
    (loudness is part of the voice the reference conveys)."""
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak <= _FULL_SCALE:
        return samples
    return (samples * np.float32(_FULL_SCALE / peak)).astype(np.float32)


def prepare_reference_audio(
    samples: np.ndarray,
    sample_rate,
    *,
    name: str = "REFERENCE_AUDIO",
    rate_name: str = "REFERENCE_SAMPLE_RATE",
) -> np.ndarray:
    """A client's reference clip -> float32 mono [samples] at 24 kHz, ready for mimi_encoder.

    Raises InvalidInput naming the input for: a dtype other than FP32, an empty or
    non-mono tensor (only [samples] and [1, samples] are accepted), NaN/inf, a sample
    rate outside [MIN_INPUT_SAMPLE_RATE, MAX_INPUT_SAMPLE_RATE], or a clip shorter than
    MIN_REFERENCE_SECONDS or longer than MAX_REFERENCE_SECONDS (checked before
    resampling, so an oversized clip costs nothing).
    """
    samples = validation.mono_audio(samples, name)
    rate = validation.input_sample_rate(sample_rate, rate_name)
    validation.reference_duration(samples.size, rate, name)
    return peak_normalise(resample(samples, rate, C.SAMPLE_RATE))


def read_audio_file(path: str | Path) -> tuple[np.ndarray, int]:
    """Any file libsndfile reads (WAV, FLAC, OGG, ...) -> (float32 mono [samples], sample rate).

    Several channels are mixed down by averaging, so the result is always valid
    REFERENCE_AUDIO; no resampling (the server does that).
    """
    import soundfile  # clients and tests only; the server never reads files

    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32)), int(rate)
