"""An imperceptible watermark on generated speech: Perth (resemble-perth 1.0.1).

Sesame's CSM ships with a watermark (SilentCipher) so that generated speech can be
recognised; its weights come from a hub at run time, which deployments here cannot
reach. Perth's weights ship inside its wheel. Perth works at 32 kHz on a magnitude
spectrogram; the service speaks 24 kHz, so `Watermarker` resamples (soxr, as every
other path in the service) and, when applying, adds only the resampled watermark
residual to the caller's samples: the original audio never goes through the
24 -> 32 -> 24 kHz round trip, and the output has exactly the input's length.

Detection returns Perth's confidence in [0, 1] (about 1.0 marked, 0.0 clean), never
NaN: a silent clip (RMS below WATERMARK_SILENCE_RMS) has nothing to detect and
scores 0.0; clips shorter than MIN_WATERMARK_DETECT_SECONDS cannot be judged and
are refused (InvalidInput), as are non-finite samples.
"""

from __future__ import annotations

import importlib
import math
import warnings

import numpy as np
import torch

from csm_triton.core import torchaudio_standin as _torchaudio_standin
from csm_triton import constants as C
from csm_triton.core import validation
from csm_triton.core.audio import resample

__all__ = ["Watermarker", "WatermarkUnavailable", "load_perth"]

_PERTH_MODULE = "perth.perth_net.perth_net_implicit.perth_watermarker"


class WatermarkUnavailable(RuntimeError):
    """resemble-perth is missing or cannot load: a deployment error, never a client's."""


def load_perth(device: str | torch.device = "cpu"):
    """Perth's `PerthImplicitWatermarker` on `device`, its weights from the wheel.

    `perth/__init__.py` swallows ImportError and leaves `PerthImplicitWatermarker =
    None`; this imports the module itself so the real cause reaches the log.
    """
    with _torchaudio_standin.installed_if_missing(), warnings.catch_warnings():
        # Perth imports pkg_resources (setuptools < 81), which warns on every import.
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        try:
            perth = importlib.import_module("perth")
            watermarker_class = perth.PerthImplicitWatermarker
            if watermarker_class is None:
                watermarker_class = importlib.import_module(_PERTH_MODULE).PerthImplicitWatermarker
        except ImportError as error:
            raise WatermarkUnavailable(
                f"resemble-perth cannot load its watermarker: {error}. It needs resemble-perth==1.0.1, "
                "setuptools<81 (pkg_resources), librosa, scipy and torchaudio (or csm_triton's stand-in)"
            ) from error
    return watermarker_class(device=str(device))


class Watermarker:
    """Loads Perth once; `apply` marks 24 kHz speech, `detect` scores any clip."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._perth = load_perth(self.device)
        hparams = self._perth.perth_net.hp
        self.model_sample_rate = int(hparams.sample_rate)
        self._hop = int(hparams.hop_size)
        self._n_fft = int(hparams.n_fft)

    def apply(self, audio: np.ndarray, sample_rate: int = C.SAMPLE_RATE, *, name: str = "audio") -> np.ndarray:
        """Watermarked copy of `audio`: float32, same length. Any length works (short
        streaming chunks too), though under MIN_WATERMARK_DETECT_SECONDS a chunk
        alone cannot be verified. Silence (RMS under WATERMARK_SILENCE_RMS) comes back
        unchanged."""
        sample_rate = validation.input_sample_rate(sample_rate, "sample_rate")
        audio = validation.audio_samples(audio, name, sample_rate=sample_rate)
        if audio.size == 0 or _rms(audio) < C.WATERMARK_SILENCE_RMS:
            # Silence in, silence out: below -80 dBFS there is nothing a mark could hide
            # in (detect scores it 0 either way), and Perth's STFT round trip would turn
            # digital silence into ~1e-12 noise whose exact values differ by CPU.
            return audio.copy()
        at_model_rate = resample(audio, sample_rate, self.model_sample_rate)
        with torch.inference_mode():
            marked = self._perth.apply_watermark(self._frame_aligned(at_model_rate),
                                                 sample_rate=self.model_sample_rate)
        residual = marked[: at_model_rate.size] - at_model_rate
        residual = _fit(resample(residual, self.model_sample_rate, sample_rate), audio.size)
        return (audio + residual).astype(np.float32, copy=False)

    def detect(self, audio: np.ndarray, sample_rate: int = C.SAMPLE_RATE, *, name: str = "audio") -> float:
        """Perth's confidence in [0, 1] that `audio` carries the watermark; 0.0 for silence."""
        sample_rate = validation.input_sample_rate(sample_rate, "sample_rate")
        min_samples = math.ceil(C.MIN_WATERMARK_DETECT_SAMPLES * sample_rate / C.SAMPLE_RATE)
        audio = validation.audio_samples(audio, name, sample_rate=sample_rate, min_samples=min_samples)
        if _rms(audio) < C.WATERMARK_SILENCE_RMS:
            return 0.0
        at_model_rate = resample(audio, sample_rate, self.model_sample_rate)
        with torch.inference_mode():
            score = float(self._perth.get_watermark(at_model_rate, sample_rate=self.model_sample_rate,
                                                    round=False))
        # Perth averages over frames with energy; should none qualify it answers NaN.
        return score if math.isfinite(score) else 0.0

    def warm_up(self) -> None:
        """The first call pays for allocator and kernel set-up (~20x a later one)."""
        one_second = np.sin(np.arange(C.SAMPLE_RATE, dtype=np.float32) * 0.05).astype(np.float32) * 0.1
        self.detect(self.apply(one_second))

    def _frame_aligned(self, samples: np.ndarray) -> np.ndarray:
        # Perth's inverse STFT returns hop * (len // hop) samples, and its centred STFT
        # needs more than n_fft / 2 of them: zero-pad up to a whole number of hops.
        length = max(-(-samples.size // self._hop) * self._hop, self._n_fft)
        return np.pad(samples, (0, length - samples.size)) if length != samples.size else samples


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


def _fit(samples: np.ndarray, length: int) -> np.ndarray:
    if samples.size >= length:
        return samples[:length]
    return np.pad(samples, (0, length - samples.size))
