"""Conversations and long texts through the clients against the real tritonserver: the
Python client (sync and asyncio, gRPC and HTTP) with context turns (a clip and a stored
voice) and a speaker, `csm-tts say/stream --context-…` and `csm-tts read book.txt`,
the gateway's OpenAI route with `extra_body` context, and bad input refused with a
clear message (a one-line exit 2 from the CLI, a 400 naming the field from the gateway).

The tiny test model never says "end": it speaks until MAX_AUDIO_SECONDS, so lengths
are exact and short; with a fixed seed, audio that differs means the context (or the
speaker) reached the model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile

from csm_clients import AsyncVoiceCloner, InvalidRequest, Turn, VoiceCloner
from csm_clients.cli import main
from csm_triton import constants as C

from .client_fixtures import GATEWAY_API_KEY, gateway, speech_clip
from .conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration
VOICE = "conversation-voice"
SHORT = {"max_audio_seconds": 0.5, "seed": 11}
SHORT_SAMPLES = 7 * C.SAMPLES_PER_FRAME  # 0.5 s, rounded up to whole 80 ms frames
SENTENCE = "This sentence is one of many, and the server speaks each segment in turn."
BOOK = " ".join([SENTENCE] * 12)  # about 900 characters: several segments


@pytest.fixture(scope="module")
def stored_voice(triton_server, speech_clip):
    with VoiceCloner(triton_server.grpc_url, admin_token=ADMIN_TOKEN) as cloner:
        cloner.register_voice(VOICE, speech_clip.path, speech_clip.transcript)
        yield VOICE
        cloner.delete_voice(VOICE)


@pytest.fixture()
def context(stored_voice, speech_clip):
    return [Turn.stored_voice(stored_voice, speaker=1), Turn.from_file(speech_clip.path, speech_clip.transcript)]


@pytest.fixture(params=["grpc", "http"])
def protocol(request, triton_server):
    return request.param, triton_server.grpc_url if request.param == "grpc" else triton_server.http_url


def test_the_client_speaks_after_context_turns(protocol, context):
    name, url = protocol
    with VoiceCloner(url, name, timeout=120) as cloner:
        alone = cloner.synthesize("And what did you say?", **SHORT)
        after = cloner.synthesize("And what did you say?", speaker=1, context=context, **SHORT)
        other_speaker = cloner.synthesize("And what did you say?", speaker=2, context=context, **SHORT)
        stream = cloner.stream("And what did you say?", speaker=1, context=context, **SHORT)
        streamed = list(stream)
    assert after.audio.shape == (SHORT_SAMPLES,) and after.sample_rate == C.SAMPLE_RATE
    assert not np.array_equal(after.audio, alone.audio) and not np.array_equal(after.audio, other_speaker.audio)
    assert sum(chunk.audio.size for chunk in streamed) == SHORT_SAMPLES
    # How the one segment ended: cut by the client's 0.5 s (the tiny model never says "end").
    assert after.finish_reasons == ("max_audio_seconds",) and after.segment_frames == (7,)
    assert all(chunk.audio.size for chunk in streamed)  # the final response is no chunk: its reasons stay
    assert (stream.finish_reasons, stream.segment_frames) == (("max_audio_seconds",), (7,))


def test_the_async_client_speaks_after_context_turns(protocol, context):
    name, url = protocol

    async def run():
        async with AsyncVoiceCloner(url, name, timeout=120) as cloner:
            spoken = await cloner.synthesize("Go on.", speaker=1, context=context, **SHORT)
            stream = cloner.stream("Go on.", speaker=1, context=context, **SHORT)
            chunks = [chunk async for chunk in stream]
            return spoken, chunks, stream

    spoken, chunks, stream = asyncio.run(run())
    assert spoken.audio.size == SHORT_SAMPLES == sum(chunk.audio.size for chunk in chunks)
    assert stream.finish_reasons == ("max_audio_seconds",) and stream.segment_frames == (7,)


def test_a_long_text_streams_as_one_request(triton_server):
    with VoiceCloner(triton_server.grpc_url) as cloner:
        stream = cloner.stream(BOOK, max_audio_seconds=1.0, seed=1)
        chunks = list(stream)
    # MAX_AUDIO_SECONDS caps the whole text (docs/api.md): 1 s, 13 frames, in chunks.
    assert len(chunks) >= 2 and sum(chunk.audio.size for chunk in chunks) == 13 * C.SAMPLES_PER_FRAME
    # The cap cut the first segment; the others never started.
    segments = len(stream.finish_reasons)
    assert segments >= 3 and stream.finish_reasons == ("max_audio_seconds",) + ("not_started",) * (segments - 1)
    assert stream.segment_frames == (13,) + (0,) * (segments - 1)
    # synthesize() collects a text of several segments from the same stream (csm_tts
    # stops at 120 s): one Speech, the same reasons.
    with VoiceCloner(triton_server.grpc_url) as cloner:
        whole = cloner.synthesize(BOOK, max_audio_seconds=1.0, seed=1)
    assert whole.audio.size == 13 * C.SAMPLES_PER_FRAME
    assert (whole.finish_reasons, whole.segment_frames) == (stream.finish_reasons, stream.segment_frames)


def test_bad_context_is_an_invalid_request_from_the_client_or_the_server(triton_server, speech_clip):
    with VoiceCloner(triton_server.grpc_url) as cloner:
        with pytest.raises(InvalidRequest, match="unknown voice 'nobody-here'"):  # the server's refusal
            cloner.synthesize("Hi.", context=[Turn.stored_voice("nobody-here")], **SHORT)
        with pytest.raises(InvalidRequest, match="18 context turns; the limit is 16"):  # refused before sending
            cloner.stream("Hi.", context=[Turn.from_file(speech_clip.path, "x")] * 18, **SHORT)


# --- csm-tts -------------------------------------------------------------------------------
@pytest.fixture()
def cli(triton_server, monkeypatch, tmp_path):
    monkeypatch.setenv("CSM_TRITON_URL", triton_server.grpc_url)
    monkeypatch.chdir(tmp_path)
    return main


def seconds(path) -> float:
    info = soundfile.info(str(path))  # raises unless the file decodes
    return info.frames / info.samplerate


def test_say_and_stream_with_context_turns(cli, speech_clip, stored_voice, capsys):
    turn = ["--context-turn", "0", str(speech_clip.path), speech_clip.transcript]
    assert (
        cli(
            [
                "say",
                "Fine, thanks.",
                "--speaker",
                "1",
                *turn,
                "--context-voice",
                "1",
                stored_voice,
                "-o",
                "reply.wav",
                "--max-audio-seconds",
                "0.5",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert cli(["stream", "And you?", *turn, *turn, "-o", "streamed.flac", "--max-audio-seconds", "1"]) == 0
    assert seconds("reply.wav") == pytest.approx(0.56) and seconds("streamed.flac") == pytest.approx(1.04)
    printed = capsys.readouterr()
    assert "streamed.flac: 1.04 s of audio" in printed.out
    # say and stream tell a cut segment (the tiny model never says "end"): 0.5 s, then 1 s
    assert "1 of 1 segment(s) did not end by themselves: 1 (max_audio_seconds, 7 frames)" in printed.err
    assert "1 (max_audio_seconds, 13 frames)" in printed.err


def test_read_a_book_through_the_console_script(triton_server, speech_clip, tmp_path):
    (tmp_path / "book.txt").write_text(BOOK + "\n", encoding="utf-8")
    script = Path(sys.executable).with_name("csm-tts")
    result = subprocess.run(
        [
            str(script),
            "--url",
            triton_server.http_url,
            "--protocol",
            "http",
            "read",
            "book.txt",
            "-o",
            "book.wav",
            "--reference",
            str(speech_clip.path),
            "--transcript",
            speech_clip.transcript,
            "--max-audio-seconds",
            "1",
            "--seed",
            "2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CSM_TRITON_URL": "unused:1"},
    )
    assert result.returncode == 0, result.stderr
    assert seconds(tmp_path / "book.wav") == pytest.approx(1.04)
    assert f"book.wav: 1.04 s of audio ({len(BOOK)} characters" in result.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["say", "Hi.", "--context-turn", "0", "missing.wav", "What it says."],
            "csm-tts say: error: --context-turn: no such audio file: missing.wav",
        ),
        (
            ["say", "Hi."] + ["--context-voice", "0", VOICE] * 17,
            "csm-tts say: error: 17 context turns; the limit is 16",
        ),
        (
            ["read", "long.txt"],
            "csm-tts read: error: long.txt has 20001 characters; the server's limit for one text is 20000",
        ),
        (["read", "nothing.txt"], "csm-tts read: error: cannot read nothing.txt: No such file or directory"),
        (
            ["stream", "Hi.", "--speaker", "-1"],
            "csm-tts stream: error: --speaker: speaker id -1; speaker ids are 0-255",
        ),
        (
            ["say", "Hi.", "--context-voice", "one", VOICE],
            "--context-voice: the speaker must be an integer id, got 'one'",
        ),
    ],
)
def test_bad_command_lines_are_one_line_and_exit_2(cli, arguments, message, capsys):
    Path("long.txt").write_text("a" * 20_001, encoding="utf-8")
    assert cli([*arguments, "-o", "x.wav"]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and "Traceback" not in error
    assert not Path("x.wav").exists()


# --- the gateway ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdk(gateway):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=GATEWAY_API_KEY, max_retries=0, timeout=120) as client:
        yield client


def clip_base64(speech_clip) -> str:
    return base64.b64encode(speech_clip.path.read_bytes()).decode()


def test_openai_speech_with_context_and_speaker(sdk, speech_clip, stored_voice):
    context = [
        {"voice": stored_voice, "speaker": 1},
        {"audio": clip_base64(speech_clip), "text": speech_clip.transcript, "speaker": 0},
    ]
    answer = sdk.audio.speech.create(
        model="tts-1",
        voice="alloy",
        input="Nice to meet you.",
        response_format="wav",
        extra_body={**SHORT, "speaker": 1, "context": context},
    )
    spoken, rate = soundfile.read(io.BytesIO(answer.content))
    assert rate == C.SAMPLE_RATE and spoken.size == SHORT_SAMPLES
    plain = sdk.audio.speech.create(
        model="tts-1",
        voice="alloy",
        input="Nice to meet you.",
        response_format="wav",
        extra_body={**SHORT, "speaker": 1},
    )
    assert plain.content != answer.content  # the context reached the model


@pytest.mark.parametrize(
    "context, speaker, param",
    [
        ([{"voice": "nobody-here"}], None, "context[0].voice"),  # Triton's refusal, mapped back
        ([{"audio": "not base64!", "text": "x"}], None, "context[0].audio"),
        ([{"audio": base64.b64encode(b"not audio").decode(), "text": "x"}], None, "context[0].audio"),
        ([{"text": "no audio"}], None, "context[0].audio"),
        ([{"voice": VOICE, "speaker": 256}], None, "context[0].speaker"),
        ([{"voice": VOICE, "transcript": "misspelt"}], None, "context[0].transcript"),
        ([{"voice": VOICE}] * 17, None, "context"),
        (None, -1, "speaker"),
    ],
)
def test_a_bad_context_is_a_400_naming_the_field(sdk, stored_voice, context, speaker, param):
    body = {"model": "tts-1", "voice": "alloy", "input": "Hi.", **SHORT, "context": context, "speaker": speaker}
    with pytest.raises(openai.BadRequestError) as failure:
        sdk.post("/audio/speech", body=body, cast_to=httpx.Response)
    error = failure.value.body.get("error", failure.value.body)
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert "Traceback" not in error["message"]


def test_clone_voice_takes_the_same_context(gateway, speech_clip, stored_voice):
    form = {
        "text": "Hello again.",
        "speaker": "1",
        "max_audio_seconds": "0.5",
        "context": json.dumps([{"voice": stored_voice, "speaker": 1}]),
    }
    key = {"Authorization": f"Bearer {GATEWAY_API_KEY}"}  # speech needs a key once keys are configured
    with httpx.Client(base_url=gateway.url, timeout=120, headers=key) as http:
        answer = http.post("/clone-voice", data=form)
        refused = http.post(
            "/clone-voice", data={**form, "context": json.dumps([{"voice": stored_voice, "speaker": -2}])}
        )
    assert answer.status_code == 200, answer.text
    assert soundfile.info(io.BytesIO(answer.content)).frames == SHORT_SAMPLES
    assert refused.status_code == 400 and "speaker id -2" in refused.json()["detail"]
