"""How many KV slots an engine gets (and the EngineConfig that asks for them), and what
its warm-up captured.

Pure arithmetic and bookkeeping, kept apart from the engine's loop so that slot sizing
is tested on any machine (tests/test_engine.py with fake GPU memory figures).
"""

from __future__ import annotations

from dataclasses import dataclass

from csm_triton import constants as C
from csm_triton.engine.frame_step import StepBucket

__all__ = ["CPU_DEFAULT_SLOTS", "SLOT_SHARE_OF_BUDGET", "EngineConfig", "WarmUpReport", "slots_from_memory"]

CPU_DEFAULT_SLOTS = 8
# Of the memory budget, the share for KV slots; the rest is for activations, the depth
# cache and the CUDA graphs' pool.
SLOT_SHARE_OF_BUDGET = 0.9


@dataclass
class EngineConfig:
    # On GPU: at most this many slots, fewer if fewer fit within gpu_memory_fraction
    # (None: as many as fit). On CPU: exactly this many (None: CPU_DEFAULT_SLOTS).
    max_slots: int | None = None
    max_context: int | None = None  # None: the backbone's max positions
    gpu_memory_fraction: float = C.DEFAULT_GPU_MEMORY_FRACTION
    prefix_cache_bytes: int = 256 << 20
    max_prefills_per_step: int = 4
    cuda_graphs: bool = True  # on CUDA: capture the frame step per bucket (frame_step.BucketPlan)
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
        return (f"{len(self.timings)} CUDA graphs captured in {self.seconds:.1f} s ({shape}); slowest "
                f"{tuple(slowest)} in {slowest_seconds:.2f} s")


def slots_from_memory(free_bytes: int, total_bytes: int, memory_fraction: float, slot_bytes: int,
                      max_slots: int | None = None) -> int:
    """KV slots for a GPU: what fits in memory_fraction of it (after what is in use
    already, keeping 10 % of that budget for everything else), at most max_slots."""
    budget = total_bytes * memory_fraction - (total_bytes - free_bytes)
    fits = int(budget * SLOT_SHARE_OF_BUDGET // slot_bytes)
    if fits < 1:
        raise RuntimeError(
            f"no KV slot fits: {budget / 2**30:.1f} GiB left within gpu_memory_fraction={memory_fraction}, "
            f"one slot needs {slot_bytes / 2**30:.2f} GiB"
        )
    if max_slots is not None and fits > max_slots:
        return max_slots
    return fits
