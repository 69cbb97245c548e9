"""How a stopped tritonserver is cleaned up after: its process group, its /dev/shm.

A python stub can outlive its server (one stuck in execute never notices it is gone),
and a killed stub leaves its shared-memory region behind. Both stoppers of a server,
`csm-triton-server serve` (cli.py) and the TritonServer of tests and tools
(process.py), therefore start it in a process group of its own with a unique
shm-region prefix, announce the stop to its stubs through a file named like those
regions, and afterwards kill what is left of the group and remove the regions. Kept
apart so that both share one implementation, standard library only (the CLI runs
without numpy).
"""

from __future__ import annotations

import ctypes
import glob
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from csm_triton import constants as C
from csm_triton.serving.stubs import process_group

__all__ = [
    "SHM_PREFIX",
    "announce_stop",
    "end_process_group",
    "kill_process_group",
    "parent_death_signal",
    "remove_shm_regions",
    "shm_region_flag",
    "stop_file",
    "unique_shm_prefix",
    "wait_for_open_work",
]

SHM_PREFIX = "triton_python_backend_shm_region_"


def unique_shm_prefix() -> str:
    """A /dev/shm name prefix for one server's python stubs, so that exactly its regions
    are removed when it stops (a killed stub leaves its region behind)."""
    return f"{SHM_PREFIX}csm{os.getpid()}x{uuid.uuid4().hex[:8]}_"


def shm_region_flag(prefix: str) -> str:
    return f"--backend-config=shm-region-prefix-name={prefix}"


def stop_file(shm_prefix: str) -> Path:
    """The file that tells this server's stubs it is stopping (triton.stub_threads.watch_server_stop);
    named like its shm regions, so that remove_shm_regions removes it too."""
    return Path("/dev/shm") / f"{shm_prefix}stopping"


def announce_stop(path: Path) -> None:
    # Created once: a second signal must not make the stop look younger than it is
    # (triton.calls.server_stopping measures the grace from the file's time). Without
    # /dev/shm the stubs' streams end with Triton's exit timeout instead.
    try:
        path.touch(exist_ok=False)
    except OSError:  # FileExistsError included
        pass


def wait_for_open_work(
    announcement: Path,
    *,
    limit_s: float = C.STOP_DRAIN_LIMIT_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = lambda line: None,
) -> float:
    """After announce_stop: waits until no stub marks open work (its streams and BLS
    calls: triton.stub_threads.OpenWork), at most `limit_s`. Returns the seconds waited."""
    began = clock()
    pattern = f"{announcement}{C.OPEN_WORK_MARKER_INFIX}*"
    while marks := glob.glob(pattern):
        if clock() - began >= limit_s:
            open_work = sorted(Path(path).name.split(C.OPEN_WORK_MARKER_INFIX, 1)[1] for path in marks)
            log(f"work still open {limit_s:g} s after the stop ({', '.join(open_work)}): stopping tritonserver anyway")
            break
        sleep(0.05)
    return clock() - began


def remove_shm_regions(prefix: str) -> None:
    for path in glob.glob(f"/dev/shm/{prefix}*"):
        try:
            os.unlink(path)
        except OSError:  # gone already, or not ours to remove: nothing to clean
            pass


def kill_process_group(pgid: int) -> None:
    """SIGKILL to a server's process group (it and its stubs: started with
    start_new_session, the group is the server's pid); nothing if it is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def end_process_group(pgid: int, grace_s: float = 2.0, log: Callable[[str], None] | None = None) -> dict[int, str]:
    """After tritonserver exited or was killed: its process group's survivors (stubs
    notice a gone server within about a second; a stub stuck in execute never does)
    get `grace_s`, then SIGKILL and one log line naming them. Returns those killed."""
    deadline = time.monotonic() + grace_s
    while True:
        left = process_group(pgid)
        if not left:
            return {}
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    kill_process_group(pgid)
    if log is not None:
        log(
            f"killed {len(left)} processes of tritonserver's process group that outlived it by {grace_s:g} s: "
            + ", ".join(f"{name} (pid {pid})" for pid, name in sorted(left.items()))
        )
    return left


try:  # resolved here, not in the forked child (no dlopen between fork and exec)
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None


def parent_death_signal() -> None:
    """preexec_fn: the server gets SIGTERM when the thread that started it ends
    (a killed test run leaves no tritonserver behind)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
