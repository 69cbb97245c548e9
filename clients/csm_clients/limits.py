"""The server's limits the clients check a value against before sending it.

The gateway and the CLI check a value before converting it to its wire type, where it
could not be represented: a seed of 2**63 does not fit INT64 (an OverflowError), a top_k
of 2**31 wraps to a negative INT32. The server still checks every input; the messages
say what its own say, after the name of the field given.

The server publishes these numbers in csm_tts's model config (the parameter
`client_limits`, a JSON object written from csm_triton.constants by export/model_config.py),
so a client never mirrors them: a connected client reads them once (VoiceCloner.limits()).
`DEFAULT_LIMITS` holds the documented values (docs/api.md): what code without a server
checks against, and what a server that publishes none is taken to have.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from csm_clients.errors import InvalidRequest

__all__ = ["CONFIG_PARAMETER", "DEFAULT_LIMITS", "Limits", "check_sampling", "check_speaker"]

CONFIG_PARAMETER = "client_limits"  # csm_tts's config parameter that holds them


@dataclass(frozen=True)
class Limits:
    """Named as the server publishes them (csm_tts's `client_limits`); the defaults are
    the documented values."""

    MAX_TEMPERATURE: float = 5.0  # TEMPERATURE in (0, 5]
    MAX_TOP_K: int = 2_048  # TOP_K in [1, 2048]: Mimi's codebook size
    MAX_SEED: int = 2**63 - 1  # SEED in [0, 2**63 - 1]: INT64
    MAX_AUDIO_SECONDS: float = 90.0  # MAX_AUDIO_SECONDS in (0, 90]
    # Conversations and long texts (docs/api.md, csm_tts):
    MAX_SPEAKER_ID: int = 255  # SPEAKER / CONTEXT_SPEAKER in [0, 255]
    MAX_CONTEXT_TURNS: int = 16  # context turns, stored voices and clips together
    MAX_CONTEXT_AUDIO_SECONDS: float = 60.0  # all context audio of one request
    MIN_TURN_SECONDS: float = 0.5  # each context clip (the reference clip's rule)
    MAX_TURN_SECONDS: float = 30.0
    MAX_TURN_TEXT_CHARS: int = 2_000  # each CONTEXT_TEXT (the one-segment TEXT limit)
    MAX_LONG_TEXT_CHARS: int = 20_000  # TEXT: longer than SEGMENT_MAX_CHARS is split by the server
    SEGMENT_MAX_CHARS: int = 300  # the server's segment size: a longer TEXT is several generations
    # Reference clips (REFERENCE_AUDIO / REFERENCE_SAMPLE_RATE): the gateway refuses a longer
    # or oddly sampled upload from its header, before decoding it (audio.read_audio).
    MAX_REFERENCE_SECONDS: float = 30.0
    MIN_INPUT_SAMPLE_RATE: int = 8_000
    MAX_INPUT_SAMPLE_RATE: int = 192_000
    # LoRA adapter voices (voice_register's ADAPTER_*): the files' sizes, checked before reading.
    MAX_ADAPTER_BYTES: int = 256 * 2**20  # adapter_model.safetensors
    MAX_ADAPTER_CONFIG_BYTES: int = 64 * 2**10  # adapter_config.json
    MAX_ADAPTER_MANIFEST_BYTES: int = 1 * 2**20  # the run's manifest.json

    @classmethod
    def from_model_config(cls, config: Any) -> Limits:
        """The limits csm_tts's config publishes: `config` as tritonclient answers
        get_model_config (HTTP: the config; gRPC with as_json=True: {"config": ...}).
        A server only tightens them: a published maximum above the default, or minimum
        below it, is taken as the default, because the gateway bounds its own work with
        them (how much audio it decodes, how much text a session sends) and must not
        trust whatever answers on its Triton address to loosen that. A value missing, of
        the wrong kind, not finite and positive, or a minimum past its maximum keeps its
        default; so does everything when the parameter is missing or not a JSON object
        (an older server): the server checks every input anyway."""
        if isinstance(config, Mapping) and isinstance(config.get("config"), Mapping):
            config = config["config"]
        try:
            published = json.loads(config["parameters"][CONFIG_PARAMETER]["string_value"])
        except (TypeError, KeyError, ValueError, RecursionError):
            return cls()
        if not isinstance(published, Mapping):
            return cls()
        taken = {}
        for field in fields(cls):
            value = _published(published.get(field.name), field.default)
            if value is None:
                continue
            if field.name.startswith("MIN_"):  # raised at most to its maximum's default
                if value > getattr(DEFAULT_LIMITS, "MAX_" + field.name[4:]):
                    continue
                value = max(value, field.default)
            else:
                value = min(value, field.default)
            taken[field.name] = type(field.default)(value)
        return cls(**taken)


DEFAULT_LIMITS = Limits()


def _published(value: Any, default: int | float) -> int | float | None:
    """`value` as a limit like `default` (an int's: an integer; a float's: any number),
    None when it is not one: a bool, a string, not finite or not positive. A huge JSON
    integer stays an int (math.isfinite would overflow on it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(default, int) and not isinstance(value, int):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if value > 0 else None


def _number(value, field: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{field}: must be a number, got {value!r}") from None


def check_sampling(
    *,
    temperature=None,
    top_k=None,
    seed=None,
    max_audio_seconds=None,
    field_names: Mapping[str, str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Raises InvalidRequest naming the field (`field_names[name]`, else the name) of the
    first value outside the server's range; None values are not sent, so not checked."""
    names = field_names or {}

    def refuse(name: str, message: str):
        raise InvalidRequest(f"{names.get(name, name)}: {message}")

    if temperature is not None:
        value = _number(temperature, names.get("temperature", "temperature"))
        if not math.isfinite(value) or not 0 < value <= limits.MAX_TEMPERATURE:
            refuse("temperature", f"input 'TEMPERATURE' must be in (0, {limits.MAX_TEMPERATURE:g}], got {temperature}")
    for name, tensor, low, high in (("top_k", "TOP_K", 1, limits.MAX_TOP_K), ("seed", "SEED", 0, limits.MAX_SEED)):
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
        if not math.isfinite(value) or not 0 < value <= limits.MAX_AUDIO_SECONDS:
            refuse(
                "max_audio_seconds",
                f"input 'MAX_AUDIO_SECONDS' must be in (0, {limits.MAX_AUDIO_SECONDS:g}], got {max_audio_seconds}",
            )


def check_speaker(value, field: str = "speaker", limits: Limits = DEFAULT_LIMITS) -> None:
    """A speaker id in [0, MAX_SPEAKER_ID], refused before it becomes an INT32 (where
    2**31 would wrap)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidRequest(f"{field}: must be an integer speaker id, got {value!r}")
    if not 0 <= value <= limits.MAX_SPEAKER_ID:
        raise InvalidRequest(f"{field}: speaker id {value}; speaker ids are 0-{limits.MAX_SPEAKER_ID}")
