"""A 5,000-character text end to end against the real tritonserver: csm_tts_stream streams
its segments in order, the first audio before the second segment is asked for, every
segment within its frame budget (FINISH_REASONS, SEGMENT_FRAMES), the joins between
segments no worse than the chunk joins inside one, the endings counted in the metrics,
the KV slots free afterwards; csm_tts returns the same text whole.

Cost: the tiny random checkpoint never emits its end frame, so every segment runs to its
budget; at the default 0.2 s per character that is 30 s of audio per segment (the default
cap), ~8 minutes of audio for this text. The module loads csm_prepare with the documented
deployment knob `segment_seconds_per_char` set to 0.005 (1.5 s per 300-character segment)
and `segment_min_seconds` 0.5 through Triton's model-load API, asserts the budgets it set,
and loads csm_prepare from its repository again afterwards.
"""

from __future__ import annotations

import json
import queue
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpc

from csm_triton import constants as C
from csm_triton.core import normalize, segments, text_split
from csm_triton.core.stream_decoder import snr_db
from loadtest.segment_joins import join_snrs, joins, long_text

from .conftest import segment_budget, slots_in_use
from .test_tts import tensor, text

pytestmark = pytest.mark.integration
SECONDS_PER_CHAR, MIN_SECONDS = 0.005, 0.5
TEXT = long_text(5000)
PARTS = text_split.split_text(TEXT, normalize=normalize.normalize_texts)  # as csm_prepare splits it
BUDGETS = [segments.segment_max_frames(p, SECONDS_PER_CHAR, MIN_SECONDS) for p in PARTS]
SEED = 3


