"""The prefix cache per turn boundary on the tiny model: a conversation that grows by one
turn reuses the keys and values of the turns before, and every answer is the one a cold
engine gives (fp32 CPU: bit-exact by design, hit or miss)."""

from __future__ import annotations

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.core import segments
from csm_triton.core.prompt import Turn
from csm_triton.engine import EngineConfig, FinishReason, GenerationEngine, GenerationRequest
from csm_triton.engine.prefix_cache import PrefillPlan

TURNS = [("Hello, who is there?", 0, 9), ("It is me, your neighbour.", 1, 12), ("Oh, come in then!", 0, 7)]


def turn(index: int, codes: np.ndarray | None = None) -> Turn:
    text, speaker, frames = TURNS[index]
    if codes is None:
        codes = np.random.default_rng(index).integers(0, C.CODEBOOK_SIZE, (frames, C.NUM_CODEBOOKS))
    return Turn(text, speaker, codes)


def request(builder, context, text="Sit down, please.", frames=6, **options) -> GenerationRequest:
    prompt = builder.build([*context, Turn(text, 1)])
    options.setdefault("greedy", "seed" not in options)
    return GenerationRequest(prompt.input_ids, prompt.audio_codes, max_frames=frames, **options)


def run(engine, generation) -> np.ndarray:
    handle = engine.submit(generation)
    engine.run_until_idle()
    result = handle.result(timeout=1)
    assert result.reason == FinishReason.MAX_FRAMES, result
    return result.codes


def cold(lm, generation) -> np.ndarray:
    """The same request on an engine that caches nothing."""
    return run(GenerationEngine(lm, EngineConfig(max_slots=1, prefix_cache_bytes=0)), generation)


def chunk_tokens(builder, context) -> list[int]:
    """Tokens of each context turn's chunk (what a hit on it reuses)."""
    ends = PrefillPlan.of(request(builder, context), builder.audio_id, builder.audio_eos_id).ends
    return np.diff([0, *ends])[:-1].tolist()


@pytest.mark.parametrize("sampling", [{}, {"seed": 1234, "temperature": 0.9, "top_k": 50}], ids=["greedy", "seeded"])
def test_a_conversation_grown_by_one_turn_reuses_the_turns_before_and_answers_as_a_cold_run(lm, builder, sampling):
    engine = GenerationEngine(lm, EngineConfig(max_slots=2))
    first = request(builder, [turn(0), turn(1)], **sampling)
    codes = run(engine, first)
    assert engine.stats()["prefix_cache_misses"] == 1 and engine.stats()["prefix_cache_hits"] == 0
    np.testing.assert_array_equal(codes, cold(lm, first))

    # The next request: the same two turns, the first answer as a third, then new text.
    grown = [turn(0), turn(1), Turn("Sit down, please.", 1, codes)]
    second = request(builder, grown, "Thank you, I will.", **sampling)
    np.testing.assert_array_equal(run(engine, second), cold(lm, second))
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 1 and stats["prefix_cache_misses"] == 1
    assert stats["prefix_cache_tokens_reused"] == sum(chunk_tokens(builder, grown)[:2])

    # Asked again, all three turns come from the cache.
    np.testing.assert_array_equal(run(engine, second), cold(lm, second))
    assert engine.stats()["prefix_cache_tokens_reused"] == (
        sum(chunk_tokens(builder, grown)[:2]) + sum(chunk_tokens(builder, grown))
    )


def test_a_turn_with_other_audio_is_not_reused_nor_are_the_turns_after_it(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1))
    run(engine, request(builder, [turn(0), turn(1), turn(2)]))
    other_audio = turn(1, np.ones((12, C.NUM_CODEBOOKS), np.int64))
    changed = request(builder, [turn(0), other_audio, turn(2)])
    np.testing.assert_array_equal(run(engine, changed), cold(lm, changed))
    assert engine.stats()["prefix_cache_tokens_reused"] == chunk_tokens(builder, [turn(0)])[0]


