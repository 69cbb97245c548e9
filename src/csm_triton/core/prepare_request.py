"""csm_prepare's request, read once at the model's boundary and checked here.

The model hands over the tensors the request carries (`INPUT_NAMES`, absent ones left
out); `PrepareRequest.from_inputs` decodes and checks every input that is cheap to
check (TEXT, SPEAKER, NORMALIZE, the voice's id and transcript), in that order, before
any voice is resolved or audio encoded. What needs the voice store or the encoder (the
voice, the context turns' audio) is checked where they are used, in core.voices and
core.conversation, from the fields kept here untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from csm_triton import constants as C
from csm_triton.core import conversation, validation

__all__ = ["CLIENT_INPUTS", "INPUT_NAMES", "PrepareRequest"]

# What a client may send csm_tts / csm_tts_stream for csm_prepare (forwarded as is)...
CLIENT_INPUTS = ("TEXT", "NORMALIZE", "VOICE_ID", "REFERENCE_AUDIO", "REFERENCE_SAMPLE_RATE", "REFERENCE_TEXT",
                 *conversation.CONTEXT_INPUTS)
# ...and csm_tts_stream's own: a piece of a longer text (CONTINUE_FROM) is budgeted as one.
INPUT_NAMES = (*CLIENT_INPUTS, "budget_every_segment")


def _texts(inputs: Mapping[str, np.ndarray], name: str) -> list[str] | None:
    return validation.decode_utf8(inputs[name], name) if name in inputs else None


@dataclass(frozen=True)
class PrepareRequest:
    text: str
    speaker: int
    speaker_given: bool  # an adapter voice's default speaker applies only when SPEAKER is absent
    normalize: bool
    budget_every_segment: bool
    voice_id: str | None = None
    reference_text: str | None = None
    reference_audio: np.ndarray | None = field(default=None, repr=False)
    reference_sample_rate: np.ndarray | None = None
    # conversation.context_turns' keyword arguments, as the request sent them
    context: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, np.ndarray]) -> "PrepareRequest":
        text = validation.single_string(_texts(inputs, "TEXT"), "TEXT")
        return cls(
            text=conversation.spoken_text(text, "TEXT", max_chars=C.MAX_LONG_TEXT_CHARS),
            speaker=conversation.speaker_id(inputs.get("SPEAKER")),
            speaker_given="SPEAKER" in inputs,
            normalize=validation.flag(inputs.get("NORMALIZE"), "NORMALIZE", True),
            budget_every_segment=validation.flag(inputs.get("budget_every_segment"), "budget_every_segment", False),
            voice_id=validation.single_text(_texts(inputs, "VOICE_ID"), "VOICE_ID", required=False),
            reference_text=validation.single_string(_texts(inputs, "REFERENCE_TEXT"), "REFERENCE_TEXT",
                                                    required=False),
            reference_audio=inputs.get("REFERENCE_AUDIO"),
            reference_sample_rate=inputs.get("REFERENCE_SAMPLE_RATE"),
            context={
                "texts": _texts(inputs, "CONTEXT_TEXT"),
                "speakers": inputs.get("CONTEXT_SPEAKER"),
                "audio": inputs.get("CONTEXT_AUDIO"),
                "audio_lengths": inputs.get("CONTEXT_AUDIO_LENGTHS"),
                "sample_rate": inputs.get("CONTEXT_SAMPLE_RATE"),
                "voice_ids": _texts(inputs, "CONTEXT_VOICE_ID"),
            },
        )
