"""One frame for a padded batch of slots, on static buffers: codebook 0 from the
backbone's last hidden state, codebooks 1..31 from the depth decoder, then the
backbone step that embeds the new frame and leaves the next hidden state.

The active slots always hold cache rows 0..n-1 (the engine keeps them compacted), so
a step over a batch of `b` rows reads the basic-slice views `k[:b, :, :attend_len]`:
no gather copies a slot's keys and values, whatever the batch. Every shape is fixed
per bucket (batch, attention length, top-k bound), nothing reads back to the host,
and the random draws come in as a buffer, so on CUDA the whole step is captured once
as a CUDA graph and replayed: one launch instead of ~1,530 kernel launches per frame
(`python -m loadtest.kernel_count`, at CSM-1B's layer counts: 6,209 before the fused
norms, the joint rotary, the folded attention heads and the log-form sampler; 2,878
before the Triton kernels of engine/fused.py), which is where `generate`'s 290 ms/frame
goes (the weights take ~7 ms to read on an H100). On the
CPU the same code runs eagerly, at the exact batch size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from csm_triton import constants as C
from csm_triton.engine.device import device_context
from csm_triton.engine.fused import sample_codes
from csm_triton.engine.layers import KVCache
from csm_triton.engine.lm import CsmLM
from csm_triton.engine.sampling import SAMPLER_FIELDS, log_exponential_draws, top_k_index

# One int64 row per request: the sampler's fields (sampling.SamplerState.row), then the
# slot of its LoRA adapter in the engine's AdapterBank (0: the base model).
ROW_FIELDS = SAMPLER_FIELDS + 1
ADAPTER_FIELD = SAMPLER_FIELDS


class FrameStep:
    def __init__(
        self,
        lm: CsmLM,
        cache: KVCache,
        depth_cache: KVCache,
        hidden: torch.Tensor,
        *,
        batch: int,
        attend_len: int,
        top_k_bound: int = C.CODEBOOK_SIZE,
        capture: bool = False,
        graph_pool=None,
        adapters=None,
    ):
        """adapters: the engine's AdapterBank (engine.lora), or None (no LoRA at all)."""
        self.device = device = lm.device
        self.lm, self.cache, self.depth_cache = lm, cache, depth_cache
        self.batch = batch
        self.attend_len = attend_len
        self.top_k_bound = top_k_bound  # every row's top_k is at most this (the engine clamps)
        # Rows 0..batch-1 of the engine's hidden states; rows past the active ones are
        # free slots whose results nobody reads (temperature 1, position 0: arithmetic only).
        self.hidden = hidden[:batch]
        # Every per-row integer in one buffer (ROW_FIELDS), so a frame's inputs are
        # two host-to-device copies (from pinned memory on a GPU), and temperatures (1 for
        # greedy rows). The graph reads these views.
        self.rows = torch.zeros((batch, ROW_FIELDS), dtype=torch.long, device=device)
        self.positions = self.rows[:, 0:1]  # [B, 1]
        self.top_k = self.rows[:, 1]
        self.temperature = torch.ones(batch, device=device)
        pinned = device.type == "cuda"
        self._host_rows = torch.zeros((batch, ROW_FIELDS), dtype=torch.long, pin_memory=pinned)
        self._host_temperature = torch.ones(batch, pin_memory=pinned)
        # Recorded after the copies from those host buffers: they are rewritten only once
        # the device has read them (the engine may launch a step before reading the last).
        self._inputs_copied = torch.cuda.Event() if pinned else None
        self.counters = torch.arange(lm.num_codebooks * C.CODEBOOK_SIZE, device=device).view(
            1, lm.num_codebooks, C.CODEBOOK_SIZE
        )
        self.codes = torch.zeros((batch, lm.num_codebooks), dtype=torch.long, device=device)
        # LoRA: a graph always applies the rows' adapters (their slots are data); eager
        # steps skip them when no row has one (load_rows knows).
        self.adapters, self._rows_have_adapters = adapters, capture and adapters is not None
        adapter_slots = self.rows[:, ADAPTER_FIELD]
        self.lora = {stack: adapters.rows(stack, adapter_slots) for stack in ("backbone", "depth")} if adapters else {}
        # The depth decoder's positions are the same every frame: its rotary rows, masks
        # and cache indices are made once here instead of in every one of 31 calls.
        self.depth_geometry = [lm.depth_geometry(batch, 1, 2)] + [
            lm.depth_geometry(batch, codebook, 1) for codebook in range(2, lm.num_codebooks)
        ]
        self.graph = self._capture(graph_pool) if capture else None

    def _compute(self) -> None:
        lm = self.lm
        hidden = self.hidden
        # Once per frame for every codebook: each row's top-k index and its draws.
        kth_index = top_k_index(self.top_k, self.top_k_bound)
        rows = self.rows
        log_e = log_exponential_draws(rows[:, 2], rows[:, 3], rows[:, 4], rows[:, 5], self.counters)

        # The rows' adapter masks once for the frame, not once per depth-decoder call.
        lora = {stack: rows.prepared() for stack, rows in self.lora.items()} if self._rows_have_adapters else {}

        def draw(logits: torch.Tensor, codebook: int) -> torch.Tensor:
            return sample_codes(logits, self.temperature, kth_index, log_e[:, codebook], self.top_k_bound)

        codes = [draw(lm.codebook0_logits(hidden), 0)]
        # Depth decoder: position 0 is the backbone's hidden state, position 1 codebook 0.
        step_input = torch.stack([hidden, lm.depth_embed(codes[0], 0)[:, 0]], dim=1)
        for codebook in range(1, lm.num_codebooks):
            logits = lm.depth_logits(
                step_input, self.depth_cache, codebook, self.depth_geometry[codebook - 1], lora.get("depth")
            )
            codes.append(draw(logits, codebook))
            step_input = lm.depth_embed(codes[-1], codebook)
        frame = torch.stack(codes, dim=1)
        self.codes.copy_(frame)
        # The backbone consumes the new frame now, so the next step starts from its
        # hidden state; a slot that finishes with this frame just never reads it.
        embeds = lm.embed_frames(frame)[:, None].to(lm.dtype)
        attended = lm.backbone.forward(
            embeds, self.cache, 0, self.positions, self.attend_len, lora=lora.get("backbone")
        )
        self.hidden.copy_(attended[:, -1])

    def load_rows(self, rows: list[tuple[int, ...]], temperatures: list[float]) -> None:
        """The active rows' ROW_FIELDS and temperatures for the next run(); the rows after
        them (free slots) get position 0, greedy, temperature 1, no adapter: arithmetic
        nobody reads."""
        count = len(rows)
        if self.graph is None:
            self._rows_have_adapters = self.adapters is not None and any(row[ADAPTER_FIELD] for row in rows)
        if self._inputs_copied is not None:
            self._inputs_copied.synchronize()  # the last copies from these buffers are done
        self._host_rows[:count] = torch.tensor(rows, dtype=torch.long)
        self._host_rows[count:] = 0
        self._host_temperature[:count] = torch.tensor(temperatures)
        self._host_temperature[count:] = 1.0
        self.rows.copy_(self._host_rows, non_blocking=True)
        self.temperature.copy_(self._host_temperature, non_blocking=True)
        if self._inputs_copied is not None:
            self._inputs_copied.record()

    def _capture(self, graph_pool) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream (cuBLAS/cuDNN pick their kernels), then capture. The
        # warm-up runs write position 0 of rows 0..batch-1 and their hidden states, which
        # may belong to running requests (a bucket first reached mid-generation): saved
        # before, restored after. Every tensor the graph allocates dies inside the step
        # (results go to buffers made outside the capture), so graphs can share one
        # memory pool and replay in any order.
        # On the engine's device, with an explicit capture stream made there:
        # torch.cuda.graph's default capture stream is made once, on whichever device was
        # current at the first capture of the process, and kept.
        device = self.device
        with device_context(device):
            saved = (
                self.cache.k[:, : self.batch, :, 0].clone(),
                self.cache.v[:, : self.batch, :, 0].clone(),
                self.hidden.clone(),
            )
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._compute()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=graph_pool, stream=stream):
                self._compute()
        self.cache.k[:, : self.batch, :, 0].copy_(saved[0])
        self.cache.v[:, : self.batch, :, 0].copy_(saved[1])
        self.hidden.copy_(saved[2])
        return graph

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._compute()


