"""How many KV slots an engine gets (and the EngineConfig that asks for them), and what
its warm-up captured.

On a GPU the slots are sized twice. Before the buffers exist (`plan_slots`): from the
device's memory in use once the load's freed copies went back to the driver, the budget
`gpu_memory_fraction` allows, the prefix cache counted up front, and an assumed warm-up
cost per slot. After the warm-up captured every graph (`refit_slots`): from what the
device really holds now, this engine's own share (its caching allocator) told apart from
what other models loaded meanwhile; over the budget, the engine rebuilds with the slots
that fit. Pure arithmetic, so the decisions are tested on any machine
(tests/model/test_engine_memory.py with fake memory readings).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from csm_triton import constants as C
from csm_triton.engine.frame_step import StepBucket

__all__ = [
    "CPU_DEFAULT_SLOTS",
    "WARM_UP_SHARE_OF_SLOT",
    "DeviceMemory",
    "EngineConfig",
    "MemoryReading",
    "SlotBudget",
    "WarmUpReport",
    "first_sizing",
    "plan_slots",
    "refit_after_warm_up",
    "refit_slots",
]

LOG = logging.getLogger("csm_triton.engine.engine")  # the engine's log: one place to read sizing
CPU_DEFAULT_SLOTS = 8
# Before the warm-up is measured, what its graphs' pool and activations are assumed to
# take per slot, as a share of the slot's own bytes (the old 10 % of the budget); the
# refit after warm-up replaces the assumption with the measurement.
WARM_UP_SHARE_OF_SLOT = 1 / 9
GIB = 2**30


@dataclass
class EngineConfig:
    # On GPU: at most this many slots, fewer if fewer fit within gpu_memory_fraction
    # (None: as many as fit). On CPU: exactly this many (None: CPU_DEFAULT_SLOTS).
    max_slots: int | None = None
    max_context: int | None = None  # None: the backbone's max positions
    gpu_memory_fraction: float = C.DEFAULT_GPU_MEMORY_FRACTION
    prefix_cache_bytes: int = 256 << 20
    # One engine step admits at most this many waiting requests and computes their
    # prompts together (engine/prefill.py), bounded by this many prompt tokens to compute,
    # padding included (cached turns are copied, not counted; the first prompt comes in
    # whatever its length): the running streams wait for one bounded prefill per frame.
    max_prefills_per_step: int = 16
    prefill_tokens_per_step: int = 2048
    cuda_graphs: bool = True  # on CUDA: capture the frame step per bucket (frame_step.BucketPlan)
    # Launch frame N+1 before reading frame N's codes, so the device never waits for the
    # host's reading, delivery and scheduling between frames. None: with CUDA graphs. On
    # the CPU a launch computes the whole step before it returns, so overlapping would
    # only hold every frame back one step (True there is for tests of its logic).
    overlap_steps: bool | None = None
    # LoRA adapters resident on the device at once (engine.lora; 0: no adapters served),
    # and the largest rank they may have (the bank is laid out for it).
    lora_slots: int = 0
    lora_max_rank: int = 32
    # start() captures every bucket's graph before serving, so no request pays a capture
    # (seconds at load); without it a bucket is captured the first time a step needs it.
    warm_up: bool = True
    # How often the engine thread hands `on_stats` its counts while it works (and once
    # each time it goes idle): live capacity gauges for a few calls per second,
    # whatever the frame rate (a Triton metric update is an IPC round trip).
    stats_interval_s: float = 0.25


@dataclass
class WarmUpReport:
    timings: list[tuple[StepBucket, float]]  # each bucket with the seconds it took, in order
    captured: bool  # CUDA graphs captured (False on the CPU: eager, nothing to capture)
    # Bytes the caching allocator grew by for each bucket (its graph's share of the pool),
    # in the order of `timings`; None where no device memory is measured (the CPU).
    graph_bytes: list[int] | None = None

    @property
    def buckets(self) -> list[StepBucket]:
        return [bucket for bucket, _ in self.timings]

    @property
    def seconds(self) -> float:
        return sum(seconds for _, seconds in self.timings)

    def summary(self) -> str:
        batches = sorted({b.batch for b in self.buckets})
        lengths = sorted({b.attend_len for b in self.buckets})
        bounds = sorted({b.top_k_bound for b in self.buckets})
        shape = f"batch {batches} x attention length {lengths} x top-k bound {bounds}"
        if not self.captured:
            return f"{len(self.timings)} buckets ({shape}), eager on this device: no CUDA graph to capture"
        slowest, slowest_seconds = max(self.timings, key=lambda timing: timing[1])
        text = (
            f"{len(self.timings)} CUDA graphs captured in {self.seconds:.1f} s ({shape}); slowest "
            f"{tuple(slowest)} in {slowest_seconds:.2f} s"
        )
        if self.graph_bytes:
            largest = max(range(len(self.graph_bytes)), key=self.graph_bytes.__getitem__)
            text += (
                f"; graph memory {sum(self.graph_bytes) / GIB:.2f} GiB, largest "
                f"{tuple(self.timings[largest][0])} {self.graph_bytes[largest] / 2**20:.0f} MiB"
            )
        return text

    def per_bucket(self) -> list[str]:
        """One line per bucket: seconds and (where measured) graph memory."""
        sizes = self.graph_bytes or [None] * len(self.timings)
        return [
            f"{tuple(bucket)}: {seconds:.3f} s" + ("" if size is None else f", {size / 2**20:.1f} MiB")
            for (bucket, seconds), size in zip(self.timings, sizes)
        ]


class MemoryReading(NamedTuple):
    """One look at a GPU: free and total bytes of the device (every process), and the
    bytes this process's caching allocator holds (this engine's buffers, graph pools and
    workspaces; not the CUDA context)."""

    free: int
    total: int
    reserved: int

    @property
    def in_use(self) -> int:
        return self.total - self.free


class DeviceMemory:
    """What slot sizing reads of a CUDA device (engine.capacity); tests hand the engine
    a fake with the same three methods."""

    def __init__(self, device: torch.device):
        self.device = device

    def release_cached(self) -> None:
        """Hands the caching allocator's free blocks back to the driver: the load's copies
        (the fp32 checkpoint cast to bf16, the heads, transposes) are freed by now but
        stay reserved, ~1.4 GiB for CSM-1B, and would count as in use."""
        gc.collect()
        torch.cuda.empty_cache()

    def reserved(self) -> int:
        """Bytes this process's caching allocator holds on the device (no synchronisation)."""
        return torch.cuda.memory_reserved(self.device)

    def reading(self) -> MemoryReading:
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return MemoryReading(free, total, torch.cuda.memory_reserved(self.device))


