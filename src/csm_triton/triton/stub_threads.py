"""The background threads that tie a python stub's life to its server's.

Kept out of adapter.py (the one module that imports triton_python_backend_utils)
because neither needs Triton: they watch files and process ids, so they are tested
without a server (tests/unit/test_supervisor.py, tests/unit/test_voices.py).

- OpenWork: a stub's open streams and BLS calls, marked in /dev/shm, so that a stopping
  server is signalled only once they have ended (2.51 unloads models whose streams still
  send, and crashed).
- watch_server_stop: csm_lm ends its streams when the server is stopping.
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

__all__ = ["OPEN_WORK", "STOP_POLL_S", "OpenWork", "start_parent_watchdog", "watch_server_stop"]

LOG = logging.getLogger("csm_triton")
STOP_POLL_S = 0.2  # a stat() of a tmpfs file: free


class OpenWork:
    """This stub's open work: streams whose final response has not gone out (DecoupledModel)
    and BLS calls whose callee has not sent its last response (calls.PendingCall). While
    there is any, a marker file exists, created and removed as the count leaves and
    returns to 0 (under the lock, so the file always says what the count says).

    `csm-triton-server serve` and `run` forward a stop signal to tritonserver only once no
    stub has a marker (serving.teardown.wait_for_open_work): Triton 2.51 counts a
    decoupled request as done when `execute` returns, so at SIGTERM it unloaded models
    whose streams still sent, and a response reaching a model being unloaded crashed it
    (SIGSEGV in TRITONBACKEND_ResponseSend, or lock_exception). No marker without
    $CSM_TRITON_STOP_FILE (the test server, tritonserver started by hand)."""

    def __init__(self, stop_file: str | None = None, label: str = "stub"):
        self._stop_file = stop_file
        self.label = label  # the model's name, set by PythonModel.initialize: the log names it
        self._lock = threading.Lock()
        self._count = 0
        self._marker: str | None = None

    @property
    def count(self) -> int:
        return self._count

    def opened(self) -> None:
        with self._lock:
            self._count += 1
            if self._count == 1:
                path = self._stop_file or os.environ.get(C.STOP_FILE_ENV)
                if path:  # named after the stop file: removing the server's regions removes a killed stub's
                    self._marker = f"{path}{C.OPEN_WORK_MARKER_INFIX}{self.label}.{os.getpid()}"
                    try:
                        open(self._marker, "a").close()
                    except OSError:  # no /dev/shm: serve then waits for nothing
                        self._marker = None

    def closed(self) -> None:
        with self._lock:
            self._count -= 1
            if self._count == 0 and self._marker is not None:
                try:
                    os.unlink(self._marker)
                except OSError:
                    pass
                self._marker = None


OPEN_WORK = OpenWork()  # this process's (one python stub serves one model instance)


def watch_server_stop(
    on_stop,
    *,
    busy=lambda: True,
    model_name: str = "model",
    stop_file: str | None = None,
    grace_s: float = C.STREAM_STOP_GRACE_S,
    interval_s: float = STOP_POLL_S,
    log_error: Callable[[str], None] = LOG.error,
):
    """Calls `on_stop()` once, from a daemon thread, when the server is stopping and
    `busy()` still holds `grace_s` later. `csm-triton-server serve` and `run` (the
    container's launch, docker/serve.sh) create $CSM_TRITON_STOP_FILE at a stop signal
    and forward the signal once the stubs' open work has ended (OpenWork): Triton tells a
    python model nothing before `finalize`, and 2.51's readiness API, polled from a
    stub's thread, crashed stubs (SIGSEGV) and then the server. None without the
    variable (the test server, or tritonserver started by hand: there Triton's exit
    timeout bounds the wait)."""
    path = stop_file or os.environ.get(C.STOP_FILE_ENV)
    if not path:
        return None

    def watch() -> None:
        while not (busy() and os.path.exists(path)):
            time.sleep(interval_s)
        deadline = time.monotonic() + grace_s
        while busy() and time.monotonic() < deadline:  # a stream about to end may finish
            time.sleep(interval_s)
        if not busy():
            return
        try:
            on_stop()
        except Exception as error:  # noqa: BLE001 - finalize still runs; say why this did not
            log_error(f"{model_name}: ending in-flight work on shutdown failed: {type(error).__name__}: {error}")

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
