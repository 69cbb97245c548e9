"""Perth watermark, without a server: marked speech is recognised, clean speech and
clean non-speech (tones, chords, hum, noise, on which Perth alone answers up to 1.0)
are not, the score is bounded, the audio keeps its length, and degenerate clips get a
defined answer."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.core.audio import read_audio_file, resample
from csm_triton.core.watermark import (
    Detection,
    SignalProfile,
    Watermarker,
    WatermarkUnavailable,
    load_perth,
    signal_profile,
)
from csm_triton.errors import InvalidInput
from csm_triton.triton import adapter as triton_adapter
from csm_triton.triton.models.watermark import WatermarkDetectModel, WatermarkModel
from csm_triton.triton.parameters import Parameters

SENTENCE = "Generated speech carries a watermark, so that anyone can check where it came from."


def espeak_speech(folder, text: str = SENTENCE) -> np.ndarray:
    """About 3-5 s of real speech at 24 kHz (espeak-ng speaks at 22.05 kHz)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: apt-get install -y espeak-ng (make setup-test installs it)")
    wav = folder / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    samples, rate = read_audio_file(wav)
    return resample(samples, rate, C.SAMPLE_RATE)


@pytest.fixture(scope="module")
def watermarker():
    return Watermarker("cpu")


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return espeak_speech(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def marked(watermarker, speech):
    return watermarker.apply(speech, C.SAMPLE_RATE)


def score(watermarker, audio, rate=C.SAMPLE_RATE) -> float:
    return watermarker.detect(audio, rate).score


def test_marked_speech_is_recognised_and_clean_speech_is_not(watermarker, speech, marked):
    marked_detection, clean_detection = watermarker.detect(marked), watermarker.detect(speech)
    assert marked_detection.score >= 0.9 and marked_detection.watermarked is True
    assert clean_detection.score <= 0.1 and clean_detection.watermarked is False
    assert marked_detection.profile.speech_like and clean_detection.profile.speech_like


SECONDS = 3.0
TIME = np.arange(int(SECONDS * C.SAMPLE_RATE)) / C.SAMPLE_RATE


def _coloured_noise(exponent: float, seed: int) -> np.ndarray:
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(TIME.size))
    freqs = np.fft.rfftfreq(TIME.size, 1 / C.SAMPLE_RATE)
    spectrum *= np.maximum(freqs, freqs[1]) ** (-exponent / 2)
    noise = np.fft.irfft(spectrum, TIME.size)
    return (0.3 * noise / np.abs(noise).max()).astype(np.float32)


# Clean non-speech that Perth alone scores high (measured: the 110 + 220 Hz pair
# 0.97, a 110 Hz tone 0.99, mains hum 0.98-1.0, a chirp 0.37-0.9), and noise colours.
CLEAN_NON_SPEECH = {
    "110 + 220 Hz": 0.3 * np.sin(2 * np.pi * 110 * TIME) + 0.3 * np.sin(2 * np.pi * 220 * TIME),
    "110 Hz tone": 0.5 * np.sin(2 * np.pi * 110 * TIME),
    "1 kHz tone": 0.5 * np.sin(2 * np.pi * 1000 * TIME),
    "C major chord": sum(0.2 * np.sin(2 * np.pi * f * TIME) for f in (261.6, 329.6, 392.0)),
    "50 Hz hum": sum(0.3 / k * np.sin(2 * np.pi * 50 * k * TIME) for k in range(1, 6)),
    "chirp 100 Hz-4 kHz": 0.5 * np.sin(2 * np.pi * (100 * TIME + (4000 - 100) / (2 * SECONDS) * TIME**2)),
    "white noise": _coloured_noise(0.0, 1),
    "pink noise": _coloured_noise(1.0, 2),
    "brown noise": _coloured_noise(2.0, 3),
}


@pytest.mark.parametrize("name", sorted(CLEAN_NON_SPEECH))
def test_clean_non_speech_is_not_called_watermarked(watermarker, name):
    detection = watermarker.detect(np.asarray(CLEAN_NON_SPEECH[name], dtype=np.float32))
    assert 0.0 <= detection.score <= 1.0 and 0.0 <= detection.confidence <= 1.0
    assert detection.watermarked is False and detection.score < C.WATERMARK_THRESHOLD


def test_steady_tonal_signals_are_not_judged_and_score_zero(watermarker):
    # Perth's own confidence on these is high, which is why the score is gated.
    for name in ("110 + 220 Hz", "110 Hz tone", "50 Hz hum"):
        detection = watermarker.detect(np.asarray(CLEAN_NON_SPEECH[name], dtype=np.float32))
        assert not detection.profile.judgeable and detection.score == 0.0, name
        assert detection.confidence >= 0.5, f"{name}: Perth alone no longer fires; revisit the gate"


