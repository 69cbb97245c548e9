"""Which voice a request speaks in: a stored voice, an inline reference, or none."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from csm_triton import constants as C
from csm_triton.core import adapters, validation
from csm_triton.core.audio import prepare_reference_audio
from csm_triton.core.voice_owners import check_owner
from csm_triton.core.voice_records import ADAPTER
from csm_triton.core.voice_store import Voice, VoiceStore
from csm_triton.errors import InvalidInput

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
       if there is none; the id must match VOICE_ID_PATTERN). An adapter voice is
       refused for now: speaking with its clip but without its adapter would be
       another voice (the engine's per-request adapters are being built).
    5. REFERENCE_AUDIO + REFERENCE_TEXT + REFERENCE_SAMPLE_RATE -> the audio is checked,
       resampled to 24 kHz (audio.prepare_reference_audio) and encoded by `encode`;
       nothing is stored.
    6. None of them -> None: the model's default voice.
    """

    def __init__(self, store: VoiceStore, encode: Encoder):
        self.store = store
        self.encode = encode

    def resolve(
        self,
        voice_id: str | None = None,
        reference_audio: np.ndarray | None = None,
        reference_sample_rate=None,
        reference_text: str | None = None,
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
            if voice.kind == ADAPTER:  # speaks through csm_lm's adapter (adapter_voice); its clip, if any
                return (voice.transcript, voice.codes) if voice.has_clip else None
            return voice.transcript, voice.codes
        if reference_text is None:
            raise InvalidInput("'REFERENCE_AUDIO' needs 'REFERENCE_TEXT', the transcript of what it says")
        if reference_sample_rate is None:
            raise InvalidInput("'REFERENCE_AUDIO' needs 'REFERENCE_SAMPLE_RATE', its sample rate in Hz")
        codes, _ = self.encode_reference(reference_audio, reference_sample_rate)
        return reference_text, codes

    def adapter_voice(self, voice_id: str | None) -> Voice | None:
        """The stored voice `voice_id` when it is a LoRA adapter voice (its requests are
        generated with its adapter, its default speaker and its clip if it has one), else
        None (no id, or a clip voice; an unknown id is refused by resolve)."""
        if voice_id is None or voice_id not in self.store:
            return None
        voice = self.store.get(voice_id)
        return voice if voice.kind == ADAPTER else None

    def context_reference(self, voice_id: str) -> tuple[str, np.ndarray]:
        """A stored voice as a context turn (CONTEXT_VOICE_ID): its transcript and codes.
        An adapter voice lends its clip; one without a clip is refused."""
        voice = self.store.get(voice_id)
        if not voice.has_clip:
            raise InvalidInput(
                f"voice '{voice.voice_id}' is a LoRA adapter voice without a reference clip; "
                "it cannot be a context turn"
            )
        return voice.transcript, voice.codes

    def encode_reference(self, reference_audio: np.ndarray, reference_sample_rate) -> tuple[np.ndarray, float]:
        """Checked, resampled and encoded reference -> (codes [frames, 32] int64, seconds at 24 kHz)."""
        audio = prepare_reference_audio(reference_audio, reference_sample_rate)
        codes = np.asarray(self.encode(audio))
        if codes.ndim != 2 or len(codes) == 0:
            raise RuntimeError(f"the encoder returned codes shaped {list(codes.shape)}, expected [frames, 32]")
        codes = validation.audio_codes(codes, "encoded reference")
        return codes, audio.size / C.SAMPLE_RATE

    def register(
        self,
        voice_id: str,
        reference_audio: np.ndarray,
        reference_sample_rate,
        reference_text: str,
        owner: str | None = None,
    ) -> Voice:
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

    def register_adapter(
        self,
        voice_id: str,
        adapter_config: bytes,
        adapter_weights: bytes,
        base: adapters.ServedBase,
        *,
        manifest: bytes | None = None,
        default_speaker: int | None = None,
        reference_audio: np.ndarray | None = None,
        reference_sample_rate=None,
        reference_text: str | None = None,
        owner: str | None = None,
    ) -> Voice:
        """Checks a LoRA adapter against the served base (core/adapters.check_adapter) and
        stores it as an adapter voice, with an optional default speaker and reference clip
        (REFERENCE_AUDIO + REFERENCE_TEXT + REFERENCE_SAMPLE_RATE, encoded as register's).
        The cheap checks (id, owner, the clip's inputs, the store's room) come first; the
        adapter is parsed before the clip is encoded; nothing is written before all pass."""
        voice_id = validation.voice_id(voice_id)
        owner = check_owner(owner)
        clip = (reference_audio, reference_sample_rate, reference_text)
        if any(part is not None for part in clip) and reference_audio is None:
            raise InvalidInput("'REFERENCE_TEXT' or 'REFERENCE_SAMPLE_RATE' was given without 'REFERENCE_AUDIO'")
        if reference_audio is not None:
            if reference_text is None or reference_sample_rate is None:
                raise InvalidInput(
                    "an adapter's reference clip needs 'REFERENCE_AUDIO', 'REFERENCE_TEXT' "
                    "and 'REFERENCE_SAMPLE_RATE' together"
                )
            reference_text = validation.text(reference_text, "REFERENCE_TEXT")
        if default_speaker is not None and not 0 <= int(default_speaker) <= C.MAX_SPEAKER_ID:
            raise InvalidInput(f"'DEFAULT_SPEAKER' must be in [0, {C.MAX_SPEAKER_ID}], got {default_speaker}")
        if voice_id in self.store:
            raise InvalidInput(f"voice '{voice_id}' already exists; delete it first to register it again")
        self.store.check_room(adapter=True)
        checked = adapters.check_adapter(adapter_config, adapter_weights, base, manifest=manifest)
        description = {
            **checked.description(),
            "base_model_sha256": base.sha256,
            "base_hash_checked": checked.recorded_base_sha256 is not None,
        }
        codes = seconds = None
        if reference_audio is not None:
            codes, seconds = self.encode_reference(reference_audio, reference_sample_rate)
        return self.store.register_adapter(
            voice_id,
            adapter_config,
            adapter_weights,
            description,
            default_speaker=default_speaker,
            codes=codes,
            transcript=reference_text,
            duration_seconds=seconds,
            owner=owner,
        )
