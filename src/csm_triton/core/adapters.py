"""LoRA adapters as voices: the folder `make finetune` writes, checked against the served
base model before anything is stored, and read back for the engine. No Triton here.

An adapter is peft's format: `adapter_config.json` and `adapter_model.safetensors`, and
beside them the run's `manifest.json` (finetune/train.py). Everything that would make
the engine serve other audio than peft would is refused, each with one line naming the
problem: another PEFT method, a rank outside 1..MAX_ADAPTER_RANK, a module other than
the q/k/v/o/gate/up/down projections of the backbone (`backbone_model.layers.N.`) and
the depth decoder (`depth_decoder.model.layers.N.`), trained biases, DoRA, rsLoRA,
per-module ranks or alphas, an initialisation that rewrites the base weights (PiSSA,
OLoRA, LoftQ, CorDA, LoRA-GA), any option this module does not know that is switched
on, a tensor whose shape the served base does not have, a corrupt or partial file, and a
base hash the served one does not equal.

The served base (its shapes and its hash): adapter_base.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csm_triton import constants as C
from csm_triton.core.adapter_base import BaseShapes, ServedBase, StackShape, base_model_sha256, base_shapes
from csm_triton.errors import InvalidInput

__all__ = [
    "ADAPTER_FILES",
    "BASE_HASH_KEY",
    "CONFIG_FILE",
    "MANIFEST_FILE",
    "PROJECTIONS",
    "STACKS",
    "WEIGHTS_FILE",
    "AdapterConfig",
    "BaseShapes",
    "LoraAdapter",
    "ServedBase",
    "StackShape",
    "base_model_sha256",
    "base_shapes",
    "check_adapter",
    "load_lora_adapter",
    "parse_adapter_config",
    "recorded_base_sha256",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
MANIFEST_FILE = "manifest.json"  # finetune.train's, beside the adapter folder
BASE_HASH_KEY = "base_model_sha256"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STACKS = {"backbone": "backbone_model", "depth": "depth_decoder.model"}  # our name -> the module path
_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_KEY = re.compile(
    r"^base_model\.model\.(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(self_attn|mlp)\."
    r"(" + "|".join(PROJECTIONS) + r")\.lora_(A|B)\.weight$"
)
_FLOAT_DTYPES = ("F32", "F16", "BF16")

# adapter_config.json. Read: the keys this module uses. Harmless: training or bookkeeping
# only. Variants: refused when switched on. Any other key switched on is refused too.
_READ = {"peft_type", "r", "lora_alpha", "target_modules", "init_lora_weights"}
_HARMLESS = {
    "lora_dropout",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
    "eva_config",
}
_VARIANTS = {
    "bias": "trained biases, which the engine does not add",
    "use_dora": "DoRA (a magnitude vector the engine does not apply)",
    "use_rslora": "rsLoRA (scale alpha/sqrt(r), not alpha/r)",
    "lora_bias": "a bias on lora_B, which the engine does not add",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "modules_to_save": "fully trained modules besides the LoRA matrices",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "adapted parameters instead of modules",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "megatron_config": "Megatron layers",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "loftq_config": "LoftQ (rewrites the base weights)",
    "corda_config": "CorDA (rewrites the base weights)",
    "lora_ga_config": "LoRA-GA (rewrites the base weights)",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
# Initialisations after which the adapter is a difference to other weights than the base's.
_INITS_ACCEPTED = (True, False, "gaussian", "eva", "orthogonal")


# --- adapter_config.json ------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    lora_alpha: float
    target_modules: str | list[str]  # as written: peft's regex or list of names
    raw: dict

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank


def _json_object(data, what: str) -> dict:
    if isinstance(data, Mapping):
        return dict(data)
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidInput(f"{what} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _switched_on(value) -> bool:
    return value not in (None, False, "none", "", [], {}, 0)


def parse_adapter_config(data) -> AdapterConfig:
    """adapter_config.json (bytes, text or dict) -> AdapterConfig; InvalidInput naming the
    first thing the engine would not apply as peft does."""
    config = _json_object(data, CONFIG_FILE)
    if config.get("peft_type") != "LORA":
        raise InvalidInput(
            f"{CONFIG_FILE} is not a peft LoRA config (peft_type {config.get('peft_type')!r}, expected 'LORA')"
        )
    for key, what in _VARIANTS.items():
        if _switched_on(config.get(key)):
            raise InvalidInput(
                f"{CONFIG_FILE}: {key}={json.dumps(config[key])[:80]} asks for {what}; "
                "the engine applies plain LoRA only"
            )
    unknown = sorted(k for k, v in config.items() if k not in _READ | _HARMLESS | set(_VARIANTS) and _switched_on(v))
    if unknown:
        raise InvalidInput(
            f"{CONFIG_FILE}: option {unknown[0]!r} is set and this server does not know what it "
            "changes; refused rather than served differently from peft"
        )
    init = config.get("init_lora_weights", True)
    if init not in _INITS_ACCEPTED:
        raise InvalidInput(
            f"{CONFIG_FILE}: init_lora_weights={init!r} rewrites the base weights the adapter is "
            "a difference to; the engine serves the unchanged base"
        )
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= C.MAX_ADAPTER_RANK:
        raise InvalidInput(
            f"{CONFIG_FILE}: rank r={rank!r} is not supported; the engine applies ranks 1 to {C.MAX_ADAPTER_RANK}"
        )
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise InvalidInput(f"{CONFIG_FILE}: lora_alpha={alpha!r} must be a positive number")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        for name in targets:
            if not isinstance(name, str) or name.rsplit(".", 1)[-1] not in PROJECTIONS:
                raise InvalidInput(
                    f"{CONFIG_FILE}: target module {name!r} is not supported; the engine adapts "
                    f"{', '.join(PROJECTIONS)} of the backbone and the depth decoder"
                )
    elif not isinstance(targets, str) or not targets:
        raise InvalidInput(f"{CONFIG_FILE}: target_modules must be a module list or a pattern, got {targets!r}")
    return AdapterConfig(rank, float(alpha), targets, config)


def recorded_base_sha256(manifest) -> str | None:
    """The base hash an adapter's manifest.json records (None: it records none)."""
    if manifest is None:
        return None
    recorded = _json_object(manifest, MANIFEST_FILE).get(BASE_HASH_KEY)
    if recorded is not None and not (isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded)):
        raise InvalidInput(f"{MANIFEST_FILE}: {BASE_HASH_KEY} must be 64 lower-case hex digits")
    return recorded


