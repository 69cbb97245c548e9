"""An imperceptible watermark on generated speech: Perth (resemble-perth 1.0.1), and the
decision whether a clip carries it.

Sesame's CSM ships with a watermark (SilentCipher) so that generated speech can be
recognised; its weights come from a hub at run time, which deployments here cannot
reach. Perth's weights ship inside its wheel. Perth works at 32 kHz on a magnitude
spectrogram; the service speaks 24 kHz, so `Watermarker` resamples (soxr, as every
other path in the service) and, when applying, adds only the resampled watermark
residual to the caller's samples: the original audio never goes through the
24 -> 32 -> 24 kHz round trip, and the output has exactly the input's length.

Detection (`Watermarker.detect` -> `Detection`) answers a SCORE in [0, 1] and the
decision WATERMARKED = SCORE >= WATERMARK_THRESHOLD. Perth's decoder alone cannot be
trusted off speech: it scores steady tones, chords, mains hum and sustained music
0.9-1.0, as high as marked speech. So the score is Perth's confidence only for clips it
can judge (`SignalProfile.judgeable`: speech-like or noise-like, pure numpy, below),
and 0 for the rest; before Perth sees it, the clip's stationary noise floor is
subtracted, which keeps the mark visible under added noise. `make watermark-eval`
measures the rule (loadtest/results/watermark_eval.md). A silent clip (RMS below
WATERMARK_SILENCE_RMS) scores 0; clips shorter than MIN_WATERMARK_DETECT_SECONDS cannot
be judged and are refused (InvalidInput), as are non-finite samples.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from csm_triton import constants as C
from csm_triton.core import torchaudio_standin as _torchaudio_standin
from csm_triton.core import validation
from csm_triton.core.audio import resample

__all__ = ["Detection", "SignalProfile", "Watermarker", "WatermarkUnavailable", "load_perth", "signal_profile"]

_PERTH_MODULE = "perth.perth_net.perth_net_implicit.perth_watermarker"
_PERTH_UTILS = "perth.perth_net.perth_net_implicit.utils"


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
    """Loads Perth once; `apply` marks 24 kHz speech, `detect` judges any clip."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._perth = load_perth(self.device)
        hparams = self._perth.perth_net.hp
        self.model_sample_rate = int(hparams.sample_rate)
        self._hop = int(hparams.hop_size)
        self._n_fft = int(hparams.n_fft)
        self._magnitude_min = float(hparams.stft_magnitude_min)
        # Loaded with Perth above (its audio processor imports it), so no stand-in needed.
        self._normalise = importlib.import_module(_PERTH_UTILS).normalize

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
            marked = self._perth.apply_watermark(self._frame_aligned(at_model_rate), sample_rate=self.model_sample_rate)
        residual = marked[: at_model_rate.size] - at_model_rate
        residual = _fit(resample(residual, self.model_sample_rate, sample_rate), audio.size)
        return (audio + residual).astype(np.float32, copy=False)

    def detect(self, audio: np.ndarray, sample_rate: int = C.SAMPLE_RATE, *, name: str = "audio") -> Detection:
        """SCORE and WATERMARKED for `audio` (see the module's docstring)."""
        sample_rate = validation.input_sample_rate(sample_rate, "sample_rate")
        min_samples = math.ceil(C.MIN_WATERMARK_DETECT_SAMPLES * sample_rate / C.SAMPLE_RATE)
        audio = validation.audio_samples(audio, name, sample_rate=sample_rate, min_samples=min_samples)
        if _rms(audio) < C.WATERMARK_SILENCE_RMS:
            return Detection.of(0.0, None)
        return Detection.of(self.confidence(audio, sample_rate), signal_profile(audio, sample_rate))

    def confidence(self, audio: np.ndarray, sample_rate: int) -> float:
        """Perth's confidence in [0, 1] once the clip's noise floor is removed, whatever
        the clip is (`detect` decides whether to trust it). `audio` already validated."""
        at_model_rate = torch.from_numpy(resample(audio, sample_rate, self.model_sample_rate)).to(self.device)
        with torch.inference_mode():
            power = self._perth.perth_net.ap.spectrogram(at_model_rate).abs().square()
            # A stationary floor (hiss, added noise) fills the quiet bins between the
            # harmonics where the mark lives; removing it lifts marked speech under white
            # noise at 20 dB SNR from 92 % to 97 % detected, and leaves clean clips alone.
            floor = torch.quantile(power, C.WATERMARK_NOISE_FLOOR_PERCENTILE / 100, dim=1, keepdim=True)
            power = torch.maximum(
                power - C.WATERMARK_NOISE_FLOOR_OVERSUBTRACTION * floor, C.WATERMARK_NOISE_FLOOR_KEEP * power
            )
            # Perth's own magnitude scale (cx_to_magphase): dB of |X|, floored, normalised.
            magnitude_db = 10 * torch.log10(power.clip(self._magnitude_min**2))
            score = float(
                self._perth.perth_net.decoder(self._normalise(self._perth.perth_net.hp, magnitude_db)[None])[0]
            )
        # Perth averages over frames with energy; should none qualify it answers NaN.
        return min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0

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


