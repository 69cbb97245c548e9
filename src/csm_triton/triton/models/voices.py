"""voice_register / voice_list / voice_delete: the voice-profile models.

Each `model_repository/voice_*/1/model.py` names one of these. Config
parameters (all optional):

- `voice_dir`: the store's folder. A relative path is resolved against the folder
  that holds the model repository, so the default `runtime/voices` lies next to the
  repository: inside it Triton would take the folder for a model, and rebuilding the
  repository (export.build_repository replaces it whole) would delete the voices.
- `admin_token_env`: the environment variable holding the admin token (CSM_ADMIN_TOKEN).
- `allow_anonymous_writes`: "true" lets anyone write when no token is configured;
  local development only, never in a committed config.
- `max_stored_voices` (voice_register): the most voices the store keeps
  (C.MAX_STORED_VOICES); a registration past it is refused, saying so.
- `max_stored_adapters` (voice_register): the most of them that may be LoRA adapters
  (C.MAX_STORED_ADAPTERS).
- `base_checkpoint` (voice_register): the served base checkpoint adapters are checked
  against, relative to the model repository (default `csm_lm/1/checkpoint`, where
  export.build_repository puts it; its manifest.json's digests give the base hash).

Adapter voices: ADAPTER_CONFIG (+ ADAPTER_WEIGHTS, optional ADAPTER_MANIFEST and
DEFAULT_SPEAKER) makes voice_register store a LoRA adapter (core/adapters.py checks it,
VoiceResolver.register_adapter stores it); REFERENCE_* then add an optional clip.

Owners: a write that carries the header `x-csm-voice-owner` (C.VOICE_OWNER_HEADER,
forwarded like the admin token) is made for that owner, a gateway's key id: a voice is
registered as theirs, and a deletion removes only a voice of theirs. The admin token
without the header is the admin, who registers voices of no owner and deletes any. The
header is believed only because the write also proved the admin token: only a
deployment's own gateway can claim an owner.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from csm_triton import constants as C
from csm_triton.core import adapters, validation
from csm_triton.core.voice_store import VoiceStore
from csm_triton.core.voices import VoiceResolver
from csm_triton.core.write_policy import WritePolicy
from csm_triton.errors import InvalidInput
from csm_triton.triton import adapter as triton
from csm_triton.triton.forward import forward_mimi_encoder
from csm_triton.triton.parameters import Parameters, voice_directory

__all__ = [
    "VoiceDeleteModel",
    "VoiceListModel",
    "VoiceRegisterModel",
]

DEFAULT_BASE_CHECKPOINT = "csm_lm/1/checkpoint"
ADAPTER_INPUTS = ("ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_MANIFEST", "DEFAULT_SPEAKER")


def served_base(args: Mapping[str, str], parameters: Parameters) -> adapters.ServedBase:
    """The base checkpoint adapters are checked against: read when the first adapter comes."""
    repository = Path(args["model_repository"]).resolve().parent
    relative = parameters.text("base_checkpoint", DEFAULT_BASE_CHECKPOINT)
    return adapters.ServedBase(
        repository / relative, repository / "manifest.json", Path(relative).as_posix().strip("/") + "/"
    )


def _one_blob(request, name: str, *, required: bool) -> bytes | None:
    """The one element of a BYTES input, as bytes (binary: never decoded as text)."""
    array = triton.input_array(request, name, required=required)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidInput(f"input '{name}' must hold exactly one element, got {array.size}")
    value = array.reshape(-1)[0]
    return value if isinstance(value, bytes) else str(value).encode()


def write_policy(parameters: Parameters) -> WritePolicy:
    return WritePolicy.from_settings(
        parameters.text("admin_token_env"), parameters.boolean("allow_anonymous_writes", False)
    )


def json_tensor(value) -> np.ndarray:
    return np.array([json.dumps(value, ensure_ascii=False).encode()], dtype=np.object_)


class _VoiceModel(triton.PythonModel):
    def initialize_model(self, args, model_config):
        self.store = VoiceStore(voice_directory(args, self.parameters))
        self.write_policy = write_policy(self.parameters)
        triton.log_info(f"{self.model_name}: voices in {self.store.directory}; {self.write_policy.describe()}")

    def voice_id(self, request) -> str:
        return validation.voice_id(validation.single_text(triton.input_texts(request, "VOICE_ID"), "VOICE_ID"))

    def authorized_owner(self, request) -> str | None:
        """The write's owner (None: the admin), once the admin token is proven."""
        parameters = triton.request_parameters(request)
        self.write_policy.check_write(parameters)
        owner = parameters.get(C.VOICE_OWNER_HEADER)
        return owner if owner is None else str(owner)


