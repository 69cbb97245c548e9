"""Which voice a request speaks in: a stored voice, an inline reference, or none."""

from __future__ import annotations

from typing import Callable

import numpy as np

from csm_triton import constants as C
from csm_triton.core import validation
from csm_triton.core.audio import prepare_reference_audio
from csm_triton.errors import InvalidInput
from csm_triton.core.voice_owners import check_owner
from csm_triton.core.voice_store import Voice, VoiceStore

__all__ = ["Encoder", "VoiceResolver"]

# 24 kHz float32 mono [samples] -> Mimi codes [frames, NUM_CODEBOOKS] int64
Encoder = Callable[[np.ndarray], np.ndarray]


class VoiceResolver:
    """Turns a request's voice inputs into the (transcript, codes) of its reference.

    REFERENCE_TEXT's own rules (validation.text) are checked here, first, for both
    doors (csm_prepare and voice_register hand it over unchecked). Then the rules,
    in the order they are checked (each failure is InvalidInput):

    1. VOICE_ID and REFERENCE_AUDIO together are refused: give one or the other.
    2. REFERENCE_TEXT without REFERENCE_AUDIO is refused (a stored voice brings its own
       transcript), and so is REFERENCE_SAMPLE_RATE without REFERENCE_AUDIO.
    3. REFERENCE_AUDIO needs REFERENCE_TEXT (its transcript) and REFERENCE_SAMPLE_RATE.
    4. VOICE_ID alone -> the stored voice's transcript and codes ("unknown voice 'x'"
       if there is none; the id must match VOICE_ID_PATTERN).
    5. REFERENCE_AUDIO + REFERENCE_TEXT + REFERENCE_SAMPLE_RATE -> the audio is checked,
       resampled to 24 kHz (audio.prepare_reference_audio) and encoded by `encode`;
       nothing is stored.
    6. None of them -> None: the model's default voice.
    """

    def __init__(self, store: VoiceStore, encode: Encoder):
        self.store = store
        self.encode = encode

    def resolve(self, voice_id: str | None = None, reference_audio: np.ndarray | None = None,
                reference_sample_rate=None, reference_text: str | None = None
                ) -> tuple[str, np.ndarray] | None:
        if reference_text is not None:
            reference_text = validation.text(reference_text, "REFERENCE_TEXT")
        if voice_id is not None and reference_audio is not None:
            raise InvalidInput("give either VOICE_ID or REFERENCE_AUDIO, not both")
        if reference_audio is None:
            if reference_text is not None:
                raise InvalidInput(
                    "'REFERENCE_TEXT' was given without 'REFERENCE_AUDIO' (a stored voice brings its own transcript)"
                )
            if reference_sample_rate is not None:
                raise InvalidInput("'REFERENCE_SAMPLE_RATE' was given without 'REFERENCE_AUDIO'")
            if voice_id is None:
                return None
            voice = self.store.get(voice_id)
            return voice.transcript, voice.codes
        if reference_text is None:
            raise InvalidInput("'REFERENCE_AUDIO' needs 'REFERENCE_TEXT', the transcript of what it says")
        if reference_sample_rate is None:
            raise InvalidInput("'REFERENCE_AUDIO' needs 'REFERENCE_SAMPLE_RATE', its sample rate in Hz")
        codes, _ = self.encode_reference(reference_audio, reference_sample_rate)
        return reference_text, codes

    def encode_reference(self, reference_audio: np.ndarray, reference_sample_rate) -> tuple[np.ndarray, float]:
        """Checked, resampled and encoded reference -> (codes [frames, 32] int64, seconds at 24 kHz)."""
        audio = prepare_reference_audio(reference_audio, reference_sample_rate)
        codes = np.asarray(self.encode(audio))
        if codes.ndim != 2 or len(codes) == 0:
            raise RuntimeError(f"the encoder returned codes shaped {list(codes.shape)}, expected [frames, 32]")
        codes = validation.audio_codes(codes, "encoded reference")
        return codes, audio.size / C.SAMPLE_RATE

    def register(self, voice_id: str, reference_audio: np.ndarray, reference_sample_rate,
                 reference_text: str, owner: str | None = None) -> Voice:
        """Encodes a reference once and stores it under `voice_id` as `owner`'s (the id,
        the owner, the transcript and the store's room are checked first, so a refused
        request costs no encoding; an existing id is refused)."""
        voice_id = validation.voice_id(voice_id)
        owner = check_owner(owner)
        transcript = validation.text(reference_text, "REFERENCE_TEXT")
        if voice_id in self.store:
            raise InvalidInput(f"voice '{voice_id}' already exists; delete it first to register it again")
        self.store.check_room()
        codes, seconds = self.encode_reference(reference_audio, reference_sample_rate)
        return self.store.register(voice_id, codes, transcript, seconds, owner=owner)
