"""The gateway's WebSocket text stream (/v1/audio/speech/stream-text) against the real
tritonserver, driven by the package's client (csm_clients.text_stream, the `websockets`
library): a six-sentence text sent in 3-10-character deltas at an LLM's pace is heard
before its last delta is sent, and its audio equals, sample for sample at a fixed seed,
the long-text path's (csm_tts_stream on the whole text, which the server splits one
sentence per segment) whatever the deltas' boundaries; a client that vanishes
mid-sentence has its KV slot freed within 2 s; the API key, the idle timeout, a bad
message and a refusal of Triton's end the session with a clear error.

Cost: the tiny random checkpoint never emits its end frame, so every sentence runs to its
frame budget. The disconnect test runs first, at the default budget (0.2 s per
character: a long sentence is still generating when the client leaves); the module then
loads csm_prepare with `segment_seconds_per_char` 0.01 (as test_long_text.py does with
its own figure) and loads it from its repository again at the end.
"""

from __future__ import annotations

import json
import random
import socket
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from csm_clients.client import VoiceCloner
from csm_clients.errors import InvalidRequest, PermissionDenied
from csm_clients.text_stream import ROUTE, stream_text
from csm_servers.gateway.encoding import StreamEncoder
from csm_servers.gateway.guard import GatewayLimits
from csm_triton.core import normalize, text_split

from .client_fixtures import GATEWAY_API_KEY, Gateway
from .conftest import ADMIN_TOKEN, segment_budget, slots_in_use

pytestmark = pytest.mark.integration
SEED = 11
SECONDS_PER_CHAR, MIN_SECONDS = 0.01, 0.5
# Six sentences of 150-300 characters: the server packs sentences into segments of up to
# 300, so each of these is one segment of the long text, as each is one piece here.
SENTENCES = [
    "The harbour was quiet that morning, with only the gulls and the slow creak of the boats against their ropes "
    "to keep the old lantern keeper company while he walked the length of the pier.",
    "He had kept the light for most of his life, and he could tell the weather from the colour of the water, the "
    "smell of the wind, and the way the fishermen hurried or lingered over their nets.",
    "Today the sky was the pale grey of a pigeon's wing, and the sea lay flat and heavy, as though it were waiting "
    "for something that nobody in the little town had yet thought to expect or fear.",
    "By noon a letter arrived from the city, carried by a boy on a bicycle who had ridden along the cliff road "
    "since dawn and who asked for nothing more than a cup of tea and a place to sit.",
    "The keeper read the letter twice, folded it into the pocket of his coat, and stood for a long while at the "
    "window, watching the boy wheel his bicycle back down the hill towards the baker.",
    "When the lamps were lit that evening, he climbed the tower one last time, wound the great clock by hand, and "
    "wrote in the log that the light had burned steadily and the harbour had been calm.",
]
TEXT = " ".join(SENTENCES)


def deltas(seed: int, pace_s: float = 0.0, sent: dict | None = None):
    """TEXT in pieces of 3-10 characters, `pace_s` apart; `sent["last"]`: when the last
    piece had been handed over (the client sends each as it is taken)."""
    rng, position = random.Random(seed), 0
    while position < len(TEXT):
        size = rng.randint(3, 10)
        yield TEXT[position : position + size]
        position += size
        time.sleep(pace_s)
    if sent is not None:
        sent["last"] = time.monotonic()


@pytest.fixture(scope="module")
def text_gateway(triton_server):
    limits = GatewayLimits(ws_idle_timeout_s=2.0)
    with Gateway(triton_server.grpc_url, admin_token=ADMIN_TOKEN, api_keys=[GATEWAY_API_KEY], limits=limits) as gw:
        yield gw


def test_a_client_that_vanishes_mid_sentence_frees_its_kv_slot_within_2_s(text_gateway, triton_server):
    # The default budget: ~290 characters is ~58 s of audio, still generating when the client goes.
    with connect(
        text_gateway.url.replace("http", "ws") + ROUTE,
        additional_headers={"Authorization": f"Bearer {GATEWAY_API_KEY}"},
    ) as websocket:
        websocket.send(json.dumps({"type": "text", "text": SENTENCES[1] + " And then"}))
        assert isinstance(websocket.recv(timeout=120), bytes)
        assert slots_in_use(triton_server) >= 1, "still generating"
        left = time.monotonic()
        websocket.socket.shutdown(socket.SHUT_RDWR)  # gone without a close frame
    while slots_in_use(triton_server) > 0 and time.monotonic() - left < 10:
        time.sleep(0.05)
    freed_after = time.monotonic() - left
    print(f"KV slot freed {freed_after:.2f} s after the client vanished")
    assert slots_in_use(triton_server) == 0 and freed_after < 2.0, freed_after


