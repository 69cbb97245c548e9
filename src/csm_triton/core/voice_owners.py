"""Who may delete a stored voice, and how many voices a store keeps: the voice store's
(voice_store.py) two rules about its callers rather than its files.

Owners. A voice may carry an owner (a gateway's key id, never a key), written in its
metadata, so it is committed with the voice in the same rename. A deletion that names
an owner removes only that owner's voices (PermissionDenied otherwise, saying so); one
without is the admin's and removes any. Between processes (several model instances) a
deletion compares the metadata's inode just before unlinking, so a voice replaced
meanwhile is not removed in its owner's name.

A count. A store holds at most `max_voices` (C.MAX_STORED_VOICES): every process
caches every voice, so the count is the memory. At most `max_adapters` of them
(C.MAX_STORED_ADAPTERS) may be adapters, which cost disk instead. The rules are applied under the
store's lock; between processes the count may overshoot by one per concurrent
registration.
"""

from __future__ import annotations

from pathlib import Path

from csm_triton import constants as C
from csm_triton.errors import InvalidInput, PermissionDenied

__all__ = ["check_adapter_room", "check_deletion", "check_owner", "check_room"]


def check_owner(owner: str | None) -> str | None:
    """An owner id as sent (None or empty: none); InvalidInput unless it matches
    C.VOICE_OWNER_PATTERN (it is written into the metadata and shown by voice_list)."""
    if owner is None or owner == "":
        return None
    if not isinstance(owner, str) or not C.VOICE_OWNER_PATTERN.fullmatch(owner):
        raise InvalidInput(f"'{C.VOICE_OWNER_HEADER}' must match {C.VOICE_OWNER_PATTERN.pattern}")
    return owner


def check_room(count: int, max_voices: int) -> None:
    """InvalidInput when a store holding `count` voices has no room for another."""
    if count >= max_voices:
        raise InvalidInput(
            f"voice store is full: it holds {count} voices, the most it keeps "
            f"(max_stored_voices = {max_voices}); nothing was stored. Delete a voice first."
        )


def check_adapter_room(count: int, max_adapters: int) -> None:
    """InvalidInput when a store holding `count` adapter voices has no room for another."""
    if count >= max_adapters:
        raise InvalidInput(
            f"voice store is full of adapters: it holds {count} adapter voices, the most it "
            f"keeps (max_stored_adapters = {max_adapters}); nothing was stored. Delete an "
            "adapter voice first."
        )


def check_deletion(voice_id: str, owner: str | None, path: Path, metadata: dict | None, inode: int | None) -> None:
    """Whether `owner` (None: the admin) may delete the voice whose metadata file is
    `path`, read as `metadata` from the file `inode` (None, None: unreadable or gone);
    PermissionDenied for another's voice, InvalidInput for one gone or replaced."""
    if owner is None:
        return
    if metadata is not None:
        stored = metadata.get("owner")
        if stored != owner:
            whose = "the admin (stored without a key)" if stored is None else "another key"
            raise PermissionDenied(f"voice '{voice_id}' belongs to {whose}; only its owner or the admin may delete it")
        if inode is not None and _inode(path) != inode:  # replaced since it was read: judge again
            raise InvalidInput(f"voice '{voice_id}' changed while it was being deleted; try again")
    elif path.exists():  # unreadable metadata: no owner can be proven
        raise PermissionDenied(
            f"voice '{voice_id}' cannot be read, so its owner cannot be checked; only the admin may delete it"
        )
    else:
        raise InvalidInput(f"unknown voice '{voice_id}'")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None
