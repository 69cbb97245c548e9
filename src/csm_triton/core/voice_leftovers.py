"""What a writer killed mid-registration leaves in a voice store's directory, and its
safe removal while other processes write: kept apart from voice_store.py because
telling a leftover from a write in flight is a policy of its own.

A killed writer leaves a temporary (a file, or an adapter's folder being filled), or
codes or an adapter folder that no metadata names. `sweep` removes a temporary whose
writer is gone (or that is old, see core/files.stale_temporary), and unnamed codes and
adapter folders once older than `ORPHAN_GRACE_S` (a registration's files land
milliseconds before its metadata). The metadata is read after the listing, so codes
whose registration committed meanwhile are seen as named. The store sweeps at
start-up, before every registration and, rate-limited, on `list`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from csm_triton.core.files import TEMP_PREFIX, is_temporary, stale_temporary

__all__ = ["ORPHAN_GRACE_S", "OWNED_SUFFIXES", "referenced_codes", "sweep"]

LOG = logging.getLogger("csm_triton.core.voice_store")

# Codes that no metadata names are removed once older than this: younger ones may be
# a registration in flight (its codes land milliseconds before its metadata).
ORPHAN_GRACE_S = 60.0
# What a metadata file may name: codes (`codes_file`) and adapter folders (`adapter_dir`).
OWNED_SUFFIXES = (".npy", ".adapter")
_OWNED_KEYS = ("codes_file", "adapter_dir")


def sweep(directory: Path, metadata_suffix: str) -> list[str]:
    """Removes the leftovers in `directory` (metadata files end in `metadata_suffix`);
    the names removed."""
    now = time.time()
    candidates, removed = [], []
    with os.scandir(directory) as entries:
        for item in entries:
            if is_temporary(item.name):
                if stale_temporary(item.path, now=now):
                    candidates.append(item.name)
            elif item.name.endswith(OWNED_SUFFIXES) and not item.name.startswith(TEMP_PREFIX):
                try:
                    if now - item.stat().st_mtime > ORPHAN_GRACE_S:
                        candidates.append(item.name)
                except FileNotFoundError:
                    continue
    if not candidates:
        return removed
    referenced = referenced_codes(directory, metadata_suffix)
    for name in candidates:
        if referenced is None and not is_temporary(name):
            continue  # some metadata could not be read: its codes may be among these
        if name in (referenced or ()):
            continue
        try:
            path = directory / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(name)
        except FileNotFoundError:  # another process swept it first
            continue
        except OSError as error:  # a leftover that cannot go must not fail a request
            LOG.warning("voice store: cannot remove the leftover %s: %s", name, error)
    if removed:
        LOG.info("voice store: removed leftovers of interrupted writes: %s", ", ".join(removed))
    return removed


def referenced_codes(directory: Path, metadata_suffix: str) -> set[str] | None:
    """The codes files and adapter folders every metadata file names; None if one could
    not be read."""
    referenced = set()
    with os.scandir(directory) as entries:
        names = [
            item.name
            for item in entries
            if item.name.endswith(metadata_suffix) and not item.name.startswith(TEMP_PREFIX)
        ]
    for name in names:
        try:
            metadata = json.loads((directory / name).read_text())
            owned = [metadata.get(key) for key in _OWNED_KEYS]
        except (FileNotFoundError, ValueError, AttributeError):
            continue  # deleted meanwhile, or broken (a whole file that names nothing usable)
        except OSError:
            return None
        referenced.update(value for value in owned if isinstance(value, str))
    return referenced