def test_marked_noise_is_recognised(watermarker):
    # The tiny random CSM speaks noise: broadband clips are judged, and the mark in them found.
    noise = _coloured_noise(0.0, 4)
    assert watermarker.detect(noise).watermarked is False
    marked_noise = watermarker.detect(watermarker.apply(noise))
    assert marked_noise.profile.noise_like and marked_noise.watermarked and marked_noise.score >= 0.9


def test_decision_is_the_threshold_on_the_gated_score():
    speech_like = SignalProfile(envelope_db=11.0, flatness_mean=0.06, flatness_spread=0.1)
    tonal = SignalProfile(envelope_db=0.1, flatness_mean=1e-6, flatness_spread=1e-7)
    assert Detection.of(0.97, tonal) == Detection(0.0, False, 0.97, tonal)
    assert Detection.of(C.WATERMARK_THRESHOLD, speech_like).watermarked is True
    assert Detection.of(np.nextafter(C.WATERMARK_THRESHOLD, 0), speech_like).watermarked is False
    assert Detection.of(0.0, None) == Detection(0.0, False, 0.0, None)  # silence


def test_signal_profile_tells_speech_from_steady_tones_at_any_rate(speech):
    assert signal_profile(speech, C.SAMPLE_RATE).speech_like
    for rate in (8_000, 16_000, 48_000):
        assert signal_profile(resample(speech, C.SAMPLE_RATE, rate), rate).speech_like, rate
    tone = np.asarray(CLEAN_NON_SPEECH["1 kHz tone"], dtype=np.float32)
    assert not signal_profile(tone, C.SAMPLE_RATE).judgeable
    # Telephone-band noise is still noise: the flatness band stops below the input's Nyquist.
    noise = _coloured_noise(0.0, 5)
    assert signal_profile(resample(noise, C.SAMPLE_RATE, 8_000), 8_000).noise_like


def test_marking_keeps_length_dtype_and_audio(speech, marked):
    assert marked.shape == speech.shape and marked.dtype == np.float32
    assert np.isfinite(marked).all()
    noise = marked - speech
    snr_db = 10 * np.log10(np.sum(speech.astype(np.float64) ** 2) / np.sum(noise.astype(np.float64) ** 2))
    assert snr_db > 10  # imperceptible-ish: ~16 dB, the residual sits below 2 kHz under the speech


def test_mark_survives_other_sample_rates_and_16_bit(watermarker, marked):
    for rate in (16_000, 44_100):
        assert score(watermarker, resample(marked, C.SAMPLE_RATE, rate), rate) >= 0.9
    as_int16 = (np.round(marked * 32767) / 32767).astype(np.float32)
    assert score(watermarker, as_int16) >= 0.9


def test_any_length_can_be_marked(watermarker, speech):
    for length in (0, 1, 500, 3_000):  # shorter than one STFT window too (streaming tails)
        out = watermarker.apply(speech[:length], C.SAMPLE_RATE)
        assert out.shape == (length,) and np.isfinite(out).all()


def test_silence_scores_zero_instead_of_nan(watermarker):
    assert watermarker.detect(np.zeros(C.SAMPLE_RATE, np.float32)) == Detection(0.0, False, 0.0, None)
    hiss = np.random.default_rng(0).standard_normal(C.SAMPLE_RATE).astype(np.float32) * 1e-6
    assert score(watermarker, hiss) == 0.0


def test_silence_in_is_silence_out(watermarker):
    # A contract of the code (silence is passed through), so exact on every CPU.
    assert np.array_equal(watermarker.apply(np.zeros(4_000, np.float32)), np.zeros(4_000, np.float32))
    hiss = np.random.default_rng(1).standard_normal(4_000).astype(np.float32) * 1e-6
    assert np.array_equal(watermarker.apply(hiss), hiss)


def test_too_short_clip_is_refused_with_the_minimum(watermarker, speech):
    with pytest.raises(InvalidInput, match=f"at least {C.MIN_WATERMARK_DETECT_SAMPLES}"):
        watermarker.detect(speech[:10], C.SAMPLE_RATE)
    # the minimum scales with the sample rate (0.5 s at 16 kHz is 8000 samples)
    with pytest.raises(InvalidInput, match="at least 8000"):
        watermarker.detect(np.ones(7_999, np.float32), 16_000)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples_are_refused(watermarker, speech, bad):
    audio = speech.copy()
    audio[100] = bad
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        watermarker.detect(audio, C.SAMPLE_RATE)
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        watermarker.apply(audio, C.SAMPLE_RATE)


def test_wrong_dtype_shape_or_rate_is_refused(watermarker, speech):
    with pytest.raises(InvalidInput, match="FP32"):
        watermarker.detect(speech.astype(np.float64), C.SAMPLE_RATE)
    with pytest.raises(InvalidInput, match="mono"):
        watermarker.detect(np.stack([speech, speech]), C.SAMPLE_RATE)
    with pytest.raises(InvalidInput, match="sample rate"):
        watermarker.detect(speech, 1_000)


