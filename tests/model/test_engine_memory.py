"""How many KV slots an engine gets on a GPU, decided on any machine: the sizing before
the buffers exist (plan_slots), and the refit after warm-up against what the device
really holds (refit_slots), through the engine itself with scripted memory readings.
(A real GPU runs the same path: tests/model/test_engine_gpu.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from csm_triton.engine import EngineConfig, GenerationEngine, GenerationRequest
from csm_triton.engine.capacity import WARM_UP_SHARE_OF_SLOT, MemoryReading, WarmUpReport, plan_slots, refit_slots

GIB, MIB = 2**30, 2**20
SLOT = 64 * MIB + 3 * MIB  # CSM-1B in bf16 at 2048 positions: 64 MiB of backbone KV, the rest per slot


def reading(total_gib: float, in_use_gib: float, reserved_gib: float = 0.0) -> MemoryReading:
    total, in_use = int(total_gib * GIB), int(in_use_gib * GIB)
    return MemoryReading(free=total - in_use, total=total, reserved=int(reserved_gib * GIB))


# --- before the buffers: plan_slots ------------------------------------------------------------
def test_the_budget_counts_what_is_in_use_the_prefix_cache_and_the_warm_up_share():
    h200 = reading(141, in_use_gib=4)  # the weights and the CUDA context
    plan = plan_slots(h200, 0.85, SLOT)
    budget = 141 * GIB * 0.85 - 4 * GIB
    assert plan.slots == int(budget // (SLOT * (1 + WARM_UP_SHARE_OF_SLOT)))
    with_cache = plan_slots(h200, 0.85, SLOT, prefix_cache_bytes=10 * GIB)
    assert with_cache.slots == int((budget - 10 * GIB) // (SLOT * (1 + WARM_UP_SHARE_OF_SLOT))) < plan.slots
    # A cap is a ceiling, not a demand: a smaller GPU gets what fits.
    assert plan_slots(h200, 0.85, SLOT, max_slots=256).slots == 256
    small = reading(16, in_use_gib=2)
    assert plan_slots(small, 0.85, SLOT, max_slots=256).slots == plan_slots(small, 0.85, SLOT).slots < 256


def test_no_slot_fitting_is_refused_with_the_figures():
    with pytest.raises(RuntimeError, match=r"no KV slot fits: .* GiB left within gpu_memory_fraction=0.5"):
        plan_slots(reading(80, in_use_gib=39.99), 0.5, SLOT, prefix_cache_bytes=256 * MIB)


# --- after warm-up: refit_slots ----------------------------------------------------------------
def test_a_warm_up_within_the_budget_keeps_the_slots():
    plan = plan_slots(reading(80, 4, reserved_gib=0), 0.85, SLOT, max_slots=64)
    own = 64 * SLOT * 1.5  # buffers and graphs, well inside 68 GiB
    assert refit_slots(plan, 64, reading(80, 4 + own / GIB, reserved_gib=own / GIB)) is None


def test_a_warm_up_that_took_more_than_assumed_gets_the_slots_its_measured_cost_allows():
    plan = plan_slots(reading(80, 4), 0.85, SLOT)
    slots = plan.slots
    own = slots * SLOT * 1.6  # the graphs' pool took 60 % of the buffers, not 11 %
    after = reading(80, 4 + own / GIB, reserved_gib=own / GIB)
    refit = refit_slots(plan, slots, after)
    assert refit == int((80 * 0.85 - 4) * GIB // (SLOT * 1.6))
    assert refit < slots


def test_what_another_model_took_meanwhile_is_not_charged_to_each_slot():
    plan = plan_slots(reading(80, 4), 0.85, SLOT)
    slots = plan.slots
    own = slots * SLOT * (1 + WARM_UP_SHARE_OF_SLOT)  # exactly as assumed
    mimi = 6 * GIB  # loaded on the same GPU while this engine warmed up
    refit = refit_slots(plan, slots, reading(80, 4 + (own + mimi) / GIB, reserved_gib=own / GIB))
    per_slot = own / slots
    assert refit == int(((80 * 0.85 - 4) * GIB - mimi) // per_slot)
    # Another model took all the room there was: no slot fits, said with the figures.
    few = plan_slots(reading(80, 4), 0.85, SLOT, max_slots=4)
    own = 4 * SLOT * (1 + WARM_UP_SHARE_OF_SLOT)
    with pytest.raises(RuntimeError, match=r"no KV slot fits after warm-up: .*other processes 64.00 GiB more"):
        refit_slots(few, 4, reading(80, 4 + (own + 64 * GIB) / GIB, reserved_gib=own / GIB))


# --- the engine's own path, scripted readings -----------------------------------------------------
class ScriptedMemory:
    """DeviceMemory's two methods; each reading() the next of `readings` (the last repeats)."""

    def __init__(self, readings: list[MemoryReading]):
        self.readings, self.calls = list(readings), []

    def release_cached(self) -> None:
        self.calls.append("release")

    def reading(self) -> MemoryReading:
        self.calls.append("reading")
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]

    def reserved(self) -> int:  # grows 1 MiB per look: each bucket's "graph" took 1 MiB
        self.looks = getattr(self, "looks", 0) + 1
        return self.looks * MIB