# --- adapter_model.safetensors --------------------------------------------------------------------
Matrices = dict  # {(stack, layer_index, projection): (A [r, in], B [out, r])}, float32 torch tensors


def _refuse_key(key: str):
    if "lora_magnitude_vector" in key:
        hint = "a DoRA magnitude vector"
    elif "lora_embedding" in key:
        hint = "an embedding adapter"
    elif key.endswith(".bias"):
        hint = "a trained bias"
    elif "codec_model" in key:
        hint = "Mimi, the codec, which must stay the served one"
    else:
        hint = "not a LoRA A/B weight of a supported projection"
    return InvalidInput(
        f"{WEIGHTS_FILE}: tensor {key!r} is {hint}; the engine adapts only "
        f"{', '.join(PROJECTIONS)} in backbone_model.layers.N and depth_decoder.model.layers.N"
    )


def _parse_weights(data: bytes, config: AdapterConfig, shapes: BaseShapes) -> Matrices:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise InvalidInput(f"{WEIGHTS_FILE} is corrupt or incomplete ({' '.join(str(error).split())[:160]})") from None
    if not tensors:
        raise InvalidInput(f"{WEIGHTS_FILE} holds no tensors")
    found: dict[tuple[str, int, str], dict[str, Any]] = {}
    for key in sorted(tensors):
        match = _KEY.match(key)
        if match is None or match.group(3) != _PARENT[match.group(4)]:
            raise _refuse_key(key)
        stack = "backbone" if match.group(1) == STACKS["backbone"] else "depth"
        layer, projection, side = int(match.group(2)), match.group(4), match.group(5)
        shape = shapes.stack(stack)
        if layer >= shape.layers:
            raise InvalidInput(
                f"{WEIGHTS_FILE}: tensor {key!r} adapts layer {layer}, but the served base's {stack} "
                f"has {shape.layers} layers: an adapter for another base model"
            )
        tensor = tensors[key]
        if not tensor.is_floating_point() or tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InvalidInput(f"{WEIGHTS_FILE}: tensor {key!r} is {tensor.dtype}; expected one of {_FLOAT_DTYPES}")
        inputs, outputs = shape.linear(projection)
        expected = [config.rank, inputs] if side == "A" else [outputs, config.rank]
        if list(tensor.shape) != expected:
            raise InvalidInput(
                f"{WEIGHTS_FILE}: tensor {key!r} has shape {list(tensor.shape)}, the served base "
                f"needs {expected} ({stack} {projection}: {inputs} in, {outputs} out, rank "
                f"{config.rank}): an adapter for another base model or rank"
            )
        tensor = tensor.to(torch.float32).contiguous()
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidInput(f"{WEIGHTS_FILE}: tensor {key!r} holds NaN or infinite values")
        found.setdefault((stack, layer, projection), {})[side] = tensor
    for (stack, layer, projection), pair in found.items():
        if len(pair) != 2:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise InvalidInput(
                f"{WEIGHTS_FILE}: {stack} layer {layer} {projection} has no {missing}: a partial adapter"
            )
    return {key: (pair["A"], pair["B"]) for key, pair in found.items()}