@dataclass(frozen=True)
class SlotBudget:
    """The sizing before the buffers exist, kept to refit against after warm-up."""

    before: MemoryReading  # after the load's freed copies were released, before any buffer
    memory_fraction: float
    slot_bytes: int  # one slot's buffers: its KV rows, depth cache row, noise and hidden state
    prefix_cache_bytes: int
    max_slots: int | None
    slots: int

    @property
    def limit(self) -> float:
        return self.before.total * self.memory_fraction

    def describe(self, slots: int, after: MemoryReading | None = None) -> str:
        text = (
            f"{slots} KV slots x {self.slot_bytes / 2**20:.1f} MiB = {slots * self.slot_bytes / GIB:.2f} GiB, "
            f"prefix cache {self.prefix_cache_bytes / GIB:.2f} GiB, within gpu_memory_fraction="
            f"{self.memory_fraction:g} of {self.before.total / GIB:.1f} GiB ({self.limit / GIB:.1f} GiB); "
            f"in use before: {self.before.in_use / GIB:.2f} GiB"
        )
        if after is not None:
            warm_up = after.reserved - self.before.reserved - slots * self.slot_bytes
            text += (
                f"; after warm-up: {after.in_use / GIB:.2f} GiB in use (graphs and activations "
                f"{warm_up / GIB:.2f} GiB, other processes {_others(self.before, after) / GIB:.2f} GiB more)"
            )
        return text