def stream_model_stats(server, model: str) -> int:
    """Triton's count of `model`'s requests, read with urllib: it is also called from the
    gRPC stream's callback thread, where the session's gevent HTTP client cannot run."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


def segment_counts(server, model: str) -> dict[str, float]:
    """csm_segments_total of `model`, by reason."""
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    counts = {}
    for line in lines:
        if line.startswith("csm_segments_total{") and f'model="{model}"' in line:
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = float(line.rsplit(" ", 1)[1])
    return counts


@pytest.fixture(scope="module")
def long_text_budget(triton_server, grpc_client):
    with segment_budget(triton_server, grpc_client, SECONDS_PER_CHAR, MIN_SECONDS):
        yield BUDGETS


def long_inputs():
    return [tensor(grpc, "TEXT", text(TEXT)), tensor(grpc, "SEED", np.array([SEED], np.int64))]


@pytest.fixture(scope="module")
def streamed(long_text_budget, grpc_client, triton_server):
    """The stream of the long text: (arrival, chunk) pairs, the final outputs, and what
    the server had done when the first chunk arrived."""
    lm_before = stream_model_stats(triton_server, "csm_lm")
    counted_before = segment_counts(triton_server, "csm_tts_stream")
    arrivals, at_first_chunk = queue.Queue(), {}

    def on_response(result, error):
        audio = None if error is not None else result.as_numpy("AUDIO")
        if audio is not None and audio.size and not at_first_chunk:  # read before the next response comes
            at_first_chunk["lm_requests"] = stream_model_stats(triton_server, "csm_lm") - lm_before
        arrivals.put((time.perf_counter(), result, error))

    grpc_client.start_stream(callback=on_response)
    chunks, final = [], None
    started = time.perf_counter()
    try:
        grpc_client.async_stream_infer("csm_tts_stream", long_inputs(), enable_empty_final_response=True)
        while True:
            arrived, result, error = arrivals.get(timeout=300)
            assert error is None, error
            audio = result.as_numpy("AUDIO")
            if audio is not None and audio.size:
                chunks.append((arrived - started, audio))
            if result.as_numpy("FINISH_REASONS") is not None:
                final = result
            flag = result.get_response().parameters.get("triton_final_response")
            if flag is not None and flag.bool_param:
                break
    finally:
        grpc_client.stop_stream()
    return {
        "chunks": chunks,
        "final": final,
        "seconds": time.perf_counter() - started,
        "at_first_chunk": at_first_chunk,
        "lm_requests": stream_model_stats(triton_server, "csm_lm") - lm_before,
        "counted": {
            reason: value - counted_before.get(reason, 0.0)
            for reason, value in segment_counts(triton_server, "csm_tts_stream").items()
        },
    }


@pytest.fixture(scope="module")
def offline(long_text_budget, grpc_client):
    return grpc_client.infer("csm_tts", long_inputs(), client_timeout=300)


def test_the_text_is_many_segments_each_with_the_budget_the_deployment_set(long_text_budget):
    assert len(TEXT) >= 4900 and len(PARTS) >= 15
    # 1.5 s for a full 300-character segment, at least 0.5 s: far below the 30 s default cap.
    # The budgets are the normalized segments' (what is spoken: "1990s" packs as words).
    assert 15 <= max(long_text_budget) <= 19 and min(long_text_budget) >= int(MIN_SECONDS * C.FRAME_RATE_HZ)


def test_every_segment_streams_in_order_within_its_budget(streamed):
    final = streamed["final"]
    assert final is not None, "the final response carries FINISH_REASONS"
    reasons = [r.decode() for r in final.as_numpy("FINISH_REASONS")]
    frames = final.as_numpy("SEGMENT_FRAMES").tolist()
    assert len(reasons) == len(frames) == len(PARTS), "one ending per segment, none left out"
    # Timestamps: monotonic, back to back, covering the streamed audio to the sample.
    times = final.as_numpy("SEGMENT_TIMES")
    total_seconds = sum(len(audio) for _, audio in streamed["chunks"]) / C.SAMPLE_RATE
    assert times.shape == (len(PARTS), 2) and np.all(times[:, 1] >= times[:, 0])
    assert np.allclose(times[1:, 0], times[:-1, 1]) and times[0, 0] == 0.0
    assert np.allclose(times[:, 1] - times[:, 0], np.array(frames) * C.SAMPLES_PER_FRAME / C.SAMPLE_RATE, atol=1e-4)
    assert abs(times[-1, 1] - total_seconds) < 1e-3
    assert set(reasons) <= {segments.END_OF_SPEECH, segments.MAX_FRAMES}, reasons
    for reason, count, budget in zip(reasons, frames, BUDGETS):
        assert 0 < count <= budget and (reason == segments.END_OF_SPEECH or count == budget)
    # Each segment streams in its own schedule (a small first chunk, then full ones), one
    # segment after the other: the chunk sizes are the segments' schedules back to back.
    sizes = [len(audio) // C.SAMPLES_PER_FRAME for _, audio in streamed["chunks"]]
    expected = []
    for count in frames:
        schedule = [min(C.STREAM_FIRST_CHUNK_FRAMES, count)]
        while sum(schedule) < count:
            schedule.append(min(C.STREAM_CHUNK_FRAMES, count - sum(schedule)))
        expected += schedule
    assert sizes == expected
    assert streamed["lm_requests"] == len(PARTS), "one csm_lm generation per segment"


def test_the_first_audio_arrives_before_the_second_segment_is_asked_for(streamed):
    # Triton counts a csm_lm request once its execute took it (one per segment by the end):
    # when the first chunk arrived, only segment 0's generation had been asked for, so
    # audio leaves before the rest of the text is generated; it came early in the stream.
    assert streamed["at_first_chunk"] == {"lm_requests": 1}
    first_arrival = streamed["chunks"][0][0]
    assert first_arrival < streamed["seconds"] / 4, (first_arrival, streamed["seconds"])


def test_the_segment_endings_are_counted_and_the_slots_freed(streamed, triton_server):
    reasons = [r.decode() for r in streamed["final"].as_numpy("FINISH_REASONS")]
    counted = {reason: value for reason, value in streamed["counted"].items() if value}
    assert counted == {reason: float(reasons.count(reason)) for reason in set(reasons)}
    assert set(streamed["counted"]) == set(segments.FINISH_REASONS), "every series exported, at 0 too"
    deadline = time.monotonic() + 30
    while slots_in_use(triton_server) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slots_in_use(triton_server) == 0


def test_csm_tts_returns_the_same_segments_whole(streamed, offline, triton_server):
    frames = streamed["final"].as_numpy("SEGMENT_FRAMES")
    assert offline.as_numpy("SEGMENT_FRAMES").tolist() == frames.tolist(), "same seed, same segments"
    assert offline.as_numpy("FINISH_REASONS").tolist() == streamed["final"].as_numpy("FINISH_REASONS").tolist()
    audio = offline.as_numpy("AUDIO")
    assert audio.shape == (int(frames.sum()) * C.SAMPLES_PER_FRAME,)
    counted = segment_counts(triton_server, "csm_generate")
    assert set(counted) == set(segments.FINISH_REASONS) and sum(counted.values()) >= len(PARTS)


def test_segment_joins_are_no_worse_than_chunk_joins(streamed, offline):
    # The join measure of the chunk joins (streamed vs whole decode, snr_db), taken in
    # ±80 ms around each join. A decoder restarted per segment would drop the segment
    # joins to the no-context figure (~7 dB, loadtest/results/streaming_decode.md).
    whole = offline.as_numpy("AUDIO")
    stream_audio = np.concatenate([audio for _, audio in streamed["chunks"]])
    assert snr_db(whole, stream_audio) >= 30.0
    sizes = [len(audio) // C.SAMPLES_PER_FRAME for _, audio in streamed["chunks"]]
    segment_joins, chunk_joins = joins(streamed["final"].as_numpy("SEGMENT_FRAMES"), sizes)
    assert len(segment_joins) == len(PARTS) - 1 and chunk_joins
    at_segments, at_chunks = join_snrs(whole, stream_audio, segment_joins), join_snrs(whole, stream_audio, chunk_joins)
    assert np.median(at_segments) >= np.median(at_chunks) - 3.0, (at_segments, at_chunks)
    assert min(at_segments) >= 20.0, at_segments


def test_csm_lm_says_how_a_generation_ended_on_its_final_response(grpc_client):
    # What FINISH_REASONS is made of: csm_lm's own finish reason (the engine's), not a guess
    # from the frame count. 0.24 s = 3 frames, which the random weights always fill.
    prepared = grpc_client.infer("csm_prepare", [tensor(grpc, "TEXT", text("Three frames, please."))])
    inputs = [
        tensor(grpc, "input_ids", prepared.as_numpy("input_ids")),
        tensor(grpc, "prompt_codes", prepared.as_numpy("prompt_codes")),
        tensor(grpc, "MAX_AUDIO_SECONDS", np.array([0.24], np.float32)),
        tensor(grpc, "SEED", np.array([1], np.int64)),
    ]
    responses = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: responses.put((result, error)))
    frames, reasons = 0, []
    try:
        grpc_client.async_stream_infer("csm_lm", inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            codes, reason = result.as_numpy("codes"), result.as_numpy("finish_reason")
            frames += 0 if codes is None else len(codes)
            flag = result.get_response().parameters.get("triton_final_response")
            final = flag is not None and flag.bool_param
            if reason is not None:
                assert final, "finish_reason rides on the final response only"
                reasons.append(reason.tolist())
            if final:
                break
    finally:
        grpc_client.stop_stream()
    assert frames == 3 and reasons == [[b"max_frames"]]


SENTENCES = "It costs $5.30. Dr. Smith is here! Is that right? Yes."


def sentence_inputs():
    return [
        tensor(grpc, "TEXT", text(SENTENCES)),
        tensor(grpc, "SENTENCE_SEGMENTS", np.array([True])),
        tensor(grpc, "SEED", np.array([SEED], np.int64)),
    ]


def test_sentence_segments_time_every_sentence_whole_and_streamed(long_text_budget, grpc_client):
    whole = grpc_client.infer("csm_tts", sentence_inputs(), client_timeout=300)
    spoken = [t.decode() for t in whole.as_numpy("NORMALIZED_TEXT")]
    # one caption per sentence as written (the title "Dr." does not end one), as spoken
    assert len(spoken) == 4 and spoken[0] == "It costs five dollars and thirty cents." and spoken[-1] == "Yes."
    assert "Smith" in spoken[1] and spoken[2] == "Is that right?"
    times, frames = whole.as_numpy("SEGMENT_TIMES"), whole.as_numpy("SEGMENT_FRAMES")
    audio = whole.as_numpy("AUDIO")
    # monotonic, back to back, covering the audio, each boundary where the engine's frame
    # counts put it (exact to the sample: the frames before it x 80 ms)
    assert times.shape == (4, 2) and times[0, 0] == 0.0 and np.all(times[:, 1] > times[:, 0])
    assert np.array_equal(times[1:, 0], times[:-1, 1])
    assert np.allclose(times[:, 1], np.cumsum(frames) * C.SAMPLES_PER_FRAME / C.SAMPLE_RATE, atol=1e-5)
    assert abs(times[-1, 1] - audio.size / C.SAMPLE_RATE) < 1e-5
    # The same sentences streamed: the same segments, the same audio at the same seed.
    streamed = []
    grpc_client.start_stream(callback=lambda result, error: streamed.append((result, error)))
    try:
        grpc_client.async_stream_infer("csm_tts_stream", sentence_inputs(), enable_empty_final_response=True)
        deadline = time.monotonic() + 300
        while not any(r is not None and r.as_numpy("SEGMENT_TIMES") is not None for r, _ in streamed):
            assert time.monotonic() < deadline and not any(e is not None for _, e in streamed), streamed
            time.sleep(0.05)
    finally:
        grpc_client.stop_stream()
    final = next(r for r, _ in streamed if r.as_numpy("SEGMENT_TIMES") is not None)
    assert final.as_numpy("SEGMENT_FRAMES").tolist() == frames.tolist()
    assert np.array_equal(final.as_numpy("SEGMENT_TIMES"), times)
    chunks = [r.as_numpy("AUDIO") for r, _ in streamed if r.as_numpy("AUDIO") is not None]
    assert snr_db(audio, np.concatenate(chunks)) >= 30.0
