"""Prompts admitted in one engine step are prefilled together (engine/prefill.py): one
backbone forward per round of chunks instead of one per chunk per prompt, and every
request still gets transformers' own codes (tiny model, fp32, greedy). A prompt that
breaks the shared forward fails alone; a cancelled one leaves no gap in the rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm_triton import constants as C
from csm_triton.core.prompt import Turn
from csm_triton.engine import EngineConfig, FinishReason, GenerationEngine, GenerationRequest
from csm_triton.engine.prefill import PrefillJob, prefill_together
from csm_triton.engine.prefix_cache import PrefixCache
from csm_triton.engine.requests import RequestHandle
from tests.model.test_engine import (  # hf_model, processor, reference_*: its module fixtures, used by name
    TARGETS,
    hf_generate,
    hf_model,
    processor,
    reference_audio,
    reference_codes,
    request,
)
from tests.model.test_prefix_cache import cold  # the request alone, on an engine that caches nothing

FRAMES = 5


def conversation_request(builder, turns: int, text: str, frames: int = FRAMES) -> GenerationRequest:
    """A prompt of `turns` context turns (random codes) and a text: turns + 1 chunks."""
    context = [
        Turn(f"Turn number {i}, said aloud.", i % 2, np.random.default_rng(i).integers(0, C.CODEBOOK_SIZE, (4 + i, 32)))
        for i in range(turns)
    ]
    prompt = builder.build([*context, Turn(text, 1)])
    return GenerationRequest(prompt.input_ids, prompt.audio_codes, max_frames=frames, greedy=True)


def counting_forwards(lm, monkeypatch) -> list[tuple[int, int]]:
    """(rows, tokens) of every backbone forward a prefill makes from now on."""
    calls, real = [], lm.backbone_forward

    def counted(embeds, *args, **kwargs):
        calls.append(tuple(embeds.shape[:2]))
        return real(embeds, *args, **kwargs)

    monkeypatch.setattr(lm, "backbone_forward", counted)
    return calls


def test_prompts_admitted_together_take_one_forward_per_round_and_each_equals_generate(
    hf_model, processor, lm, builder, reference_audio, reference_codes, monkeypatch
):
    engine = GenerationEngine(lm, EngineConfig(max_slots=4))
    cloned = engine.submit(request(builder, TARGETS[3], FRAMES, reference_codes))  # 2 chunks: the reference, the text
    plain = [engine.submit(request(builder, target, FRAMES + i)) for i, target in enumerate(TARGETS[:3])]
    forwards = counting_forwards(lm, monkeypatch)
    engine.step()
    assert engine.stats()["slots_in_use"] == 4
    # Round 0: the four first chunks; round 1: the cloned prompt's text alone (first row).
    assert [rows for rows, _ in forwards] == [4, 1], forwards
    engine.run_until_idle()
    expected = hf_generate(hf_model, processor, TARGETS[3], FRAMES, reference_audio=reference_audio)
    np.testing.assert_array_equal(cloned.result(timeout=1).codes, expected)
    for i, (target, handle) in enumerate(zip(TARGETS, plain)):
        np.testing.assert_array_equal(
            handle.result(timeout=1).codes, hf_generate(hf_model, processor, target, FRAMES + i)
        )


def test_conversations_of_different_lengths_prefilled_together_equal_each_cold(lm, builder):
    generations = [conversation_request(builder, turns, TARGETS[turns]) for turns in (0, 3, 1, 2)]
    engine = GenerationEngine(lm, EngineConfig(max_slots=4, prefix_cache_bytes=0))
    handles = [engine.submit(generation) for generation in generations]
    engine.run_until_idle()
    for generation, handle in zip(generations, handles):
        result = handle.result(timeout=1)
        assert result.reason == FinishReason.MAX_FRAMES
        np.testing.assert_array_equal(result.codes, cold(lm, generation))


@torch.inference_mode()
def test_a_shared_prefill_leaves_each_row_as_its_prefill_alone_does(lm, builder):
    """Rows and hidden states directly: padding writes only past a prompt's end, clamped
    into a cache that ends one position after the longest prompt."""
    generations = [conversation_request(builder, turns, TARGETS[turns]) for turns in (1, 0, 3)]
    longest = max(len(g.input_ids) for g in generations)

    def prefill(jobs_of, first_row):
        cache, hidden = lm.new_backbone_cache(4, longest + 1), torch.zeros(4, lm.backbone_hidden_size)
        jobs = [PrefillJob.of(lm, PrefixCache(0), RequestHandle(g, None), 0, "") for g in jobs_of]
        done = prefill_together(lm, cache, hidden, PrefixCache(0), jobs, first_row)
        return cache, hidden, {id(job.handle.request): (job.row, end) for job, end in done}

    together = prefill(generations, 1)
    assert sorted(row for row, _ in together[2].values()) == [1, 2, 3]
    for generation in generations:
        row, end = together[2][id(generation)]
        assert end == len(generation.input_ids)
        cache, hidden, rows = prefill([generation], 0)
        assert rows[id(generation)] == (0, end)
        for ours, theirs in ((together[0].k, cache.k), (together[0].v, cache.v)):
            torch.testing.assert_close(ours[:, row, :, :end], theirs[:, 0, :, :end], atol=1e-5, rtol=0)
        torch.testing.assert_close(together[1][row], hidden[0], atol=1e-5, rtol=0)


def test_the_token_budget_counts_padding_spreads_prompts_over_steps_and_a_long_one_still_comes_in(lm, builder):
    generations = [request(builder, target, FRAMES) for target in TARGETS]
    lengths = [len(g.input_ids) for g in generations]
    assert lengths[0] < lengths[1] < lengths[3] and lengths[2] < lengths[3]
    # Two prompts in one forward cost twice the longer: their real tokens alone do not fit.
    unpadded = GenerationEngine(lm, EngineConfig(max_slots=4, prefill_tokens_per_step=lengths[0] + lengths[1]))
    for generation in generations[:2]:
        unpadded.submit(generation)
    unpadded.step()
    assert unpadded.stats()["slots_in_use"] == 1
    budget = 2 * lengths[1]  # the first two fit together, a third beside them not
    engine = GenerationEngine(lm, EngineConfig(max_slots=4, prefill_tokens_per_step=budget))
    handles = [engine.submit(generation) for generation in generations]
    engine.step()
    assert engine.stats()["slots_in_use"] == 2 and engine.stats()["waiting"] == 2
    engine.step()  # the third, then the fourth would cost 2 x its length > budget
    assert engine.stats()["slots_in_use"] == 3
    tight = GenerationEngine(lm, EngineConfig(max_slots=1, prefill_tokens_per_step=1))
    long = tight.submit(generations[3])
    tight.run_until_idle()
    engine.run_until_idle()
    np.testing.assert_array_equal(long.result(timeout=1).codes, cold(lm, generations[3]))
    assert [h.result(timeout=1).reason for h in handles] == [FinishReason.MAX_FRAMES] * 4


def test_a_prompt_that_breaks_the_shared_forward_fails_alone_and_its_batch_mates_are_served(
    hf_model, processor, lm, builder, monkeypatch
):
    generations = [request(builder, target, FRAMES) for target in TARGETS]
    poison = max(len(g.input_ids) for g in generations)  # TARGETS[3]: the widest, so every shared forward
    real = lm.backbone_forward

    def breaks_on_the_poison(embeds, *args, **kwargs):
        if embeds.shape[1] == poison:
            raise RuntimeError("The size of tensor a (3) must match the size of tensor b (4)")
        return real(embeds, *args, **kwargs)

    monkeypatch.setattr(lm, "backbone_forward", breaks_on_the_poison)
    engine = GenerationEngine(lm, EngineConfig(max_slots=4))
    handles = [engine.submit(generation) for generation in generations]
    engine.run_until_idle()
    results = [handle.result(timeout=1) for handle in handles]
    assert results[3].reason == FinishReason.ERROR and "prefill failed" in results[3].error
    for target, result in zip(TARGETS[:3], results):
        assert result.reason == FinishReason.MAX_FRAMES
        np.testing.assert_array_equal(result.codes, hf_generate(hf_model, processor, target, FRAMES))
    assert engine.stats()["slots_in_use"] == 0


def test_a_prompt_cancelled_during_a_shared_prefill_leaves_no_gap_in_the_rows(lm, builder, monkeypatch):
    generations = [conversation_request(builder, turns, TARGETS[turns]) for turns in (2, 0, 1)]
    engine = GenerationEngine(lm, EngineConfig(max_slots=3))
    handles = [engine.submit(generation) for generation in generations]
    real = lm.backbone_forward

    def cancels_the_longest(*args, **kwargs):
        handles[0].cancel()  # as engine.cancel() would, from another thread
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "backbone_forward", cancels_the_longest)
    engine.step()
    monkeypatch.undo()
    # Rows by chunks to compute: the cancelled prompt (3) in row 0, then the one-turn (2)
    # and the turnless prompt (1); with row 0 left free, both moved up one.
    assert [slot.row for slot in engine._active] == [0, 1]
    assert [slot.handle for slot in engine._active] == [handles[2], handles[1]]
    engine.run_until_idle()
    assert handles[0].result(timeout=1).reason == FinishReason.CANCELLED
    assert len(engine.prefix_cache) == 1, "the one-turn prompt's turn only: the cancelled prompt stores nothing"
    for generation, handle in zip(generations[1:], handles[1:]):
        np.testing.assert_array_equal(handle.result(timeout=1).codes, cold(lm, generation))


@pytest.mark.timeout(120)
def test_a_device_error_in_a_shared_prefill_answers_every_prompt_of_it(lm, builder, monkeypatch):
    def device_assert(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(lm, "backbone_forward", device_assert)
    engine = GenerationEngine(lm, EngineConfig(max_slots=3, warm_up=False))
    exited = []
    engine.on_fatal = exited.append
    handles = [engine.submit(request(builder, target, FRAMES)) for target in TARGETS[:3]]
    engine.start()
    assert [h.result(timeout=60).reason for h in handles] == [FinishReason.DEVICE_FAILURE] * 3
    engine._thread.join(60)
    assert len(exited) == 1
    engine.stop()


def test_the_csm_lm_config_sets_the_prefill_budget_and_the_overlap_switch_and_refuses_bad_values(tiny_checkpoint):
    from csm_triton.triton.models.lm import engine_from_config
    from csm_triton.triton.parameters import ParameterError, Parameters

    def parameters(**values):
        values = {"checkpoint_dir": tiny_checkpoint.name, "max_slots": "2", "cpu_kernels": "mkl", **values}
        return Parameters({"name": "csm_lm", "parameters": {k: {"string_value": v} for k, v in values.items()}})

    default = engine_from_config(tiny_checkpoint.parent, parameters(), "cpu").config
    assert (default.max_prefills_per_step, default.prefill_tokens_per_step) == (16, 2048)
    tuned = engine_from_config(
        tiny_checkpoint.parent, parameters(max_prefills_per_step="3", prefill_tokens_per_step="512"), "cpu"
    ).config
    assert (tuned.max_prefills_per_step, tuned.prefill_tokens_per_step) == (3, 512)
    assert default.overlap_steps is None  # auto: with CUDA graphs
    switched = engine_from_config(tiny_checkpoint.parent, parameters(overlap_steps="false"), "cpu")
    assert switched.config.overlap_steps is False and switched.overlap_steps is False
    with pytest.raises(ParameterError, match="overlap_steps"):
        engine_from_config(tiny_checkpoint.parent, parameters(overlap_steps="yes"), "cpu")
    with pytest.raises(ParameterError, match="prefill_tokens_per_step"):
        engine_from_config(tiny_checkpoint.parent, parameters(prefill_tokens_per_step="0"), "cpu")