# --- buckets --------------------------------------------------------------------------------
ATTENTION_BUCKETS = (256, 512, 1024, 2048, 4096)
# Top-k is found with torch.topk over this many candidates instead of sorting the whole
# vocabulary: 64 covers CSM's default of 50; a request asking for more uses the full
# codebook (its own graphs, captured at load like the others).
TOP_K_BOUNDS = (64, C.CODEBOOK_SIZE)


def batch_buckets(up_to: int) -> list[int]:
    """Batch buckets up to `up_to`: powers of two to 32, then alternately x1.5 and x4/3
    (48, 64, 96, 128, 192, 256, 384, ...). Above 32 rows a power-of-two ladder pads up to
    twice the work (129 rows ran as 256); these pad at most 50 %, for a few more graphs."""
    sizes, size = [], 1
    while size <= up_to:
        sizes.append(size)
        size = size * 2 if size < 32 else (size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3)
    return sizes


class StepBucket(NamedTuple):
    batch: int
    attend_len: int
    top_k_bound: int


class BucketPlan:
    """Every (batch, attention length, top-k bound) a frame step can need, for an engine
    of `max_slots` slots of `max_context` positions: the graphs captured at load.

    Batch sizes (BATCH_BUCKETS) are the powers of two up to 32, then 1.5x steps (48, 64,
    96, 128, 192, 256, ...) below max_slots, then max_slots itself (never more: padding
    rows are free slots, so a bucket cannot exceed the slot count); attention lengths
    are ATTENTION_BUCKETS below max_context, then max_context; with the decode-attention
    kernel, max_context alone (every row reads only its own keys whatever the bucket).
    """

    def __init__(self, max_slots: int, max_context: int, *, per_row_attention: bool = False):
        """per_row_attention: the frame step's attention reads each row's own keys
        (fused.attention's decode kernel), so one attention length serves every context."""
        self.max_slots, self.max_context = max_slots, max_context
        self.batch_sizes = _ladder(batch_buckets(max_slots), max_slots)
        self.attention_lengths = (max_context,) if per_row_attention else _ladder(ATTENTION_BUCKETS, max_context)
        self.top_k_bounds = TOP_K_BOUNDS

    def buckets(self) -> list[StepBucket]:
        return [
            StepBucket(batch, length, bound)
            for batch in self.batch_sizes
            for length in self.attention_lengths
            for bound in self.top_k_bounds
        ]

    def bucket_for(self, count: int, attend_len: int, top_k: int) -> StepBucket:
        """The smallest bucket that holds `count` rows attending `attend_len` positions
        with top-k up to `top_k` (the largest top_k among the sampled rows)."""
        return StepBucket(
            _smallest_at_least(self.batch_sizes, count),
            _smallest_at_least(self.attention_lengths, attend_len),
            _smallest_at_least(self.top_k_bounds, top_k),
        )


def _ladder(steps, top: int) -> tuple[int, ...]:
    return tuple(step for step in steps if step < top) + (top,)


def _smallest_at_least(ladder: tuple[int, ...], value: int) -> int:
    for step in ladder:
        if value <= step:
            return step
    raise ValueError(f"{value} is beyond the largest bucket {ladder[-1]}")


__all__ = ["ATTENTION_BUCKETS", "BucketPlan", "FrameStep", "StepBucket", "TOP_K_BOUNDS", "batch_buckets"]
