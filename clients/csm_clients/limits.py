"""The server's documented ranges for the sampling inputs (docs/api.md), mirrored here.

The gateway and the CLI check a value against them before converting it to its wire
type, where it could not be represented: a seed of 2**63 does not fit INT64 (an
OverflowError), a top_k of 2**31 wraps to a negative INT32. The server still checks
every input; the messages say what its own say, after the name of the field given.
Mirrors of csm_triton.constants (the clients never import the server's package);
tests/unit/test_client_offline.py keeps them equal.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from csm_clients.errors import InvalidRequest

__all__ = [
    "MAX_ADAPTER_BYTES",
    "MAX_ADAPTER_CONFIG_BYTES",
    "MAX_ADAPTER_MANIFEST_BYTES",
    "MAX_AUDIO_SECONDS",
    "MAX_CONTEXT_AUDIO_SECONDS",
    "MAX_INPUT_SAMPLE_RATE",
    "MAX_REFERENCE_SECONDS",
    "MIN_INPUT_SAMPLE_RATE",
    "MAX_CONTEXT_TURNS",
    "MAX_LONG_TEXT_CHARS",
    "MAX_SEED",
    "MAX_SPEAKER_ID",
    "MAX_TEMPERATURE",
    "MAX_TOP_K",
    "MAX_TURN_SECONDS",
    "MAX_TURN_TEXT_CHARS",
    "MIN_TURN_SECONDS",
    "SEGMENT_MAX_CHARS",
    "check_sampling",
    "check_speaker",
]

MAX_TEMPERATURE = 5.0  # TEMPERATURE in (0, 5]
MAX_TOP_K = 2_048  # TOP_K in [1, 2048]: Mimi's codebook size
MAX_SEED = 2**63 - 1  # SEED in [0, 2**63 - 1]: INT64
MAX_AUDIO_SECONDS = 90.0  # MAX_AUDIO_SECONDS in (0, 90]
# Conversations and long texts (docs/api.md, csm_tts):
MAX_SPEAKER_ID = 255  # SPEAKER / CONTEXT_SPEAKER in [0, 255]
MAX_CONTEXT_TURNS = 16  # context turns, stored voices and clips together
MAX_CONTEXT_AUDIO_SECONDS = 60.0  # all context audio of one request
MIN_TURN_SECONDS, MAX_TURN_SECONDS = 0.5, 30.0  # each context clip (the reference clip's rule)
MAX_TURN_TEXT_CHARS = 2_000  # each CONTEXT_TEXT (the one-segment TEXT limit)
MAX_LONG_TEXT_CHARS = 20_000  # TEXT: longer than SEGMENT_MAX_CHARS is split by the server
SEGMENT_MAX_CHARS = 300  # the server's segment size: a longer TEXT is several generations
# Reference clips (REFERENCE_AUDIO / REFERENCE_SAMPLE_RATE): the gateway refuses a longer
# or oddly sampled upload from its header, before decoding it (audio.read_audio).
MAX_REFERENCE_SECONDS = 30.0
MIN_INPUT_SAMPLE_RATE, MAX_INPUT_SAMPLE_RATE = 8_000, 192_000
# LoRA adapter voices (voice_register's ADAPTER_*): the files' sizes, checked before reading.
MAX_ADAPTER_BYTES = 256 * 2**20  # adapter_model.safetensors
MAX_ADAPTER_CONFIG_BYTES = 64 * 2**10  # adapter_config.json
MAX_ADAPTER_MANIFEST_BYTES = 1 * 2**20  # the run's manifest.json


def _number(value, field: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{field}: must be a number, got {value!r}") from None


def check_sampling(
    *, temperature=None, top_k=None, seed=None, max_audio_seconds=None, field_names: Mapping[str, str] | None = None
) -> None:
    """Raises InvalidRequest naming the field (`field_names[name]`, else the name) of the
    first value outside the server's range; None values are not sent, so not checked."""
    names = field_names or {}

    def refuse(name: str, message: str):
        raise InvalidRequest(f"{names.get(name, name)}: {message}")

    if temperature is not None:
        value = _number(temperature, names.get("temperature", "temperature"))
        if not math.isfinite(value) or not 0 < value <= MAX_TEMPERATURE:
            refuse("temperature", f"input 'TEMPERATURE' must be in (0, {MAX_TEMPERATURE:g}], got {temperature}")
    for name, tensor, low, high in (("top_k", "TOP_K", 1, MAX_TOP_K), ("seed", "SEED", 0, MAX_SEED)):
        value = {"top_k": top_k, "seed": seed}[name]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                refuse(name, f"input '{tensor}' must be an integer, got {value!r}")
        if not low <= value <= high:
            refuse(name, f"input '{tensor}' must be in [{low}, {high}], got {value}")
    if max_audio_seconds is not None:
        value = _number(max_audio_seconds, names.get("max_audio_seconds", "max_audio_seconds"))
        if not math.isfinite(value) or not 0 < value <= MAX_AUDIO_SECONDS:
            refuse(
                "max_audio_seconds",
                f"input 'MAX_AUDIO_SECONDS' must be in (0, {MAX_AUDIO_SECONDS:g}], got {max_audio_seconds}",
            )


def check_speaker(value, field: str = "speaker") -> None:
    """A speaker id in [0, MAX_SPEAKER_ID], refused before it becomes an INT32 (where
    2**31 would wrap)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidRequest(f"{field}: must be an integer speaker id, got {value!r}")
    if not 0 <= value <= MAX_SPEAKER_ID:
        raise InvalidRequest(f"{field}: speaker id {value}; speaker ids are 0-{MAX_SPEAKER_ID}")