@pytest.fixture(scope="module")
def low_budget(triton_server, grpc_client):
    with segment_budget(triton_server, grpc_client, SECONDS_PER_CHAR, MIN_SECONDS):
        yield


@pytest.fixture(scope="module")
def long_text_path(low_budget, triton_server):
    """The whole TEXT through csm_tts_stream, as pcm16: the reference."""
    assert text_split.split_text(TEXT, normalize=normalize.normalize_texts) == [
        normalize.normalize_text(sentence).strip() for sentence in SENTENCES
    ], "one sentence per segment"
    with VoiceCloner(triton_server.grpc_url) as cloner:
        stream = cloner.stream(TEXT, seed=SEED)
        audio = np.concatenate([chunk.audio for chunk in stream])
    assert len(stream.segment_frames) == 6
    return StreamEncoder("pcm", 24_000).feed(audio), stream


def speak(gateway, pieces, **options):
    speech = stream_text(gateway.url, pieces, api_key=GATEWAY_API_KEY, seed=SEED, **options)
    arrivals, audio = [], bytearray()
    with speech:
        for data in speech:
            arrivals.append(time.monotonic())
            audio += data
    return bytes(audio), arrivals, speech


def test_text_at_an_llms_pace_is_heard_before_its_last_delta_and_is_the_long_text_path(text_gateway, long_text_path):
    reference, whole = long_text_path
    sent = {}
    audio, arrivals, speech = speak(text_gateway, deltas(1, pace_s=0.02, sent=sent))
    print(f"first audio {sent['last'] - arrivals[0]:.2f} s before the last delta was sent")
    assert arrivals[0] < sent["last"], f"first audio {arrivals[0] - sent['last']:.2f} s after the last delta"
    assert [s.text for s in speech.sentences] == SENTENCES
    assert [s.frames for s in speech.sentences] == list(whole.segment_frames)
    assert [s.normalized_text for s in speech.sentences] == list(whole.normalized_text)
    assert len(audio) == len(reference) and audio == reference, "sample for sample, the long text's audio"


def test_the_audio_does_not_depend_on_the_deltas_boundaries(text_gateway, long_text_path):
    reference, whole = long_text_path
    audio, _, speech = speak(text_gateway, deltas(2))
    assert audio == reference
    # each sentence's times: back to back, covering the audio, each its frames long
    ends = np.cumsum(whole.segment_frames) * 0.08
    assert [s.end for s in speech.sentences] == pytest.approx(list(ends))
    assert [s.start for s in speech.sentences] == pytest.approx([0.0, *ends[:-1]])
    assert speech.audio_seconds == pytest.approx(len(reference) / 2 / 24_000)
    assert all(s.finish_reasons == ("max_frames",) for s in speech.sentences), "the tiny model never ends itself"


def test_the_api_key_is_required(text_gateway):
    url = text_gateway.url.replace("http", "ws") + ROUTE
    for headers in (None, {"Authorization": "Bearer wrong-key"}):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers)
        assert refused.value.response.status_code == 401
    with pytest.raises(PermissionDenied, match="Authorization"):
        stream_text(text_gateway.url, ["Hello."]).read_all()


def test_an_unknown_voice_is_tritons_refusal_then_the_session_closes(text_gateway, low_budget):
    with pytest.raises(InvalidRequest, match="unknown voice 'nobody-here'"):
        stream_text(text_gateway.url, ["Hello there."], api_key=GATEWAY_API_KEY, voice="nobody-here").read_all()


def test_an_idle_session_and_a_bad_message_are_closed_with_a_clear_reason(text_gateway, low_budget):
    url = text_gateway.url.replace("http", "ws") + ROUTE
    headers = {"Authorization": f"Bearer {GATEWAY_API_KEY}"}
    for first, code in [({"type": "text", "text": "Half a sent"}, "idle_timeout"), ("{oops", "invalid_json")]:
        with connect(url, additional_headers=headers) as websocket:
            websocket.send(first if isinstance(first, str) else json.dumps(first))
            event = json.loads(websocket.recv(timeout=10))
            with pytest.raises(ConnectionClosed):
                websocket.recv(timeout=10)
        assert event["type"] == "error" and event["error"]["code"] == code and websocket.close_code == 1008
