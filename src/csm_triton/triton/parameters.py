"""The one reader of what Triton hands a model at load: config parameters and the
instance's device. No Triton import (the config is the JSON `args["model_config"]`).

Every parameter is a `parameters { key: ... value: { string_value: ... } }` entry of
config.pbtxt, i.e. a string. A bad value fails the model's load with a message that
names the model, the parameter and what it accepts, never a bare int() traceback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ParameterError", "Parameters", "instance_device", "parse_model_config", "voice_directory"]

# The voice store of csm_prepare, csm_lm (adapter voices) and the voice models, beside
# the repository unless `voice_dir` says otherwise.
DEFAULT_VOICE_DIR = "runtime/voices"

_BOOLEANS = {"true": True, "false": False}


class ParameterError(ValueError):
    """A config parameter with a value the model cannot use (fails the model's load)."""


def parse_model_config(args: Mapping[str, str]) -> dict:
    return json.loads(args["model_config"])


def instance_device(args: Mapping[str, str]) -> str:
    """The torch device of this model instance: "cuda:N" for KIND_GPU, else "cpu"."""
    if args.get("model_instance_kind", "CPU") == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', 0) or 0)}"
    return "cpu"


class Parameters:
    """Typed access to one model's config parameters."""

    def __init__(self, model_config: Mapping[str, Any], model_name: str | None = None):
        self._entries = model_config.get("parameters", {}) or {}
        self.model_name = model_name or str(model_config.get("name") or "model")

    def text(self, name: str, default: str | None = None) -> str | None:
        """The raw value, or `default` when absent, empty or an unexpanded "${VAR}"."""
        entry = self._entries.get(name)
        if entry is None:
            return default
        value = str(entry.get("string_value", "")).strip()
        # Triton leaves "${VAR}"-style placeholders unexpanded; treat them as unset.
        return default if value == "" or value.startswith("${") else value

    def _error(self, name: str, accepted: str, value: str) -> ParameterError:
        return ParameterError(f"model '{self.model_name}': config parameter '{name}' must be {accepted}, got {value!r}")

    def boolean(self, name: str, default: bool) -> bool:
        value = self.text(name)
        if value is None:
            return default
        try:
            return _BOOLEANS[value.lower()]
        except KeyError:
            raise self._error(name, '"true" or "false"', value) from None

    def integer(
        self, name: str, default: int | None, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        value = self.text(name)
        if value is None:
            return default
        accepted = (
            "an integer"
            + (f" >= {minimum}" if minimum is not None else "")
            + (f" <= {maximum}" if maximum is not None else "")
        )
        try:
            number = int(value)
        except ValueError:
            raise self._error(name, accepted, value) from None
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            raise self._error(name, accepted, value)
        return number

    def number(self, name: str, default: float, *, minimum: float | None = None, maximum: float | None = None) -> float:
        value = self.text(name)
        if value is None:
            return default
        accepted = "a number" + (f" in [{minimum}, {maximum}]" if minimum is not None and maximum is not None else "")
        try:
            number = float(value)
        except ValueError:
            raise self._error(name, accepted, value) from None
        if number != number or (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            raise self._error(name, accepted, value)
        return number

    def choice(self, name: str, choices: Sequence[str], default: str) -> str:
        value = self.text(name)
        if value is None:
            return default
        if value not in choices:
            raise self._error(name, "one of " + ", ".join(repr(c) for c in choices), value)
        return value


def voice_directory(args: Mapping[str, str], parameters: Parameters) -> Path:
    """The absolute store folder; `args['model_repository']` is the model's own folder."""
    configured = Path(parameters.text("voice_dir", DEFAULT_VOICE_DIR)).expanduser()
    if not configured.is_absolute():
        repository = Path(args["model_repository"]).resolve().parent
        configured = repository.parent / configured
    return configured.resolve()
