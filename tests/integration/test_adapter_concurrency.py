"""Issue 26 under load, against the real tritonserver: two LoRA adapter voices and the base
model speak at the same time (csm_tts_stream over gRPC, csm_tts over HTTP), all in flight
together so csm_lm runs them in one batch, and every result is the audio the same request
gives alone (the fp32 CPU engine's per-seed determinism, docs/api.md "Seeds and
determinism"; up to the codec's float rounding, see assert_same_audio); the two adapters
and the base each sound different for the same text and seed. OpenAI's client picks an
adapter by `voice` and gets csm_tts's audio. Registering, using and deleting a third
adapter voice while streams of an adapter and the base run leaves those streams' audio
untouched, and an id deleted and registered again speaks with its new adapter.

The adapter voices are registered with DEFAULT_SPEAKER 1 (test_voice_models.adapter_inputs),
so the base requests here ask for speaker 1 too: the prompts are then the same and only the
adapter weights differ."""

from __future__ import annotations

import json
import queue
import threading
import time

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http
from safetensors.numpy import load_file, save_file

from .client_fixtures import GATEWAY_API_KEY, gateway
from .test_adapter_speech import adapter_folder
from .test_tts import expected_samples, tensor, tts_inputs
from .test_voice_models import Protocol, adapter_inputs, delete, token

pytestmark = pytest.mark.integration
ADAPTER_A, ADAPTER_B, ADAPTER_C = "busy-tuned-a", "busy-tuned-b", "busy-tuned-c"
BASE = None  # no VOICE_ID: the base model
WORDS = "Several voices at once."
SEED = 23
SECONDS = 0.8  # 10 frames: the tiny model never ends on its own


@pytest.fixture(scope="module")
def adapter_b(adapter_folder, tmp_path_factory):
    """A second adapter of the same shapes: A's matrices with fresh random values."""
    run = tmp_path_factory.mktemp("tuned-run-b")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_bytes(
        (adapter_folder / "adapter" / "adapter_config.json").read_bytes()
    )
    (run / "manifest.json").write_bytes((adapter_folder / "manifest.json").read_bytes())
    rng = np.random.default_rng(17)
    weights = {
        name: rng.normal(0.0, 0.05, value.shape).astype(value.dtype)
        for name, value in load_file(adapter_folder / "adapter" / "adapter_model.safetensors").items()
    }
    save_file(weights, run / "adapter" / "adapter_model.safetensors")
    return run


@pytest.fixture(scope="module")
def adapter_voices(grpc_client, adapter_folder, adapter_b):
    """ADAPTER_A and ADAPTER_B registered through voice_register (admin token), deleted after."""
    runs = {ADAPTER_A: adapter_folder, ADAPTER_B: adapter_b}
    for voice_id, run in runs.items():
        stored = json.loads(
            grpc_client.infer("voice_register", adapter_inputs(grpc, voice_id, run), headers=token()).as_numpy("VOICE")[
                0
            ]
        )
        assert stored["kind"] == "adapter" and stored["default_speaker"] == 1
    yield runs
    for voice_id in runs:
        delete(Protocol("grpc", grpc, grpc_client), voice_id)


def request_inputs(module, voice: str | None, seconds: float = SECONDS) -> list:
    inputs = tts_inputs(module, words=WORDS, seconds=seconds, seed=SEED, voice_id=voice, reference=False)
    if voice is None:
        inputs.append(tensor(module, "SPEAKER", np.array([1], np.int32)))  # the adapter voices' speaker
    return inputs


