"""Prefill: waiting prompts written into their cache rows, several in one forward.

A prompt is prefilled chunk by chunk (prefix_cache.PrefillPlan: one chunk per context
turn, then the text to speak); the chunks the prefix cache holds are copied, the rest
computed. The prompts admitted in one engine step are computed together: round r runs
every prompt's r-th chunk still to compute in one backbone forward, padded to the
longest (the prompts with the most chunks take the first rows, so each round's rows are
contiguous and a forward reads a view of the cache). A step's prompts are bounded by a
token budget (EngineConfig.prefill_tokens_per_step), so the running streams wait for
one bounded prefill per frame instead of one forward per chunk per prompt.

Padding is arithmetic nobody reads: a padded token sits at a position past its prompt's
end (clamped to the cache), where its keys and values are overwritten by the frame that
reaches that position before anything attends there, and no real token attends past its
own position. Alone (one prompt) a round computes exactly the unbatched forward.

Nothing here reads back to the host: positions, last-token indices and attention
lengths come from the prompts' lengths, which the host knows, and the audio
placeholders are found in the token ids on the host (lm.embed_prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from csm_triton.engine.device import host_to_device
from csm_triton.engine.lm import CsmLM
from csm_triton.engine.prefix_cache import PrefillPlan, PrefixCache, PrefixEntry
from csm_triton.engine.requests import RequestHandle

__all__ = ["PrefillJob", "prefill_together", "prefill_tokens"]


@dataclass
class PrefillJob:
    """One admitted request's prompt, its plan and what the prefix cache holds of it."""

    handle: RequestHandle
    adapter: int  # its AdapterBank slot (0: the base model)
    plan: PrefillPlan
    reused: list[PrefixEntry]  # the leading chunks the prefix cache holds
    row: int = -1  # its cache row, given by prefill_together

    @classmethod
    def of(cls, lm: CsmLM, prefix_cache: PrefixCache, handle: RequestHandle, adapter: int, version: str):
        """`version`: the adapter's weights (AdapterBank.version), so that turns cached
        under an adapter since replaced are not reused."""
        plan = PrefillPlan.of(handle.request, lm.audio_token_id, lm.audio_eos_token_id, version)
        return cls(handle, adapter, plan, prefix_cache.lookup(plan.keys))

    @property
    def chunks_to_compute(self) -> list[tuple[int, int, int]]:
        """(chunk index, start, end) of every chunk not copied from the cache; the last
        chunk (the text to speak) is never cached, so there is at least one."""
        starts = (0, *self.plan.ends[:-1])
        return [(i, starts[i], self.plan.ends[i]) for i in range(len(self.reused), len(self.plan.ends))]


Chunk = tuple[int, int, int]  # (chunk index, start, end)


def _in_rows(jobs: list[PrefillJob]) -> list[PrefillJob]:
    """The jobs in row order: most chunks to compute first, so that round r's prompts are
    rows first_row..first_row+k-1."""
    return sorted(jobs, key=lambda job: len(job.chunks_to_compute), reverse=True)


def _rounds(jobs: list[PrefillJob]) -> list[list[Chunk]]:
    """Per round, the chunk each job (in row order) computes in it: a prefix of the jobs."""
    todo = [job.chunks_to_compute for job in jobs]
    return [[chunks[r] for chunks in todo if len(chunks) > r] for r in range(len(todo[0]) if todo else 0)]


def prefill_tokens(jobs: list[PrefillJob]) -> int:
    """The tokens prefill_together computes for `jobs`, padding included: each round's
    rows times its longest chunk (what a step's token budget bounds)."""
    return sum(len(chunks) * max(end - start for _, start, end in chunks) for chunks in _rounds(_in_rows(jobs)))


def prefill_together(
    lm: CsmLM,
    cache,
    hidden: torch.Tensor,
    prefix_cache: PrefixCache,
    jobs: list[PrefillJob],
    first_row: int,
    adapters=None,
) -> list[tuple[PrefillJob, int | None]]:
    """The jobs' prompts into rows first_row.. of `cache` (each job's `row` set here), the
    last hidden state of each into hidden[row]. Returns (job, next position to write) in
    row order; None: cancelled between rounds (nothing stored for it). A prefill that
    raises stores nothing for any job. `adapters`: the engine's AdapterBank, or None."""
    device = lm.device
    jobs = _in_rows(jobs)
    rounds = _rounds(jobs)
    embeds = []
    for row, job in enumerate(jobs, start=first_row):
        job.row = row
        request = job.handle.request
        codes = np.asarray(request.audio_codes, dtype=np.int64).reshape(-1, lm.num_codebooks)
        embeds.append(lm.embed_prompt(np.asarray(request.input_ids, dtype=np.int64), codes))
        start = 0
        for entry, end in zip(job.reused, job.plan.ends):
            cache.k[:, row, :, start:end] = entry.k
            cache.v[:, row, :, start:end] = entry.v
            start = end
    adapter_slots = [job.adapter for job in jobs]
    cancelled = [False] * len(jobs)
    new: list[list[tuple[str, PrefixEntry]]] = [[] for _ in jobs]
    for chunks in rounds:
        count = len(chunks)
        for i in range(count):
            cancelled[i] = cancelled[i] or jobs[i].handle.cancelled
        if all(cancelled[:count]):  # nobody left to compute this round for
            break
        lora = None
        if adapters is not None and any(adapter_slots[:count]):
            lora = adapters.rows("backbone", host_to_device(np.array(adapter_slots[:count]), device))
        last = _forward_round(lm, cache, embeds[:count], chunks, first_row, lora)
        for i, (index, start, end) in enumerate(chunks):
            job = jobs[i]
            if index < job.plan.storable:
                new[i].append((job.plan.keys[index], PrefixEntry.copy_of(cache, job.row, start, end)))
            if index == len(job.plan.ends) - 1:  # its text's last token: the state frames start from
                hidden[job.row] = last[i]
    results = []
    for i, job in enumerate(jobs):
        if cancelled[i]:
            results.append((job, None))
            continue
        prefix_cache.commit(job.plan.keys, job.reused, new[i])  # stored only now: the prefill is whole
        results.append((job, job.plan.ends[-1]))
    return results


def _forward_round(lm: CsmLM, cache, embeds, chunks, first_row: int, lora) -> torch.Tensor:
    """One forward over rows first_row..first_row+len(chunks)-1, each its chunk (index,
    start, end) padded to the longest -> each row's hidden state at its chunk's last
    token [rows, hidden]."""
    width = max(end - start for _, start, end in chunks)
    last_position = cache.k.shape[3] - 1
    if len(chunks) == 1:  # exactly the unbatched call
        _, start, end = chunks[0]
        x = embeds[0][None, start:end]
    else:
        x = embeds[0].new_zeros(len(chunks), width, embeds[0].shape[-1])
        for i, (_, start, end) in enumerate(chunks):
            x[i, : end - start] = embeds[i][start:end]
    # Padding continues past the chunk's end (a prompt ends before the cache does:
    # check_request leaves room for a frame), clamped to the cache's last position.
    positions = np.minimum(np.stack([np.arange(start, start + width) for _, start, _ in chunks]), last_position)
    lengths = np.array([end - start for _, start, end in chunks])
    return lm.backbone_forward(
        x,
        cache,
        first_row,
        host_to_device(positions, lm.device),
        lora,
        last=host_to_device(lengths - 1, lm.device),
        attend_len=max(end for _, _, end in chunks),
    )
