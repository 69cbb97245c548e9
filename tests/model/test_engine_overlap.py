"""Overlapped steps (EngineConfig.overlap_steps, on with CUDA graphs): frame N+1 is
launched before frame N's codes are read. The CPU computes a launch before it returns,
so there the logic is what is tested: each step hands out the frame of the step before,
and every request's codes equal the sequential engine's (test_engine.py runs its
joining, leaving, seeded, streaming and end-of-speech tests both ways, against
transformers' generate)."""

from __future__ import annotations

import numpy as np

from csm_triton.engine import EngineConfig, FinishReason, GenerationEngine
from tests.model.test_engine import TARGETS, request


def test_the_cpu_engine_does_not_overlap_unless_asked(lm):
    assert GenerationEngine(lm, EngineConfig(max_slots=1)).overlap_steps is False
    assert GenerationEngine(lm, EngineConfig(max_slots=1, overlap_steps=True)).overlap_steps is True


def test_each_overlapped_step_hands_out_the_frame_launched_the_step_before(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1, overlap_steps=True))
    chunks = []
    engine.submit(request(builder, TARGETS[0], 3, stream_every=1), callback=chunks.append)
    engine.step()
    assert chunks == [] and engine.has_work(), "frame 1 launched, not read yet"
    delivered = []
    while engine.has_work():
        engine.step()
        delivered.append(sum(len(c.codes) for c in chunks))
    # Steps 2 and 3 read frames 1 and 2 (launching 2 and 3); step 4 reads frame 3, whose
    # request ends there, and launches nothing: its slot is free.
    assert delivered == [1, 2, 3] and engine.steps == 3
    assert chunks[-1].finished and chunks[-1].reason == FinishReason.MAX_FRAMES


def test_a_frame_in_flight_for_a_request_that_ended_is_dropped(lm, builder):
    """Each request ends at its frame cap while the next frame is already launched for
    it; a cancelled one leaves with a frame in flight too. Nothing extra reaches anyone,
    and the slots left are the sequential engine's codes."""

    def run(overlap: bool) -> list:
        engine = GenerationEngine(lm, EngineConfig(max_slots=3, overlap_steps=overlap))
        handles = [engine.submit(request(builder, target, 4 + 3 * i)) for i, target in enumerate(TARGETS[:3])]
        for _ in range(3):
            engine.step()
        handles[2].cancel()
        engine.run_until_idle()
        assert engine.stats()["slots_in_use"] == 0 and engine._in_flight is None
        return [handle.result(timeout=1) for handle in handles]

    overlapped, sequential = run(True), run(False)
    assert [len(r.codes) for r in overlapped[:2]] == [4, 7]
    assert overlapped[2].reason == FinishReason.CANCELLED
    for ours, theirs in zip(overlapped[:2], sequential[:2]):
        assert ours.reason == theirs.reason == FinishReason.MAX_FRAMES
        np.testing.assert_array_equal(ours.codes, theirs.codes)
    # Cancelled after 3 steps: sequential has read 3 frames; overlapped 2 (the third was in flight).
    assert len(sequential[2].codes) == 3 and len(overlapped[2].codes) == 2
    np.testing.assert_array_equal(overlapped[2].codes, sequential[2].codes[:2])


def test_a_request_that_fills_the_context_leaves_no_frame_past_it_while_others_run_on(lm, builder):
    """Its last frame is at the context's last position; the frame launched after it for
    it (while a batch-mate still wants frames) must stay inside the cache."""
    tokens = len(request(builder, TARGETS[0], 1).input_ids)
    results = {}
    for overlap in (False, True):
        engine = GenerationEngine(lm, EngineConfig(max_slots=2, max_context=tokens + 8, overlap_steps=overlap))
        full = engine.submit(request(builder, TARGETS[0], 8))  # prompt + frames == the context
        for _ in range(4):
            engine.step()
        later = engine.submit(request(builder, TARGETS[0], 8))
        engine.run_until_idle()
        results[overlap] = [full.result(timeout=1), later.result(timeout=1)]
    for ours, theirs in zip(results[True], results[False]):
        assert ours.reason == theirs.reason == FinishReason.MAX_FRAMES, (ours.error, theirs.error)
        np.testing.assert_array_equal(ours.codes, theirs.codes)
