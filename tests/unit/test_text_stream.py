"""The gateway's WebSocket text stream without Triton: the sentence splitter agrees with the
server's whatever the pieces, and the route (served by uvicorn with the gateway's own
settings, driven by a real WebSocket client) speaks each sentence in order with the
previous one's CONTINUATION, times them, refuses every bad message and limit with a
clear error and close code, checks the key and the key's slots before the handshake,
and cancels the sentence being spoken when the client goes away. The real server's
audio (equal to the long-text path, the KV slot freed) is tests/integration/test_text_stream.py."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from csm_clients.audio import Speech
from csm_clients.errors import InvalidRequest, PermissionDenied, ServerUnavailable
from csm_clients.limits import DEFAULT_LIMITS
from csm_clients.text_stream import FLUSH, ROUTE, stream_text
from csm_servers.gateway.sentences import TITLES, WINDOW_CHARS, SentenceSplitter
from csm_triton import constants as C
from csm_triton.core import text_split
from csm_triton.serving.process import free_ports
from loadtest.segment_joins import long_text

ROOT = Path(__file__).resolve().parents[2]
PROSE = [
    long_text(3000),
    (ROOT / "loadtest" / "data" / "texts.txt").read_text(),
    'Dr. Smith went to Washington. He said: "Hi!" Then he left... The U.S. grew 3.5% in 2024. What? Yes.\n\n'
    "Mr. Brown, e.g. Ms. Lee, said no. It costs $5.30 at 10:45 a.m. on Jan. 3rd. Prof. X agreed! Really?! Fine…",
    "word " * 900 + "and no end in sight " * 30,
]


def test_the_mirrors_of_the_servers_splitter_are_equal():
    assert WINDOW_CHARS == C.SENTENCE_WINDOW_CHARS and TITLES == text_split._TITLES


@pytest.mark.parametrize("text", PROSE, ids=["numbered", "loadtest", "abbreviations", "no-boundary"])
def test_the_sentences_are_the_servers_whatever_the_pieces(text):
    rng = random.Random(len(text))
    for _ in range(10):
        splitter, found, position = SentenceSplitter(), [], 0
        while position < len(text):
            size = rng.randint(1, 12)
            found += splitter.feed(text[position : position + size])
            position += size
        assert found + splitter.flush() == text_split._sentences(text)


# --- the route, with a fake csm_tts_stream -----------------------------------------------------
class FakeStream:
    """What AsyncVoiceCloner.stream returns: 3 chunks of 80 ms, then the final response's
    fields; a text with "forever" never ends. Records an early close (a cancel)."""

    def __init__(self, cloner, number, text):
        self.cloner, self.number, self.text, self.sent, self.ended = cloner, number, text, 0, False
        self.continuation, self.finish_reasons, self.segment_frames, self.normalized_text = None, (), (), ()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.sent == 3 and "forever" not in self.text:
            self.ended, self.continuation = True, f"continuation-of-sentence-{self.number}"
            self.finish_reasons, self.segment_frames, self.normalized_text = ("end_of_speech",), (3,), (self.text,)
            raise StopAsyncIteration
        await asyncio.sleep(self.cloner.chunk_delay_s)
        self.sent += 1
        return Speech(np.full(1920, self.number / 10, np.float32), 24_000)

    async def aclose(self):
        if not self.ended:
            self.cloner.cancelled.append((self.number, time.monotonic()))


class FakeCloner:
    def __init__(self):
        self.calls, self.cancelled, self.chunk_delay_s = [], [], 0.01

    async def limits(self):
        return DEFAULT_LIMITS

    def stream(self, text, **options):
        self.calls.append((text, options))
        return FakeStream(self, len(self.calls), text)


class Served:
    """An app of the gateway's guard and the text stream route under uvicorn, with the
    settings `python -m csm_servers.gateway` uses (its header deadline included)."""

    def __init__(self, limits, keys=()):
        import uvicorn
        from fastapi import FastAPI

        from csm_servers.gateway.__main__ import uvicorn_settings
        from csm_servers.gateway.guard import GatewayGuard
        from csm_servers.gateway.keys import ApiKeys
        from csm_servers.gateway.text_stream_route import text_stream_router

        self.cloner, keys = FakeCloner(), ApiKeys(keys)
        app = FastAPI()
        app.add_middleware(GatewayGuard, keys=keys, limits=limits)
        app.include_router(text_stream_router(lambda: self.cloner, keys, limits))
        self.port = free_ports(1)[0]
        self.url = f"ws://127.0.0.1:{self.port}{ROUTE}"
        settings = uvicorn_settings(header_timeout_s=0.3)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **settings)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served():
    from csm_servers.gateway.guard import GatewayLimits

    server = Served(
        GatewayLimits(ws_max_message_bytes=1024, ws_idle_timeout_s=1.0, ws_max_session_s=4.0, ws_max_sentences=5)
    )
    yield server
    server.stop()


@pytest.fixture()
def cloner(served):
    served.cloner.__init__()
    return served.cloner


def session(served, messages, pause_s=0.0, headers=None):
    """Sends `messages` (dicts, or raw str/bytes), then reads to the end: (audio bytes,
    JSON events, the close code)."""
    audio, events = bytearray(), []
    with connect(served.url, additional_headers=headers) as websocket:
        for message in messages:
            try:
                websocket.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
            except ConnectionClosed:  # the gateway ended the session: its reason is read below
                break
            time.sleep(pause_s)
        try:
            while True:
                received = websocket.recv(timeout=10)
                if isinstance(received, bytes):
                    audio += received
                else:
                    events.append(json.loads(received))
        except ConnectionClosed:
            pass
        return bytes(audio), events, websocket.close_code


def text(value):
    return {"type": "text", "text": value}


def test_each_sentence_is_spoken_in_order_continuing_the_one_before(served, cloner):
    deltas = ["Hello th", "ere. How are", " you? Fine, th", "anks."]
    audio, events, code = session(
        served, [{"type": "start", "seed": 7, "voice": "alloy"}, *map(text, deltas), {"type": "close"}]
    )
    assert code == 1000 and [t for t, _ in cloner.calls] == ["Hello there.", "How are you?", "Fine, thanks."]
    assert [o["continue_from"] for _, o in cloner.calls] == [
        "",
        "continuation-of-sentence-1",
        "continuation-of-sentence-2",
    ]
    assert all(o["seed"] == 7 and o["voice"] is None for _, o in cloner.calls), "alloy: the default voice"
    assert [e["type"] for e in events] == ["sentence"] * 3 + ["done"]
    done = events[-1]
    assert [(s["start"], s["end"]) for s in done["sentences"]] == [(0.0, 0.24), (0.24, 0.48), (0.48, 0.72)]
    assert done["sentences"][0]["finish_reasons"] == ["end_of_speech"] and done["audio_seconds"] == 0.72
    samples = np.frombuffer(audio, "<i2")
    assert samples.size == 3 * 3 * 1920 and samples[0] == round(0.1 * 32767) and samples[-1] == round(0.3 * 32767)


def test_a_sentence_is_spoken_before_the_text_goes_on_and_flush_speaks_a_part(served, cloner):
    with connect(served.url) as websocket:
        websocket.send(json.dumps(text("The first sentence. The se")))
        assert isinstance(websocket.recv(timeout=5), bytes), "its audio while the text goes on"
        websocket.send(json.dumps(text("cond one without an end")))
        websocket.send(json.dumps({"type": "flush"}))
        websocket.send(json.dumps(text("… ")))
        websocket.send(json.dumps({"type": "flush"}))
        websocket.send(json.dumps(text("Last.")))
        websocket.send(json.dumps({"type": "close"}))
        while not isinstance(message := websocket.recv(timeout=5), str) or json.loads(message)["type"] != "done":
            pass
    assert [t for t, _ in cloner.calls] == ["The first sentence.", "The second one without an end", "… Last."]


def test_a_session_outlives_the_header_deadline_and_the_idle_clock_stops_while_speaking(served, cloner):
    cloner.chunk_delay_s = 0.5  # 1.5 s of speaking: past the 1 s idle timeout and the 0.3 s header deadline
    audio, events, code = session(served, [text("One slow sentence. "), text("Then more")], pause_s=0.1)
    assert [t for t, _ in cloner.calls] == ["One slow sentence."] and len(audio) == 3 * 1920 * 2
    assert code == 1008 and events[-1]["error"]["code"] == "idle_timeout"


@pytest.mark.parametrize(
    "messages, code, close_code",
    [
        (["{not json"], "invalid_json", 1008),
        ([{"type": "speak", "text": "x"}], "unknown_message_type", 1008),
        (["[1, 2]"], "unknown_message_type", 1008),
        ([b"\x00\x01"], "binary_message", 1003),
        ([text("x" * 2000)], "message_too_large", 1009),
        ([{"type": "text", "text": 5}], "invalid_message", 1008),
        ([text("Hi. "), {"type": "start"}], "late_start", 1008),
        ([{"type": "start", "voise": "alice"}], "invalid_start", 1008),
        ([{"type": "start", "seed": -1}], "invalid_start", 1008),
        ([{"type": "start", "response_format": "ogg"}], "invalid_start", 1008),
        ([{"type": "start", "model": "tts-2"}], "model_not_found", 1008),
        ([text("One. Two. Three. Four. Five. Six. Seven. ")], "too_many_sentences", 1008),
    ],
)
def test_a_bad_message_is_answered_with_a_clear_error_then_closed(served, cloner, messages, code, close_code):
    _, events, closed = session(served, messages)
    assert closed == close_code and events[-1]["type"] == "error", events
    assert events[-1]["error"]["code"] == code and "Traceback" not in events[-1]["error"]["message"]


def test_text_past_the_long_text_limit_is_refused_before_it_is_spoken():
    from csm_servers.gateway.guard import GatewayLimits

    served = Served(GatewayLimits())  # 64 KiB messages, 500 sentences
    try:
        _, events, code = session(served, [text("word " * 3000), text("more " * 2000)])
    finally:
        served.stop()
    error = events[-1]["error"]
    assert code == 1008 and error["code"] == "text_too_long" and "20,000" in error["message"]
    assert "more" not in "".join(spoken for spoken, _ in served.cloner.calls), "nothing of the message past the limit"


def test_a_session_past_its_length_is_closed():
    from csm_servers.gateway.guard import GatewayLimits

    # Its own server with a 1 s session (the module's is 4 s, for the tests that speak
    # longer); the same 1 s idle timeout: a message every 0.1 s is never idle, 2 s in all.
    served = Served(GatewayLimits(ws_idle_timeout_s=1.0, ws_max_session_s=1.0))
    try:
        _, events, code = session(served, [text("and on ")] * 20, pause_s=0.1)
    finally:
        served.stop()
    assert code == 1008 and events[-1]["error"]["code"] == "session_timeout"


def test_a_client_that_goes_away_mid_sentence_has_its_generation_cancelled(served, cloner):
    with connect(served.url) as websocket:
        websocket.send(json.dumps(text("This goes on forever. Yes it does")))
        websocket.recv(timeout=5)
        left = time.monotonic()
    deadline = time.monotonic() + 2
    while not cloner.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cloner.cancelled and cloner.cancelled[0][1] - left < 2


def test_the_python_helper_streams_deltas_and_returns_the_times(served, cloner):
    def deltas():
        yield from ["Hello there. How", " are you?", FLUSH, " Good"]

    speech = stream_text(served.url.replace("ws://", "http://").replace(ROUTE, ""), deltas(), voice="alice", seed=3)
    audio = speech.read_all()
    assert len(audio) == 3 * 3 * 1920 * 2 and [s.text for s in speech.sentences] == [
        "Hello there.",
        "How are you?",
        "Good",
    ]
    assert speech.sentences[2].end == speech.audio_seconds == 0.72 and cloner.calls[0][1]["voice"] == "alice"
    with pytest.raises(InvalidRequest, match="more than 5 sentences"):
        stream_text(served.url, iter(["One. Two. Three. Four. Five. Six. Seven. Eight."])).read_all()


def test_keys_and_the_keys_slots_are_checked_before_the_handshake():
    from csm_servers.gateway.guard import GatewayLimits

    served = Served(GatewayLimits(max_concurrency_per_key=1, max_queue_per_key=0), keys=["the-key"])
    try:
        for headers in (None, {"Authorization": "Bearer wrong"}):
            with pytest.raises(InvalidStatus) as refused:
                connect(served.url, additional_headers=headers)
            assert refused.value.response.status_code == 401
            assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
        with pytest.raises(PermissionDenied, match="Authorization"):
            stream_text(served.url, ["Hi."])
        first = connect(served.url, additional_headers={"Authorization": "Bearer the-key"}, legacy=True)
        with pytest.raises(ServerUnavailable, match="too many requests"):
            stream_text(served.url, ["Hi."], api_key="the-key")
        first.close()
        time.sleep(0.2)
        assert len(stream_text(served.url, ["Hi."], api_key="the-key").read_all()) == 3 * 1920 * 2
    finally:
        served.stop()


def test_csm_tts_pipe_writes_the_audio_of_stdin_as_it_arrives(served, cloner, tmp_path):
    out = tmp_path / "piped.wav"
    command = [sys.executable, "-m", "csm_clients.cli", "pipe", "--gateway", served.url, "-o", str(out), "--seed", "1"]
    done = subprocess.run(command, input=b"First line.\nSecond line.\n", capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    audio, rate = soundfile.read(out)
    assert rate == 24_000 and audio.size == 2 * 3 * 1920 and b"2 sentence(s)" in done.stderr
    raw = subprocess.run(command[:-4] + ["--format", "pcm"], input=b"Raw.", capture_output=True, timeout=60)
    assert raw.returncode == 0 and len(raw.stdout) == 3 * 1920 * 2
    for stdin, option, message in [
        (b"caf\xe9 au lait", [], b"stdin is not UTF-8 text (byte 3)"),
        (b"Hi.", ["--seed", "-1"], b"--seed"),
    ]:
        refused = subprocess.run(command + option, input=stdin, capture_output=True, timeout=60)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
