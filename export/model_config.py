"""Model configs: parse the committed `config.pbtxt` files and render them for a
hardware profile with protobuf's text_format (never string templating).

The committed repository is the A100 deployment; the other profiles are
differences from it, listed here so that docs/model_config.md can explain each. Every
profile publishes the clients' limits from csm_triton.constants in csm_tts's config
(`client_limits`); the committed config holds the same text (tests/unit/test_client_limits.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from csm_triton import constants as C

ModelConfig = model_config_pb2.ModelConfig
KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


@dataclass(frozen=True)
class ModelOverride:
    instance_kind: int | None = None
    instance_count: int | None = None
    max_queue_delay_microseconds: int | None = None
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    # "*" applies to every model before its own entry.
    overrides: dict[str, ModelOverride] = field(default_factory=dict)


PROFILES: dict[str, Profile] = {
    "a100": Profile("a100", "NVIDIA A100 (40 or 80 GB): the committed configs as they are."),
    "h100": Profile(
        "h100",
        "NVIDIA H100 80 GB: ~2x the A100's memory bandwidth makes generation faster, so the "
        "codec must keep up with more streams per second.",
        {"mimi_decoder": ModelOverride(instance_count=3)},
    ),
    "cpu": Profile(
        "cpu",
        "CPU only (development, CI): every instance on the CPU, few of them, since each "
        "instance is a process with its own copy of the weights and the machine has 2 cores.",
        {
            "*": ModelOverride(instance_kind=KIND_CPU),
            "mimi_encoder": ModelOverride(instance_count=1),
            "mimi_decoder": ModelOverride(instance_count=1, max_queue_delay_microseconds=5000),
            "csm_prepare": ModelOverride(instance_count=1),
            # fp32 on CPU (tokens identical to transformers); few slots: each one is a
            # full context of KV cache, and 2 cores cannot feed many streams anyway. Two
            # resident adapters (fp32 CSM-1B at rank 32: 164 MB each).
            "csm_lm": ModelOverride(parameters={"dtype": "float32", "max_slots": "4", "lora_slots": "2"}),
            "csm_generate": ModelOverride(instance_count=4),
        },
    ),
}


def parse_config(text: str) -> ModelConfig:
    return text_format.Parse(text, ModelConfig())


def read_config(path: Path) -> ModelConfig:
    return parse_config(Path(path).read_text())


def _leading_comments(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines) + "\n" if lines else ""


def _apply(config: ModelConfig, override: ModelOverride) -> None:
    for group in config.instance_group:
        if override.instance_kind is not None:
            group.kind = override.instance_kind
            if override.instance_kind == KIND_CPU:
                del group.gpus[:]
        if override.instance_count is not None:
            group.count = override.instance_count
    if override.max_queue_delay_microseconds is not None and config.HasField("dynamic_batching"):
        config.dynamic_batching.max_queue_delay_microseconds = override.max_queue_delay_microseconds
    for key, value in override.parameters.items():
        config.parameters[key].string_value = value


def client_limits_json() -> str:
    """csm_tts's `client_limits` parameter: what clients check before sending (csm_clients/limits.py)."""
    return json.dumps(C.CLIENT_LIMITS)


def render_config(text: str, profile_name: str, model_name: str) -> str:
    """The committed config text rendered for a profile (comments at the top kept)."""
    try:
        profile = PROFILES[profile_name]
    except KeyError:
        raise ValueError(f"unknown profile {profile_name!r}; choose one of {sorted(PROFILES)}") from None
    config = parse_config(text)
    for key in ("*", model_name):
        if key in profile.overrides:
            _apply(config, profile.overrides[key])
    if model_name == C.CLIENT_LIMITS_MODEL:  # from the constants the server checks with, whatever the text says
        config.parameters[C.CLIENT_LIMITS_PARAMETER].string_value = client_limits_json()
    header = _leading_comments(text) + f"# Rendered for profile '{profile.name}' by export.build_repository.\n"
    return header + text_format.MessageToString(config)
