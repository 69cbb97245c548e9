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
it was), any other file-system failure a VoiceStoreError naming only the errno. How
each file is written, read, scanned and removed is voice_store_files.py's.

A voice may carry an owner, and a store holds at most `max_voices`, at most
`max_adapters` of them adapters: those rules are voice_owners.py's.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from csm_triton import constants as C
from csm_triton.core import validation, voice_leftovers
from csm_triton.core.files import fsync_directory, temporary_path
from csm_triton.core.voice_owners import check_adapter_room, check_deletion, check_owner, check_room
from csm_triton.core.voice_records import ADAPTER, ADAPTER_DIR_SUFFIX, Voice, adapter_writer, checked_clip, codes_writer
from csm_triton.core.voice_store_files import (
    METADATA_SUFFIX,
    Entry,
    file_errors,
    metadata_path,
    read_metadata_with_inode,
    remove_files,
    scan,
    write_metadata,
)
from csm_triton.errors import InvalidInput

__all__ = ["Voice", "VoiceStore"]

LOG = logging.getLogger(__name__)

_FORMAT_VERSION = 1
# A directory changed within this window may change again without its mtime moving
# (file systems with coarse timestamps): re-scan until it is older than this.
_RACY_NS = 2_000_000_000
# `list` sweeps at most this often (registrations always do).
_SWEEP_INTERVAL_S = 30.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class VoiceStore:
    """Voices persisted in `directory`, cached in memory, shared between processes."""

    def __init__(
        self, directory: str | Path, max_voices: int = C.MAX_STORED_VOICES, max_adapters: int = C.MAX_STORED_ADAPTERS
    ):
        if int(max_voices) < 1:
            raise ValueError(f"max_voices must be at least 1, got {max_voices}")
        self.max_voices, self.max_adapters = int(max_voices), int(max_adapters)
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._scanned_mtime_ns: int | None = None
        self._scanned_at_ns = 0
        self._swept_at = 0.0
        with file_errors("read the voices"):
            self.sweep()
            self._refresh(force=True)

    # --- public API ---------------------------------------------------------------------
    def register(
        self,
        voice_id: str,
        codes: np.ndarray,
        transcript: str,
        duration_seconds: float,
        *,
        replace: bool = False,
        owner: str | None = None,
    ) -> Voice:
        """Stores a clip voice as `owner`'s (None: the admin's); an existing id is refused
        unless `replace`, and a new one when the store is full (InvalidInput).

        The transcript is trusted: VoiceResolver.register checks it (validation.text)
        before it pays for the encoding. The id is checked here too, since file names
        are built from it."""
        voice_id = validation.voice_id(voice_id)
        owner = check_owner(owner)
        codes, duration = checked_clip(codes, duration_seconds)
        codes_name = f"{voice_id}.{uuid.uuid4().hex[:12]}.npy"
        metadata = {
            "format_version": _FORMAT_VERSION,
            "voice_id": voice_id,
            "transcript": transcript,
            "duration_seconds": duration,
            "created_at": _now(),
            "frames": int(len(codes)),
            "codes_file": codes_name,
            "owner": owner,
        }
        return self._commit(
            metadata,
            [(codes_name, codes_writer(codes))],
            lambda: Voice(voice_id, transcript, codes, duration, metadata["created_at"], owner),
            replace=replace,
        )

    def register_adapter(
        self,
        voice_id: str,
        adapter_config: bytes,
        adapter_weights: bytes,
        description: dict,
        *,
        default_speaker: int | None = None,
        codes: np.ndarray | None = None,
        transcript: str | None = None,
        duration_seconds: float | None = None,
        owner: str | None = None,
    ) -> Voice:
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
        metadata = {
            "format_version": _FORMAT_VERSION,
            "voice_id": voice_id,
            "kind": ADAPTER,
            "transcript": transcript or "",
            "duration_seconds": duration,
            "created_at": _now(),
            "frames": 0 if codes is None else int(len(codes)),
            "codes_file": codes_name,
            "owner": owner,
            "adapter_dir": adapter_name,
            "adapter": adapter,
            "default_speaker": speaker,
        }
        return self._commit(
            metadata,
            writes,
            lambda: Voice(
                voice_id,
                transcript or "",
                codes,
                duration,
                metadata["created_at"],
                owner,
                ADAPTER,
                adapter,
                speaker,
                adapter_name,
            ),
            adapter=True,
        )

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
        with self._lock, file_errors("read the voices"):
            self._refresh()
            self._check_room(None, adapter)

    def get(self, voice_id: str) -> Voice:
        voice_id = validation.voice_id(voice_id)
        with self._lock, file_errors("read the voices"):
            self._refresh()
            entry = self._entries.get(voice_id)
        if entry is None:
            raise InvalidInput(f"unknown voice '{voice_id}'")
        return entry.voice

    def list(self) -> list[dict]:
        """Summaries of every voice, sorted by id."""
        with self._lock, file_errors("list the voices"):
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
        with self._lock, file_errors(f"delete voice '{voice_id}'"):
            self._refresh()
            path = metadata_path(self.directory, voice_id)
            metadata, inode = read_metadata_with_inode(self.directory, voice_id)
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
            remove_files(self.directory, removed if isinstance(removed, dict) else {})
            moved.unlink(missing_ok=True)
            fsync_directory(self.directory)
        if entry is not None:
            return entry.voice.summary()
        # Unreadable metadata (or written by another process a moment ago): what it says.
        return {
            "voice_id": voice_id,
            **{key: metadata.get(key) for key in ("transcript", "duration_seconds", "created_at", "owner")},
            "kind": metadata.get("kind", "clip"),
        }

    def __contains__(self, voice_id: str) -> bool:
        try:
            self.get(voice_id)
        except InvalidInput:
            return False
        return True

    def __len__(self) -> int:
        with self._lock, file_errors("read the voices"):
            self._refresh()
            return len(self._entries)

    def sweep(self) -> list[str]:
        """Removes what killed writers left (voice_leftovers.sweep, safe while other
        processes register); the names removed."""
        self._swept_at = time.monotonic()
        return voice_leftovers.sweep(self.directory, METADATA_SUFFIX)

    def _commit(self, metadata: dict, writes, voice, *, replace: bool = False, adapter: bool = False) -> Voice:
        """Under the lock: admits the id, writes the voice's files (`writes`: (name, write)
        pairs, each atomic), then its metadata, the commit; a failure before the commit
        removes what was written. `voice()`: the Voice registered."""
        voice_id = metadata["voice_id"]
        with self._lock, file_errors(f"store voice '{voice_id}'"):
            self._refresh()
            if not replace and metadata_path(self.directory, voice_id).exists():
                raise InvalidInput(f"voice '{voice_id}' already exists; delete it first to register it again")
            self._check_room(voice_id, adapter)
            self.sweep()
            written = []
            try:
                for name, write in writes:
                    write(self.directory / name)
                    written.append(name)
                previous = read_metadata_with_inode(self.directory, voice_id)[0] if replace else None
                signature = write_metadata(self.directory, voice_id, metadata, exclusive=not replace)
            except BaseException:
                remove_files(
                    self.directory,
                    {
                        "codes_file": next((n for n in written if n.endswith(".npy")), None),
                        "adapter_dir": next((n for n in written if n.endswith(ADAPTER_DIR_SUFFIX)), None),
                    },
                )
                raise
            # Committed: from here on the answer is "registered", whatever else happens
            # (another process may delete the voice this very moment).
            registered = voice()
            self._entries[voice_id] = Entry(signature, registered)
            try:
                if previous:
                    remove_files(
                        self.directory,
                        {
                            key: value
                            for key, value in previous.items()
                            if key in ("codes_file", "adapter_dir") and value != metadata.get(key)
                        },
                    )
                fsync_directory(self.directory)
            except OSError as error:  # the old files stay: orphans the next sweep removes
                LOG.warning("voice store: cleaning up after registering '%s': %s", voice_id, error)
            return registered

    def _check_room(self, voice_id: str | None, adapter: bool) -> None:
        if voice_id not in self._entries:
            check_room(len(self._entries), self.max_voices)
        if adapter:
            check_adapter_room(sum(e.voice.kind == ADAPTER for e in self._entries.values()), self.max_adapters)

    def _refresh(self, *, force: bool = False) -> None:
        """Re-scans the directory if it may have changed since the last scan."""
        stat = self.directory.stat()
        now = time.time_ns()
        if (
            not force
            and stat.st_mtime_ns == self._scanned_mtime_ns
            and self._scanned_at_ns - stat.st_mtime_ns > _RACY_NS
        ):
            return
        self._entries = scan(self.directory, self._entries)
        self._scanned_mtime_ns = stat.st_mtime_ns
        self._scanned_at_ns = now