def _others(before: MemoryReading, after: MemoryReading) -> int:
    """What the device took meanwhile that this process's allocator does not hold: other
    models loading beside this one (Triton loads them in parallel), CUDA libraries."""
    return max(0, (after.in_use - before.in_use) - (after.reserved - before.reserved))


def plan_slots(
    before: MemoryReading,
    memory_fraction: float,
    slot_bytes: int,
    *,
    prefix_cache_bytes: int = 0,
    max_slots: int | None = None,
) -> SlotBudget:
    """KV slots for a GPU: what fits in memory_fraction of it after what is in use
    already, the prefix cache and the assumed warm-up share; at most max_slots (a
    ceiling, not a demand)."""
    budget = before.total * memory_fraction - before.in_use - prefix_cache_bytes
    fits = int(budget // (slot_bytes * (1 + WARM_UP_SHARE_OF_SLOT)))
    if fits < 1:
        raise RuntimeError(
            f"no KV slot fits: {budget / GIB:.2f} GiB left within gpu_memory_fraction={memory_fraction} "
            f"({before.in_use / GIB:.2f} GiB of {before.total / GIB:.1f} GiB in use, prefix cache "
            f"{prefix_cache_bytes / GIB:.2f} GiB), one slot needs {slot_bytes / GIB:.3f} GiB"
        )
    slots = min(fits, max_slots) if max_slots is not None else fits
    return SlotBudget(before, memory_fraction, slot_bytes, prefix_cache_bytes, max_slots, slots)


def refit_slots(plan: SlotBudget, slots: int, after: MemoryReading) -> int | None:
    """After warm-up with `slots` slots: None when the device's use (plus the prefix
    cache, which fills later) is within the budget; otherwise the slot count that fits,
    at this engine's measured bytes per slot (buffers, graphs, activations), beside what
    other processes took meanwhile."""
    if after.in_use + plan.prefix_cache_bytes <= plan.limit:
        return None
    own_per_slot = max(after.reserved - plan.before.reserved, 1) / slots
    room = plan.limit - plan.before.in_use - _others(plan.before, after) - plan.prefix_cache_bytes
    fits = int(room // own_per_slot)
    if fits < 1:
        raise RuntimeError(
            f"no KV slot fits after warm-up: {plan.describe(slots, after)}; one slot with its share of the "
            f"graphs needs {own_per_slot / GIB:.3f} GiB"
        )
    return min(fits, slots - 1)  # fewer than now, even when rounding says otherwise


def first_sizing(memory, config: EngineConfig, slot_bytes: int) -> SlotBudget:
    """The engine's sizing before its buffers exist (on a GPU), logged."""
    memory.release_cached()
    budget = plan_slots(
        memory.reading(),
        config.gpu_memory_fraction,
        slot_bytes,
        prefix_cache_bytes=config.prefix_cache_bytes,
        max_slots=config.max_slots,
    )
    LOG.info("KV sizing: %s", budget.describe(budget.slots))
    return budget


def refit_after_warm_up(memory, budget: SlotBudget, slots: int) -> int | None:
    """After a warm-up with `slots` slots: None when within the budget, else the slot
    count to rebuild with; logged either way."""
    after = memory.reading()
    fewer = refit_slots(budget, slots, after)
    if fewer is None:
        LOG.info("memory after warm-up: %s", budget.describe(slots, after))
    else:
        LOG.warning(
            "over gpu_memory_fraction after warm-up, %d slots instead of %d: %s",
            fewer,
            slots,
            budget.describe(slots, after),
        )
    return fewer
