"""Persisted voice profiles: a reference's Mimi codes and transcript under an id.

One voice is two files in the store's directory:

    <voice_id>.json               metadata; its presence is what makes the voice exist
    <voice_id>.<random>.npy       codes [frames, 32] int64, named by the metadata

Every file is written to a temporary name in the same directory, flushed and
fsync'ed, then renamed into place, so a reader never sees half a file. The codes
go first and the metadata last (the commit); deletion removes the metadata first.
Each registration writes its codes under a fresh name, so a reader holding an
older metadata file never pairs it with another registration's codes.

Several processes (Triton model instances) may share a directory: every `get` and
`list` re-scans it when it may have changed (its mtime moved, or it changed within
the last `_RACY_NS`, where a coarse file-system clock could hide a second change),
and re-reads only metadata files whose (inode, size, mtime) changed. Within a
process a lock makes the store thread-safe.

A writer killed mid-registration leaves a temporary or codes no metadata names.
`sweep` removes them safely while others write (voice_leftovers.py); it runs at
start-up, before every registration and, at most every `_SWEEP_INTERVAL_S`, on `list`.

Errors never carry the store's path (clients see them): a full disk or quota is an
InvalidInput "voice store is full" (the request is refused whole, the store left as
it was), any other file-system failure a VoiceStoreError naming only the errno.

A voice may carry an owner, and a store holds at most `max_voices`: those rules are
voice_owners.py's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from csm_triton import constants as C
from csm_triton.core import validation, voice_leftovers
from csm_triton.core.files import TEMP_PREFIX, atomic_write, fsync_directory, temporary_path
from csm_triton.core.voice_owners import check_deletion, check_owner, check_room
from csm_triton.errors import InvalidInput

__all__ = ["Voice", "VoiceStore", "VoiceStoreError"]

LOG = logging.getLogger(__name__)

_FORMAT_VERSION = 1
_METADATA_SUFFIX = ".json"
# A directory changed within this window may change again without its mtime moving
# (file systems with coarse timestamps): re-scan until it is older than this.
_RACY_NS = 2_000_000_000
# `list` sweeps at most this often (registrations always do).
_SWEEP_INTERVAL_S = 30.0
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class VoiceStoreError(RuntimeError):
    """A file-system failure of the store other than a full disk: the message names the
    operation and the errno, never a path (the server log has the whole error)."""


@contextlib.contextmanager
def _file_errors(action: str):
    """OSError -> InvalidInput (disk full) or VoiceStoreError, without the path."""
    try:
        yield
    except OSError as error:
        LOG.error("voice store: %s failed: %s", action, error)
        reason = os.strerror(error.errno) if error.errno else type(error).__name__
        if error.errno in _DISK_FULL:
            raise InvalidInput(f"voice store is full ({reason}): could not {action}; nothing was stored. "
                               "Delete voices or ask the operator to free space.") from None
        raise VoiceStoreError(f"the voice store could not {action}: {reason} (errno {error.errno})") from error


@dataclass(frozen=True)
class Voice:
    voice_id: str
    transcript: str
    codes: np.ndarray  # [frames, NUM_CODEBOOKS] int64, read-only
    duration_seconds: float
    created_at: str  # ISO 8601, UTC
    owner: str | None = None  # a key id (C.VOICE_OWNER_PATTERN); None: the admin's

    def summary(self) -> dict:
        """What clients see (JSON-ready): everything but the codes."""
        return {
            "voice_id": self.voice_id,
            "transcript": self.transcript,
            "duration_seconds": self.duration_seconds,
            "created_at": self.created_at,
            "owner": self.owner,
        }


@dataclass(frozen=True)
class _Entry:
    signature: tuple[int, int, int]  # the metadata file's (inode, size, mtime_ns)
    voice: Voice


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _link_exclusively(voice_id: str):
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


class VoiceStore:
    """Voices persisted in `directory`, cached in memory, shared between processes."""

    def __init__(self, directory: str | Path, max_voices: int = C.MAX_STORED_VOICES):
        if int(max_voices) < 1:
            raise ValueError(f"max_voices must be at least 1, got {max_voices}")
        self.max_voices = int(max_voices)
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._scanned_mtime_ns: int | None = None
        self._scanned_at_ns = 0
        self._swept_at = 0.0
        with _file_errors("read the voices"):
            self.sweep()
            self._refresh(force=True)

    # --- public API ---------------------------------------------------------------------
    def register(self, voice_id: str, codes: np.ndarray, transcript: str, duration_seconds: float,
                 *, replace: bool = False, owner: str | None = None) -> Voice:
        """Stores a voice as `owner`'s (None: the admin's); an existing id is refused
        unless `replace`, and a new one when the store is full (InvalidInput).

        The transcript is trusted: VoiceResolver.register checks it (validation.text)
        before it pays for the encoding. The id is checked here too, since file names
        are built from it."""
        voice_id = validation.voice_id(voice_id)
        owner = check_owner(owner)
        codes = validation.audio_codes(np.asarray(codes), "codes")
        if len(codes) == 0:
            raise InvalidInput("a voice needs at least one frame of codes")
        duration = float(duration_seconds)
        if not np.isfinite(duration) or duration <= 0:
            raise InvalidInput(f"duration_seconds must be a positive number, got {duration_seconds!r}")
        codes = np.array(codes, dtype=np.int64, order="C", copy=True)  # ours, made read-only below
        codes_name = f"{voice_id}.{uuid.uuid4().hex[:12]}.npy"
        created_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        metadata = {
            "format_version": _FORMAT_VERSION,
            "voice_id": voice_id,
            "transcript": transcript,
            "duration_seconds": round(duration, 3),
            "created_at": created_at,
            "frames": int(len(codes)),
            "codes_file": codes_name,
            "owner": owner,
        }
        with self._lock, _file_errors(f"store voice '{voice_id}'"):
            self._refresh()
            if not replace and self._metadata_path(voice_id).exists():
                raise InvalidInput(f"voice '{voice_id}' already exists; delete it first to register it again")
            if voice_id not in self._entries:
                check_room(len(self._entries), self.max_voices)
            self.sweep()
            self._write_atomic(self.directory / codes_name, lambda handle: np.save(handle, codes, allow_pickle=False))
            try:
                previous = self._read_metadata_with_inode(voice_id)[0] if replace else None
                signature = self._write_metadata(voice_id, metadata, exclusive=not replace)
            except BaseException:
                (self.directory / codes_name).unlink(missing_ok=True)
                raise
            # Committed: from here on the answer is "registered", whatever else happens
            # (another process may delete the voice this very moment).
            codes.setflags(write=False)
            voice = Voice(voice_id, transcript, codes, metadata["duration_seconds"], created_at, owner)
            self._entries[voice_id] = _Entry(signature, voice)
            try:
                if previous and previous.get("codes_file") != codes_name:
                    self._unlink_codes(previous.get("codes_file"))
                fsync_directory(self.directory)
            except OSError as error:  # the old codes stay: an orphan the next sweep removes
                LOG.warning("voice store: cleaning up after registering '%s': %s", voice_id, error)
            return voice

    def check_room(self) -> None:
        """Raises InvalidInput when the store holds max_voices (so a registration can be
        refused before it pays for encoding)."""
        with self._lock, _file_errors("read the voices"):
            self._refresh()
            check_room(len(self._entries), self.max_voices)

    def get(self, voice_id: str) -> Voice:
        voice_id = validation.voice_id(voice_id)
        with self._lock, _file_errors("read the voices"):
            self._refresh()
            entry = self._entries.get(voice_id)
        if entry is None:
            raise InvalidInput(f"unknown voice '{voice_id}'")
        return entry.voice

    def list(self) -> list[dict]:
        """Summaries of every voice, sorted by id."""
        with self._lock, _file_errors("list the voices"):
            if time.monotonic() - self._swept_at >= _SWEEP_INTERVAL_S:
                self.sweep()
            self._refresh()
            return [self._entries[key].voice.summary() for key in sorted(self._entries)]

    def delete(self, voice_id: str, *, owner: str | None = None) -> dict:
        """Removes a voice (its metadata first, then its codes); returns its summary.
        With `owner`, only a voice of that owner (PermissionDenied for another's, the
        admin's included); without, any (the admin)."""
        voice_id = validation.voice_id(voice_id)
        owner = check_owner(owner)
        with self._lock, _file_errors(f"delete voice '{voice_id}'"):
            self._refresh()
            path = self._metadata_path(voice_id)
            metadata, inode = self._read_metadata_with_inode(voice_id)
            check_deletion(voice_id, owner, path, metadata, inode)
            metadata = metadata or {}
            entry = self._entries.pop(voice_id, None)
            # Moved aside, then read: the codes removed are those of the very metadata this
            # call removed, even if another process deleted and registered the id again
            # since it was read above (else the new registration's codes were orphaned).
            # A crash here leaves a temporary and unnamed codes, which the sweep removes.
            moved = temporary_path(path)
            try:
                os.rename(path, moved)
            except FileNotFoundError:
                raise InvalidInput(f"unknown voice '{voice_id}'") from None
            try:
                removed = json.loads(moved.read_bytes())
            except (OSError, ValueError):
                removed = None
            self._unlink_codes(removed.get("codes_file") if isinstance(removed, dict) else None)
            moved.unlink(missing_ok=True)
            fsync_directory(self.directory)
        if entry is not None:
            return entry.voice.summary()
        # Unreadable metadata (or written by another process a moment ago): what it says.
        return {"voice_id": voice_id, **{key: metadata.get(key) for key in
                                         ("transcript", "duration_seconds", "created_at", "owner")}}

    def __contains__(self, voice_id: str) -> bool:
        try:
            self.get(voice_id)
        except InvalidInput:
            return False
        return True

    def __len__(self) -> int:
        with self._lock, _file_errors("read the voices"):
            self._refresh()
            return len(self._entries)

    def sweep(self) -> list[str]:
        """Removes what killed writers left (voice_leftovers.sweep, safe while other
        processes register); the names removed."""
        self._swept_at = time.monotonic()
        return voice_leftovers.sweep(self.directory, _METADATA_SUFFIX)

    # --- files ----------------------------------------------------------------------------
    def _metadata_path(self, voice_id: str) -> Path:
        return self.directory / f"{voice_id}{_METADATA_SUFFIX}"

    def _write_atomic(self, target: Path, write) -> None:
        with atomic_write(target) as out:
            write(out)

    def _write_metadata(self, voice_id: str, metadata: dict, *, exclusive: bool) -> tuple[int, int, int]:
        """Commits the voice; returns the signature of the file written (taken from the
        open file: the name may be gone again by the time this returns)."""
        target = self._metadata_path(voice_id)
        data = (json.dumps(metadata, ensure_ascii=False, indent=2) + "\n").encode()
        with atomic_write(target, publish=_link_exclusively(voice_id) if exclusive else os.replace) as out:
            out.write(data)
            out.flush()
            signature = _signature(os.fstat(out.fileno()))
        return signature

    def _read_metadata_with_inode(self, voice_id: str) -> tuple[dict | None, int | None]:
        """The metadata and the inode of the very file it was read from."""
        try:
            with open(self._metadata_path(voice_id), "rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                metadata = json.loads(handle.read())
        except (OSError, ValueError):
            return None, None
        return (metadata, inode) if isinstance(metadata, dict) else (None, None)

    def _unlink_codes(self, name: object) -> None:
        if isinstance(name, str) and name.endswith(".npy") and "/" not in name and not name.startswith("."):
            (self.directory / name).unlink(missing_ok=True)

    def _load(self, voice_id: str, path: Path) -> Voice | None:
        """A voice from its metadata file, or None when it is incomplete (being
        written or deleted by another process) or not ours."""
        try:
            metadata = json.loads(path.read_text())
            codes_name = metadata["codes_file"]
            if metadata.get("voice_id") != voice_id or not isinstance(codes_name, str) or "/" in codes_name:
                return None
            codes = np.load(self.directory / codes_name, allow_pickle=False)
            codes = validation.audio_codes(codes, codes_name)
            codes = np.ascontiguousarray(codes, dtype=np.int64)
            codes.setflags(write=False)
            owner = metadata.get("owner")
            return Voice(voice_id, str(metadata["transcript"]), codes, float(metadata["duration_seconds"]),
                         str(metadata["created_at"]), owner if isinstance(owner, str) else None)
        except (OSError, ValueError, KeyError, TypeError, InvalidInput):
            return None

    def _refresh(self, *, force: bool = False) -> None:
        """Re-scans the directory if it may have changed since the last scan."""
        stat = self.directory.stat()
        now = time.time_ns()
        if (not force and stat.st_mtime_ns == self._scanned_mtime_ns
                and self._scanned_at_ns - stat.st_mtime_ns > _RACY_NS):
            return
        found: dict[str, _Entry] = {}
        with os.scandir(self.directory) as entries:
            for item in entries:
                name = item.name
                if not name.endswith(_METADATA_SUFFIX) or name.startswith(TEMP_PREFIX):
                    continue
                voice_id = name[: -len(_METADATA_SUFFIX)]
                if not C.VOICE_ID_PATTERN.fullmatch(voice_id):
                    continue
                try:
                    signature = _signature(item.stat())
                except FileNotFoundError:
                    continue
                cached = self._entries.get(voice_id)
                if cached is not None and cached.signature == signature:
                    found[voice_id] = cached
                    continue
                voice = self._load(voice_id, Path(item.path))
                if voice is not None:
                    found[voice_id] = _Entry(signature, voice)
        self._entries = found
        self._scanned_mtime_ns = stat.st_mtime_ns
        self._scanned_at_ns = now
