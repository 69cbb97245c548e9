"""Input checks for every public model, in one place, against the limits in
`csm_triton.constants`. Each failure raises `InvalidInput` with a message that
names the input and the rule, which Triton returns to the client as INVALID_ARG.
"""

from __future__ import annotations

import numpy as np

from csm_triton import constants as C
from csm_triton.errors import InvalidInput


def single_text(texts: list[str] | None, name: str, *, required: bool = True) -> str | None:
    """Exactly one non-blank string of at most MAX_TEXT_CHARS characters."""
    if texts is None:
        if required:
            raise InvalidInput(f"missing required input '{name}'")
        return None
    if len(texts) != 1:
        raise InvalidInput(f"input '{name}' must hold exactly one string, got {len(texts)}")
    text = texts[0]
    if not text.strip():
        raise InvalidInput(f"input '{name}' is empty")
    if len(text) > C.MAX_TEXT_CHARS:
        raise InvalidInput(f"input '{name}' has {len(text)} characters; the limit is {C.MAX_TEXT_CHARS}")
    if "\x00" in text:
        raise InvalidInput(f"input '{name}' contains a NUL character")
    return text


def token_count(count: int, name: str) -> None:
    if count > C.MAX_TEXT_TOKENS:
        raise InvalidInput(f"input '{name}' is {count} tokens long; the limit is {C.MAX_TEXT_TOKENS}")


def audio_codes(codes: np.ndarray, name: str, *, max_frames: int = C.MAX_CODEC_FRAMES) -> np.ndarray:
    """Mimi codes shaped [frames, NUM_CODEBOOKS], each in [0, CODEBOOK_SIZE)."""
    if codes.dtype.kind not in "iu":
        raise InvalidInput(f"input '{name}' must be an integer tensor, got {codes.dtype}")
    if codes.ndim != 2 or codes.shape[1] != C.NUM_CODEBOOKS:
        raise InvalidInput(
            f"input '{name}' must have shape [frames, {C.NUM_CODEBOOKS}], got {list(codes.shape)}"
        )
    if codes.shape[0] > max_frames:
        raise InvalidInput(f"input '{name}' has {codes.shape[0]} frames; the limit is {max_frames}")
    if codes.size and (codes.min() < 0 or codes.max() >= C.CODEBOOK_SIZE):
        raise InvalidInput(f"input '{name}' holds codes outside [0, {C.CODEBOOK_SIZE})")
    return codes.astype(np.int64, copy=False)
