"""The one way this project writes a file that others may read meanwhile.

A reader (another Triton instance, a running server mapping a binary, a crash
recovery) must never see half a file: everything is written to a hidden temporary
in the target's folder, flushed (and fsync'ed when it must survive a power cut),
then published with one rename. A failure anywhere removes the temporary.

A writer that is killed cannot remove its temporary, so each temporary's name says
who wrote it: `.<target>.<host>~<pid>~<random>.tmp`. `stale_temporary` tells a
leftover (its writer gone from this host, or too old) from a write in flight.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "TEMP_PREFIX",
    "TEMP_SUFFIX",
    "atomic_copy",
    "atomic_directory",
    "atomic_write",
    "fsync_directory",
    "is_temporary",
    "stale_temporary",
    "temporary_path",
    "write_durable",
]

TEMP_PREFIX = "."  # temporaries are hidden ...
TEMP_SUFFIX = ".tmp"  # ... and never end in the target's own suffix
# A temporary older than this is a leftover whoever wrote it (a pid reused by another
# process, another host's writer): a real write takes milliseconds.
TEMP_MAX_AGE_S = 600.0
# The writer part of a temporary's name: host (letters, digits, dashes) ~ pid ~ random.
_WRITER = re.compile(r"\.([a-z0-9-]{1,24})~(\d+)~[a-z0-9_]+$")


def _host_tag() -> str:
    """This host's name as it goes into temporaries: pids are only comparable on one
    host (and in one pid namespace, which a container's own host name stands for)."""
    return re.sub(r"[^a-z0-9-]", "-", socket.gethostname().lower())[:24] or "host"


def temporary_path(target: str | os.PathLike) -> Path:
    """A fresh temporary's path beside `target`, named as atomic_write names its own (so
    `stale_temporary` tells a killed writer's leftover); for a file moved aside by rename."""
    target = Path(target)
    return target.parent / f"{TEMP_PREFIX}{target.name}.{_host_tag()}~{os.getpid()}~{os.urandom(6).hex()}{TEMP_SUFFIX}"


def is_temporary(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def stale_temporary(path: str | os.PathLike, *, max_age_s: float = TEMP_MAX_AGE_S, now: float | None = None) -> bool:
    """Whether `path` is a temporary of `atomic_write` that nobody will publish: its
    writer's process is gone from this host, or it is older than max_age_s. False for
    anything else (and for a file that vanished meanwhile)."""
    path = Path(path)
    if not is_temporary(path.name):
        return False
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False
    if age > max_age_s:
        return True
    writer = _WRITER.search(path.name[: -len(TEMP_SUFFIX)])
    if writer is None or writer.group(1) != _host_tag():
        return False  # an older name or another host's writer: only its age tells
    return not _process_exists(int(writer.group(2)))


Publish = Callable[[str, Path], None]  # (temporary path, target)


def fsync_directory(directory: Path) -> None:
    """Makes a rename in `directory` durable (where the file system supports it)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # not supported everywhere; the rename itself is still atomic
        pass
    finally:
        os.close(handle)


@contextlib.contextmanager
def atomic_write(
    target: str | os.PathLike, *, durable: bool = True, publish: Publish = os.replace
) -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at `target` all at once, on success.

    durable: fsync the file and its folder (data that must survive a crash; off for
    caches that can be rebuilt). publish: how the temporary takes the target's name;
    os.replace by default, or e.g. a hard link for an exclusive create.
    """
    target = Path(target)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, suffix=TEMP_SUFFIX, prefix=f"{TEMP_PREFIX}{target.name}.{_host_tag()}~{os.getpid()}~"
    )
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
            out.flush()
            if durable:
                os.fsync(out.fileno())
        publish(temporary, target)
        if durable:
            fsync_directory(target.parent)
    finally:
        # After os.replace the name is gone already; after a link or a failure it is not.
        Path(temporary).unlink(missing_ok=True)


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike, *, mode: int | None = None) -> None:
    """Copies `source` onto `target` atomically, keeping its mtime (and its permission
    bits, unless `mode` is given): a running process keeps its mapped old copy."""
    source = Path(source)
    status = source.stat()
    with atomic_write(target, durable=False) as out, open(source, "rb") as data:
        shutil.copyfileobj(data, out)
        out.flush()
        os.fchmod(out.fileno(), mode if mode is not None else status.st_mode & 0o7777)
        os.utime(out.fileno(), ns=(status.st_atime_ns, status.st_mtime_ns))


def write_durable(path: str | os.PathLike, data: bytes) -> None:
    """A new file holding `data`, fsync'ed (for the inside of an atomic_directory)."""
    with open(path, "xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A folder whose files appear at `target` (a new name) all at once, on success: the
    caller writes them into the yielded hidden temporary folder (write_durable), which is
    fsync'ed and renamed into place. A failure anywhere removes the temporary; a writer
    killed meanwhile leaves one that `stale_temporary` recognises."""
    target = Path(target)
    temporary = temporary_path(target)
    temporary.mkdir()
    try:
        yield temporary
        fsync_directory(temporary)
        # The folder's mtime is when its last file was created, maybe long ago for a big
        # file: a sweep's grace for unnamed leftovers counts from the rename instead.
        os.utime(temporary)
        os.rename(temporary, target)
        fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
