"""watermark and watermark_detect against a real tritonserver, over HTTP and gRPC:
what `watermark` and csm_tts emit is recognised by `watermark_detect` (SCORE in [0, 1],
WATERMARKED true), clean speech, tones and noise are not, and degenerate clips get a
defined score or a clear INVALID_ARG, never NaN."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from csm_triton import constants as C
from csm_triton.core.audio import read_audio_file, resample

pytestmark = pytest.mark.integration
PROTOCOLS = {"http": http, "grpc": grpc}
DATATYPES = {np.float32: "FP32", np.float64: "FP64", np.int32: "INT32", np.int64: "INT64", np.object_: "BYTES"}


@pytest.fixture(params=sorted(PROTOCOLS))
def protocol(request, http_client, grpc_client):
    return PROTOCOLS[request.param], {"http": http_client, "grpc": grpc_client}[request.param]


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """~4 s of espeak-ng speech at 24 kHz."""
    wav = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(
        ["espeak-ng", "-w", str(wav), "The service marks every clip it speaks, quietly."],
        check=True,
        capture_output=True,
    )
    samples, rate = read_audio_file(wav)
    return resample(samples, rate, C.SAMPLE_RATE)


def tensor(module, name, array):
    item = module.InferInput(name, list(array.shape), DATATYPES[array.dtype.type])
    item.set_data_from_numpy(array)
    return item


def judge(module, client, audio: np.ndarray, rate: int = C.SAMPLE_RATE) -> tuple[float, bool]:
    """(SCORE, WATERMARKED), checking both outputs' shape, type and range."""
    result = client.infer(
        "watermark_detect",
        [
            tensor(module, "AUDIO", audio),
            tensor(module, "SAMPLE_RATE", np.array([rate], np.int32)),
        ],
    )
    score, watermarked = result.as_numpy("SCORE"), result.as_numpy("WATERMARKED")
    assert score.shape == (1,) and score.dtype == np.float32 and 0.0 <= score[0] <= 1.0
    assert watermarked.shape == (1,) and watermarked.dtype == np.bool_
    assert bool(watermarked[0]) == (score[0] >= C.WATERMARK_THRESHOLD)
    return float(score[0]), bool(watermarked[0])


def detect(module, client, audio: np.ndarray, rate: int = C.SAMPLE_RATE) -> float:
    return judge(module, client, audio, rate)[0]


def test_watermarked_speech_is_recognised(protocol, speech):
    module, client = protocol
    result = client.infer("watermark", [tensor(module, "audio_values", speech[None, None])])
    audio = result.as_numpy("AUDIO")
    assert audio.shape == speech.shape and audio.dtype == np.float32 and np.isfinite(audio).all()
    assert result.as_numpy("SAMPLE_RATE").tolist() == [C.SAMPLE_RATE]
    assert not np.array_equal(audio, speech)
    for samples, rate in ((audio, C.SAMPLE_RATE), (resample(audio, C.SAMPLE_RATE, 16_000), 16_000)):
        score, watermarked = judge(module, client, samples, rate)
        assert score >= 0.9 and watermarked, rate


def test_clean_speech_is_not_recognised(protocol, speech):
    module, client = protocol
    score, watermarked = judge(module, client, speech)
    assert score <= 0.1 and not watermarked


def test_csm_tts_output_is_recognised(protocol):
    # The tiny random CSM speaks noise; what matters is that the served path marks it and
    # watermark_detect calls it marked (the gate judges broadband clips, not only speech).
    module, client = protocol
    result = client.infer(
        "csm_tts",
        [
            tensor(module, "TEXT", np.array([b"Is this marked?"], dtype=np.object_)),
            tensor(module, "MAX_AUDIO_SECONDS", np.array([2.0], np.float32)),
            tensor(module, "SEED", np.array([5], np.int64)),
        ],
    )
    audio = result.as_numpy("AUDIO")
    assert audio.size >= C.MIN_WATERMARK_DETECT_SAMPLES
    score, watermarked = judge(module, client, audio)
    assert watermarked and score >= 0.9


def test_clean_tones_and_noise_are_not_called_watermarked(protocol):
    # Perth alone scores the 110 + 220 Hz pair 0.97 and mains hum ~1.0.
    module, client = protocol
    t = np.arange(3 * C.SAMPLE_RATE) / C.SAMPLE_RATE
    clips = {
        "110 + 220 Hz": 0.3 * np.sin(2 * np.pi * 110 * t) + 0.3 * np.sin(2 * np.pi * 220 * t),
        "50 Hz hum": sum(0.3 / k * np.sin(2 * np.pi * 50 * k * t) for k in range(1, 6)),
        "white noise": 0.1 * np.random.default_rng(0).standard_normal(t.size),
        "brown noise": np.cumsum(np.random.default_rng(1).standard_normal(t.size)) * 1e-3,
    }
    for name, clip in clips.items():
        clip = (0.5 * clip / np.abs(clip).max()).astype(np.float32)
        score, watermarked = judge(module, client, clip)
        assert not watermarked and score < C.WATERMARK_THRESHOLD, name


def test_silence_has_a_defined_score(protocol):
    module, client = protocol
    score = detect(module, client, np.zeros(C.SAMPLE_RATE, np.float32))
    assert score == 0.0 and not math.isnan(score)


def test_a_few_samples_get_a_clear_error(protocol):
    module, client = protocol
    with pytest.raises(InferenceServerException) as failure:
        detect(module, client, np.full(10, 0.1, np.float32))
    message = failure.value.message()
    assert f"at least {C.MIN_WATERMARK_DETECT_SAMPLES}" in message and "Traceback" not in message


def test_non_finite_audio_gets_a_clear_error(protocol, speech):
    module, client = protocol
    audio = speech.copy()
    audio[5] = np.nan
    with pytest.raises(InferenceServerException, match="NaN or infinite"):
        detect(module, client, audio)


def test_wrong_dtype_is_refused(protocol, speech):
    module, client = protocol
    with pytest.raises(InferenceServerException, match="AUDIO"):
        detect(module, client, speech.astype(np.float64))
    with pytest.raises(InferenceServerException, match="audio_values"):
        client.infer("watermark", [tensor(module, "audio_values", speech[None, None].astype(np.float64))])
