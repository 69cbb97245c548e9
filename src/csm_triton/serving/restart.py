"""`csm-triton-server serve`'s loop: tritonserver started again when it dies.

An exit nobody asked for (killed by a signal, or an error exit code) is followed by a
restart after an exponential backoff, with a restart counter and one log line naming
the exit cause; a stop that serve was asked for (SIGTERM, SIGINT, SIGHUP) is forwarded
and ends the loop. A server still running `stop_timeout_s` after that is killed, with a
log line. The model repository and the voice store are files the loop never touches: a
restarted server finds them as they were.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["RestartPolicy", "ServerRunner", "describe_exit"]

LogFn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"csm-triton-server: {message}", file=sys.stderr, flush=True)


def describe_exit(returncode: int | None) -> str:
    """'exit code 1' / 'killed by SIGKILL', as subprocess reports a child's end."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class RestartPolicy:
    """Exponential backoff between restarts: `initial_s`, doubled after each restart up
    to `maximum_s`; a run that lasted `healthy_s` or longer starts over at `initial_s`.
    `max_restarts` (None: no limit) ends the restarts."""

    def __init__(
        self, initial_s: float = 1.0, maximum_s: float = 30.0, healthy_s: float = 60.0, max_restarts: int | None = None
    ):
        if initial_s <= 0 or maximum_s < initial_s:
            raise ValueError("need 0 < initial_s <= maximum_s")
        self.initial_s, self.maximum_s, self.healthy_s = initial_s, maximum_s, healthy_s
        self.max_restarts = max_restarts
        self.restarts = 0
        self._delay = initial_s

    def next_delay(self, ran_s: float) -> float | None:
        """The wait before the next start after a run of `ran_s` seconds; None: give up."""
        if ran_s >= self.healthy_s:
            self._delay = self.initial_s
        if self.max_restarts is not None and self.restarts >= self.max_restarts:
            return None
        delay = self._delay
        self._delay = min(self._delay * 2, self.maximum_s)
        self.restarts += 1
        return delay


class Process(Protocol):  # what ServerRunner needs of subprocess.Popen
    pid: int

    def wait(self) -> int: ...
    def poll(self) -> int | None: ...
    def send_signal(self, signum: int) -> None: ...


class ServerRunner:
    """Runs `spawn()`'s process until asked to stop, starting it again after it died:
    killed by a signal or exited with an error, without `request_stop`. Exit code 0 is
    a clean shutdown someone asked tritonserver itself for (a SIGTERM sent to it, not
    to serve) and ends the loop too. `run()` returns the last exit code. With
    `stop_timeout_s`, a server still running that long after the stop was forwarded is
    ended by `kill` (default SIGKILL to it), and `killed_after_stop` says so."""

    def __init__(
        self,
        spawn: Callable[[], Process],
        *,
        policy: RestartPolicy | None = None,
        cleanup: Callable[[Process], None] = lambda process: None,
        stop_timeout_s: float | None = None,
        kill: Callable[[Process], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], bool] | None = None,
        log: LogFn = _stderr,
    ):
        self._spawn = spawn
        self.policy = policy or RestartPolicy()
        self._cleanup = cleanup
        self._clock = clock
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait  # True: a stop came during the wait
        self._log = log
        # Re-entrant: request_stop runs in a signal handler, on the main thread, which may
        # hold the lock at that moment (a plain Lock would deadlock the stop there).
        self._lock = threading.RLock()
        self._stop_signal = signal.SIGTERM
        self.process: Process | None = None
        self.stop_timeout_s = stop_timeout_s
        self._kill = kill or (lambda process: process.send_signal(signal.SIGKILL))
        self._stop_deadline: threading.Timer | None = None
        self.killed_after_stop = False

    @property
    def restarts(self) -> int:
        return self.policy.restarts

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None else None

    def request_stop(self, signum: int = signal.SIGTERM, *, drain: Callable[[], object] | None = None) -> None:
        """Stop for good: the signal goes to the running server, no restart follows.
        With `drain`, the signal is forwarded from a thread once `drain()` returned (the
        stubs' open streams ended); the stop deadline counts from now all the same, and
        a second stop request forwards at once."""
        with self._lock:
            self._stop_signal = signum
            first = not self._stopping.is_set()
            self._stopping.set()
            process = self.process
        if process is None or process.poll() is not None:
            return
        self._arm_stop_deadline(process, signum)
        if drain is None or not first:
            process.send_signal(signum)
            return

        def drain_then_forward() -> None:
            try:
                drain()
            finally:
                if process.poll() is None:
                    process.send_signal(signum)

        threading.Thread(target=drain_then_forward, name="csm-stop-drain", daemon=True).start()

    def _arm_stop_deadline(self, process: Process, signum: int) -> None:
        with self._lock:
            if self.stop_timeout_s is None or self._stop_deadline is not None:
                return
            self._stop_deadline = threading.Timer(self.stop_timeout_s, self._kill_if_running, (process, signum))
            self._stop_deadline.daemon = True
            self._stop_deadline.start()

    def _kill_if_running(self, process: Process, signum: int) -> None:
        if process.poll() is not None:
            return
        self.killed_after_stop = True
        self._log(
            f"tritonserver (pid {process.pid}) still running {self.stop_timeout_s:g} s after "
            f"{signal.Signals(signum).name}: killing it and its python stubs (SIGKILL)"
        )
        self._kill(process)

    def run(self) -> int:
        try:
            return self._run()
        finally:
            if self._stop_deadline is not None:
                self._stop_deadline.cancel()

    def _run(self) -> int:
        code = 0
        while True:
            if self._stopping.is_set():
                return code
            process = self._spawn()
            with self._lock:  # a stop that came while it started reaches it too
                self.process = process
                stop_now = self._stopping.is_set()
            if stop_now:
                process.send_signal(self._stop_signal)
                self._arm_stop_deadline(process, self._stop_signal)
            started = self._clock()
            pid = getattr(process, "pid", None)  # for the log lines
            code = self._wait(process)
            ran_s = self._clock() - started
            try:
                self._cleanup(process)
            finally:
                with self._lock:
                    self.process = None
            if self._stopping.is_set():
                return code
            if code == 0:
                self._log(f"tritonserver (pid {pid}) shut down cleanly after {ran_s:.1f} s; not restarting")
                return code
            delay = self.policy.next_delay(ran_s)
            if delay is None:
                self._log(
                    f"tritonserver (pid {pid}) ended after {ran_s:.1f} s ({describe_exit(code)}); "
                    f"{self.policy.restarts} restarts already, giving up"
                )
                return code
            self._log(
                f"tritonserver (pid {pid}) ended unexpectedly after {ran_s:.1f} s "
                f"({describe_exit(code)}); restart {self.policy.restarts} in {delay:g} s"
            )
            if self._sleep(delay):
                return code

    def _wait(self, process: Process) -> int:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:  # pragma: no cover - serve's signal handler replaces it
                self.request_stop(signal.SIGINT)
