"""A LoRA adapter folder, as `make finetune` writes it, read for voice_register.

The server checks everything (peft LoRA only, rank, target modules, shapes against the
served base, the base hash, the file's integrity: docs/api.md "Voice profiles"); this
module only finds the files and bounds their sizes before reading them, so a wrong
folder is refused here with one line instead of after an upload.

Accepted: the adapter folder itself (`OUT/adapter`: adapter_config.json +
adapter_model.safetensors), or the run's folder `OUT` that holds it. The run's
`manifest.json` (beside the adapter folder, or inside it) travels along: the server
compares the base hash it records with the base it serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from csm_clients.errors import InvalidRequest
from csm_clients.limits import DEFAULT_LIMITS, Limits

__all__ = ["CONFIG_FILE", "MANIFEST_FILE", "WEIGHTS_FILE", "AdapterFiles", "read_adapter_folder"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class AdapterFiles:
    folder: Path
    config: bytes
    weights: bytes
    manifest: bytes | None  # the run's manifest.json, when there is one


def _read(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise InvalidRequest(f"{path} is {size:,} bytes; the server takes at most {limit:,}")
        return path.read_bytes()
    except OSError as error:
        raise InvalidRequest(f"cannot read {path}: {error.strerror or error}") from None


def read_adapter_folder(folder: str | Path, limits: Limits = DEFAULT_LIMITS) -> AdapterFiles:
    """The adapter's files from `folder` (the adapter folder or the run's), sizes bounded
    before reading (by the server's `limits`); InvalidRequest naming what is missing or too large."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() and (folder / "adapter" / CONFIG_FILE).is_file():
        folder = folder / "adapter"  # the run's OUT folder
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise InvalidRequest(
                f"{folder} has no {name}: give the adapter folder `make finetune` wrote "
                "(OUT/adapter) or its run folder (OUT)"
            )
    manifest = next((path for path in (folder / MANIFEST_FILE, folder.parent / MANIFEST_FILE) if path.is_file()), None)
    return AdapterFiles(
        folder,
        _read(folder / CONFIG_FILE, limits.MAX_ADAPTER_CONFIG_BYTES),
        _read(folder / WEIGHTS_FILE, limits.MAX_ADAPTER_BYTES),
        _read(manifest, limits.MAX_ADAPTER_MANIFEST_BYTES) if manifest else None,
    )
