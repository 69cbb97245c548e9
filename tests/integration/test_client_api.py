"""csm_clients against the real tritonserver: every call of VoiceCloner over gRPC and
HTTP, the asyncio variant, and errors as the client's exceptions with the server's
own messages."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import soundfile
import tritonclient.grpc as grpc

from csm_clients import (
    MODEL_SAMPLE_RATE,
    AsyncVoiceCloner,
    InvalidRequest,
    PermissionDenied,
    Reference,
    ServerUnavailable,
    VoiceCloner,
)
from csm_triton import constants as C
from csm_triton.core.stream_decoder import snr_db
from csm_triton.serving.process import free_ports

from .client_fixtures import long_clip, speech_clip
from .conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration
SHORT = {"max_audio_seconds": 0.5, "seed": 3}


def frames_of(seconds: float) -> int:
    return int(np.ceil(seconds * C.FRAME_RATE_HZ)) * C.SAMPLES_PER_FRAME


@pytest.fixture(params=["grpc", "http"])
def cloner(request, triton_server):
    url = triton_server.grpc_url if request.param == "grpc" else triton_server.http_url
    with VoiceCloner(url, request.param, admin_token=ADMIN_TOKEN, timeout=60) as client:
        yield client


def test_synthesize_gives_24khz_speech_reproducible_by_seed(cloner):
    assert cloner.is_ready()
    first = cloner.synthesize("Hello from the client.", **SHORT)
    again = cloner.synthesize("Hello from the client.", **SHORT)
    assert first.sample_rate == MODEL_SAMPLE_RATE == C.SAMPLE_RATE
    assert first.audio.dtype == np.float32 and first.audio.shape == (frames_of(0.5),)
    # Exact: the same seed gives the same codes, and the decoder and watermark then see
    # the same inputs, one request at a time, in the same server.
    np.testing.assert_array_equal(first.audio, again.audio)


def test_clone_voice_from_file(cloner, speech_clip):
    speech = cloner.clone_voice_from_file(
        speech_clip.path, speech_clip.transcript, "Said in a cloned voice.", temperature=0.7, top_k=20, **SHORT
    )
    assert speech.seconds == pytest.approx(frames_of(0.5) / C.SAMPLE_RATE) and np.abs(speech.audio).max() > 0


def test_stream_yields_chunks_that_add_up_to_the_offline_result(cloner):
    offline = cloner.synthesize("Streamed, chunk by chunk.", max_audio_seconds=1.5, seed=5)
    chunks = list(cloner.stream("Streamed, chunk by chunk.", max_audio_seconds=1.5, seed=5))
    assert len(chunks) >= 2 and chunks[0].audio.size == C.STREAM_FIRST_CHUNK_FRAMES * C.SAMPLES_PER_FRAME
    streamed = np.concatenate([chunk.audio for chunk in chunks])
    assert streamed.shape == offline.audio.shape and snr_db(offline.audio, streamed) >= 30.0


def test_stopping_a_stream_early_leaves_the_client_usable(cloner):
    chunk = next(iter(cloner.stream("A long text that will not be heard to the end.", max_audio_seconds=20, seed=1)))
    assert chunk.audio.size
    assert cloner.synthesize("Still here.", **SHORT).audio.size


def test_voice_round_trip(cloner, speech_clip):
    voice_id = f"client-{cloner.protocol}"
    stored = cloner.register_voice(voice_id, speech_clip.path, speech_clip.transcript)
    try:
        assert stored["voice_id"] == voice_id and stored["transcript"] == speech_clip.transcript
        assert voice_id in {voice["voice_id"] for voice in cloner.list_voices()}
        assert cloner.synthesize("In a stored voice.", voice=voice_id, **SHORT).audio.size
    finally:
        assert cloner.delete_voice(voice_id)["voice_id"] == voice_id
    assert voice_id not in {voice["voice_id"] for voice in cloner.list_voices()}
    with pytest.raises(InvalidRequest, match=f"unknown voice '{voice_id}'"):
        cloner.synthesize("Gone.", voice=voice_id)


def test_voice_writes_without_the_token_are_permission_denied(triton_server, speech_clip):
    for protocol, url in (("grpc", triton_server.grpc_url), ("http", triton_server.http_url)):
        with VoiceCloner(url, protocol) as anonymous:
            with pytest.raises(PermissionDenied, match="x-csm-admin-token"):
                anonymous.register_voice("nobody-may", speech_clip.path, speech_clip.transcript)
        with VoiceCloner(url, protocol, admin_token="wrong") as wrong:
            with pytest.raises(PermissionDenied, match="wrong admin token"):
                wrong.delete_voice("nobody-may")


def test_watermark_detection(cloner, speech_clip):
    speech = cloner.synthesize("Marked speech.", max_audio_seconds=1.0, seed=2)
    # The server's decision is the contract (SCORE >= its calibrated threshold, after the
    # clip's noise floor is removed; docs/api.md), not a particular score.
    marked = cloner.detect_watermark(speech)
    assert marked.watermarked and marked >= C.WATERMARK_THRESHOLD
    clean = cloner.detect_watermark(speech_clip.path)
    assert not clean.watermarked and clean <= 0.1
    assert cloner.detect_watermark(speech.audio, speech.sample_rate).watermarked


def test_limits_come_from_the_server(cloner, speech_clip, long_clip):
    cases = [
        (lambda: cloner.synthesize("  "), "'TEXT' is empty"),
        (lambda: cloner.synthesize("Hi.", temperature=0.0), "'TEMPERATURE' must be in"),
        (lambda: cloner.synthesize("Hi.", max_audio_seconds=1e4), "'MAX_AUDIO_SECONDS' must be in"),
        (lambda: cloner.clone_voice_from_file(long_clip, "Too long.", "Hi."), "REFERENCE_AUDIO"),
        (lambda: cloner.clone_voice_from_file(speech_clip.path, None, "Hi."), "REFERENCE_TEXT"),
        (lambda: cloner.register_voice("../escape", speech_clip.path, "x"), "VOICE_ID"),
        (lambda: list(cloner.stream("Hi.", top_k=0)), "'TOP_K' must be in [1, 2048]"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidRequest) as refused:
            call()
        assert message in str(refused.value) and "Traceback" not in str(refused.value)


def test_a_file_not_audio_is_refused_before_sending(cloner, tmp_path):
    junk = tmp_path / "notes.wav"
    junk.write_text("this is not audio")
    with pytest.raises(InvalidRequest, match="cannot read the reference clip as audio"):
        cloner.clone_voice_from_file(junk, "x", "Hi.")


def test_clips_above_24khz_are_resampled_by_the_client_as_the_server_would(
    triton_server, grpc_client, speech_clip, tmp_path
):
    samples, rate = soundfile.read(speech_clip.path, dtype="float32")
    import soxr

    hi_fi = soxr.resample(samples, rate, 48_000).astype(np.float32)
    stereo = tmp_path / "stereo-48k.flac"
    soundfile.write(stereo, np.stack([hi_fi, hi_fi], axis=1), 48_000)
    reference = Reference.from_file(stereo, speech_clip.transcript)
    assert reference.sample_rate == MODEL_SAMPLE_RATE and reference.samples.ndim == 1
    with VoiceCloner(triton_server.grpc_url) as cloner:
        ours = cloner.synthesize("Same audio, fewer bytes.", voice=reference, **SHORT).audio

    def tensor(name, value):  # the raw 48 kHz clip as tritonclient sends it: the server resamples
        item = grpc.InferInput(
            name,
            list(value.shape),
            {np.float32: "FP32", np.int32: "INT32", np.int64: "INT64", np.object_: "BYTES"}[value.dtype.type],
        )
        item.set_data_from_numpy(value)
        return item

    # The clip as the FLAC file holds it (16-bit), so that both paths start from the same
    # samples and differ only in who resamples: then the codes, and the audio, are equal
    # exactly (the same soxr, the same seed), not only where 16-bit rounding happens to
    # leave Mimi's codes alone.
    sent = soundfile.read(stereo, dtype="float32")[0][:, 0].copy()
    raw = grpc_client.infer(
        "csm_tts",
        [
            tensor("TEXT", np.array([b"Same audio, fewer bytes."], dtype=object)),
            tensor("REFERENCE_AUDIO", sent),
            tensor("REFERENCE_SAMPLE_RATE", np.array([48_000], np.int32)),
            tensor("REFERENCE_TEXT", np.array([speech_clip.transcript.encode()], dtype=object)),
            tensor("MAX_AUDIO_SECONDS", np.array([0.5], np.float32)),
            tensor("SEED", np.array([3], np.int64)),
        ],
    ).as_numpy("AUDIO")
    np.testing.assert_array_equal(ours, raw)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_unreachable_server_is_server_unavailable(protocol):
    url = f"127.0.0.1:{free_ports(1)[0]}"
    with VoiceCloner(url, protocol, timeout=5) as cloner:
        assert not cloner.is_ready()
        with pytest.raises(ServerUnavailable):
            cloner.list_voices()
        with pytest.raises(ServerUnavailable):
            list(cloner.stream("Hi."))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client_many_requests_at_once(triton_server, protocol, speech_clip):
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url

    async def run():
        async with AsyncVoiceCloner(url, protocol, admin_token=ADMIN_TOKEN, timeout=60) as cloner:
            assert await cloner.is_ready()
            texts = [f"Request number {index}." for index in range(4)]
            speeches = await asyncio.gather(
                *(cloner.synthesize(text, seed=i, max_audio_seconds=0.5) for i, text in enumerate(texts))
            )
            chunks = [chunk async for chunk in cloner.stream("Async stream.", max_audio_seconds=1.0, seed=1)]
            voice_id = f"async-{protocol}"
            await cloner.register_voice(voice_id, speech_clip.path, speech_clip.transcript)
            listed = await cloner.list_voices()
            await cloner.delete_voice(voice_id)
            score = await cloner.detect_watermark(speeches[0])
            with pytest.raises(InvalidRequest, match="'TOP_K' must be in"):
                await cloner.synthesize("Bad.", top_k=0)
            return speeches, chunks, listed, score

    speeches, chunks, listed, score = asyncio.run(run())
    assert [s.audio.size for s in speeches] == [frames_of(0.5)] * 4
    assert sum(chunk.audio.size for chunk in chunks) == frames_of(1.0)
    assert f"async-{protocol}" in json.dumps(listed) and score.watermarked
