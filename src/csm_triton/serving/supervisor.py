"""Models whose python stub died (or stopped) reloaded without an operator.

Triton 2.51 does not do it: the python backend stopped restarting dead stubs in 24.06,
and its health API does not look at them (triton-inference-server/server issues 7230
and 8604). After `kill -9` of a stub the model, and the server under strict
readiness, stay ready while every new request to it fails ("Stub process
'<instance>' is not healthy") and the requests that were inside it are never answered.

`ModelSupervisor` (a thread in `csm-triton-server serve`; `TritonServer(
supervise_models=True)` in tests) looks every `interval_s` at the stubs of each loaded
model (csm_triton.serving.stubs). A stub that is gone, a zombie or stopped (SIGSTOP)
marks its model broken. The model is unloaded at once, so `/v2/models/<m>/ready`, and
`/v2/health/ready` under strict readiness, turn false and the BLS callers waiting on it
give up with UNAVAILABLE (csm_triton.triton.adapter); the models that call it through
BLS (`BLS_CALLERS`) are unloaded too. Once the callers drained, everything is loaded
again, the ensembles over them included.

The replaced versions cannot finish unloading in 2.51 when a request inside the dead
stub, or a BLS call waiting on it, is never answered (python_be.cc's instance teardown
waits for its BLS worker threads): their stubs that still live `reap_after_s` later are
killed to give their memory back. A stub stuck while still running (a deadlock) is not
detected: no cheap probe tells it from one busy with long work; the BLS callers'
deadline (adapter.BLS_TIMEOUT_S) bounds what waits on it.

Its repository calls (repository_client.py) carry the model-control key
(csm_triton.serving.flags): the server refuses them to anyone else. Its HTTP
connection is closed after every round: Triton 2.51 waits on SIGTERM for every open
HTTP connection, an idle keep-alive one included, for the whole exit timeout, and
then has no time left to unload the models.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from csm_triton.serving.flags import model_control_headers
from csm_triton.serving.repository_client import RepositoryClient
from csm_triton.serving.stubs import (
    expected_instances,
    python_based_backends,
    read_state,
    server_stubs,
    stub_backed,
    stub_problem,
)

__all__ = ["BLS_CALLERS", "ModelSupervisor", "Recovery", "log_to_file"]

LogFn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"csm-triton-server: {message}", file=sys.stderr, flush=True)


def log_to_file(path: Path | str, source: str = "csm-model-supervisor") -> LogFn:
    """Lines appended to a server's log (one write each: they interleave whole)."""

    def log(message: str) -> None:
        with open(path, "a") as file:
            file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {source}: {message}\n")

    return log


# Who calls whom through BLS (ensembles are Triton's business: loading a step reloads
# the ensembles over it). The one table of these edges; keep it in step with the
# triton.call_model / triton.stream_model calls in csm_triton/triton/models/.
BLS_CALLERS: Mapping[str, tuple[str, ...]] = {
    "csm_lm": ("csm_generate", "csm_tts_stream"),  # generate.py, stream.py
    "mimi_encoder": ("csm_prepare", "voice_register"),  # voices.py (VoiceResolver)
    "mimi_decoder": ("csm_tts_stream",),  # stream.py (chunk decoding)
    "watermark": ("csm_tts_stream",),  # stream.py
    "csm_prepare": ("csm_tts_stream",),  # stream.py
}


def _instance_of(instance: str, models: Iterable[str]) -> bool:
    """Whether a stub's instance name is one of these models' default names."""
    return any(re.fullmatch(rf"{re.escape(model)}_\d+_\d+", instance) for model in models)


@dataclass
class _Watch:
    expected: Counter
    stubs: dict[int, str]


@dataclass
class _Retry:
    at: float
    delay_s: float
    models: list[str]
    ready_before: set[str]


@dataclass
class Recovery:
    """One broken model brought back: what was wrong and how long it took."""

    model: str
    reason: str
    reloaded: list[str]
    detected_at: float  # time.monotonic()
    recovered_at: float | None = None
    error: str | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.detected_at


