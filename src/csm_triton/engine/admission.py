"""How a request enters the engine: checked, prefilled into a free cache row, slotted.

Kept apart from the engine's loop (engine.py) because each step here concerns one
request, not the batch: `check_request` refuses a bad request before it is queued
(on CUDA an out-of-range index is a device-side assert that breaks the whole process,
see engine.faults), prefill.py writes the admitted prompts into their rows of the
backbone cache, and `Slot` is what the loop then carries for each from frame to frame;
`compact` keeps the active slots in rows 0..n-1 as they leave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from csm_triton.core import validation
from csm_triton.engine.lm import CsmLM
from csm_triton.engine.requests import GenerationRequest, RequestHandle
from csm_triton.engine.sampling import SamplerState
from csm_triton.errors import InvalidInput

__all__ = ["Slot", "acquire_adapter", "check_request", "compact", "move_row"]


@dataclass
class Slot:
    row: int  # its row of the KV cache (and of the hidden states); changes when others leave
    handle: RequestHandle
    sampler: SamplerState
    position: int  # next backbone position to write, as of the frames read so far
    frames_done: int = 0
    in_flight: int = 0  # frames launched for it whose codes are not read yet (0 or 1)
    done: bool = False  # finished: frames still in flight for it are dropped
    adapter: int = 0  # its LoRA adapter's slot in the engine's AdapterBank (0: the base model)
    chunks_sent: int = 0
    pending: list = field(default_factory=list)  # frames not yet delivered

    def chunk_size(self) -> int:
        request = self.handle.request
        if self.chunks_sent == 0 and request.first_chunk_frames:
            return request.first_chunk_frames
        return request.stream_every


def check_request(request: GenerationRequest, lm: CsmLM, max_context: int) -> None:
    """Every integer the engine indexes with, before any work (core.validation); raises
    InvalidInput."""
    validation.token_ids(request.input_ids, "input_ids", lm.text_vocab_size)
    codes = np.asarray(request.audio_codes)
    if codes.size:  # no codes at all may come in any dtype (np.zeros((0, 32)) is float)
        validation.audio_codes(codes, "prompt_codes", max_frames=max_context)
    tokens = len(request.input_ids)
    if request.max_frames < 1:
        raise InvalidInput("max_frames must be at least 1")
    if tokens + request.max_frames > max_context:
        raise InvalidInput(
            f"prompt of {tokens} tokens plus {request.max_frames} frames exceeds the context of {max_context} positions"
        )
    placeholders = int(np.count_nonzero(np.asarray(request.input_ids) == lm.audio_token_id))
    if placeholders != len(request.audio_codes):
        raise InvalidInput(f"prompt has {placeholders} audio placeholders but {len(request.audio_codes)} frames")


def acquire_adapter(adapters, request: GenerationRequest) -> int:
    """The AdapterBank slot of the request's adapter (0: none asked); InvalidInput when it
    asks for one and this engine serves none, or the store refuses it."""
    if not request.adapter:
        return 0
    if adapters is None:
        raise InvalidInput(f"adapter {request.adapter!r} asked, but this model serves no LoRA adapters (lora_slots 0)")
    return adapters.acquire(request.adapter)


def compact(active: list[Slot], slot: Slot, cache, hidden: torch.Tensor) -> bool:
    """Frees `slot`'s row of `active` (rows 0..n-1); the slot in the last row moves into it
    (keys, values and hidden state: one copy of its context, once per departure instead
    of a gather per layer per frame), so the active slots stay rows 0..n-1. Called
    between frames; a step still running on the device finishes before the copies (the
    same stream), so the moved slot's frame in flight moves too. True when a slot moved."""
    last = active.pop()
    if last is slot:
        return False
    # Its context: positions 0..position-1, and the frame a launched step writes next.
    move_row(cache, hidden, last.row, slot.row, last.position + last.in_flight)
    last.row = slot.row
    active[slot.row] = last
    return True


def move_row(cache, hidden: torch.Tensor, source: int, target: int, written: int) -> None:
    """A slot's context (positions 0..written-1) and hidden state from row `source` to `target`."""
    cache.k[:, target, :, :written] = cache.k[:, source, :, :written]
    cache.v[:, target, :, :written] = cache.v[:, source, :, :written]
    hidden[target] = hidden[source]