def test_an_evicted_tail_turn_is_computed_again_with_the_same_codes(lm, builder):
    context = [turn(0), turn(1), turn(2)]
    per_token = lm.backbone_bytes_per_token()
    a, b, c = (tokens * per_token for tokens in chunk_tokens(builder, context))
    other = [Turn("Something else entirely.", 2, np.full((5, C.NUM_CODEBOOKS), 3, np.int64))]
    e = chunk_tokens(builder, other)[0] * per_token
    # Room for A, B and the other voice, not for C as well: C, the least recently used
    # (a chain is refreshed head last), is evicted, so the chain ends after B.
    engine = GenerationEngine(lm, EngineConfig(max_slots=1, prefix_cache_bytes=a + b + e + c // 2))
    run(engine, request(builder, context))
    assert len(engine.prefix_cache) == 3
    run(engine, request(builder, other))
    assert len(engine.prefix_cache) == 3 and engine.prefix_cache.nbytes <= engine.prefix_cache.max_bytes
    again = request(builder, context, "Another line.")
    np.testing.assert_array_equal(run(engine, again), cold(lm, again))
    assert engine.stats()["prefix_cache_tokens_reused"] == (a + b) // per_token


def test_a_budget_smaller_than_one_turn_keeps_nothing(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1, prefix_cache_bytes=1024))
    generation = request(builder, [turn(0)])
    run(engine, generation)
    np.testing.assert_array_equal(run(engine, generation), cold(lm, generation))
    assert len(engine.prefix_cache) == 0 and engine.stats()["prefix_cache_misses"] == 2


def test_prefix_cache_turns_bounds_what_is_stored(lm, builder):
    context = [turn(0), turn(1), turn(2)]
    engine = GenerationEngine(lm, EngineConfig(max_slots=1))
    run(engine, request(builder, context, prefix_cache_turns=1))
    assert len(engine.prefix_cache) == 1
    run(engine, request(builder, context, prefix_cache_turns=0))
    assert len(engine.prefix_cache) == 1 and engine.stats()["prefix_cache_hits"] == 1
    unbounded = request(builder, context, "Another line.")
    np.testing.assert_array_equal(run(engine, unbounded), cold(lm, unbounded))
    tokens = chunk_tokens(builder, context)
    assert engine.stats()["prefix_cache_tokens_reused"] == 2 * tokens[0]
    assert len(engine.prefix_cache) == 3


def test_later_long_text_segments_store_only_the_requests_own_turns():
    audio, audio_eos = 90, 91
    first = np.array([1, 2, audio, audio_eos, 3, audio, audio_eos, 5, 6], np.int64)
    chain = segments.SegmentChain.from_prepared(
        {
            "input_ids": first,
            "prompt_codes": np.full((2, C.NUM_CODEBOOKS), 3, np.int64),
            "segment_ids": np.array([5, 6, 7, 8], np.int64),
            "segment_token_counts": np.array([2, 2], np.int32),
            "segment_max_frames": np.array([40, 40], np.int32),
            "audio_token_ids": np.array([audio, audio_eos]),
        }
    )
    assert "prefix_cache_turns" not in chain.lm_inputs(0, {}, 99)  # nothing generated in its prompt
    chain.record(0, np.full((4, C.NUM_CODEBOOKS), 7))
    second = chain.lm_inputs(1, {}, 99)
    assert np.count_nonzero(second["input_ids"] == audio_eos) == 3  # two own turns + the generated one
    assert second["prefix_cache_turns"].tolist() == [2]


def test_a_failed_prefill_stores_nothing(lm, builder, monkeypatch):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1))
    real, calls = lm.backbone_forward, []

    def fails_on_the_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "backbone_forward", fails_on_the_third_chunk)
    generation = request(builder, [turn(0), turn(1), turn(2)])
    handle = engine.submit(generation)
    engine.run_until_idle()
    assert handle.result(timeout=1).reason == FinishReason.ERROR
    assert len(engine.prefix_cache) == 0 and engine.prefix_cache.nbytes == 0
    assert engine.stats()["prefix_cache_misses"] == 0 and engine.stats()["slots_in_use"] == 0
    monkeypatch.undo()
    np.testing.assert_array_equal(run(engine, generation), cold(lm, generation))


def test_a_request_cancelled_during_its_prefill_stores_nothing(lm, builder, monkeypatch):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1))
    handle = engine.submit(request(builder, [turn(0), turn(1), turn(2)]))
    real = lm.backbone_forward

    def cancels_after_one_chunk(*args, **kwargs):
        handle.cancel()  # as engine.cancel() would, from another thread
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "backbone_forward", cancels_after_one_chunk)
    engine.run_until_idle()
    result = handle.result(timeout=1)
    assert result.reason == FinishReason.CANCELLED and len(result.codes) == 0
    assert len(engine.prefix_cache) == 0 and engine.stats()["slots_in_use"] == 0