class VoiceRegisterModel(_VoiceModel):
    def initialize_model(self, args, model_config):
        super().initialize_model(args, model_config)
        self.store.max_voices = self.parameters.integer("max_stored_voices", C.MAX_STORED_VOICES, minimum=1)
        self.store.max_adapters = self.parameters.integer("max_stored_adapters", C.MAX_STORED_ADAPTERS, minimum=0)
        self.resolver = VoiceResolver(self.store, forward_mimi_encoder)
        self.base = served_base(args, self.parameters)

    def handle(self, request):
        owner = self.authorized_owner(request)
        if triton.present_inputs(request, ADAPTER_INPUTS):
            return self.register_adapter(request, owner)
        voice = self.resolver.register(
            self.voice_id(request),
            triton.input_array(request, "REFERENCE_AUDIO"),
            triton.input_array(request, "REFERENCE_SAMPLE_RATE"),
            # Its content is checked by the resolver (validation.text), before encoding.
            validation.single_string(triton.input_texts(request, "REFERENCE_TEXT"), "REFERENCE_TEXT"),
            owner=owner,
        )
        triton.log_info(f"{self.model_name}: registered voice '{voice.voice_id}' ({len(voice.codes)} frames)")
        return {"VOICE": json_tensor(voice.summary())}

    def register_adapter(self, request, owner: str | None):
        speaker = triton.input_array(request, "DEFAULT_SPEAKER", required=False)
        if speaker is not None and speaker.size != 1:
            raise InvalidInput(f"input 'DEFAULT_SPEAKER' must hold exactly one value, got {speaker.size}")
        text = triton.input_texts(request, "REFERENCE_TEXT", required=False)
        voice = self.resolver.register_adapter(
            self.voice_id(request),
            _one_blob(request, "ADAPTER_CONFIG", required=True),
            _one_blob(request, "ADAPTER_WEIGHTS", required=True),
            self.base,
            manifest=_one_blob(request, "ADAPTER_MANIFEST", required=False),
            default_speaker=None if speaker is None else int(speaker.reshape(-1)[0]),
            reference_audio=triton.input_array(request, "REFERENCE_AUDIO", required=False),
            reference_sample_rate=triton.input_array(request, "REFERENCE_SAMPLE_RATE", required=False),
            reference_text=validation.single_string(text, "REFERENCE_TEXT", required=False),
            owner=owner,
        )
        summary = voice.summary()
        triton.log_info(
            f"{self.model_name}: registered adapter voice '{voice.voice_id}' (rank {summary['rank']}, "
            f"{summary['size_bytes']} bytes)"
        )
        return {"VOICE": json_tensor(summary)}


class VoiceListModel(_VoiceModel):
    def handle(self, request):
        return {"VOICES": json_tensor(self.store.list())}


class VoiceDeleteModel(_VoiceModel):
    def handle(self, request):
        owner = self.authorized_owner(request)
        deleted = self.store.delete(self.voice_id(request), owner=owner)
        triton.log_info(f"{self.model_name}: deleted voice '{deleted['voice_id']}'")
        return {"DELETED": json_tensor(deleted)}
