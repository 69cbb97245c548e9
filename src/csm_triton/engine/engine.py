"""In-flight batching generation engine for CSM.

Requests join (prefill into a free KV-cache slot) and leave (end of speech, frame
cap, cancellation) at frame boundaries. One frame step = one backbone step for
every active slot + the depth decoder's positions 1..31 for all of them at once.
Frames reach each request's handle (or callback) every `stream_every` frames.

The active slots hold cache rows 0..n-1: a request that leaves hands its row to the
one in the last row (its keys and values move once), so every frame step reads the
cache through views instead of gathering each slot's context per layer (frame_step).

The engine is independent of Triton: `csm_lm`'s model.py drives it from one
engine thread (`start`), tests and benchmarks may call `step` directly.

This module schedules requests over the slots (queue, admission, the engine thread,
delivery); the slots' buffers, their sizing and warm-up, and the frame step itself
are FrameRunner's (frame_runner.py), which GenerationEngine extends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import torch

from csm_triton.engine.admission import Slot, acquire_adapter, check_request, compact, move_row
from csm_triton.engine.capacity import DeviceMemory, EngineConfig, WarmUpReport
from csm_triton.engine.device import device_context
from csm_triton.engine.faults import DeviceFailure, device_failure_message, is_fatal_device_error
from csm_triton.engine.frame_runner import FrameRunner, LaunchedStep
from csm_triton.engine.lm import CsmLM
from csm_triton.engine.lora import LoraWeights
from csm_triton.engine.prefill import PrefillJob, prefill_together, prefill_tokens
from csm_triton.engine.prefix_cache import PrefixCache
from csm_triton.engine.requests import (
    CancellationPoller,
    Deliveries,
    FinishReason,
    FrameChunk,
    GenerationRequest,
    RequestHandle,
)
from csm_triton.engine.sampling import SamplerState

__all__ = ["EngineConfig", "GenerationEngine"]  # EngineConfig lives in engine.capacity

LOG = logging.getLogger(__name__)


class GenerationEngine(FrameRunner):
    """Requests queued, admitted into free slots, stepped a frame at a time and delivered
    (the slots' buffers and the frame step itself: FrameRunner)."""

    def __init__(
        self,
        lm: CsmLM,
        config: EngineConfig | None = None,
        memory: DeviceMemory | None = None,
        adapter_loader: Callable[[str], LoraWeights] | None = None,
    ):
        """memory: what sizes the slots on a GPU (DeviceMemory of lm.device, the default
        there); None on the CPU, where config.max_slots is the count. adapter_loader: an
        adapter id -> its weights (the voice store), for config.lora_slots adapters."""
        super().__init__(lm, config, memory, adapter_loader)  # the slots' buffers (frame_runner)
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes)
        self._active: list[Slot] = []  # _active[r] holds cache row r
        # Overlapping steps: the step launched last, its codes not yet read.
        self.overlap_steps = self.config.overlap_steps if self.config.overlap_steps is not None else self.use_graphs
        self._in_flight: LaunchedStep | None = None
        self._waiting: deque[RequestHandle] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.frames_generated = 0
        self.steps = 0
        self.slot_moves = 0  # slots moved to a lower row when a request before them left
        self._cancellation = CancellationPoller()
        self._deliveries = Deliveries()  # started with the engine thread (start())
        self.warm_up_report: WarmUpReport | None = None
        # Called with stats() from the engine thread (see EngineConfig.stats_interval_s).
        self.on_stats: Callable[[dict], None] | None = None
        self._stats_reported_at = 0.0
        # Set once the device failed (engine.faults): every request since is refused.
        self.device_failure: BaseException | None = None
        # Called on the engine thread after the in-flight requests were answered; csm_lm
        # ends its stub there, so the supervisor reloads the model on a fresh context.
        self.on_fatal: Callable[[BaseException], None] | None = None

    # --- public API -------------------------------------------------------------------
    def submit(self, request: GenerationRequest, callback: Callable[[FrameChunk], None] | None = None) -> RequestHandle:
        check_request(request, self.lm, self.max_context)
        if request.adapter and self.adapters is not None:
            self.adapters.prefetch(request.adapter)  # the disk read here, not on the engine thread
        handle = RequestHandle(request, callback)
        with self._lock:
            if self.device_failure is not None:
                raise DeviceFailure(self._device_failure_message())
            if self._stopping:
                raise RuntimeError("the generation engine is shutting down")
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    def cancel(self, request_id: str) -> bool:
        """Cancel the request submitted with this id (waiting or running); False when
        no such request is known (already finished, or never seen)."""
        with self._lock:
            handles = [h for h in self._waiting if h.request.request_id == request_id]
        handles += [s.handle for s in list(self._active) if s.handle.request.request_id == request_id]
        for handle in handles:
            handle.cancel()
        return bool(handles)

    def stats(self) -> dict:
        # No lock: len() of a dict or deque is atomic, and a count a moment old is fine.
        return {
            "slots_total": self.max_slots,
            "slots_in_use": len(self._active),
            "waiting": len(self._waiting),
            "frames_generated": self.frames_generated,
            "prefix_cache_hits": self.prefix_cache.hits,
            "prefix_cache_misses": self.prefix_cache.misses,
            "prefix_cache_tokens_reused": self.prefix_cache.tokens_reused,
            "prefix_cache_bytes": self.prefix_cache.nbytes,
        }

    def has_work(self) -> bool:
        return bool(self._active or self._waiting or self._in_flight)

    def run_until_idle(self) -> None:
        while self.has_work():
            self.step()

    def start(self) -> None:
        if self.config.warm_up and self.warm_up_report is None:
            self.warm_up_report = self.warm_up()
        self._deliveries.start()
        self._thread = threading.Thread(target=self._loop, name="csm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._finish_all(FinishReason.SHUTDOWN, "the server is shutting down")
        self._deliveries.drain(timeout)
        self._deliveries.stop(timeout)

    # --- the loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        with device_context(self.lm.device):  # CUDA's current device is per thread, 0 until set
            self._serve()

    def _serve(self) -> None:
        while True:
            self._report_stats(force=not self.has_work())  # forced on going idle: no stale gauge
            with self._lock:
                while not self._stopping and not self.has_work():
                    self._lock.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:
                if is_fatal_device_error(error):
                    self._fail_device(error)
                    return
                LOG.exception("frame step failed")
                self._finish_all(FinishReason.ERROR, f"generation failed: {type(error).__name__}: {error}")

    def _device_failure_message(self) -> str:
        return device_failure_message(self.device_failure)

    def _fail_device(self, error: BaseException) -> None:
        """A device error no later step survives: answer every request in flight (and
        refuse new ones) as DEVICE_FAILURE, then hand over to on_fatal."""
        LOG.critical("device failure, the engine stops: %s", error, exc_info=error)
        with self._lock:
            self.device_failure = error
        self._finish_all(FinishReason.DEVICE_FAILURE, self._device_failure_message())
        self._deliveries.drain(timeout=10.0)  # every request answered before the stub may end
        if self.on_fatal is not None:
            self.on_fatal(error)

    def _report_stats(self, *, force: bool = False) -> None:
        """Hands on_stats the counts at most every stats_interval_s, unless forced, through
        the delivery thread: neither submit nor the next frame waits on it. (The receiver
        skips values it has already set.)"""
        if self.on_stats is None:
            return
        now = time.monotonic()
        if not force and now - self._stats_reported_at < self.config.stats_interval_s:
            return
        self._stats_reported_at = now
        self._deliveries.send(self.on_stats, self.stats())  # a failure there is logged, never raised here

    @torch.inference_mode()
    def step(self) -> int:
        """Admit waiting requests, launch one frame for every active slot, and hand out
        the frames of this step, or, overlapping, of the step launched before it: the
        host then reads, delivers and schedules while the device computes the next frame
        (EngineConfig.overlap_steps)."""
        self._drop_cancelled()
        self._admit()
        # Rows 0..n-1; none when every slot's last frame is already in flight (overlapping).
        wanted = any(s.frames_done + s.in_flight < s.handle.request.max_frames for s in self._active)
        launched = self._launch_frame_step(list(self._active)) if wanted else None
        if launched is not None:
            self.steps += 1
        if self.overlap_steps:
            launched, self._in_flight = self._in_flight, launched
        if launched is not None:
            self._advance(launched.slots, self._frame_codes(launched))
        return len(self._active)

    def _drop_cancelled(self) -> None:
        self._cancellation.poll([slot.handle for slot in self._active])
        for slot in reversed([s for s in self._active if s.handle.cancelled]):  # highest row first
            self._finish(slot, FinishReason.CANCELLED)
        with self._lock:
            cancelled = [h for h in self._waiting if h.cancelled]
            for handle in cancelled:
                self._waiting.remove(handle)
        for handle in cancelled:
            self._deliveries.send(handle._end, FinishReason.CANCELLED)

    def _admit(self) -> None:
        """Waiting requests into free rows, their prompts computed together (prefill.py):
        at most max_prefills_per_step of them and prefill_tokens_per_step tokens to
        compute, padding included (the first always comes in, however long)."""
        jobs: list[PrefillJob] = []
        while len(jobs) < self.config.max_prefills_per_step:
            with self._lock:
                if len(self._active) + len(jobs) >= self.max_slots or not self._waiting:
                    break
                handle = self._waiting.popleft()
            try:
                adapter = acquire_adapter(self.adapters, handle.request)
            except Exception as error:  # noqa: BLE001 - unknown, refused or no slot free: this request only
                self._deliveries.send(handle._end, FinishReason.ERROR, str(error))
                continue
            version = self.adapters.version(adapter) if adapter else ""
            job = PrefillJob.of(self.lm, self.prefix_cache, handle, adapter, version)  # host work: hashes, lookup
            if jobs and prefill_tokens([*jobs, job]) > self.config.prefill_tokens_per_step:
                self._release_adapter(adapter)
                with self._lock:
                    self._waiting.appendleft(handle)  # first in the next step
                break
            jobs.append(job)
        if len(jobs) > 1:
            try:
                done = self._prefill_together(jobs)
            except Exception as error:
                if is_fatal_device_error(error):  # not these prompts' fault: the loop fails them all
                    self._requeue(jobs)
                    raise
                # Which prompt broke the shared forward is unknown: each again alone, so
                # only one that fails alone is answered with the error.
                LOG.warning("a prefill of %d prompts failed (%s); each is prefilled alone", len(jobs), error)
            else:
                self._slot_in(done)
                return
        for index, job in enumerate(jobs):
            try:
                done = self._prefill_together([job])
            except Exception as error:
                if is_fatal_device_error(error):
                    self._requeue(jobs[index:])
                    raise
                LOG.exception("prefill failed")
                self._release_adapter(job.adapter)
                self._deliveries.send(job.handle._end, FinishReason.ERROR, f"prefill failed: {error}")
                continue
            try:
                self._slot_in(done)
            except BaseException:
                self._requeue(jobs[index + 1 :])
                raise

    def _slot_in(self, done: list[tuple[PrefillJob, int | None]]) -> None:
        """Prefilled prompts become active slots, in rows 0..n-1 (a cancelled one's row
        is closed by moving the next into it); cancelled ones are answered. If a move
        fails (a device error), the prompts not slotted in yet go back to the queue, where
        the failure answers them."""
        for index, (job, position) in enumerate(done):
            if position is None:
                self._release_adapter(job.adapter)
                self._deliveries.send(job.handle._end, FinishReason.CANCELLED)
                continue
            row = len(self._active)
            try:
                if job.row != row:
                    move_row(self.cache, self.hidden, job.row, row, position)
            except BaseException:
                self._requeue([job for job, position in done[index:] if position is not None])
                raise
            request = job.handle.request
            sampler = SamplerState.create(
                temperature=request.temperature, top_k=request.top_k, greedy=request.greedy, seed=request.seed
            )
            self._active.append(Slot(row, job.handle, sampler, position, adapter=job.adapter))

    def _prefill_together(self, jobs: list[PrefillJob]):
        first_row = len(self._active)  # the first free row: the active slots are rows 0..n-1
        return prefill_together(self.lm, self.cache, self.hidden, self.prefix_cache, jobs, first_row, self.adapters)

    def _requeue(self, jobs: list[PrefillJob]) -> None:
        """Admitted but not prefilled: back to the head of the queue, in order."""
        for job in jobs:
            self._release_adapter(job.adapter)
        with self._lock:
            self._waiting.extendleft(reversed([job.handle for job in jobs]))

    def _advance(self, slots: list[Slot], frames: np.ndarray) -> None:
        """A launched step's frames, slot by slot (`slots`: each row's slot at launch)."""
        finished: list[tuple[Slot, FinishReason]] = []
        for slot, frame in zip(slots, frames):
            if slot.done:  # ended while this frame was in flight (end of speech, cap, cancel)
                continue
            slot.in_flight -= 1
            if not frame.any():  # an all-zero frame: end of speech (not emitted)
                finished.append((slot, FinishReason.END_OF_SPEECH))
                continue
            slot.pending.append(frame)
            slot.frames_done += 1
            slot.position += 1  # the frame step already wrote this frame into the cache
            self.frames_generated += 1
            if slot.frames_done == 1:
                slot.handle.time_to_first_frame = time.perf_counter() - slot.handle.submitted_at
            if slot.frames_done >= slot.handle.request.max_frames:
                finished.append((slot, FinishReason.MAX_FRAMES))
                continue
            size = slot.chunk_size()
            if size and len(slot.pending) >= size:
                self._deliveries.send(slot.handle._deliver, FrameChunk(np.stack(slot.pending)))
                slot.pending = []
                slot.chunks_sent += 1
        # Only now, with every position advanced past the frame just written, may a slot
        # move rows; the highest rows leave first, so no leaving slot is moved.
        for slot, reason in sorted(finished, key=lambda item: item[0].row, reverse=True):
            self._finish(slot, reason)

    def _finish(self, slot: Slot, reason: FinishReason, error: str | None = None) -> None:
        slot.done = True
        self._release(slot)
        self._release_adapter(slot.adapter)
        self._deliveries.send(slot.handle._end, reason, error, slot.pending)

    def _release_adapter(self, adapter: int) -> None:
        if self.adapters is not None:
            self.adapters.release(adapter)

    def _release(self, slot: Slot) -> None:
        self.slot_moves += compact(self._active, slot, self.cache, self.hidden)  # (admission)

    def _finish_all(self, reason: FinishReason, error: str) -> None:
        self._in_flight = None  # its slots are all answered here
        for slot in reversed(list(self._active)):  # the last row first: nothing moves
            self._finish(slot, reason, error)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for handle in waiting:
            self._deliveries.send(handle._end, reason, error)