def test_the_engine_releases_load_copies_then_sizes_and_rebuilds_after_an_over_budget_warm_up(lm, builder, caplog):
    context = 256
    slot = lm.slot_bytes(context)
    total = 1000 * slot
    before = MemoryReading(free=total - 100 * slot, total=total, reserved=0)  # 10 % in use: the weights
    config = EngineConfig(max_context=context, gpu_memory_fraction=0.5, prefix_cache_bytes=0)
    planned = int(400 * slot // (slot * (1 + WARM_UP_SHARE_OF_SLOT)))  # 400 slots' worth of budget
    over = planned * slot * 2  # buffers and graphs took twice their bytes: over the budget
    fitting = 100 * slot  # after the rebuild: well inside
    memory = ScriptedMemory(
        [
            before,
            MemoryReading(total - 100 * slot - over, total, over),
            MemoryReading(total - 100 * slot - fitting, total, fitting),
        ]
    )
    engine = GenerationEngine(lm, config, memory=memory)
    assert memory.calls[:2] == ["release", "reading"], "sized before the load's freed copies were released"
    assert engine.max_slots == planned and engine.cache.k.shape[1] == planned

    with caplog.at_level("INFO", logger="csm_triton.engine.engine"):
        report = engine.warm_up()
    assert (
        engine.max_slots
        == refit_slots(engine.slot_budget, planned, MemoryReading(total - 100 * slot - over, total, over))
        == 200
    )
    assert engine.cache.k.shape[1] == engine.depth_cache.k.shape[1] == engine.hidden.shape[0] == 200
    assert max(engine.buckets.batch_sizes) == 200
    assert "over gpu_memory_fraction after warm-up, 200 slots instead of" in caplog.text
    assert "memory after warm-up: 200 KV slots" in caplog.text  # the budget, logged
    # Each bucket's graph memory, measured and summed up in the warm-up line.
    assert report.graph_bytes == [MIB] * len(report.timings) == [MIB] * len(engine.buckets.buckets())
    captured = WarmUpReport(report.timings, captured=True, graph_bytes=[MIB] * (len(report.timings) - 1) + [9 * MIB])
    assert (
        f"graph memory {(len(report.timings) + 8) * MIB / GIB:.2f} GiB, largest {tuple(report.timings[-1][0])} 9 MiB"
        in captured.summary()
    )
    assert all(line.endswith("1.0 MiB") for line in report.per_bucket())

    # The rebuilt engine generates as one that never was: the same greedy codes.
    prompt = builder.prepare("Hello there.")
    codes = []
    for candidate in (engine, GenerationEngine(lm, EngineConfig(max_slots=2, max_context=context))):
        handle = candidate.submit(GenerationRequest(prompt.input_ids, prompt.audio_codes, max_frames=4, greedy=True))
        candidate.run_until_idle()
        codes.append(handle.result(timeout=5).codes)
    np.testing.assert_array_equal(codes[0], codes[1])
