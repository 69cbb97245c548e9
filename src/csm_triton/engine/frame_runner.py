"""The device side of the generation engine: the slots' buffers and the frame steps
over them.

`FrameRunner` sizes the KV-cache slots to the device's memory (engine.capacity),
allocates the caches and hidden rows they live in, prepares the frame step of every
bucket a batch can reach (on CUDA: captures its graph; engine.frame_step) and refits
the slots if that warm-up took more memory than assumed, then runs one frame for a
batch of slots. It knows nothing of requests arriving or leaving: GenerationEngine
(engine.py) adds the queue, admission, the engine thread and delivery on top of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from csm_triton import constants as C
from csm_triton.engine import fused
from csm_triton.engine.admission import Slot
from csm_triton.engine.capacity import (
    CPU_DEFAULT_SLOTS,
    DeviceMemory,
    EngineConfig,
    SlotBudget,
    WarmUpReport,
    first_sizing,
    refit_after_warm_up,
)
from csm_triton.engine.device import device_context
from csm_triton.engine.frame_step import BucketPlan, FrameStep, StepBucket
from csm_triton.engine.lm import CsmLM
from csm_triton.engine.lora import AdapterBank, LoraWeights

__all__ = ["FrameRunner", "LaunchedStep"]

LOG = logging.getLogger("csm_triton.engine.engine")  # the engine's log: one place to read sizing and warm-up


@dataclass
class LaunchedStep:
    slots: list[Slot]  # the slot of each row when it was launched
    codes: torch.Tensor  # [rows, 32] on the host, once `ready`
    ready: torch.cuda.Event | None  # recorded after the copy to the host; None: there already (CPU)


class FrameRunner:
    """The slots' device buffers (rows 0..max_slots-1), sized, warmed up and stepped."""

    def __init__(
        self,
        lm: CsmLM,
        config: EngineConfig | None,
        memory: DeviceMemory | None,
        adapter_loader: Callable[[str], LoraWeights] | None,
    ):
        self.lm = lm
        self.config = config or EngineConfig()
        self.max_context = min(self.config.max_context or lm.max_context, lm.max_context)
        self.use_graphs = lm.device.type == "cuda" and self.config.cuda_graphs
        self.memory = memory if memory is not None or lm.device.type != "cuda" else DeviceMemory(lm.device)
        self.slot_budget: SlotBudget | None = None  # on a GPU: the sizing, refit after warm-up
        # The adapter bank first: the slot sizing then counts it as memory in use.
        self.adapters = (
            AdapterBank(lm, self.config.lora_slots, self.config.lora_max_rank, adapter_loader)
            if self.config.lora_slots and adapter_loader is not None
            else None
        )
        self._allocate(self._slot_count())

    # --- sizing -----------------------------------------------------------------------
    def _slot_count(self) -> int:
        if self.memory is None:
            return self.config.max_slots or CPU_DEFAULT_SLOTS
        self.slot_budget = first_sizing(self.memory, self.config, self.lm.slot_bytes(self.max_context))
        return self.slot_budget.slots

    def _allocate(self, slots: int) -> None:
        """The slots' buffers, and no frame step yet: the graphs capture these buffers."""
        lm = self.lm
        self._frame_steps: dict[StepBucket | int, FrameStep] = {}  # graphed: per StepBucket; eager: per batch
        self.cache = self.depth_cache = self.hidden = None  # freed before the new ones exist
        if self.memory is not None and getattr(self, "max_slots", None) is not None:
            self.memory.release_cached()
        self.max_slots = slots
        # Batch buckets never exceed max_slots, so a bucket's padding rows are free slots.
        # With the decode kernel a graph's attention length bounds nothing that is read.
        self.buckets = BucketPlan(slots, self.max_context, per_row_attention=fused.kernels_run_on(lm.device))
        with device_context(lm.device):
            self.cache = lm.new_backbone_cache(slots, self.max_context)
            self.depth_cache = lm.new_depth_cache(slots)
            self.hidden = torch.zeros(slots, lm.backbone_hidden_size, device=lm.device, dtype=lm.dtype)
        pinned = lm.device.type == "cuda"
        self._host_codes = [torch.zeros((slots, lm.num_codebooks), dtype=torch.long, pin_memory=pinned) for _ in "ab"]
        self._codes_turn = 0
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # At most this many rebuilds with fewer slots after a warm-up over the budget.
    MAX_REFITS = 2

    def _refit_after_warm_up(self) -> bool:
        """True when the slots were rebuilt (fewer): the warm-up then runs again."""
        slots = refit_after_warm_up(self.memory, self.slot_budget, self.max_slots)
        if slots is not None:
            self._allocate(slots)
        return slots is not None

    @torch.inference_mode()  # as in step(): the buffers made here are used there
    def warm_up(self) -> WarmUpReport:
        """Prepare the frame step of every bucket a request can reach (BucketPlan), so
        that no request pays for it: on CUDA, capture its graph. The CPU runs eagerly at
        exact batch sizes and has nothing to prepare, so its walk costs nothing."""
        with device_context(self.lm.device):  # on the caller's thread (the model's initialize)
            for _ in range(self.MAX_REFITS + 1):
                timings, graph_bytes = [], []
                for bucket in self.buckets.buckets():
                    started, reserved = time.perf_counter(), self.memory and self.memory.reserved()
                    self._prepare(bucket)
                    timings.append((bucket, time.perf_counter() - started))
                    graph_bytes.append(self.memory and self.memory.reserved() - reserved)
                if self.memory is None or not self._refit_after_warm_up():
                    break
        report = WarmUpReport(timings, captured=self.use_graphs, graph_bytes=graph_bytes if self.memory else None)
        LOG.info("warm-up: %s", report.summary())
        LOG.debug("warm-up per bucket (batch, attention length, top-k bound):\n%s", "\n".join(report.per_bucket()))
        return report

    def _prepare(self, bucket: StepBucket) -> None:
        if self.use_graphs and bucket not in self._frame_steps:
            self._frame_steps[bucket] = self._new_frame_step(bucket, capture=True)
            torch.cuda.synchronize(self.lm.device)  # so that the timing is the capture's

    # --- one frame ---------------------------------------------------------------------
    def _launch_frame_step(self, slots: list[Slot]) -> LaunchedStep:
        """One frame for `slots` (rows 0..n-1), started: on a GPU it runs while the host
        goes on; _frame_codes waits for its codes. A slot's frames launched but not yet
        read (`in_flight`) are counted into the position and frame index it asks for."""
        step = self._frame_step_for(slots)
        count = len(slots)
        step.load_rows(
            [
                (*s.sampler.row(self._launch_position(s), s.frames_done + s.in_flight, step.top_k_bound), s.adapter)
                for s in slots
            ],
            [s.sampler.temperature for s in slots],
        )
        step.run()
        for slot in slots:
            slot.in_flight += 1
        # Into one of two host buffers in turn: the step launched before this one may
        # not have been read yet, and the step's own buffer is reused by the next.
        self._codes_turn ^= 1
        codes = self._host_codes[self._codes_turn][:count]
        codes.copy_(step.codes[:count], non_blocking=True)
        ready = None
        if self.lm.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return LaunchedStep(list(slots), codes, ready)

    def _launch_position(self, slot: Slot) -> int:
        """The position a slot's next launched frame writes: its frame in flight counted.
        A slot whose last frame is already in flight (this one will be dropped) may stand
        at the context's end: its wasted frame then rewrites its own last position, which
        nothing reads again, instead of one past the cache."""
        return min(slot.position + slot.in_flight, self.max_context - 1)

    def _frame_codes(self, launched: LaunchedStep) -> np.ndarray:
        """A launched step's codes [rows, 32], waiting for them: the one host
        synchronisation per frame (the codes go to the clients anyway, and an all-zero
        frame must end its request)."""
        if launched.ready is not None:
            launched.ready.synchronize()
        return launched.codes.numpy().copy()  # a copy: the buffer is reused two steps on

    def _frame_step_for(self, slots: list[Slot]) -> FrameStep:
        needed = max(self._launch_position(s) for s in slots) + 1
        top_k = max((s.sampler.top_k for s in slots if not s.sampler.greedy), default=1)
        bucket = self.buckets.bucket_for(len(slots), needed, min(top_k, C.CODEBOOK_SIZE))
        if not self.use_graphs:  # eager: exact sizes, one set of buffers per batch size
            step = self._frame_steps.get(len(slots))
            if step is None:
                step = self._frame_steps[len(slots)] = self._new_frame_step(
                    bucket._replace(batch=len(slots)), capture=False
                )
            step.attend_len, step.top_k_bound = needed, bucket.top_k_bound
            return step
        if bucket not in self._frame_steps:  # only without warm-up (or past it: never)
            self._frame_steps[bucket] = self._new_frame_step(bucket, capture=True)
        return self._frame_steps[bucket]

    def _new_frame_step(self, bucket: StepBucket, *, capture: bool) -> FrameStep:
        return FrameStep(
            self.lm,
            self.cache,
            self.depth_cache,
            self.hidden,
            batch=bucket.batch,
            attend_len=bucket.attend_len,
            top_k_bound=bucket.top_k_bound,
            capture=capture,
            graph_pool=self._graph_pool,
            adapters=self.adapters,
        )
