"""Per-request sampling: each request has its own temperature, top-k and random
generator, so its codes never depend on which requests share its batch.

The order of operations is transformers' (temperature, then top-k, softmax,
multinomial), so a seeded request at batch 1 draws exactly what `generate` draws
after `torch.manual_seed(seed)`.
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


def sample(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """logits [B, V] (float32, specials already at -inf) -> one token per row [B]."""
    tokens = logits.argmax(dim=-1)
    sampled_rows = [row for row, state in enumerate(states) if not state.greedy]
    if not sampled_rows:
        return tokens
    index = torch.tensor(sampled_rows, device=logits.device)
    temperatures = torch.tensor([states[r].temperature for r in sampled_rows], device=logits.device)
    top_ks = [min(states[r].top_k, logits.shape[-1]) for r in sampled_rows]
    scores = logits[index] / temperatures[:, None]
    top_values = torch.topk(scores, max(top_ks), dim=-1).values
    kth = top_values.gather(1, torch.tensor(top_ks, device=logits.device)[:, None] - 1)
    scores = scores.masked_fill(scores < kth, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    for position, row in enumerate(sampled_rows):
        draw = torch.multinomial(probabilities[position : position + 1], 1, generator=states[row].generator)
        tokens[row] = draw[0, 0]
    return tokens
