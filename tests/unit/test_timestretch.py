"""`speed` (csm_clients.timestretch): the duration it promises and the pitch it keeps on
real speech (espeak-ng), a stream stretched chunk by chunk equal to the whole clip
stretched at once, every response format still decoding, and the OpenAI route, the
/clone-voice form and the CLI applying it (a fake Triton client: no server)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import soundfile

from csm_clients import InvalidRequest, Speech
from csm_clients.limits import DEFAULT_LIMITS
from csm_clients.streams import SpeechStream
from csm_clients.timestretch import TimeStretcher, check_speed, needs_stretch, stretch
from csm_servers.gateway.encoding import FORMATS, StreamEncoder, encode
from loadtest.speed_eval import RATE, TEXT, espeak_speech, median_f0, naive_speed_up, speech_seconds
from tests.unit.test_encoding import TOLERANCE_S, decode

SPEEDS = (0.25, 0.5, 1.5, 2.0, 4.0)
VOICES = ["en", "en+f3"]


@pytest.fixture(scope="module")
def speeches(tmp_path_factory) -> dict[str, np.ndarray]:
    """About 8 s of espeak-ng speech at 24 kHz, a low (~100 Hz) and a high (~200 Hz) voice."""
    folder = tmp_path_factory.mktemp("espeak")
    return {voice: espeak_speech(TEXT, voice, folder) for voice in VOICES}


@pytest.fixture(scope="module", params=VOICES)
def speech(request, speeches) -> np.ndarray:
    return speeches[request.param]


def _chunked(samples: np.ndarray, sizes) -> list[np.ndarray]:
    parts, start = [], 0
    for size in sizes:
        parts.append(samples[start : start + size])
        start += size
    return parts + ([samples[start:]] if start < samples.size else [])


@pytest.mark.parametrize("speed", SPEEDS)
def test_a_stream_stretched_chunk_by_chunk_equals_the_whole_clip_stretched(speech, speed):
    # Exactly, not nearly: atempo copies its input into its own ring buffer and works on
    # its own windows, whatever frames were pushed, so the chunking cannot change a
    # sample. The pipeline's chunks (4 frames, then 12), then odd sizes down to 1.
    whole = stretch(speech, RATE, speed)
    rng = np.random.default_rng(int(speed * 100))
    for sizes in ([1920 * 4] + [1920 * 12] * 40, list(rng.integers(1, 3000, 400)) + [1, 1, 1]):
        stretcher = TimeStretcher(speed, RATE)
        pushed = [stretcher.push(part) for part in _chunked(speech, sizes)]
        assert sum(part.size for part in pushed) < whole.size  # atempo holds its last window back
        streamed = np.concatenate(pushed + [stretcher.flush()])
        np.testing.assert_array_equal(streamed, whole)


@pytest.mark.parametrize("speed", SPEEDS)
def test_a_stream_gives_each_chunks_audio_with_that_chunk(speech, speed):
    # Not with the next one: a stream's first audio must not wait a whole chunk of
    # generation. What stays held back is atempo's windows and 40 ms frames: measured at
    # most 120 ms of input (240 ms at 4.0, two stages), under a third of a 960 ms chunk.
    stretcher, pushed, out = TimeStretcher(speed, RATE), 0, 0
    for part in _chunked(speech, [1920 * 4] + [1920 * 12] * 40):
        pushed, out = pushed + part.size, out + stretcher.push(part).size
        assert pushed - out * speed <= 0.3 * RATE, (pushed, out)


def test_speed_one_is_the_audio_itself():
    audio = np.linspace(-1, 1, 4_801, dtype=np.float32)
    assert stretch(audio, RATE, 1.0) is audio and stretch(audio, RATE, 1) is audio
    assert not needs_stretch(1.0) and not needs_stretch(None) and needs_stretch(0.99)


def test_a_stretcher_ends_once():
    stretcher = TimeStretcher(2.0, RATE)
    assert stretcher.flush().size == 0  # nothing pushed: nothing out, no padding
    assert stretcher.flush().size == 0
    with pytest.raises(ValueError, match="flushed"):
        stretcher.push(np.zeros(10, np.float32))
    short = TimeStretcher(0.5, RATE)
    out = np.concatenate([short.push(np.ones(7, np.float32) * 0.1), short.flush()])
    assert out.size == 14  # a few samples still make round(n / speed)


@pytest.mark.parametrize("value", [0.25, 4, 4.0, 1, np.float32(1.5)])
def test_speeds_in_range_pass(value):
    assert check_speed(value) == float(value)


@pytest.mark.parametrize("value", [0.2499, 4.0001, 0, -1, math.nan, math.inf, -math.inf, True, "2", None])
def test_other_speeds_are_refused_naming_the_field(value):
    with pytest.raises(InvalidRequest, match=r"^--speed: must be"):
        check_speed(value, "--speed")


@pytest.mark.parametrize("audio_format", sorted(FORMATS))
def test_every_format_decodes_after_the_stretch_whole_and_streamed(speech, audio_format):
    speed = 2.0
    expected = round(speech.size / speed) / RATE
    seconds, rate = decode(encode(stretch(speech, RATE, speed), RATE, audio_format), audio_format)
    assert rate == RATE and seconds == pytest.approx(expected, abs=TOLERANCE_S[audio_format])
    encoder, stretcher = StreamEncoder(audio_format, RATE), TimeStretcher(speed, RATE)
    data = b"".join(encoder.feed(stretcher.push(part)) for part in _chunked(speech, [1920 * 4] + [1920 * 12] * 40))
    data += encoder.feed(stretcher.flush()) + encoder.finish()
    seconds, rate = decode(data, audio_format)
    assert rate == RATE and seconds == pytest.approx(expected, abs=TOLERANCE_S[audio_format])


# --- the gateway and the CLI, with a fake Triton client ---------------------------------


class _FakeTriton:
    """Answers every synthesis with `AUDIO` (whole, or in the pipeline's chunks)."""

    AUDIO = np.zeros(0, np.float32)

    def __init__(self, *args, **kwargs):
        pass

    def _chunks(self):
        return [Speech(part, RATE) for part in _chunked(self.AUDIO, [1920 * 4] + [1920 * 12] * 40)]

    async def limits(self):
        return DEFAULT_LIMITS

    async def synthesize(self, text, voice=None, **options):
        return Speech(self.AUDIO, RATE, ("end_of_speech",), (self.AUDIO.size // 1920,))

    def stream(self, text, voice=None, **options):
        async def chunks():
            for chunk in self._chunks():
                yield chunk

        return chunks()

    async def close(self):
        pass


class _FakeSyncTriton(_FakeTriton):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def limits(self):
        return DEFAULT_LIMITS

    def synthesize(self, text, voice=None, **options):
        return Speech(self.AUDIO, RATE, ("end_of_speech",), (self.AUDIO.size // 1920,))

    def stream(self, text, voice=None, **options):
        return SpeechStream(iter(self._chunks()))


@pytest.fixture(scope="module")
def gateway(speech):
    """One gateway per voice for the module's tests (an app and its TestClient took most
    of each short test's time); the fake client keeps no state between requests."""
    from fastapi.testclient import TestClient

    from csm_servers.gateway import app as gateway_app

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_FakeTriton, "AUDIO", speech)
        patch.setattr(gateway_app, "AsyncVoiceCloner", _FakeTriton)
        with TestClient(gateway_app.create_app("127.0.0.1:1")) as client:
            yield client


def _speech_body(**change) -> dict:
    return {"model": "tts-1", "voice": "alloy", "input": "Hello.", "response_format": "pcm", **change}


@pytest.mark.parametrize("audio_format", sorted(FORMATS))
def test_the_openai_route_stretches_every_format(gateway, speech, audio_format):
    answer = gateway.post("/v1/audio/speech", json=_speech_body(speed=2.0, response_format=audio_format))
    assert answer.status_code == 200, answer.text
    expected = round(speech.size / 2.0) / RATE
    assert decode(answer.content, audio_format)[0] == pytest.approx(expected, abs=TOLERANCE_S[audio_format])
    assert float(answer.headers["x-audio-seconds"]) == pytest.approx(expected, abs=0.001)


@pytest.mark.parametrize("speed", [0.5, 1.5])
def test_the_openai_routes_stream_is_the_whole_answer_stretched(gateway, speech, speed):
    streamed = gateway.post("/v1/audio/speech", json=_speech_body(speed=speed, stream_format="audio"))
    whole = gateway.post("/v1/audio/speech", json=_speech_body(speed=speed))
    assert streamed.status_code == whole.status_code == 200
    assert streamed.content == whole.content == encode(stretch(speech, RATE, speed), RATE, "pcm")


@pytest.mark.parametrize("audio_format", ["pcm", "wav", "flac"])
def test_speed_one_answers_the_generated_audio_untouched(gateway, speech, audio_format):
    for body in (_speech_body(response_format=audio_format), _speech_body(response_format=audio_format, speed=1)):
        assert gateway.post("/v1/audio/speech", json=body).content == encode(speech, RATE, audio_format)


@pytest.mark.parametrize("speed", [0.2, 4.5, 0, "fast", "2", True, float("nan"), float("inf")])
def test_a_bad_speed_is_a_400_naming_it(gateway, speed):
    # Sent as Python's json writes it (NaN, Infinity): Starlette's json.loads reads those.
    answer = gateway.post(
        "/v1/audio/speech", content=json.dumps(_speech_body(speed=speed)), headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "speed" and answer.json()["error"]["type"] == "invalid_request_error"


def test_clone_voice_takes_a_speed(gateway, speech):
    answer = gateway.post("/clone-voice", data={"text": "Hello.", "speed": "0.5"})
    assert answer.status_code == 200, answer.text
    samples, rate = soundfile.read(io.BytesIO(answer.content), dtype="float32")
    assert rate == RATE and samples.size == round(speech.size / 0.5)
    assert float(answer.headers["x-audio-seconds"]) == pytest.approx(samples.size / RATE, abs=0.001)
    for bad in ("5", "nan", "slow"):
        refused = gateway.post("/clone-voice", data={"text": "Hello.", "speed": bad})
        assert refused.status_code == 400 and refused.json()["detail"].startswith("speed:"), refused.text


@pytest.fixture()
def cli(speech, monkeypatch):
    from csm_clients import cli as cli_module

    monkeypatch.setattr(_FakeTriton, "AUDIO", speech)
    monkeypatch.setattr(cli_module, "VoiceCloner", _FakeSyncTriton)
    return cli_module.main


@pytest.mark.parametrize("command", ["say", "stream"])
def test_the_cli_writes_the_stretched_audio(cli, speech, tmp_path, command):
    out = tmp_path / f"{command}.wav"
    assert cli([command, "Hello.", "-o", str(out), "--speed", "1.5"]) == 0
    written, rate = soundfile.read(out, dtype="float32")
    expected = stretch(speech, RATE, 1.5)
    assert rate == RATE and written.size == expected.size
    np.testing.assert_allclose(written, np.clip(expected, -1, 1), atol=1 / 32767)  # 16-bit WAV


@pytest.mark.parametrize("value", ["5", "0.1", "nan"])
def test_the_cli_refuses_a_bad_speed_before_sending(cli, tmp_path, capsys, value):
    assert cli(["say", "Hello.", "-o", str(tmp_path / "x.wav"), "--speed", value]) == 2
    assert "--speed: must be in [0.25, 4]" in capsys.readouterr().err


# --- the duration and the pitch, measured (librosa) ------------------------------------
# These take the voice as a parameter of their own, not through `speech`: pytest runs them
# together after the module's other tests (which it groups by `speech`'s voice), so one
# xdist worker pays librosa's import (~3 s: scipy, numba) for both voices, not each worker.
@pytest.mark.parametrize("speed", [0.5, 1.5, 2.0])
@pytest.mark.parametrize("voice", VOICES)
def test_the_duration_is_one_over_speed_and_the_pitch_stays(speeches, voice, speed):
    speech = speeches[voice]
    stretched = stretch(speech, RATE, speed)
    assert stretched.dtype == np.float32 and stretched.size == round(speech.size / speed)
    # The speech itself (first to last window above -40 dB), not the sample count the
    # stretcher cuts to: a lost tail or padding would show here.
    assert speech_seconds(stretched) / speech_seconds(speech) == pytest.approx(1 / speed, rel=0.03)
    assert median_f0(stretched) == pytest.approx(median_f0(speech), rel=0.05)


@pytest.mark.parametrize("voice", VOICES)
def test_the_pitch_measure_catches_a_stretch_that_shifts_the_pitch(speeches, voice):
    speech = speeches[voice]
    # A speed-up by resampling (no pitch correction) raises F0 by the factor itself:
    # far outside the 5 % the stretch is held to.
    assert median_f0(naive_speed_up(speech, 1.5)) / median_f0(speech) > 1.4
