"""Per-request sampling that needs no host round trip and fits in a CUDA graph.

Each request has its own temperature, top-k and random generator. The generator
fills the request's row of a noise buffer with Exp(1) draws before the frame step;
inside the step, a code is drawn as argmax(p / noise) over the temperature-scaled,
top-k-filtered distribution p (the "exponential race": the same distribution as
multinomial sampling, computed with fixed shapes and no synchronisation). A
request's codes therefore depend on its seed alone, never on its batch-mates.
Greedy rows take the argmax of the logits, exactly like transformers' greedy search.
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
        return cls(temperature, top_k, greedy, generator)

    def fill_noise(self, row: torch.Tensor) -> None:
        """The draws for one frame (all codebooks) into this request's noise row."""
        if self.greedy:
            row.fill_(1.0)
        else:
            row.exponential_(generator=self.generator)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, greedy: torch.Tensor,
           noise: torch.Tensor, top_k_bound: int | None = None) -> torch.Tensor:
    """logits [B, V] float32 (specials at -inf); temperature [B]; top_k [B] int64;
    greedy [B] bool; noise [B, V] Exp(1) draws -> codes [B].

    top_k_bound: the largest top_k of any row (default V). The k-th largest score comes
    from torch.topk over that many candidates, not from a sort of all V: the same value,
    and on the CPU this whole function is ~3.5x faster at a bound of 64 of 2,051 (8 rows:
    22 -> 6 ms per frame of 32 codebooks). A top_k above the bound is clamped to it (the
    engine picks a bound that holds every sampled row's top_k).
    """
    bound = logits.shape[-1] if top_k_bound is None else min(top_k_bound, logits.shape[-1])
    scores = logits / temperature[:, None]
    ranked = torch.topk(scores, bound, dim=-1).values  # descending
    kth = ranked.gather(1, (top_k.clamp(1, bound) - 1)[:, None])
    scores = scores.masked_fill(scores < kth, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    drawn = (probabilities / noise).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)
