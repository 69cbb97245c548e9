"""The one way this project writes a file that others may read meanwhile.

A reader (another Triton instance, a running server mapping a binary, a crash
recovery) must never see half a file: everything is written to a hidden temporary
in the target's folder, flushed (and fsync'ed when it must survive a power cut),
then published with one rename. A failure anywhere removes the temporary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

__all__ = ["TEMP_PREFIX", "TEMP_SUFFIX", "atomic_copy", "atomic_write", "fsync_directory"]

TEMP_PREFIX = "."  # temporaries are hidden ...
TEMP_SUFFIX = ".tmp"  # ... and never end in the target's own suffix

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
def atomic_write(target: str | os.PathLike, *, durable: bool = True,
                 publish: Publish = os.replace) -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at `target` all at once, on success.

    durable: fsync the file and its folder (data that must survive a crash; off for
    caches that can be rebuilt). publish: how the temporary takes the target's name;
    os.replace by default, or e.g. a hard link for an exclusive create.
    """
    target = Path(target)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}.",
                                         suffix=TEMP_SUFFIX)
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
