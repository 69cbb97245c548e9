"""A voice store directory's files, one at a time: the metadata file written atomically
(exclusively for a new id), read back with its inode, the directory scanned into cached
entries, a voice's codes and adapter folder removed; and the file-system errors turned
into what a client may see (never a path).

voice_store.py holds the rules over these files (ids, room, replacement, deletion, when
to re-scan, the lock); this module only knows where a voice's files lie and how each is
written, read or removed safely while other processes share the directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from csm_triton import constants as C
from csm_triton.core.files import TEMP_PREFIX, atomic_write, temporary_path
from csm_triton.core.voice_records import ADAPTER_DIR_SUFFIX, Voice, owned_name, read_voice
from csm_triton.errors import InvalidInput

__all__ = [
    "METADATA_SUFFIX",
    "Entry",
    "VoiceStoreError",
    "file_errors",
    "link_exclusively",
    "metadata_path",
    "read_metadata_with_inode",
    "remove_files",
    "scan",
    "write_metadata",
]

LOG = logging.getLogger("csm_triton.core.voice_store")  # the store's log: one place to read its failures

METADATA_SUFFIX = ".json"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class VoiceStoreError(RuntimeError):
    """A file-system failure of the store other than a full disk: the message names the
    operation and the errno, never a path (the server log has the whole error)."""


@contextlib.contextmanager
def file_errors(action: str):
    """OSError -> InvalidInput (disk full) or VoiceStoreError, without the path."""
    try:
        yield
    except OSError as error:
        LOG.error("voice store: %s failed: %s", action, error)
        reason = os.strerror(error.errno) if error.errno else type(error).__name__
        if error.errno in _DISK_FULL:
            raise InvalidInput(
                f"voice store is full ({reason}): could not {action}; nothing was stored. "
                "Delete voices or ask the operator to free space."
            ) from None
        raise VoiceStoreError(f"the voice store could not {action}: {reason} (errno {error.errno})") from error


@dataclass(frozen=True)
class Entry:
    """A voice as last read, with the signature of the metadata file it was read from."""

    signature: tuple[int, int, int]  # the metadata file's (inode, size, mtime_ns)
    voice: Voice


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def metadata_path(directory: Path, voice_id: str) -> Path:
    return directory / f"{voice_id}{METADATA_SUFFIX}"


def link_exclusively(voice_id: str):
    """An exclusive create that is atomic across processes: link() fails if the name
    exists, so two registrations of one id cannot both win."""

    def publish(temporary: str, target: Path) -> None:
        try:
            os.link(temporary, target)
        except FileExistsError:
            raise InvalidInput(f"voice '{voice_id}' already exists; delete it first to register it again") from None
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # A file system without hard links: checked before under the lock; the
            # cross-process race that remains is accepted there.
            os.replace(temporary, target)

    return publish


def write_metadata(directory: Path, voice_id: str, metadata: dict, *, exclusive: bool) -> tuple[int, int, int]:
    """Commits the voice; returns the signature of the file written (taken from the
    open file: the name may be gone again by the time this returns)."""
    target = metadata_path(directory, voice_id)
    data = (json.dumps(metadata, ensure_ascii=False, indent=2) + "\n").encode()
    with atomic_write(target, publish=link_exclusively(voice_id) if exclusive else os.replace) as out:
        out.write(data)
        out.flush()
        signature = _signature(os.fstat(out.fileno()))
    return signature


def read_metadata_with_inode(directory: Path, voice_id: str) -> tuple[dict | None, int | None]:
    """The metadata and the inode of the very file it was read from."""
    try:
        with open(metadata_path(directory, voice_id), "rb") as handle:
            inode = os.fstat(handle.fileno()).st_ino
            metadata = json.loads(handle.read())
    except (OSError, ValueError):
        return None, None
    return (metadata, inode) if isinstance(metadata, dict) else (None, None)


def remove_files(directory: Path, metadata: dict) -> None:
    """Removes the codes and the adapter folder a metadata names (plain names only)."""
    if owned_name(metadata.get("codes_file"), ".npy"):
        (directory / metadata["codes_file"]).unlink(missing_ok=True)
    if owned_name(metadata.get("adapter_dir"), ADAPTER_DIR_SUFFIX):
        # Renamed aside first, so the name is gone at once and a crash mid-removal
        # leaves a temporary the sweep removes (never a half-deleted adapter).
        folder = directory / metadata["adapter_dir"]
        aside = temporary_path(folder)
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)


def scan(directory: Path, cached: dict[str, Entry]) -> dict[str, Entry]:
    """Every voice in the directory by id; a metadata file whose signature is that of
    its `cached` entry is not read again."""
    found: dict[str, Entry] = {}
    with os.scandir(directory) as entries:
        for item in entries:
            name = item.name
            if not name.endswith(METADATA_SUFFIX) or name.startswith(TEMP_PREFIX):
                continue
            voice_id = name[: -len(METADATA_SUFFIX)]
            if not C.VOICE_ID_PATTERN.fullmatch(voice_id):
                continue
            try:
                signature = _signature(item.stat())
            except FileNotFoundError:
                continue
            entry = cached.get(voice_id)
            if entry is not None and entry.signature == signature:
                found[voice_id] = entry
                continue
            voice = read_voice(directory, voice_id, Path(item.path))
            if voice is not None:
                found[voice_id] = Entry(signature, voice)
    return found
