"""The OpenAI-compatible API (/v1) against the real tritonserver, driven by the official
`openai` package with only base_url and api_key changed: every format whole and
streamed (read back by another decoder than PyAV's), SSE events, voices, keys, bad
bodies, and a client that goes away mid-stream freeing its KV slot."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import openai
import pytest
import soundfile

from tests.unit.test_encoding import TOLERANCE_S, decode

from .client_fixtures import GATEWAY_API_KEY, gateway, speech_clip
from .conftest import slots_in_use

pytestmark = pytest.mark.integration
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# The tiny test model never says "end": it speaks noise until MAX_AUDIO_SECONDS, rounded
# up to whole 80 ms frames.
SHORT = {"max_audio_seconds": 1.0, "seed": 1}
SHORT_SECONDS = 1.04


@pytest.fixture(scope="module")
def client(gateway):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=GATEWAY_API_KEY, max_retries=0, timeout=120) as sdk:
        yield sdk


def error_of(failure) -> dict:
    body = failure.value.body
    return body.get("error", body) if isinstance(body, dict) else {}


@pytest.mark.parametrize("audio_format", FORMATS)
def test_each_format_whole(client, audio_format):
    answer = client.audio.speech.create(
        model="tts-1", voice="alloy", input="Hello there.", response_format=audio_format, extra_body=SHORT
    )
    assert answer.response.headers["content-type"] == MEDIA_TYPES[audio_format]
    seconds, rate = decode(answer.content, audio_format)
    assert rate == 24_000 and seconds == pytest.approx(SHORT_SECONDS, abs=TOLERANCE_S[audio_format])


def test_a_long_text_without_streaming_is_one_whole_file(client):
    # Over 300 characters the server speaks segments; the gateway collects them from
    # csm_tts_stream (csm_tts stops at 120 s), so the answer is still one file.
    long_text = " ".join(["A sentence of a long text that the server splits into segments."] * 10)
    answer = client.audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input=long_text, response_format="wav", extra_body=SHORT
    )
    seconds, rate = decode(answer.content, "wav")
    assert rate == 24_000 and seconds == pytest.approx(SHORT_SECONDS, abs=TOLERANCE_S["wav"])
    assert float(answer.headers["x-audio-seconds"]) == pytest.approx(SHORT_SECONDS)
    # How each segment ended: the client's 1 s cut the first, the others never started.
    reasons = answer.headers["x-finish-reasons"].split(",")
    assert len(reasons) >= 3 and reasons == ["max_audio_seconds"] + ["not_started"] * (len(reasons) - 1)


@pytest.mark.parametrize("audio_format", FORMATS)
def test_each_format_streamed_arrives_in_chunks_and_decodes(client, audio_format):
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b",
        voice="alloy",
        input="Streaming, chunk by chunk.",
        response_format=audio_format,
        stream_format="audio",
        extra_body={"max_audio_seconds": 2.0, "seed": 2},
    ) as answer:
        assert answer.headers["content-type"] == MEDIA_TYPES[audio_format]
        assert answer.headers.get("transfer-encoding") == "chunked"
        chunks = [chunk for chunk in answer.iter_bytes() if chunk]
    assert len(chunks) >= 2
    seconds, rate = decode(b"".join(chunks), audio_format)
    assert rate == 24_000 and seconds == pytest.approx(2.0, abs=TOLERANCE_S[audio_format])


def test_first_audio_arrives_before_the_generation_ends(client):
    started = time.perf_counter()
    with client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="alloy",
        input="A longer answer.",
        response_format="pcm",
        stream_format="audio",
        extra_body={"max_audio_seconds": 6.0, "seed": 3},
    ) as answer:
        arrivals = [time.perf_counter() - started for chunk in answer.iter_bytes() if chunk]
    first, last = arrivals[0], arrivals[-1]
    assert len(arrivals) >= 3 and first < 0.7 * last, arrivals


def test_speed_stretches_whole_and_streamed_answers(client):
    # The tiny model's 1.04 s at 2.0 is 0.52 s; its 2.0 s streamed at 0.5 is 4.0 s, one
    # stretch across the chunks (tests/unit/test_timestretch.py checks pitch and continuity).
    whole = client.audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input="Faster.", speed=2.0, response_format="wav", extra_body=SHORT
    )
    assert decode(whole.content, "wav")[0] == pytest.approx(SHORT_SECONDS / 2, abs=0.001)
    assert float(whole.headers["x-audio-seconds"]) == pytest.approx(SHORT_SECONDS / 2, abs=0.001)
    with client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="alloy",
        input="Slower.",
        speed=0.5,
        response_format="mp3",
        stream_format="audio",
        extra_body={"max_audio_seconds": 2.0, "seed": 2},
    ) as answer:
        chunks = [chunk for chunk in answer.iter_bytes() if chunk]
    assert len(chunks) >= 2
    assert decode(b"".join(chunks), "mp3")[0] == pytest.approx(4.0, abs=TOLERANCE_S["mp3"])


def test_sse_events_are_openais(client):
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="nova",
        input="Events.",
        response_format="pcm",
        stream_format="sse",
        instructions="Speak cheerfully.",
        extra_body=SHORT,
    ) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in answer.iter_lines() if line.startswith("data:")]
    deltas = [event for event in events if event["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
    assert sum(event["type"] == "speech.audio.done" for event in events) == 1
    audio = b"".join(base64.b64decode(event["audio"]) for event in deltas)
    assert len(audio) == int(SHORT_SECONDS * 24_000) * 2
    assert events[-1]["usage"]["output_tokens"] == 13  # 13 Mimi frames of 80 ms


def test_models_list(client):
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "csm-1b"} <= {model.id for model in client.models.list()}


def test_a_voice_stored_through_v1_is_usable_and_removable(client, gateway, speech_clip):
    headers = {"Authorization": f"Bearer {GATEWAY_API_KEY}"}
    with httpx.Client(base_url=f"{gateway.url}/v1", timeout=120) as http:
        created = http.post(
            "/audio/voices",
            headers=headers,
            data={"name": "openai-voice", "transcript": speech_clip.transcript, "consent": "ok"},
            files={"audio_sample": ("fox.wav", speech_clip.path.read_bytes(), "audio/wav")},
        )
        try:
            assert created.status_code == 200, created.text
            assert created.json()["id"] == "openai-voice" and created.json()["object"] == "audio.voice"
            listed = http.get("/audio/voices", headers=headers).json()
            assert "openai-voice" in {voice["id"] for voice in listed["data"]}
            spoken = client.audio.speech.create(
                model="tts-1", voice="openai-voice", input="In my voice.", response_format="wav", extra_body=SHORT
            )
            assert decode(spoken.content, "wav")[0] == pytest.approx(SHORT_SECONDS, abs=0.001)
            unkeyed = http.post(
                "/audio/voices",
                data={"name": "x", "transcript": "x"},
                files={"audio_sample": ("fox.wav", speech_clip.path.read_bytes(), "audio/wav")},
            )
            assert unkeyed.status_code == 401 and unkeyed.json()["error"]["code"] == "invalid_api_key"
        finally:
            deleted = client.audio.voices.delete("openai-voice")
        assert deleted.deleted and deleted.id == "openai-voice"
    with pytest.raises(openai.BadRequestError) as failure:
        client.audio.speech.create(model="tts-1", voice="openai-voice", input="Gone.", extra_body=SHORT)
    assert error_of(failure)["param"] == "voice" and "unknown voice" in error_of(failure)["message"]


def test_a_wrong_key_is_401_in_openais_shape(gateway):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-a-key", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as failure:
            wrong.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", extra_body=SHORT)
    assert failure.value.status_code == 401
    assert set(error_of(failure)) == {"message", "type", "param", "code"}
    assert error_of(failure)["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "change, param",
    [
        ({"response_format": "ogg"}, "response_format"),
        ({"speed": 9.0}, "speed"),
        ({"speed": 0.2}, "speed"),
        ({"speed": "fast"}, "speed"),
        ({"input": "   "}, "input"),
        ({"input": 42}, "input"),
        ({"voice": "no-such-voice"}, "voice"),
        ({"temperature": "warm"}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"stream_format": "video"}, "stream_format"),
        ({"input": "word " * 5_000}, "input"),  # over the long-form limit (20 000 characters)
    ],
)
def test_bad_bodies_are_400_naming_the_field(client, change, param):
    body = {"model": "tts-1", "voice": "alloy", "input": "Hi.", **SHORT, **change}
    with pytest.raises(openai.BadRequestError) as failure:
        client.post("/audio/speech", body=body, cast_to=httpx.Response)
    assert error_of(failure)["param"] == param, error_of(failure)
    assert error_of(failure)["type"] == "invalid_request_error" and "Traceback" not in error_of(failure)["message"]


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as failure:
        client.audio.speech.create(model="whisper-1", voice="alloy", input="Hi.")
    assert error_of(failure)["code"] == "model_not_found" and error_of(failure)["param"] == "model"


def test_a_client_gone_mid_stream_frees_its_kv_slot(gateway, triton_server):
    body = {
        "model": "tts-1",
        "voice": "alloy",
        "input": "A very long answer.",
        "response_format": "mp3",
        "stream_format": "audio",
        "max_audio_seconds": 90.0,
        "seed": 4,
    }
    headers = {"Authorization": f"Bearer {GATEWAY_API_KEY}"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{gateway.url}/v1/audio/speech", json=body, headers=headers) as answer:
            assert answer.status_code == 200
            next(answer.iter_bytes())
            assert slots_in_use(triton_server) >= 1  # 90 s of audio: still generating
    deadline = time.monotonic() + 30
    while slots_in_use(triton_server) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slots_in_use(triton_server) == 0


def test_captioned_speech_is_the_audio_and_a_timed_caption_per_sentence(gateway):
    text = (
        "The meeting starts at 9 am sharp, so please be on time and bring your notes with you. " * 2
        + "Afterwards we will have lunch together in the big room on the second floor, as usual. " * 2
    )
    headers = {"Authorization": f"Bearer {GATEWAY_API_KEY}"}
    with httpx.Client(base_url=f"{gateway.url}/v1", timeout=180, headers=headers) as http:
        answer = http.post(
            "/audio/speech/captioned",
            json={"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav", "seed": 4, "speed": 2.0},
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        as_written = http.post(
            "/audio/speech/captioned",
            json={"model": "tts-1", "input": "Meet at 9 am. Bye.", "voice": "alloy", "normalize": False, "seed": 4},
        )
        not_a_switch = http.post(
            "/audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": "alloy", "normalize": "no"}
        )
        refused = http.post(
            "/audio/speech/captioned", json={"model": "tts-1", "input": "Hi.", "voice": "alloy", "stream_format": "sse"}
        )
    audio, rate = soundfile.read(io.BytesIO(base64.b64decode(body["audio"])))
    segments = body["segments"]
    # one caption per sentence (four, where 300-character segments would have made two)
    assert len(segments) == 4 and segments[0]["start"] == 0.0
    assert [caption["text"][:14] for caption in segments] == ["The meeting st"] * 2 + ["Afterwards we "] * 2
    assert all(a["end"] <= b["start"] + 1e-3 and a["start"] <= a["end"] for a, b in zip(segments, segments[1:]))
    assert abs(segments[-1]["end"] - audio.size / rate) < 0.01 and abs(body["audio_seconds"] - audio.size / rate) < 0.01
    assert "nine" in segments[0]["text"].lower(), "the captions are the text as spoken"
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream_format"
    assert as_written.status_code == 200, as_written.text
    assert [caption["text"] for caption in as_written.json()["segments"]] == ["Meet at 9 am.", "Bye."]
    assert not_a_switch.status_code == 400 and "normalize" in not_a_switch.text
