"""csm_prepare's request, read once at the model's boundary and checked here.

The model hands over the tensors the request carries (`INPUT_NAMES`, absent ones left
out); `PrepareRequest.from_inputs` decodes and checks every input that is cheap to
check (TEXT, SPEAKER, NORMALIZE, SENTENCE_SEGMENTS, the voice's id and transcript), in that order, before
any voice is resolved or audio encoded. What needs the voice store or the encoder (the
voice, the context turns' audio) is checked where they are used, in core.voices and
core.conversation, from the fields kept here untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from csm_triton import constants as C
from csm_triton.core import conversation, text_split, validation
from csm_triton.errors import InvalidInput

__all__ = ["CLIENT_INPUTS", "INPUT_NAMES", "PrepareRequest", "check_sentence_segments"]

# What a client may send csm_tts / csm_tts_stream for csm_prepare (forwarded as is)...
CLIENT_INPUTS = (
    "TEXT",
    "NORMALIZE",
    "SENTENCE_SEGMENTS",
    "VOICE_ID",
    "REFERENCE_AUDIO",
    "REFERENCE_SAMPLE_RATE",
    "REFERENCE_TEXT",
    *conversation.CONTEXT_INPUTS,
)
# ...and csm_tts_stream's own: a piece of a longer text (CONTINUE_FROM) is budgeted as one;
# `head_only` asks for the first segment alone and the rest's sentences, which come back
# as `pieces` / `spoken_pieces` in a second request for the rest's segments alone
# (core.text_split.split_head: a long text's first audio waits for its first segment only).
INPUT_NAMES = (*CLIENT_INPUTS, "budget_every_segment", "head_only", "pieces", "spoken_pieces")


def check_sentence_segments(count: int) -> None:
    """SENTENCE_SEGMENTS' bound, checked on the sentences counted before any work, and on
    the segments the split made (its fallback scan, past its time budget, may cut more)."""
    if count > C.MAX_SENTENCE_SEGMENTS:
        raise InvalidInput(
            f"input 'TEXT' has more than {C.MAX_SENTENCE_SEGMENTS} sentences, the most a text spoken one "
            "sentence per segment (SENTENCE_SEGMENTS, captions) may have"
        )


def _texts(inputs: Mapping[str, np.ndarray], name: str) -> list[str] | None:
    return validation.decode_utf8(inputs[name], name) if name in inputs else None


@dataclass(frozen=True)
class PrepareRequest:
    text: str
    speaker: int
    speaker_given: bool  # an adapter voice's default speaker applies only when SPEAKER is absent
    normalize: bool
    budget_every_segment: bool
    # SENTENCE_SEGMENTS: each sentence a segment of its own, so SEGMENT_TIMES time sentences
    sentence_segments: bool = False
    head_only: bool = False
    # The rest of a text split by head_only: its sentences as written, and the parts of the
    # sentence the head ended in, normalized already. None: TEXT is split here.
    pieces: list[str] | None = None
    spoken_pieces: list[str] = field(default_factory=list)
    voice_id: str | None = None
    reference_text: str | None = None
    reference_audio: np.ndarray | None = field(default=None, repr=False)
    reference_sample_rate: np.ndarray | None = None
    # conversation.context_turns' keyword arguments, as the request sent them
    context: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, np.ndarray]) -> PrepareRequest:
        text = validation.single_string(_texts(inputs, "TEXT"), "TEXT")
        pieces, spoken_pieces = _texts(inputs, "pieces"), _texts(inputs, "spoken_pieces")
        if pieces is not None or spoken_pieces is not None:
            pieces, spoken_pieces = pieces or [], spoken_pieces or []
            if sum(map(len, pieces)) + sum(map(len, spoken_pieces)) > C.NORMALIZED_TEXT_MAX_CHARS:
                raise InvalidInput(
                    f"inputs 'pieces' and 'spoken_pieces' hold more than {C.NORMALIZED_TEXT_MAX_CHARS} characters"
                )
        sentence_segments = validation.flag(inputs.get("SENTENCE_SEGMENTS"), "SENTENCE_SEGMENTS", False)
        text = conversation.spoken_text(text, "TEXT", max_chars=C.MAX_LONG_TEXT_CHARS)
        if sentence_segments and pieces is None:
            check_sentence_segments(text_split.sentence_count(text))
        return cls(
            text=text,
            speaker=conversation.speaker_id(inputs.get("SPEAKER")),
            speaker_given="SPEAKER" in inputs,
            normalize=validation.flag(inputs.get("NORMALIZE"), "NORMALIZE", True),
            sentence_segments=sentence_segments,
            budget_every_segment=validation.flag(inputs.get("budget_every_segment"), "budget_every_segment", False),
            head_only=validation.flag(inputs.get("head_only"), "head_only", False),
            pieces=pieces,
            spoken_pieces=spoken_pieces or [],
            voice_id=validation.single_text(_texts(inputs, "VOICE_ID"), "VOICE_ID", required=False),
            reference_text=validation.single_string(_texts(inputs, "REFERENCE_TEXT"), "REFERENCE_TEXT", required=False),
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
