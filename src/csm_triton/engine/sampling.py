"""Per-request sampling that needs no host round trip and fits in a CUDA graph.

Each request has its own temperature, top-k and random generator. The generator
fills the request's row of a noise buffer with Exp(1) draws E before the frame step;
inside the step, a code is drawn as argmax(s - log E) over the temperature-scaled,
top-k-filtered scores s: the "exponential race" argmax(p / E) written in logs (-log E
is a Gumbel draw, so this is the Gumbel-max trick), the same distribution as
multinomial sampling, with fixed shapes and no synchronisation. A request's codes
therefore depend on its seed alone, never on its batch-mates. Greedy rows have E = 1
(log 0) and temperature 1, so they take the argmax of the logits, exactly like
transformers' greedy search, through the same kernels as every other row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class SamplerState:
    temperature: float
    top_k: int
    greedy: bool
    generator: torch.Generator | None = field(default=None, repr=False)

    @classmethod
    def create(cls, *, temperature: float, top_k: int, greedy: bool, seed: int | None,
               device: torch.device) -> "SamplerState":
        generator = None
        if not greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed if seed is not None else random.getrandbits(63))
        # Greedy: temperature 1 (an exact division) and Exp(1) draws of 1 (log 0): argmax of the logits.
        return cls(1.0 if greedy else temperature, top_k, greedy, generator)

    def fill_noise(self, row: torch.Tensor) -> None:
        """The draws for one frame (all codebooks) into this request's noise row."""
        if self.greedy:
            row.fill_(1.0)
        else:
            row.exponential_(generator=self.generator)


def sample(logits: torch.Tensor, temperature: torch.Tensor, kth_index: torch.Tensor, log_noise: torch.Tensor,
           top_k_bound: int | None = None) -> torch.Tensor:
    """logits [B, V] float32 (only codes that may be drawn); temperature [B] (1 for greedy
    rows); kth_index [B, 1] int64: top_k - 1 (top_k_index); log_noise [B, V]: log of the
    Exp(1) draws (0 for greedy rows) -> codes [B]. Six kernels.

    top_k_bound: the largest top_k of any row (default V). The k-th largest score comes
    from torch.topk over that many candidates, not from a sort of all V: the same value,
    and on the CPU ~3.5x faster at a bound of 64 of 2,048 (8 rows: 22 -> 6 ms per frame
    of 32 codebooks).
    """
    bound = logits.shape[-1] if top_k_bound is None else min(top_k_bound, logits.shape[-1])
    scores = logits / temperature[:, None]
    kth = torch.topk(scores, bound, dim=-1).values.gather(1, kth_index)  # descending: the k-th largest
    return scores.masked_fill(scores < kth, float("-inf")).sub(log_noise).argmax(dim=-1)


def top_k_index(top_k: torch.Tensor, bound: int) -> torch.Tensor:
    """[B] top_k -> [B, 1] the k-th score's index among the `bound` largest, once per frame."""
    return (top_k.clamp(1, bound) - 1)[:, None]


def log_noise(noise: torch.Tensor) -> torch.Tensor:
    """log E of the noise buffer, once per frame for every codebook. Exp(1) draws of
    exactly 0 are possible (float rounding): clamped to the smallest normal float, so a
    masked score stays -inf instead of turning NaN."""
    return noise.clamp_min(torch.finfo(noise.dtype).tiny).log()