class Stream:
    """One csm_tts_stream request over gRPC on a thread of its own (its own client):
    `audio` (the chunks joined) and `finish_reasons` once `done`; `first_chunk` is set when
    audio arrived; `sent` / `ended` are time.monotonic() stamps."""

    def __init__(self, url: str, voice: str | None, seconds: float = SECONDS, start: threading.Barrier | None = None):
        self.first_chunk, self.done = threading.Event(), threading.Event()
        self.audio = self.finish_reasons = self.error = None
        self.sent = self.ended = None
        self._thread = threading.Thread(target=self._run, args=(url, voice, seconds, start), daemon=True)
        self._thread.start()

    def _run(self, url, voice, seconds, start):
        client = grpc.InferenceServerClient(url)
        arrivals: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: arrivals.put((result, error)))
        chunks = []
        try:
            if start is not None:
                start.wait(timeout=60)
            self.sent = time.monotonic()
            client.async_stream_infer(
                "csm_tts_stream", request_inputs(grpc, voice, seconds), enable_empty_final_response=True
            )
            while True:
                result, error = arrivals.get(timeout=120)
                if error is not None:
                    self.error = str(error)
                    return
                audio = result.as_numpy("AUDIO")
                if audio is not None and audio.size:
                    chunks.append(audio)
                    self.first_chunk.set()
                if result.as_numpy("FINISH_REASONS") is not None:
                    self.finish_reasons = [reason.decode() for reason in result.as_numpy("FINISH_REASONS")]
                if result.get_response().parameters["triton_final_response"].bool_param:
                    self.audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
                    return
        finally:
            self.ended = time.monotonic()
            self.done.set()
            client.stop_stream()
            client.close()

    def result(self) -> np.ndarray:
        assert self.done.wait(timeout=180), "the stream did not end"
        assert self.error is None, self.error
        assert self.finish_reasons == ["max_audio_seconds"], self.finish_reasons
        return self.audio


def streamed_alone(url: str, voice: str | None, seconds: float = SECONDS) -> np.ndarray:
    return Stream(url, voice, seconds).result()


def overlapped(items) -> bool:
    """Whether every one of these (sent, ended) requests was in flight at one moment."""
    return max(item.sent for item in items) < min(item.ended for item in items)


def spoken_over_http(url: str, voice: str | None, seconds: float = SECONDS) -> np.ndarray:
    client = http.InferenceServerClient(url, network_timeout=180)  # one per thread
    try:
        return client.infer("csm_tts", request_inputs(http, voice, seconds)).as_numpy("AUDIO")
    finally:
        client.close()


def assert_same_audio(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """The same generated frames: equal samples up to the codec's float rounding. The codes
    are bit for bit the same, but mimi_decoder batches the chunks of concurrent requests
    (dynamic batching), and onnxruntime's sums round differently by batch: up to ~1e-7
    seen, far under one 16-bit step (3e-5); other frames differ by ~0.1."""
    assert got.shape == expected.shape, what
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=what)


def assert_distinct(audio: dict) -> None:
    """The same text and seed: each adapter sounds unlike the base and unlike the other."""
    for first, second in ((ADAPTER_A, BASE), (ADAPTER_B, BASE), (ADAPTER_A, ADAPTER_B)):
        assert audio[first].shape == audio[second].shape
        assert not np.array_equal(audio[first], audio[second]), f"{first} sounds like {second}"


def test_two_adapters_and_the_base_stream_at_once_as_each_alone(triton_server, adapter_voices):
    url, voices = triton_server.grpc_url, (ADAPTER_A, ADAPTER_B, BASE)
    alone = {voice: streamed_alone(url, voice) for voice in voices}
    assert all(audio.shape == (expected_samples(SECONDS),) for audio in alone.values())
    assert_distinct(alone)

    start = threading.Barrier(len(voices))
    streams = {voice: Stream(url, voice, start=start) for voice in voices}
    together = {voice: stream.result() for voice, stream in streams.items()}
    assert overlapped(streams.values()), "the three streams were never in flight together"
    for voice in voices:
        assert_same_audio(together[voice], alone[voice], f"voice {voice} in the batch")


class Call:
    """A function on a thread of its own, started with the others at a barrier."""

    def __init__(self, start: threading.Barrier, work, *args):
        self.value = self.error = self.sent = self.ended = None
        self._thread = threading.Thread(target=self._run, args=(start, work, args), daemon=True)
        self._thread.start()

    def _run(self, start, work, args):
        start.wait(timeout=60)
        self.sent = time.monotonic()
        try:
            self.value = work(*args)
        except Exception as error:  # noqa: BLE001 - reported by result()
            self.error = error
        self.ended = time.monotonic()

    def result(self):
        self._thread.join(timeout=180)
        assert not self._thread.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.value


