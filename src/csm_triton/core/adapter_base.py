"""The base model an adapter is a difference to: the shapes of its linears (read from
its config.json) and its hash. No Triton here.

The base hash (`base_model_sha256`) names the weights an adapter is a difference to:
sha256 over the lines `<file name>\\t<sha256 of the file>\\n` for `config.json` and every
`*.safetensors` of a checkpoint folder, sorted by name. These are exactly the files
export.build_repository links into `csm_lm/1/checkpoint`, so the server computes the
same value from its own copy (or from the build manifest's per-file digests, without
reading 6 GB again). finetune's older `base_checkpoint_sha256` covers every file of the
source folder (tokenizer, README, ...), which a served repository does not hold, so it
cannot be compared there; and a hash of config.json and shapes alone would pass an
adapter trained on another fine-tune of the same architecture, which the shape check
already covers and the hash exists to catch. A resharded copy of the same weights
hashes differently: refused, as the conservative answer (remove the manifest to
register on shapes alone).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from csm_triton.errors import InvalidInput

__all__ = ["BaseShapes", "ServedBase", "StackShape", "base_model_sha256", "base_shapes"]


# --- the served base model's shapes -----------------------------------------------------------
@dataclass(frozen=True)
class StackShape:
    layers: int
    hidden: int
    q_out: int  # heads x head_dim
    kv_out: int  # key-value heads x head_dim
    intermediate: int

    def linear(self, projection: str) -> tuple[int, int]:
        """(in features, out features) of a projection of every layer."""
        return {
            "q_proj": (self.hidden, self.q_out),
            "k_proj": (self.hidden, self.kv_out),
            "v_proj": (self.hidden, self.kv_out),
            "o_proj": (self.q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[projection]


@dataclass(frozen=True)
class BaseShapes:
    backbone: StackShape
    depth: StackShape

    def stack(self, name: str) -> StackShape:
        return self.backbone if name == "backbone" else self.depth


def _config_dict(base_config) -> dict:
    if isinstance(base_config, (str, Path)):
        path = Path(base_config)
        path = path / "config.json" if path.is_dir() else path
        return json.loads(path.read_text())
    if isinstance(base_config, Mapping):
        return dict(base_config)
    return base_config.to_dict()  # a transformers CsmConfig


def _stack_shape(config: Mapping[str, Any], name: str) -> StackShape:
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        return StackShape(
            int(config["num_hidden_layers"]),
            hidden,
            heads * head_dim,
            int(config.get("num_key_value_heads") or heads) * head_dim,
            int(config["intermediate_size"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"the base config's {name} lacks a usable {error}") from None


def base_shapes(base_config) -> BaseShapes:
    """The linear shapes of a CSM base: its checkpoint folder, config.json, the dict in it
    or a transformers CsmConfig (the top level is the backbone)."""
    config = _config_dict(base_config)
    return BaseShapes(_stack_shape(config, "backbone"), _stack_shape(config.get("depth_decoder_config") or {}, "depth"))


def base_model_sha256(checkpoint: str | Path, known: Mapping[str, str] | None = None) -> str:
    """The base hash of a checkpoint folder (module docstring). `known`: sha256 by file
    name already computed (a build manifest's), used instead of reading those files."""
    folder = Path(checkpoint)
    names = sorted(["config.json"] + [p.name for p in folder.glob("*.safetensors") if p.is_file()])
    digest = hashlib.sha256()
    for name in names:
        file_digest = (known or {}).get(name)
        if file_digest is None:
            with open(folder / name, "rb") as handle:
                file_digest = hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"{name}\t{file_digest}\n".encode())
    return digest.hexdigest()


class ServedBase:
    """The base model a server serves, for checking adapters: its shapes and its hash,
    each read once, when first needed. `build_manifest`: export.build_repository's
    manifest.json, whose per-file digests spare hashing the weights again."""

    def __init__(self, checkpoint: str | Path, build_manifest: str | Path | None = None, manifest_prefix: str = ""):
        self.checkpoint = Path(checkpoint)
        self.build_manifest = Path(build_manifest) if build_manifest else None
        # The checkpoint's folder inside the repository, as the manifest names it: csm_lm/1/checkpoint/
        self.manifest_prefix = manifest_prefix

    def _require(self) -> None:
        if not (self.checkpoint / "config.json").is_file():
            raise InvalidInput(
                "this server cannot register adapters: it has no base checkpoint to check them "
                "against (voice_register's `base_checkpoint`)"
            )

    @cached_property
    def shapes(self) -> BaseShapes:
        self._require()
        return base_shapes(self.checkpoint)

    @cached_property
    def sha256(self) -> str:
        self._require()
        known = {}
        try:
            artifacts = json.loads(self.build_manifest.read_text())["artifacts_sha256"] if self.build_manifest else {}
            known = {
                path[len(self.manifest_prefix) :]: digest
                for path, digest in artifacts.items()
                if path.startswith(self.manifest_prefix) and "/" not in path[len(self.manifest_prefix) :]
            }
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return base_model_sha256(self.checkpoint, known)