class ModelSupervisor:
    """Finds models whose stubs died or stopped and reloads them, BLS callers included.

    `server_pid()` names the running tritonserver (None while there is none); when it
    changes (a restarted server) everything is looked at afresh. `check()` is one round
    (the thread calls it every `interval_s`); `recoveries` lists what it did."""

    def __init__(
        self,
        http_url: str,
        server_pid: Callable[[], int | None],
        *,
        interval_s: float = 2.0,
        drain_s: float = 3.0,
        reap_after_s: float = 30.0,
        load_timeout_s: float = 900.0,
        python_based: Sequence[str] = (),
        model_control_key: str | None = None,
        callers: Mapping[str, Sequence[str]] = BLS_CALLERS,
        log: LogFn = _stderr,
        client=None,
        proc: Path = Path("/proc"),
        clock: Callable[[], float] = time.monotonic,
    ):
        self._server_pid = server_pid
        self.interval_s = interval_s
        self.drain_s = drain_s
        self.reap_after_s = reap_after_s
        self._python_based = tuple(python_based)
        self._callers = callers
        self._log = log
        headers = model_control_headers(model_control_key) if model_control_key is not None else None
        self._client = client or RepositoryClient(http_url, load_timeout_s, headers)
        self._proc = proc
        self._clock = clock
        self._stop = threading.Event()
        self._first_round = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._watched: dict[str, _Watch] = {}
        self._unwatched: set[str] = set()  # READY models without stubs (ensembles, native backends)
        self._retired: set[int] = set()  # stubs of replaced versions, never watched again
        self._failed: dict[str, _Retry] = {}  # after a failed recovery
        self._reap: list[tuple[float, dict[int, str]]] = []  # (when, stubs of replaced versions)
        self.recoveries: list[Recovery] = []

    @classmethod
    def for_embedded(
        cls, install, http_port: int, server_pid: Callable[[], int | None], *, host: str = "127.0.0.1", **options
    ) -> ModelSupervisor:
        """For a server of this embedded install (its onnxruntime models run as stubs too)."""
        return cls(
            f"{host}:{http_port}", server_pid, python_based=python_based_backends(install.backend_directory), **options
        )

    # --- the thread -------------------------------------------------------------------
    def start(self, first_look_s: float = 30.0) -> ModelSupervisor:
        """Starts the thread and waits (at most first_look_s) for its first round, which
        records the stubs of the models loaded now: a stub that dies later is then named."""
        self._first_round = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="csm-model-supervisor", daemon=True)
        self._thread.start()
        self._first_round.wait(first_look_s)
        return self

    def request_stop(self) -> None:
        """No further round (the one under way ends first); returns at once, so a
        signal handler can call it before the server is asked to stop: a recovery must
        not start while models unload."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while True:
                try:
                    self.check()
                except Exception as error:  # noqa: BLE001 - the server may be restarting; next round
                    if not self._stop.is_set() and self._server_pid() is not None:
                        self._log(f"model supervisor: {type(error).__name__}: {error}")
                self._first_round.set()
                self._client.close()  # no idle connection for a shutdown to wait on
                if self._stop.wait(self.interval_s):
                    return
        finally:
            self._first_round.set()
            self._client.close()

    # --- one round --------------------------------------------------------------------
    def check(self) -> list[Recovery]:
        pid = self._server_pid()
        if pid != self._pid:  # a new server (or none): nothing known about it yet
            self._pid = pid
            self._watched.clear()
            self._unwatched.clear()
            self._retired.clear()
            self._failed.clear()
            self._reap.clear()
        if pid is None:
            return []
        self._reap_due(pid)
        try:
            states = self._client.states()
        except Exception:  # noqa: BLE001 - not up yet (loading) or going down: next round
            return []
        ready = {name for name, state in states.items() if state == "READY"}
        for name in list(self._watched):
            if name not in ready:  # unloaded by someone, or being replaced: look again once ready
                del self._watched[name]
        self._unwatched &= ready
        broken = {}
        for name in sorted(ready - set(self._watched) - self._unwatched):
            problem = self._watch(name, pid)
            if problem:
                broken[name] = problem
        for name, watch in sorted(self._watched.items()):
            problem = stub_problem(watch.stubs, watch.expected, self._proc)
            if problem:  # a reload by someone else replaces stubs: look again before judging
                watch.stubs = self._current_stubs(pid, watch.expected)
                problem = stub_problem(watch.stubs, watch.expected, self._proc) and problem
            if problem:
                broken[name] = problem
        now = self._clock()
        done = []
        for name, retry in list(self._failed.items()):
            if now >= retry.at:
                broken.pop(name, None)
                done.append(
                    self._recover(
                        name, "its last recovery failed", pid, ready | retry.ready_before, models=retry.models
                    )
                )
        for name, problem in broken.items():
            if name not in self._failed:
                done.append(self._recover(name, problem, pid, ready))
        return done

    def _watch(self, name: str, pid: int) -> str | None:
        config = self._client.config(name)
        if not stub_backed(config, self._python_based):
            self._unwatched.add(name)
            return None
        expected = expected_instances(config)
        watch = _Watch(expected, self._current_stubs(pid, expected))
        self._watched[name] = watch
        return stub_problem(watch.stubs, expected, self._proc)

    def _current_stubs(self, pid: int, expected: Counter) -> dict[int, str]:
        return {
            stub: instance
            for stub, instance in server_stubs(pid, self._proc).items()
            if instance in expected and stub not in self._retired
        }

    def _recover(
        self, name: str, problem: str, pid: int, ready_before: set[str], models: Sequence[str] | None = None
    ) -> Recovery:
        if models is None:
            models = [name, *(c for c in self._callers.get(name, ()) if c in ready_before)]
        callers = [m for m in models if m != name]
        recovery = Recovery(name, problem, list(models), self._clock())
        self.recoveries.append(recovery)
        self._log(
            f"model {name} is broken ({problem}): unloading it"
            + (f" and its callers {', '.join(callers)}" if callers else "")
            + ", then loading again"
        )
        for model in recovery.reloaded:
            watch = self._watched.pop(model, None)
            if watch is not None:
                self._retired.update(watch.stubs)
        replaced = {
            stub: instance
            for stub, instance in server_stubs(pid, self._proc).items()
            if _instance_of(instance, recovery.reloaded)
        }
        self._retired.update(replaced)
        self._reap.append((self._clock() + self.reap_after_s, replaced))
        self._kill_stopped_stubs(pid, recovery.reloaded)
        try:
            for model in recovery.reloaded:
                try:
                    self._client.unload(model)
                except Exception as error:  # noqa: BLE001 - not loaded any more: fine
                    self._log(f"model supervisor: unload {model}: {error}")
            self._drain(callers)
            for model in recovery.reloaded:
                self._client.load(model)
            states = self._client.states()
            for model in sorted(ready_before):  # ensembles over a reloaded step, e.g. csm_tts
                if states.get(model) != "READY":
                    self._client.load(model)
        except Exception as error:  # noqa: BLE001 - retried with backoff in a later round
            previous = self._failed.get(name)
            delay = min(previous.delay_s * 2, 60.0) if previous else self.interval_s
            self._failed[name] = _Retry(self._clock() + delay, delay, list(recovery.reloaded), set(ready_before))
            recovery.error = f"{type(error).__name__}: {error}"
            self._log(f"model {name}: recovery failed ({recovery.error}); next try in {delay:g} s")
            return recovery
        self._failed.pop(name, None)
        recovery.recovered_at = self._clock()
        self._log(f"model {name} recovered in {recovery.seconds:.1f} s (reloaded: {', '.join(recovery.reloaded)})")
        return recovery

    def _drain(self, callers: Sequence[str]) -> None:
        """Until the unloaded callers' last requests ended (their BLS calls to the broken
        model see it not ready and fail), at most drain_s: a caller loaded again at once
        would leave its old instances waiting."""
        deadline = self._clock() + self.drain_s
        while callers and self._clock() < deadline:
            states = self._client.states()
            if not any(states.get(c) == "UNLOADING" for c in callers):
                return
            time.sleep(0.1)

    def _reap_due(self, pid: int) -> None:
        now = self._clock()
        due = [stubs for at, stubs in self._reap if at <= now]
        self._reap = [(at, stubs) for at, stubs in self._reap if at > now]
        for stubs in due:
            live = server_stubs(pid, self._proc)
            stuck = {stub: name for stub, name in stubs.items() if live.get(stub) == name}
            for stub in stuck:
                try:
                    os.kill(stub, signal.SIGKILL)
                except OSError:
                    pass
            if stuck:
                self._log(
                    f"killed {len(stuck)} stubs of replaced model versions that never finished unloading: "
                    + ", ".join(f"{name} (pid {stub})" for stub, name in sorted(stuck.items()))
                )

    def _kill_stopped_stubs(self, pid: int, models: Sequence[str]) -> None:
        """A stopped stub neither works nor exits when unloaded: end it."""
        for stub, instance in server_stubs(pid, self._proc).items():
            state = read_state(stub, self._proc)
            if state is not None and state.stopped and _instance_of(instance, models):
                try:
                    os.kill(stub, signal.SIGKILL)
                except OSError:
                    pass
