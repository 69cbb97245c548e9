"""In-flight batching generation engine for CSM.

Requests join (prefill into a free KV-cache slot) and leave (end of speech, frame
cap, cancellation) at frame boundaries. One frame step = one backbone step for
every active slot + the depth decoder's positions 1..31 for all of them at once.
Frames reach each request's handle (or callback) every `stream_every` frames.

The engine is independent of Triton: `csm_lm`'s model.py drives it from one
engine thread (`start`), tests and benchmarks may call `step` directly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from csm_triton import constants as C
from csm_triton.engine.frame_step import FrameStep, attention_bucket, batch_bucket
from csm_triton.engine.lm import CsmLM
from csm_triton.engine.prefix_cache import PrefixCache, PrefixEntry, prefix_key
from csm_triton.engine.requests import FinishReason, FrameChunk, GenerationRequest, RequestHandle
from csm_triton.engine.sampling import SamplerState
from csm_triton.errors import InvalidInput

LOG = logging.getLogger(__name__)


@dataclass
class _Slot:
    index: int
    handle: RequestHandle
    sampler: SamplerState
    position: int  # next backbone position to write
    frames_done: int = 0
    chunks_sent: int = 0
    pending: list = field(default_factory=list)  # frames not yet delivered

    def chunk_size(self) -> int:
        request = self.handle.request
        if self.chunks_sent == 0 and request.first_chunk_frames:
            return request.first_chunk_frames
        return request.stream_every


@dataclass
class EngineConfig:
    max_slots: int | None = None  # None: from memory on GPU, 8 on CPU
    max_context: int | None = None  # None: the backbone's max positions
    gpu_memory_fraction: float = C.DEFAULT_GPU_MEMORY_FRACTION
    prefix_cache_bytes: int = 256 << 20
    max_prefills_per_step: int = 4
    cuda_graphs: bool = True  # on CUDA: capture the frame step per (batch, length) bucket
    # How often the engine thread hands `on_stats` its counts while it works (and once
    # each time it goes idle): live capacity gauges for a few calls per second,
    # whatever the frame rate (a Triton metric update is an IPC round trip).
    stats_interval_s: float = 0.25


class GenerationEngine:
    def __init__(self, lm: CsmLM, config: EngineConfig | None = None):
        self.lm = lm
        self.config = config or EngineConfig()
        self.max_context = min(self.config.max_context or lm.max_context, lm.max_context)
        self.max_slots = self.config.max_slots or self._slots_from_memory()
        # One extra row: the scratch slot that padding rows of a batch bucket point at.
        self.scratch_row = self.max_slots
        self.cache = lm.new_backbone_cache(self.max_slots + 1, self.max_context)
        self.depth_cache = lm.new_depth_cache(batch_bucket(self.max_slots))
        self.noise = torch.ones((batch_bucket(self.max_slots), lm.num_codebooks, lm.audio_vocab_size),
                                device=lm.device)
        self.hidden = torch.zeros(self.max_slots + 1, lm.backbone_hidden_size, device=lm.device, dtype=lm.dtype)
        self.use_graphs = lm.device.type == "cuda" and self.config.cuda_graphs
        self._frame_steps: dict[tuple[int, int], FrameStep] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes)
        self._slots: dict[int, _Slot] = {}
        self._free = list(range(self.max_slots))
        self._waiting: deque[RequestHandle] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.frames_generated = 0
        self.steps = 0
        # Called with stats() from the engine thread (see EngineConfig.stats_interval_s).
        self.on_stats: Callable[[dict], None] | None = None
        self._stats_reported_at = 0.0

    # --- sizing -----------------------------------------------------------------------
    def _slots_from_memory(self) -> int:
        if self.lm.device.type != "cuda":
            return 8
        free, total = torch.cuda.mem_get_info(self.lm.device)
        used_by_others = total - free
        budget = total * self.config.gpu_memory_fraction - used_by_others
        # Keep room for activations and the depth cache: 10 % of the budget.
        per_slot = self.lm.backbone_bytes_per_token() * self.max_context
        slots = int(budget * 0.9 // per_slot)
        if slots < 1:
            raise RuntimeError(
                f"no KV slot fits: {budget / 2**30:.1f} GiB left within gpu_memory_fraction="
                f"{self.config.gpu_memory_fraction}, one slot of {self.max_context} tokens needs "
                f"{per_slot / 2**30:.2f} GiB"
            )
        return slots

    # --- public API -------------------------------------------------------------------
    def submit(self, request: GenerationRequest,
               callback: Callable[[FrameChunk], None] | None = None) -> RequestHandle:
        self._check(request)
        handle = RequestHandle(request, callback)
        with self._lock:
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
        handles += [s.handle for s in list(self._slots.values()) if s.handle.request.request_id == request_id]
        for handle in handles:
            handle.cancel()
        return bool(handles)

    def stats(self) -> dict:
        # No lock: len() of a dict or deque is atomic, and a count a moment old is fine.
        return {
            "slots_total": self.max_slots,
            "slots_in_use": len(self._slots),
            "waiting": len(self._waiting),
            "frames_generated": self.frames_generated,
            "prefix_cache_hits": self.prefix_cache.hits,
            "prefix_cache_misses": self.prefix_cache.misses,
            "prefix_cache_bytes": self.prefix_cache.nbytes,
        }

    def has_work(self) -> bool:
        return bool(self._slots or self._waiting)

    def run_until_idle(self) -> None:
        while self.has_work():
            self.step()

    def start(self) -> None:
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

    # --- the loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._report_stats(force=not self.has_work())  # forced on going idle: no stale gauge
            with self._lock:
                while not self._stopping and not self.has_work():
                    self._lock.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - keep serving the next requests
                LOG.exception("frame step failed")
                self._finish_all(FinishReason.ERROR, f"generation failed: {type(error).__name__}: {error}")

    def _report_stats(self, *, force: bool = False) -> None:
        """Hands on_stats the counts at most every stats_interval_s, unless forced. On the
        engine thread, outside the lock: submit never waits on it. (The receiver skips
        values it has already set.)"""
        if self.on_stats is None:
            return
        now = time.monotonic()
        if not force and now - self._stats_reported_at < self.config.stats_interval_s:
            return
        self._stats_reported_at = now
        try:
            self.on_stats(self.stats())
        except Exception:  # noqa: BLE001 - metrics must never stop generation
            LOG.exception("reporting the engine's stats failed")

    @torch.inference_mode()
    def step(self) -> int:
        """Admit waiting requests, then generate one frame for every active slot."""
        self._drop_cancelled()
        self._admit()
        if not self._slots:
            return 0
        slots = sorted(self._slots.values(), key=lambda s: s.index)
        frames = self._frame_step(slots)
        self.steps += 1
        self._advance(slots, frames)
        return len(self._slots)

    def _check(self, request: GenerationRequest) -> None:
        tokens = len(request.input_ids)
        if request.max_frames < 1:
            raise InvalidInput("max_frames must be at least 1")
        if tokens + request.max_frames > self.max_context:
            raise InvalidInput(
                f"prompt of {tokens} tokens plus {request.max_frames} frames exceeds the context of "
                f"{self.max_context} positions"
            )
        placeholders = int(np.count_nonzero(np.asarray(request.input_ids) == self.lm.audio_token_id))
        if placeholders != len(request.audio_codes):
            raise InvalidInput(f"prompt has {placeholders} audio placeholders but {len(request.audio_codes)} frames")

    CANCEL_POLL_FRAMES = 4  # polling a client's state costs an IPC round trip in Triton

    def _drop_cancelled(self) -> None:
        if self.steps % self.CANCEL_POLL_FRAMES == 0:
            for slot in self._slots.values():
                poll = slot.handle.request.is_cancelled
                if poll is not None and poll():
                    slot.handle.cancel()
        for slot in [s for s in self._slots.values() if s.handle.cancelled]:
            self._finish(slot, FinishReason.CANCELLED)
        with self._lock:
            cancelled = [h for h in self._waiting if h.cancelled]
            for handle in cancelled:
                self._waiting.remove(handle)
        for handle in cancelled:
            handle._end(FinishReason.CANCELLED)

    def _admit(self) -> None:
        for _ in range(self.config.max_prefills_per_step):
            with self._lock:
                if not self._free or not self._waiting:
                    return
                handle = self._waiting.popleft()
                index = self._free.pop(0)
            request = handle.request
            try:
                position = self._prefill(index, request)
            except Exception as error:  # noqa: BLE001 - one bad prompt fails only itself
                LOG.exception("prefill failed")
                self._free.append(index)
                self._free.sort()
                handle._end(FinishReason.ERROR, f"prefill failed: {error}")
                continue
            sampler = SamplerState.create(temperature=request.temperature, top_k=request.top_k,
                                          greedy=request.greedy, seed=request.seed, device=self.lm.device)
            self._slots[index] = _Slot(index, handle, sampler, position)

    def _prefill(self, index: int, request: GenerationRequest) -> int:
        device = self.lm.device
        input_ids = torch.as_tensor(np.asarray(request.input_ids), dtype=torch.long, device=device)
        audio_codes = torch.as_tensor(np.asarray(request.audio_codes), dtype=torch.long, device=device)
        embeds = self.lm.embed_prompt(input_ids, audio_codes.reshape(-1, self.lm.num_codebooks))
        rows = torch.tensor([index], device=device)
        prefix_len = self._prefix_length(input_ids)
        if prefix_len:
            # The reference segment is computed on its own (hit or miss alike), so a
            # cache hit yields exactly the numbers a miss computes.
            key = prefix_key(input_ids[:prefix_len], audio_codes)
            entry = self.prefix_cache.get(key)
            if entry is None:
                positions = torch.arange(prefix_len, device=device)[None]
                self.lm.backbone_forward(embeds[None, :prefix_len], self.cache, rows, positions)
                entry = PrefixEntry(self.cache.k[:, index, :, :prefix_len].clone(),
                                    self.cache.v[:, index, :, :prefix_len].clone())
                self.prefix_cache.put(key, entry)
            else:
                self.cache.k[:, index, :, :prefix_len] = entry.k
                self.cache.v[:, index, :, :prefix_len] = entry.v
        total = len(input_ids)
        positions = torch.arange(prefix_len, total, device=device)[None]
        self.hidden[index] = self.lm.backbone_forward(embeds[None, prefix_len:], self.cache, rows, positions)[0]
        return total

    def _prefix_length(self, input_ids: torch.Tensor) -> int:
        """Tokens up to and including the last <|audio_eos|>: the voice reference."""
        ends = (input_ids == self.lm.audio_eos_token_id).nonzero()
        return int(ends[-1]) + 1 if len(ends) else 0

    def _frame_step(self, slots: list[_Slot]) -> np.ndarray:
        step = self._frame_step_for(slots)
        count = len(slots)
        step.rows[:count].copy_(torch.tensor([s.index for s in slots]), non_blocking=True)
        step.positions[:count, 0].copy_(torch.tensor([s.position for s in slots]), non_blocking=True)
        step.temperature[:count].copy_(torch.tensor([s.sampler.temperature for s in slots]), non_blocking=True)
        step.top_k[:count].copy_(torch.tensor([min(s.sampler.top_k, C.CODEBOOK_SIZE) for s in slots]),
                                 non_blocking=True)
        step.greedy[:count].copy_(torch.tensor([s.sampler.greedy for s in slots]), non_blocking=True)
        step.rows[count:].fill_(self.scratch_row)
        step.positions[count:].zero_()
        step.greedy[count:].fill_(True)
        for row, slot in enumerate(slots):
            slot.sampler.fill_noise(step.noise[row])
        step.run()
        # The one host synchronisation per frame: the codes go to the clients anyway,
        # and an all-zero frame must end its request before the next step.
        return step.codes[:count].cpu().numpy().copy()  # a copy: the buffer is reused

    def _frame_step_for(self, slots: list[_Slot]) -> FrameStep:
        needed = max(s.position for s in slots) + 1
        if not self.use_graphs:  # eager: exact sizes, one set of buffers per batch size
            key = (len(slots), 0)
            step = self._frame_steps.get(key)
            if step is None:
                step = self._frame_steps[key] = self._new_frame_step(len(slots), needed, capture=False)
            step.attend_len = needed
            return step
        key = (batch_bucket(len(slots)), attention_bucket(needed, self.max_context))
        if key not in self._frame_steps:
            self._frame_steps[key] = self._new_frame_step(*key, capture=True)
        return self._frame_steps[key]

    def _new_frame_step(self, batch: int, attend_len: int, *, capture: bool) -> FrameStep:
        return FrameStep(self.lm, self.cache, self.depth_cache, self.hidden, self.noise, batch=batch,
                         scratch_row=self.scratch_row, attend_len=attend_len, capture=capture,
                         graph_pool=self._graph_pool)

    def _advance(self, slots: list[_Slot], frames: np.ndarray) -> None:
        for slot, frame in zip(slots, frames):
            if not frame.any():  # an all-zero frame: end of speech (not emitted)
                self._finish(slot, FinishReason.END_OF_SPEECH)
                continue
            slot.pending.append(frame)
            slot.frames_done += 1
            slot.position += 1  # the frame step already wrote this frame into the cache
            self.frames_generated += 1
            if slot.frames_done == 1:
                slot.handle.time_to_first_frame = time.perf_counter() - slot.handle.submitted_at
            if slot.frames_done >= slot.handle.request.max_frames:
                self._finish(slot, FinishReason.MAX_FRAMES)
                continue
            size = slot.chunk_size()
            if size and len(slot.pending) >= size:
                slot.handle._deliver(FrameChunk(np.stack(slot.pending)))
                slot.pending = []
                slot.chunks_sent += 1

    def _finish(self, slot: _Slot, reason: FinishReason, error: str | None = None) -> None:
        del self._slots[slot.index]
        with self._lock:
            self._free.append(slot.index)
            self._free.sort()
        slot.handle._end(reason, error, slot.pending)

    def _finish_all(self, reason: FinishReason, error: str) -> None:
        for slot in list(self._slots.values()):
            self._finish(slot, reason, error)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for handle in waiting:
            handle._end(reason, error)