def test_two_adapters_and_the_base_over_http_at_once_as_each_alone(triton_server, adapter_voices):
    url, voices = triton_server.http_url, (ADAPTER_A, ADAPTER_B, BASE)
    alone = {voice: spoken_over_http(url, voice) for voice in voices}
    assert_distinct(alone)
    start = threading.Barrier(len(voices))
    calls = {voice: Call(start, spoken_over_http, url, voice) for voice in voices}
    together = {voice: call.result() for voice, call in calls.items()}
    assert overlapped(calls.values()), "the three requests were never in flight together"
    for voice in voices:
        assert_same_audio(together[voice], alone[voice], f"voice {voice} in the batch")


def as_pcm16(samples: np.ndarray) -> np.ndarray:
    """csm_tts's float samples as the gateway's `pcm` answer carries them."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")


def test_openais_client_picks_an_adapter_by_voice(triton_server, adapter_voices, gateway):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=GATEWAY_API_KEY, max_retries=0, timeout=120) as sdk:

        def speak(voice: str) -> np.ndarray:
            answer = sdk.audio.speech.create(
                model="tts-1",
                voice=voice,
                input=WORDS,
                response_format="pcm",
                extra_body={"seed": SEED, "max_audio_seconds": SECONDS, "speaker": 1},
            )
            return np.frombuffer(answer.content, "<i2")

        spoken = {ADAPTER_A: speak(ADAPTER_A), ADAPTER_B: speak(ADAPTER_B), BASE: speak("alloy")}
    for voice, audio in spoken.items():
        expected = as_pcm16(spoken_over_http(triton_server.http_url, voice))
        np.testing.assert_array_equal(audio, expected, err_msg=f"voice {voice}: the gateway's audio is csm_tts's")
    assert_distinct(spoken)


def test_registering_and_deleting_an_adapter_leaves_running_streams_untouched(
    triton_server, grpc_client, adapter_voices
):
    """While an adapter stream and a base stream run: a third adapter voice (B's files
    under another id) is registered, speaks (loaded into the engine's adapter bank beside
    the running one), and is deleted. The streams end normally with the audio they give
    without any of that; the new voice spoke exactly as B does."""
    url, seconds, voices = triton_server.grpc_url, 4.0, (ADAPTER_A, BASE)
    alone = {voice: streamed_alone(url, voice, seconds) for voice in voices}
    b_alone = spoken_over_http(triton_server.http_url, ADAPTER_B)
    p = Protocol("grpc", grpc, grpc_client)

    streams = {voice: Stream(url, voice, seconds) for voice in voices}
    for stream in streams.values():
        assert stream.first_chunk.wait(timeout=120), stream.error
    grpc_client.infer("voice_register", adapter_inputs(grpc, ADAPTER_C, adapter_voices[ADAPTER_B]), headers=token())
    try:
        c_spoken = spoken_over_http(triton_server.http_url, ADAPTER_C)
    finally:
        deleted = delete(p, ADAPTER_C)
    changed_at = time.monotonic()
    assert deleted["voice_id"] == ADAPTER_C and deleted["kind"] == "adapter"
    together = {voice: stream.result() for voice, stream in streams.items()}
    assert all(stream.ended > changed_at for stream in streams.values()), (
        "a stream ended before the register, speak and delete were done: make it longer"
    )
    for voice in voices:
        assert_same_audio(together[voice], alone[voice], f"voice {voice} beside the changes")
    assert_same_audio(c_spoken, b_alone, "B's adapter under another id speaks as B")


def test_a_voice_id_deleted_and_registered_again_speaks_with_its_new_adapter(
    grpc_client, triton_server, adapter_voices
):
    """An adapter voice retrained and registered again under its id (delete, then register)
    speaks with the new weights, not the ones the engine still holds from before."""
    url, p = triton_server.http_url, Protocol("grpc", grpc, grpc_client)
    expected = {voice: spoken_over_http(url, voice) for voice in (ADAPTER_A, ADAPTER_B)}
    for voice in (ADAPTER_B, ADAPTER_A):  # B's files first, then A's, under the one id
        grpc_client.infer("voice_register", adapter_inputs(grpc, ADAPTER_C, adapter_voices[voice]), headers=token())
        try:
            spoken = spoken_over_http(url, ADAPTER_C)
        finally:
            delete(p, ADAPTER_C)
        assert_same_audio(spoken, expected[voice], f"{ADAPTER_C} registered with {voice}'s files")
