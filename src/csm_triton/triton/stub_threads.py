"""The background threads that tie a python stub's life to its server's.

Kept out of adapter.py (the one module that imports triton_python_backend_utils)
because neither needs Triton: they watch files and process ids, so they are tested
without a server (tests/unit/test_supervisor.py, tests/unit/test_voices.py).

- watch_server_stop: a stopping server ends its open streams before Triton unloads
  anything (2.51 unloads models whose streams still send, and crashes).
- start_parent_watchdog: a stub must not outlive its server (an orphaned stub ignored
  SIGTERM for minutes).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from csm_triton import constants as C

__all__ = ["STOP_POLL_S", "open_work_marker", "start_parent_watchdog", "watch_server_stop"]

LOG = logging.getLogger("csm_triton")
STOP_POLL_S = 0.2  # a stat() of a tmpfs file: free


def open_work_marker(stop_file: str, model_name: str, pid: int) -> str:
    """The file a stub keeps in /dev/shm while its model still has open streams after a
    stop was announced; `serve` and `run` forward the signal once none is left
    (serving.teardown.wait_for_open_work). Named after the stop file, so that removing
    the server's regions removes what a killed stub left."""
    return f"{stop_file}{C.OPEN_WORK_MARKER_INFIX}{model_name}.{pid}"


def watch_server_stop(
    on_stop=None,
    *,
    busy=lambda: True,
    model_name: str = "model",
    stop_file: str | None = None,
    grace_s: float = C.STREAM_STOP_GRACE_S,
    drain_s: float = C.STOP_DRAIN_LIMIT_S,
    interval_s: float = STOP_POLL_S,
    log_error: Callable[[str], None] = LOG.error,
):
    """Watches, from a daemon thread, for the server's stop while `busy()` (the model
    has open streams). `csm-triton-server serve` and `run` (the container's launch,
    docker/serve.sh) create $CSM_TRITON_STOP_FILE at a stop signal and forward the
    signal to tritonserver only once the stubs' open streams have ended: Triton 2.51
    counts a decoupled request as done when `execute` returns, so it unloads models
    while their streams still send, and a response reaching a caller being unloaded
    crashed it (SIGSEGV in TRITONBACKEND_ResponseSend). So, once stopping and busy: the
    open-work marker is created; `on_stop()` (when given) is called if `busy()` still
    holds `grace_s` later; the marker is removed when `busy()` ends, or `drain_s` after
    the stop at the latest. Triton tells a python model nothing before `finalize`, and
    2.51's readiness API, polled from a stub's thread, crashed stubs, hence the file.
    None without the variable (the test server, or tritonserver started by hand)."""
    path = stop_file or os.environ.get(C.STOP_FILE_ENV)
    if not path:
        return None
    marker = open_work_marker(path, model_name, os.getpid())

    def wait_while_busy(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while busy() and time.monotonic() < deadline:
            time.sleep(interval_s)

    def watch() -> None:
        while not (busy() and os.path.exists(path)):
            time.sleep(interval_s)
        noticed = time.monotonic()
        try:
            open(marker, "a").close()
        except OSError:  # no /dev/shm: serve then forwards the signal after its notice time
            pass
        try:
            wait_while_busy(grace_s)  # a stream about to end may finish
            if busy() and on_stop is not None:
                try:
                    on_stop()
                except Exception as error:  # noqa: BLE001 - finalize still runs; say why this did not
                    log_error(
                        f"{model_name}: ending in-flight work on shutdown failed: {type(error).__name__}: {error}"
                    )
            wait_while_busy(drain_s - (time.monotonic() - noticed))
        finally:
            try:
                os.unlink(marker)
            except OSError:
                pass

    thread = threading.Thread(target=watch, name=f"csm-stop-watch-{model_name}", daemon=True)
    thread.start()
    return thread


_watchdog: threading.Thread | None = None


def start_parent_watchdog(interval_s: float = 1.0, *, force: bool = False) -> threading.Thread | None:
    """Ends this python stub (os._exit) once the tritonserver that started it is gone.

    Triton's stub checks its parent with kill(pid, 0), which a dead but unreaped server
    (a zombie) passes: orphans lived for minutes, ignoring SIGTERM. An orphan is
    re-parented, so a changed os.getppid() is the sign. (Not PR_SET_PDEATHSIG: that fires
    when the server *thread* that forked the stub ends.) One daemon thread per process,
    started by PythonModel.initialize, only inside a stub unless `force` (tests)."""
    global _watchdog
    if _watchdog is not None or not (force or "triton_python_backend_utils" in sys.modules):
        return _watchdog
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        try:  # not pb_utils.Logger: that is a message to the server, which is gone
            os.write(2, f"csm_triton: tritonserver (pid {parent}) is gone; stub {os.getpid()} exits\n".encode())
        finally:
            os._exit(1)

    _watchdog = threading.Thread(target=watch, name="csm-parent-watchdog", daemon=True)
    _watchdog.start()
    return _watchdog
