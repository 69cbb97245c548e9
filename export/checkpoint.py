"""Find and check a CSM-1B checkpoint before anything expensive reads it.

A checkpoint is a folder in the Hugging Face layout of `sesame/csm-1b`
(transformers format). Each file is checked cheaply (JSON parses; safetensors
opens its weights files, which parses their headers and checks that the tensors
cover the file exactly, without reading the weights) so that a missing or
truncated download fails here, in one line naming the file, instead of deep
inside `from_pretrained` or half-way through an ONNX export.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
REQUIRED_JSON = (CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG)
# Layouts differ between transformers releases (processor vs preprocessor config,
# template as .jinja or inside tokenizer_config), so these are checked only if present.
OPTIONAL_JSON = ("processor_config.json", "preprocessor_config.json", "special_tokens_map.json")
OPTIONAL_TEXT = ("chat_template.jinja",)
EXPECTED_MODEL_TYPE = "csm"

# The hub repository also holds Sesame's original `ckpt.pt` (several GB) that the
# transformers layout does not need.
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def _missing(path: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint file missing: {path}")


def _corrupt(path: Path, reason: object) -> CheckpointError:
    return CheckpointError(f"checkpoint file corrupt: {path} ({' '.join(str(reason).split())})")


def _not_a_folder(path: Path) -> CheckpointError:
    if path.exists():
        return CheckpointError(f"checkpoint is not a folder: {path}")
    return CheckpointError(f"checkpoint folder missing: {path}")


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise _missing(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(path, error) from None


def _check_text(path: Path) -> None:
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise _corrupt(path, error) from None


def check_safetensors(path: Path) -> set[str]:
    """Opens a safetensors file without loading its tensors; returns their names.

    safetensors refuses, on opening, a header that does not parse, a tensor whose
    byte range does not fit its dtype and shape, and a file that does not end where
    the data does (a truncated or padded download)."""
    if not path.is_file():
        raise _missing(path)
    try:
        # "numpy" only names the type get_tensor would return; nothing is read here.
        with safe_open(path, framework="numpy") as weights:
            return set(weights.keys())
    except (SafetensorError, OSError) as error:
        raise _corrupt(path, error) from None


def _check_weights(folder: Path) -> None:
    single = folder / SINGLE_WEIGHTS
    index_path = folder / WEIGHTS_INDEX
    # transformers prefers the single file when both exist, so that is the one to check.
    if single.exists() or not index_path.exists():
        check_safetensors(single)
        return
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise _corrupt(index_path, "no weight_map of tensor names to shard files")
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(shard, []).append(tensor)
    for shard, tensors in sorted(shards.items()):
        shard_path = folder / shard
        present = check_safetensors(shard_path)
        absent = [tensor for tensor in tensors if tensor not in present]
        if absent:
            raise _corrupt(shard_path, f"lacks {len(absent)} tensors the index assigns to it, e.g. {absent[0]}")


def validate_checkpoint(path: str | os.PathLike) -> Path:
    """Checks a local CSM checkpoint folder; returns its resolved path or raises CheckpointError."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise _not_a_folder(folder)
    contents = {name: _read_json(folder / name) for name in REQUIRED_JSON}
    config = contents[CONFIG]
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != EXPECTED_MODEL_TYPE:
        raise _corrupt(folder / CONFIG, f"model_type is {model_type!r}, expected {EXPECTED_MODEL_TYPE!r}")
    for name in OPTIONAL_JSON:
        if (folder / name).exists():
            _read_json(folder / name)
    for name in OPTIONAL_TEXT:
        if (folder / name).exists():
            _check_text(folder / name)
    _check_weights(folder)
    return folder


def _download(repo_id: str) -> Path:
    # Imported here: only the hub path needs it, and it is slow to import.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise CheckpointError(
            f"checkpoint {repo_id!r} is not a local folder and HF_TOKEN is not set "
            "(set HF_TOKEN for an account that accepted the model's terms, or pass a local folder)"
        )
    try:
        return Path(snapshot_download(repo_id, token=token, allow_patterns=HUB_FILE_PATTERNS))
    except GatedRepoError:
        raise CheckpointError(
            f"checkpoint {repo_id!r} is gated and HF_TOKEN has no access: accept its terms on the hub"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"checkpoint {repo_id!r} not found on the hub (or HF_TOKEN cannot see it)") from None
    except (HfHubHTTPError, OSError) as error:
        # No network ends here too (LocalEntryNotFoundError is an OSError); the hub's
        # message spans several lines, its first one says what happened.
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CheckpointError(
            f"could not download checkpoint {repo_id!r} from the hub "
            f"(no network? pass a local folder instead): {first_line}"
        ) from None


def resolve_checkpoint(spec: str) -> Path:
    """A local folder (which wins over a hub id of the same name), or a hub id such as
    `sesame/csm-1b` (downloaded when HF_TOKEN is set), as a validated local folder."""
    local = Path(spec).expanduser()
    if local.is_dir():
        return validate_checkpoint(local)
    if local.exists() or not HUB_ID_PATTERN.match(spec):
        raise _not_a_folder(local.resolve())
    return validate_checkpoint(_download(spec))
