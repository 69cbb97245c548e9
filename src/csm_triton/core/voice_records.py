"""A stored voice as the store hands it out, and as its metadata file says it.

Two kinds share one store (voice_store.py) and one id space:

- `clip` (every voice written before adapters existed has no `kind` and is one): a
  reference's Mimi codes and transcript.
- `adapter`: a LoRA adapter (core/adapters.py, checked before it was stored) in a folder
  of its own that holds exactly `adapter_config.json` and `adapter_model.safetensors`,
  what voice_list shows of it (rank, alpha, target modules, the base hash it was checked
  against, size), an optional default speaker id, and optionally a reference clip of its
  own, stored as a clip voice's is.

A metadata file names the files it owns (`codes_file`, `adapter_dir`); the leftovers of a
writer killed before the metadata landed are named by none and swept (voice_leftovers.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm_triton.core import validation
from csm_triton.core.adapters import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE
from csm_triton.core.files import atomic_directory, atomic_write, write_durable
from csm_triton.errors import InvalidInput

__all__ = [
    "ADAPTER_DIR_SUFFIX",
    "CLIP",
    "ADAPTER",
    "KINDS",
    "Voice",
    "adapter_writer",
    "checked_clip",
    "codes_writer",
    "owned_name",
    "read_voice",
]

CLIP, ADAPTER = "clip", "adapter"
KINDS = (CLIP, ADAPTER)
ADAPTER_DIR_SUFFIX = ".adapter"
# What voice_list shows of an adapter (the metadata's "adapter" object).
_ADAPTER_FIELDS = (
    "rank",
    "lora_alpha",
    "target_modules",
    "stacks",
    "base_model_sha256",
    "base_hash_checked",
    "size_bytes",
)


@dataclass(frozen=True)
class Voice:
    voice_id: str
    transcript: str  # "" for an adapter voice without a clip
    codes: np.ndarray | None  # [frames, NUM_CODEBOOKS] int64, read-only; None: an adapter voice without a clip
    duration_seconds: float  # the clip's; 0.0 without one
    created_at: str  # ISO 8601, UTC
    owner: str | None = None  # a key id (C.VOICE_OWNER_PATTERN); None: the admin's
    kind: str = CLIP
    adapter: dict | None = None  # an adapter voice's _ADAPTER_FIELDS
    default_speaker: int | None = None
    adapter_dir: str | None = None  # the adapter's folder, a name in the store's directory

    @property
    def has_clip(self) -> bool:
        return self.codes is not None

    def summary(self) -> dict:
        """What clients see (JSON-ready): everything but the codes and file names."""
        summary = {
            "voice_id": self.voice_id,
            "transcript": self.transcript,
            "duration_seconds": self.duration_seconds,
            "created_at": self.created_at,
            "owner": self.owner,
            "kind": self.kind,
        }
        if self.kind == ADAPTER:
            summary.update({key: (self.adapter or {}).get(key) for key in _ADAPTER_FIELDS})
            summary["default_speaker"] = self.default_speaker
        return summary


def owned_name(name: object, suffix: str) -> bool:
    """Whether a metadata file's `codes_file` / `adapter_dir` is a plain name in the store
    (never a path: the metadata is only as trusted as the folder's other writers)."""
    return (
        isinstance(name, str)
        and name.endswith(suffix)
        and "/" not in name
        and "\\" not in name
        and not name.startswith(".")
        and name not in (".", "..")
    )


def _codes(directory: Path, name: str) -> np.ndarray:
    codes = validation.audio_codes(np.load(directory / name, allow_pickle=False), name)
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    codes.setflags(write=False)
    return codes


def read_voice(directory: Path, voice_id: str, path: Path) -> Voice | None:
    """A voice from its metadata file, or None when it is incomplete (being written or
    deleted by another process), of a kind this version does not know, or not ours."""
    try:
        metadata = json.loads(path.read_text())
        if metadata.get("voice_id") != voice_id:
            return None
        kind = metadata.get("kind", CLIP)
        owner = metadata.get("owner")
        owner = owner if isinstance(owner, str) else None
        codes_name = metadata.get("codes_file")
        if kind == CLIP:
            if not owned_name(codes_name, ".npy"):
                return None
            return Voice(
                voice_id,
                str(metadata["transcript"]),
                _codes(directory, codes_name),
                float(metadata["duration_seconds"]),
                str(metadata["created_at"]),
                owner,
            )
        if kind != ADAPTER:
            return None
        adapter_dir = metadata["adapter_dir"]
        if not owned_name(adapter_dir, ADAPTER_DIR_SUFFIX) or not all(
            (directory / adapter_dir / name).is_file() for name in ADAPTER_FILES
        ):
            return None
        codes = None
        if codes_name is not None:
            if not owned_name(codes_name, ".npy"):
                return None
            codes = _codes(directory, codes_name)
        speaker = metadata.get("default_speaker")
        return Voice(
            voice_id,
            str(metadata.get("transcript") or ""),
            codes,
            float(metadata.get("duration_seconds") or 0.0),
            str(metadata["created_at"]),
            owner,
            ADAPTER,
            dict(metadata["adapter"]),
            int(speaker) if speaker is not None else None,
            adapter_dir,
        )
    except (OSError, ValueError, KeyError, TypeError, InvalidInput):
        return None


def checked_clip(codes: np.ndarray, duration_seconds: float) -> tuple[np.ndarray, float]:
    """A clip's codes (a read-only copy) and seconds, checked before they are stored."""
    codes = validation.audio_codes(np.asarray(codes), "codes")
    if len(codes) == 0:
        raise InvalidInput("a voice needs at least one frame of codes")
    duration = float(duration_seconds) if duration_seconds is not None else float("nan")
    if not np.isfinite(duration) or duration <= 0:
        raise InvalidInput(f"duration_seconds must be a positive number, got {duration_seconds!r}")
    codes = np.array(codes, dtype=np.int64, order="C", copy=True)  # ours, read-only
    codes.setflags(write=False)
    return codes, round(duration, 3)


# The store's writers: each makes one named file (or folder) appear whole.
def codes_writer(codes: np.ndarray):
    def write(target: Path) -> None:
        with atomic_write(target) as out:
            np.save(out, codes, allow_pickle=False)

    return write


def adapter_writer(config: bytes, weights: bytes):
    def write(target: Path) -> None:
        with atomic_directory(target) as folder:
            write_durable(folder / CONFIG_FILE, config)
            write_durable(folder / WEIGHTS_FILE, weights)

    return write
