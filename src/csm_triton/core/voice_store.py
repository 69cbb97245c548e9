"""Persisted voice profiles under an id: a reference's Mimi codes and transcript (a
clip voice), or a LoRA adapter with an optional clip of its own (an adapter voice;
voice_records.py has both kinds).

A voice is its metadata file and the files it names, in the store's directory:

    <voice_id>.json               metadata; its presence is what makes the voice exist
    <voice_id>.<random>.npy       codes [frames, 32] int64 (a clip voice; an adapter voice's clip)
    <voice_id>.<random>.adapter/  adapter_config.json + adapter_model.safetensors (an adapter voice)

Every file is written to a temporary name in the same directory, flushed and
fsync'ed, then renamed into place, so a reader never sees half a file; an adapter's
folder is filled as a hidden temporary folder and renamed whole (files.atomic_directory).
The named files go first and the metadata last (the commit); deletion removes the
metadata first. Each registration writes its files under fresh names, so a reader
holding an older metadata file never pairs it with another registration's files.

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

A voice may carry an owner, and a store holds at most `max_voices`, at most
`max_adapters` of them adapters: those rules are voice_owners.py's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
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
from csm_triton.core.voice_owners import check_adapter_room, check_deletion, check_owner, check_room
from csm_triton.core.voice_records import (ADAPTER, ADAPTER_DIR_SUFFIX, Voice, adapter_writer, checked_clip,
                                          codes_writer, owned_name, read_voice)
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class VoiceStore:
    """Voices persisted in `directory`, cached in memory, shared between processes."""

    def __init__(self, directory: str | Path, max_voices: int = C.MAX_STORED_VOICES,
                 max_adapters: int = C.MAX_STORED_ADAPTERS):
        if int(max_voices) < 1:
            raise ValueError(f"max_voices must be at least 1, got {max_voices}")
        self.max_voices, self.max_adapters = int(max_voices), int(max_adapters)
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
        """Stores a clip voice as `owner`'s (None: the admin's); an existing id is refused
        unless `replace`, and a new one when the store is full (InvalidInput).

        The transcript is trusted: VoiceResolver.register checks it (validation.text)
        before it pays for the encoding. The id is checked here too, since file names
        are built from it."""
        voice_id = validation.voice_id(voice_id)
        owner = check_owner(owner)
        codes, duration = checked_clip(codes, duration_seconds)
        codes_name = f"{voice_id}.{uuid.uuid4().hex[:12]}.npy"
        metadata = {"format_version": _FORMAT_VERSION, "voice_id": voice_id, "transcript": transcript,
                    "duration_seconds": duration, "created_at": _now(), "frames": int(len(codes)),
                    "codes_file": codes_name, "owner": owner}
        return self._commit(metadata, [(codes_name, codes_writer(codes))],
                            lambda: Voice(voice_id, transcript, codes, duration, metadata["created_at"], owner),
                            replace=replace)

    def register_adapter(self, voice_id: str, adapter_config: bytes, adapter_weights: bytes, description: dict, *,
                         default_speaker: int | None = None, codes: np.ndarray | None = None,
                         transcript: str | None = None, duration_seconds: float | None = None,
                         owner: str | None = None) -> Voice:
        """Stores an adapter voice as `owner`'s: the adapter's two files byte for byte
        (checked before: core/adapters.check_adapter, VoiceResolver.register_adapter),
        `description` (rank, alpha, target modules, base hash ...: what voice_list shows;
        the size is added here), and optionally a default speaker id and a clip (codes,
        transcript, seconds). An existing id is refused, and so is a new one when the store
        holds max_voices voices or max_adapters adapters."""
        voice_id = validation.voice_id(voice_id)
        owner = check_owner(owner)
        if default_speaker is not None and not 0 <= int(default_speaker) <= C.MAX_SPEAKER_ID:
            raise InvalidInput(f"DEFAULT_SPEAKER must be in [0, {C.MAX_SPEAKER_ID}], got {default_speaker}")
        stamp = uuid.uuid4().hex[:12]
        adapter_name = f"{voice_id}.{stamp}{ADAPTER_DIR_SUFFIX}"
        writes = [(adapter_name, adapter_writer(adapter_config, adapter_weights))]
        codes_name, duration = None, 0.0
        if codes is not None:
            codes, duration = checked_clip(codes, duration_seconds)
            codes_name = f"{voice_id}.{stamp}.npy"
            writes.append((codes_name, codes_writer(codes)))
        adapter = {**description, "size_bytes": len(adapter_config) + len(adapter_weights)}
        speaker = None if default_speaker is None else int(default_speaker)
        metadata = {"format_version": _FORMAT_VERSION, "voice_id": voice_id, "kind": ADAPTER,
                    "transcript": transcript or "", "duration_seconds": duration, "created_at": _now(),
                    "frames": 0 if codes is None else int(len(codes)), "codes_file": codes_name, "owner": owner,
                    "adapter_dir": adapter_name, "adapter": adapter, "default_speaker": speaker}
        return self._commit(metadata, writes, lambda: Voice(
            voice_id, transcript or "", codes, duration, metadata["created_at"], owner, ADAPTER, adapter, speaker,
            adapter_name), adapter=True)

    def adapter_dir(self, voice_id: str) -> Path:
        """The folder of an adapter voice's adapter: exactly adapter_config.json and
        adapter_model.safetensors, as registered (InvalidInput for an unknown voice or a
        clip voice). Deleting the voice removes the folder: open its files, then read."""
        voice = self.get(voice_id)
        if voice.kind != ADAPTER or voice.adapter_dir is None:
            raise InvalidInput(f"voice '{voice.voice_id}' is a {voice.kind} voice, not a LoRA adapter")
        return self.directory / voice.adapter_dir

    def check_room(self, *, adapter: bool = False) -> None:
        """Raises InvalidInput when the store holds max_voices (or, for an adapter,
        max_adapters adapters), so a registration can be refused before it pays for work."""
        with self._lock, _file_errors("read the voices"):
            self._refresh()
            self._check_room(None, adapter)

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
        """Removes a voice (its metadata first, then its codes and adapter); returns its summary.
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
            # Moved aside, then read: the files removed are those of the very metadata this
            # call removed, even if another process deleted and registered the id again
            # since it was read above (else the new registration's files were orphaned).
            # A crash here leaves a temporary and unnamed files, which the sweep removes.
            moved = temporary_path(path)
            try:
                os.rename(path, moved)
            except FileNotFoundError:
                raise InvalidInput(f"unknown voice '{voice_id}'") from None
            try:
                removed = json.loads(moved.read_bytes())
            except (OSError, ValueError):
                removed = None
            self._remove_files(removed if isinstance(removed, dict) else {})
            moved.unlink(missing_ok=True)
            fsync_directory(self.directory)
        if entry is not None:
            return entry.voice.summary()
        # Unreadable metadata (or written by another process a moment ago): what it says.
        return {"voice_id": voice_id, **{key: metadata.get(key) for key in
                                         ("transcript", "duration_seconds", "created_at", "owner")},
                "kind": metadata.get("kind", "clip")}

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

    def _commit(self, metadata: dict, writes, voice, *, replace: bool = False, adapter: bool = False) -> Voice:
        """Under the lock: admits the id, writes the voice's files (`writes`: (name, write)
        pairs, each atomic), then its metadata, the commit; a failure before the commit
        removes what was written. `voice()`: the Voice registered."""
        voice_id = metadata["voice_id"]
        with self._lock, _file_errors(f"store voice '{voice_id}'"):
            self._refresh()
            if not replace and self._metadata_path(voice_id).exists():
                raise InvalidInput(f"voice '{voice_id}' already exists; delete it first to register it again")
            self._check_room(voice_id, adapter)
            self.sweep()
            written = []
            try:
                for name, write in writes:
                    write(self.directory / name)
                    written.append(name)
                previous = self._read_metadata_with_inode(voice_id)[0] if replace else None
                signature = self._write_metadata(voice_id, metadata, exclusive=not replace)
            except BaseException:
                self._remove_files({"codes_file": next((n for n in written if n.endswith(".npy")), None),
                                    "adapter_dir": next((n for n in written if n.endswith(ADAPTER_DIR_SUFFIX)), None)})
                raise
            # Committed: from here on the answer is "registered", whatever else happens
            # (another process may delete the voice this very moment).
            registered = voice()
            self._entries[voice_id] = _Entry(signature, registered)
            try:
                if previous:
                    self._remove_files({key: value for key, value in previous.items()
                                        if key in ("codes_file", "adapter_dir") and value != metadata.get(key)})
                fsync_directory(self.directory)
            except OSError as error:  # the old files stay: orphans the next sweep removes
                LOG.warning("voice store: cleaning up after registering '%s': %s", voice_id, error)
            return registered

    def _check_room(self, voice_id: str | None, adapter: bool) -> None:
        if voice_id not in self._entries:
            check_room(len(self._entries), self.max_voices)
        if adapter:
            check_adapter_room(sum(e.voice.kind == ADAPTER for e in self._entries.values()), self.max_adapters)

    def _remove_files(self, metadata: dict) -> None:
        """Removes the codes and the adapter folder a metadata names (plain names only)."""
        if owned_name(metadata.get("codes_file"), ".npy"):
            (self.directory / metadata["codes_file"]).unlink(missing_ok=True)
        if owned_name(metadata.get("adapter_dir"), ADAPTER_DIR_SUFFIX):
            # Renamed aside first, so the name is gone at once and a crash mid-removal
            # leaves a temporary the sweep removes (never a half-deleted adapter).
            folder = self.directory / metadata["adapter_dir"]
            aside = temporary_path(folder)
            try:
                os.rename(folder, aside)
            except FileNotFoundError:
                return
            shutil.rmtree(aside, ignore_errors=True)

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
                voice = read_voice(self.directory, voice_id, Path(item.path))
                if voice is not None:
                    found[voice_id] = _Entry(signature, voice)
        self._entries = found
        self._scanned_mtime_ns = stat.st_mtime_ns
        self._scanned_at_ns = now