def test_mimi_decoder_layout_is_accepted(watermarker, speech):
    out = watermarker.apply(speech[None, None, :4_800], C.SAMPLE_RATE)
    assert out.shape == (4_800,)


def watermark_model(monkeypatch, enabled: str) -> WatermarkModel:
    """The Triton model class with requests faked as {input name: array}."""
    monkeypatch.setattr(triton_adapter, "input_array", lambda request, name, required=True: request[name])
    model = WatermarkModel()
    config = {"parameters": {"enabled": {"string_value": enabled}}}
    model.parameters = Parameters(config, "watermark")
    model.initialize_model({}, config)
    return model


def test_watermark_model_marks_mimi_decoder_output(monkeypatch, watermarker, speech, marked):
    model = watermark_model(monkeypatch, "false")  # no second Perth load: borrow the fixture's
    model.enabled, model.watermarker = True, watermarker
    outputs = model.handle({"audio_values": speech[None, None]})
    # Exact: the same samples through the same Watermarker in one process (Perth has no
    # randomness at inference); what is checked is that the model hands mimi_decoder's
    # [1, 1, samples] to apply unchanged.
    np.testing.assert_array_equal(outputs["AUDIO"], marked)
    assert outputs["SAMPLE_RATE"].tolist() == [C.SAMPLE_RATE] and outputs["SAMPLE_RATE"].dtype == np.int32


def test_watermark_detect_model_answers_score_and_decision(monkeypatch, watermarker, speech, marked):
    monkeypatch.setattr(triton_adapter, "input_array", lambda request, name, required=True: request[name])
    model = WatermarkDetectModel()
    model.watermarker = watermarker  # initialize_model would load a second Perth
    rate = np.array([C.SAMPLE_RATE], np.int32)
    for audio, expected in (
        (marked, True),
        (speech, False),
        (np.asarray(CLEAN_NON_SPEECH["110 + 220 Hz"], np.float32), False),
    ):
        outputs = model.handle({"AUDIO": audio, "SAMPLE_RATE": rate})
        assert outputs["SCORE"].dtype == np.float32 and outputs["SCORE"].shape == (1,)
        assert outputs["WATERMARKED"].dtype == np.bool_ and outputs["WATERMARKED"].tolist() == [expected]
        assert 0.0 <= outputs["SCORE"][0] <= 1.0


def test_disabled_watermark_model_passes_audio_through(monkeypatch, speech):
    model = watermark_model(monkeypatch, "false")
    assert model.watermarker is None  # Perth not even loaded
    outputs = model.handle({"audio_values": speech[None, None]})
    np.testing.assert_array_equal(outputs["AUDIO"], speech)


def test_enabled_parameter_is_strict(monkeypatch):
    with pytest.raises(ValueError, match="model 'watermark': config parameter 'enabled' must be \"true\" or \"false\""):
        watermark_model(monkeypatch, "yes")


def test_torchaudio_stand_in_transforms_behave_like_torchaudio(speech):
    import torch

    from csm_triton.core.torchaudio_standin import InverseSpectrogram, Spectrogram, TimeStretch

    signal = torch.from_numpy(speech[: 32 * 320])
    spectrogram = Spectrogram(n_fft=2048, win_length=2048, hop_length=320, power=None)
    spec = spectrogram(signal)
    assert spec.shape == (1025, 33) and spec.is_complex()
    restored = InverseSpectrogram(n_fft=2048, win_length=2048, hop_length=320)(spec, length=signal.numel())
    assert torch.allclose(restored, signal, atol=1e-5)
    # Perth never calls its TimeStretch; only the buffer its checkpoint loads must fit.
    stretch = TimeStretch(hop_length=320, n_freq=1025)
    assert stretch.phase_advance.shape == (1025, 1)


def test_a_broken_perth_install_fails_loudly(monkeypatch):
    # perth/__init__.py swallows the ImportError and leaves PerthImplicitWatermarker = None.
    broken = types.ModuleType("perth")
    broken.PerthImplicitWatermarker = None
    monkeypatch.setitem(sys.modules, "perth", broken)
    monkeypatch.setitem(sys.modules, "perth.perth_net.perth_net_implicit.perth_watermarker", None)
    with pytest.raises(WatermarkUnavailable, match="resemble-perth cannot load its watermarker"):
        load_perth("cpu")


def test_torchaudio_stand_in_does_not_leak():
    # The stand-in is only visible while Perth is imported (see _torchaudio_standin).
    module = sys.modules.get("torchaudio")
    assert module is None or not getattr(module, "__csm_standin__", False)
