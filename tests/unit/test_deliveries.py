"""The engine hands chunks, endings and stats to their receivers on a thread of its own
(engine.requests.Deliveries): in order, without the frame loop waiting on a slow
receiver (a Triton send is an IPC round trip), synchronously when stepped by hand, and
all of them answered before a device failure ends the process."""

from __future__ import annotations

import threading
import time

from csm_triton.engine import EngineConfig, GenerationEngine, GenerationRequest
from csm_triton.engine.requests import Deliveries

# tests/model/test_engine.py's first two targets and its request() without a voice: that
# module is not imported, because importing it loads transformers' processors and models
# into every xdist worker at collection (seconds each), for two strings and three lines.
TARGETS = ["Hello there.", "How are you doing today, my friend?"]


def request(builder, target, frames, **options):
    prompt = builder.prepare(target)
    options.setdefault("greedy", "seed" not in options)
    return GenerationRequest(prompt.input_ids, prompt.audio_codes, max_frames=frames, **options)


def test_hand_offs_keep_their_order_and_one_failing_receiver_stops_none_of_the_others(caplog):
    deliveries, seen = Deliveries(), []
    deliveries.start()
    for index in range(200):
        deliveries.send(seen.append, index)
        if index == 50:
            deliveries.send(lambda: 1 / 0)
    assert deliveries.drain(timeout=5)
    deliveries.stop(timeout=5)
    assert seen == list(range(200))
    assert "a delivery failed" in caplog.text
    deliveries.send(seen.append, "inline")  # stopped: at once, on this thread
    assert seen[-1] == "inline"


def test_a_slow_receiver_does_not_hold_the_frame_loop(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=2, warm_up=False))
    chunks_at, release = [], threading.Event()

    def slow(chunk):  # a receiver stuck in an IPC for the first chunk
        chunks_at.append(time.monotonic())
        if len(chunks_at) == 1:
            release.wait(10)

    engine.start()
    try:
        handle = engine.submit(request(builder, TARGETS[1], 12, stream_every=1), callback=slow)
        deadline = time.monotonic() + 60
        while engine.frames_generated < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        generated_while_blocked = engine.frames_generated
        release.set()
    finally:
        engine.stop()
    assert handle is not None and generated_while_blocked >= 12, "the engine waited on its receiver"
    assert len(chunks_at) >= 12  # every chunk and the ending still arrived, after the receiver woke


def test_stepped_by_hand_the_engine_delivers_at_once(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1, warm_up=False))
    got = []
    engine.submit(request(builder, TARGETS[0], 3, stream_every=1), callback=got.append)
    engine.step()
    assert got, "a chunk of the first frame, delivered within step()"