@dataclass(frozen=True)
class LoraAdapter:
    """A checked adapter. `matrices`: {(stack, layer_index, projection): (A, B)} with stack
    "backbone" or "depth", projection one of PROJECTIONS, A [r, in] and B [out, r] float32
    torch tensors (the update to W x is scale * B (A x)); linears it does not adapt are
    absent. `scale`: lora_alpha / r."""

    config: AdapterConfig
    matrices: Matrices
    recorded_base_sha256: str | None  # what its manifest records (None: no manifest, or none there)

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def scale(self) -> float:
        return self.config.scale

    @property
    def target_modules(self) -> list[str]:
        adapted = {projection for _, _, projection in self.matrices}
        return [p for p in PROJECTIONS if p in adapted]

    @property
    def stacks(self) -> list[str]:
        adapted = {stack for stack, _, _ in self.matrices}
        return [s for s in STACKS if s in adapted]

    def description(self) -> dict:
        """What voice_list shows of it (the store adds the base hash and the size)."""
        return {
            "rank": self.rank,
            "lora_alpha": self.config.lora_alpha,
            "target_modules": self.target_modules,
            "stacks": self.stacks,
        }


def _bounded(data, limit: int, what: str) -> None:
    if len(data) > limit:
        raise InvalidInput(f"{what} is {len(data):,} bytes; the limit is {limit:,}")


def check_adapter(
    config,
    weights: bytes,
    base: BaseShapes | ServedBase,
    *,
    manifest=None,
    served_base_sha256: Callable[[], str] | str | None = None,
) -> LoraAdapter:
    """An adapter's files as bytes, checked against the served base (every refusal an
    InvalidInput naming the problem): sizes first, then the config, the manifest, every
    tensor, and last the base hash its manifest records against `served_base_sha256`
    (a callable: computed only when there is something to compare)."""
    shapes = base.shapes if isinstance(base, ServedBase) else base
    if served_base_sha256 is None and isinstance(base, ServedBase):
        served_base_sha256 = lambda: base.sha256  # noqa: E731
    if not isinstance(config, Mapping):
        _bounded(config, C.MAX_ADAPTER_CONFIG_BYTES, CONFIG_FILE)
    _bounded(weights, C.MAX_ADAPTER_BYTES, WEIGHTS_FILE)
    if manifest is not None and not isinstance(manifest, Mapping):
        _bounded(manifest, C.MAX_ADAPTER_MANIFEST_BYTES, MANIFEST_FILE)
    parsed = parse_adapter_config(config)
    recorded = recorded_base_sha256(manifest)
    matrices = _parse_weights(weights, parsed, shapes)
    if recorded is not None and served_base_sha256 is not None:
        served = served_base_sha256() if callable(served_base_sha256) else served_base_sha256
        if recorded != served:
            raise InvalidInput(
                f"{MANIFEST_FILE}: the adapter was trained on base {recorded[:12]}..., this server "
                f"serves base {served[:12]}... ({BASE_HASH_KEY}): an adapter for another base model"
            )
    return LoraAdapter(parsed, matrices, recorded)


def _read_bounded(path: Path, limit: int) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise InvalidInput(f"{path.name} is {size:,} bytes; the limit is {limit:,}")
    return path.read_bytes()


def load_lora_adapter(folder: str | Path, base_config, *, base_sha256: str | None = None) -> LoraAdapter:
    """The adapter in `folder` (adapter_config.json + adapter_model.safetensors, and the
    optional manifest.json beside them), checked against
    `base_config` (a checkpoint folder, its config.json, that dict or a CsmConfig).
    Sizes are checked before a file is read. Returns a LoraAdapter: `.matrices`
    {(stack, layer_index, projection): (A [r, in], B [out, r])} float32 torch tensors,
    stack "backbone" | "depth"; `.scale` alpha / r; `.rank`; `.config`. With
    `base_sha256`, a hash the manifest records must equal it. InvalidInput for a bad
    adapter; FileNotFoundError for a missing file."""
    folder = Path(folder)
    config = _read_bounded(folder / CONFIG_FILE, C.MAX_ADAPTER_CONFIG_BYTES)
    weights = _read_bounded(folder / WEIGHTS_FILE, C.MAX_ADAPTER_BYTES)
    manifest = folder / MANIFEST_FILE if (folder / MANIFEST_FILE).is_file() else None
    manifest_bytes = _read_bounded(manifest, C.MAX_ADAPTER_MANIFEST_BYTES) if manifest else None
    shapes = base_config if isinstance(base_config, BaseShapes) else base_shapes(base_config)
    return check_adapter(config, weights, shapes, manifest=manifest_bytes, served_base_sha256=base_sha256)
