"""One frame for a padded batch of slots, on static buffers: codebook 0 from the
backbone's last hidden state, codebooks 1..31 from the depth decoder, then the
backbone step that embeds the new frame and leaves the next hidden state.

Every shape is fixed per (batch bucket, attention length), nothing reads back to the
host, and the random draws come in as a buffer, so on CUDA the whole step is
captured once as a CUDA graph and replayed: one launch instead of ~1,500 kernel
launches per frame, which is where `generate`'s 290 ms/frame goes (the weights take
~7 ms to read on an H100). On the CPU the same code runs eagerly.
"""

from __future__ import annotations

import torch

from csm_triton.engine.layers import KVCache
from csm_triton.engine.lm import CsmLM
from csm_triton.engine.sampling import sample


class FrameStep:
    def __init__(self, lm: CsmLM, cache: KVCache, depth_cache: KVCache, hidden: torch.Tensor,
                 noise: torch.Tensor, *, batch: int, scratch_row: int, attend_len: int,
                 capture: bool = False, graph_pool=None):
        device = lm.device
        self.lm, self.cache, self.depth_cache, self.hidden = lm, cache, depth_cache, hidden
        self.attend_len = attend_len
        # Unused rows point at the scratch slot, greedy, so they cost arithmetic only.
        self.rows = torch.full((batch,), scratch_row, dtype=torch.long, device=device)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.temperature = torch.ones(batch, device=device)
        self.top_k = torch.ones(batch, dtype=torch.long, device=device)
        self.greedy = torch.ones(batch, dtype=torch.bool, device=device)
        # Rows of the engine's one noise buffer ([rows, 32, vocab], 256 KiB a row): every
        # bucket's graph reads the same memory, so buckets cost no extra noise buffers.
        self.noise = noise[:batch]
        self.codes = torch.zeros((batch, lm.num_codebooks), dtype=torch.long, device=device)
        self.graph = self._capture(graph_pool) if capture else None

    def _compute(self) -> None:
        lm = self.lm
        hidden = self.hidden[self.rows]
        codes = [self._sample(lm.codebook0_logits(hidden), 0)]
        # Depth decoder: position 0 is the backbone's hidden state, position 1 codebook 0.
        step_input = torch.stack([hidden, lm.depth_embed(codes[0], 0)[:, 0]], dim=1)
        for codebook in range(1, lm.num_codebooks):
            codes.append(self._sample(lm.depth_logits(step_input, self.depth_cache, codebook), codebook))
            step_input = lm.depth_embed(codes[-1], codebook)
        frame = torch.stack(codes, dim=1)
        self.codes.copy_(frame)
        # The backbone consumes the new frame now, so the next step starts from its
        # hidden state; a slot that finishes with this frame just never reads it.
        embeds = lm.embed_frames(frame)[:, None].to(lm.dtype)
        attended = lm.backbone.forward(embeds, self.cache, self.rows, self.positions, self.attend_len)
        self.hidden[self.rows] = attended[:, -1]

    def _sample(self, logits: torch.Tensor, codebook: int) -> torch.Tensor:
        return sample(logits, self.temperature, self.top_k, self.greedy, self.noise[:, codebook])

    def _capture(self, graph_pool) -> "torch.cuda.CUDAGraph":
        # Warm up on a side stream (cuBLAS/cuDNN pick their kernels), then capture.
        # Buffers still point every row at the scratch slot, so this writes nothing
        # that a request will read.
        stream = torch.cuda.Stream(self.lm.device)
        stream.wait_stream(torch.cuda.current_stream(self.lm.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._compute()
        torch.cuda.current_stream(self.lm.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=graph_pool):
            self._compute()
        return graph

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._compute()


def batch_bucket(count: int) -> int:
    """Padded batch sizes: powers of two, so a few graphs cover every batch."""
    bucket = 1
    while bucket < count:
        bucket *= 2
    return bucket


ATTENTION_BUCKETS = (256, 512, 1024, 2048, 4096)


def attention_bucket(length: int, max_context: int) -> int:
    for bucket in ATTENTION_BUCKETS:
        if length <= bucket:
            return min(bucket, max_context)
    return max_context


__all__ = ["FrameStep", "attention_bucket", "batch_bucket"]