# --- the decision -------------------------------------------------------------------


@dataclass(frozen=True)
class SignalProfile:
    """What kind of signal a clip is, as far as trusting Perth goes (see constants)."""

    envelope_db: float  # std of the 10 ms energy (300-4000 Hz) in dB, floored 40 dB under its peak
    flatness_mean: float  # spectral flatness (100-6000 Hz) of the active frames: 0 tonal, ~0.56 white noise
    flatness_spread: float  # its standard deviation over those frames
    rhythm: float = 0.0  # the envelope's autocorrelation peak at 0.2-1.5 s lags: ~1 for a steady beat

    @property
    def speech_like(self) -> bool:
        return (
            self.envelope_db >= C.WATERMARK_SPEECH_MIN_ENVELOPE_DB
            and self.flatness_spread >= C.WATERMARK_SPEECH_MIN_FLATNESS_SPREAD
            and self.rhythm < C.WATERMARK_SPEECH_MAX_RHYTHM
        )

    @property
    def noise_like(self) -> bool:
        return self.flatness_mean >= C.WATERMARK_NOISE_MIN_FLATNESS

    @property
    def judgeable(self) -> bool:
        """Perth's confidence means something here; on steady tonal signals it does not."""
        return self.speech_like or self.noise_like


@dataclass(frozen=True)
class Detection:
    """watermark_detect's answer: SCORE in [0, 1] and WATERMARKED = SCORE >= the threshold."""

    score: float
    watermarked: bool
    confidence: float  # Perth's, before the judgeability gate (for evaluation and logs)
    profile: SignalProfile | None  # None for silence

    @classmethod
    def of(cls, confidence: float, profile: SignalProfile | None) -> Detection:
        score = float(confidence) if profile is not None and profile.judgeable else 0.0
        return cls(score, bool(score >= C.WATERMARK_THRESHOLD), float(confidence), profile)


_PROFILE_RATE = 16_000
_FRAME = 400  # 25 ms
_HOP = 160  # 10 ms
_FFT = 512
_ACTIVE_RANGE_DB = 40.0


def signal_profile(audio: np.ndarray, sample_rate: int) -> SignalProfile:
    """`SignalProfile` of a mono clip at any sample rate (a few ms per second of audio)."""
    samples = resample(np.asarray(audio, dtype=np.float32), sample_rate, _PROFILE_RATE).astype(np.float64)
    if samples.size < _FRAME:
        samples = np.pad(samples, (0, _FRAME - samples.size))
    frames = np.lib.stride_tricks.sliding_window_view(samples, _FRAME)[::_HOP] * np.hanning(_FRAME)
    power = np.abs(np.fft.rfft(frames, _FFT)) ** 2
    freqs = np.fft.rfftfreq(_FFT, 1 / _PROFILE_RATE)
    # Bands capped below the input's own Nyquist, so 8 kHz telephone audio is not "tonal"
    # just because it has nothing above 4 kHz.
    top = 0.45 * sample_rate
    energy_db = 10 * np.log10(power[:, (freqs >= 300) & (freqs <= min(4000.0, top))].sum(axis=1) + 1e-12)
    floor = energy_db.max() - _ACTIVE_RANGE_DB
    active = energy_db > floor
    band = power[active][:, (freqs >= 100) & (freqs <= min(6000.0, top))] + 1e-12
    flatness = np.exp(np.log(band).mean(axis=1)) / band.mean(axis=1)
    envelope = np.maximum(energy_db, floor)
    return SignalProfile(
        envelope_db=float(envelope.std()),
        flatness_mean=float(flatness.mean()),
        flatness_spread=float(flatness.std()),
        rhythm=_rhythm(envelope),
    )


def _rhythm(envelope: np.ndarray) -> float:
    """Peak autocorrelation of the energy envelope at lags of 0.2-1.5 s (at most a third of
    the clip, so that two thirds overlap), normalised per overlap: a drum loop or a
    metronome ~1, speech <= 0.55."""
    centred = envelope - envelope.mean()
    energy = float(np.dot(centred, centred))
    low, high = 20, min(150, centred.size // 3)  # in 10 ms frames
    if energy <= 0 or high <= low:
        return 0.0
    spectrum = np.fft.rfft(centred, 2 * centred.size)
    autocorrelation = np.fft.irfft(np.abs(spectrum) ** 2)[: centred.size] / energy
    lags = np.arange(low, high)
    return float((autocorrelation[lags] * centred.size / (centred.size - lags)).max())
