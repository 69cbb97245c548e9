"""One tritonserver in the foreground until a signal stops it: the code that
`csm-triton-server serve` (the embedded install, supervised, restarted) and
`csm-triton-server run` (the tritonserver on PATH: the container's launch,
docker/serve.sh) share, so that compose, the Helm chart and KServe stop as `make serve` does.

On SIGTERM, SIGINT or SIGHUP: the model supervisor (when there is one) stops first, so
that no reload starts while the models unload; the stop file appears, so that the python
stubs take no new stream and csm_lm ends its open ones with a final response
(triton.stub_threads.watch_server_stop); the signal is forwarded once no stub marks open
work (streams, BLS calls awaiting their last response: triton.stub_threads.OpenWork), at
most C.STOP_DRAIN_LIMIT_S later: Triton 2.51 does not wait for streams, it unloads models
whose streams still send and crashed doing so. A server still running `stop_timeout_s`
after the signal is killed with its process group, stubs included, and a log line says
so. The server gets a process group of its own so that what outlives it (a stub stuck in
execute) is found and killed afterwards.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from csm_triton import constants as C
from csm_triton.serving.restart import RestartPolicy, ServerRunner
from csm_triton.serving.teardown import (
    announce_stop,
    end_process_group,
    kill_process_group,
    parent_death_signal,
    remove_shm_regions,
    stop_file,
    wait_for_open_work,
)

__all__ = ["STOP_SIGNALS", "run_until_stopped"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Supervisor(Protocol):  # what run_until_stopped needs of serving.supervisor.ModelSupervisor
    def request_stop(self) -> None: ...
    def stop(self) -> None: ...


def run_until_stopped(
    command: Sequence[str],
    environment: Mapping[str, str],
    *,
    shm_prefix: str,
    policy: RestartPolicy,
    stop_timeout_s: float,
    log: Callable[[str], None],
    supervise: Callable[[Callable[[], int | None]], Supervisor] | None = None,
) -> int:
    """Runs `command` (started again as `policy` allows) until a stop signal or a clean
    exit. Returns its exit code as a shell reports it (128 + n when signal n ended it),
    1 when the stop deadline had to kill it. The stubs learn of the stop through the file
    in $C.STOP_FILE_ENV, named after `shm_prefix` so that remove_shm_regions removes it
    with the stubs' regions. `supervise(pid)` starts a model supervisor for the running
    server (pid: its current pid, None between two runs)."""
    announcement = stop_file(shm_prefix)
    # The drain comes out of the stop deadline; Triton keeps STOP_KILL_MARGIN_S of it at least.
    drain_limit_s = min(C.STOP_DRAIN_LIMIT_S, max(0.0, stop_timeout_s - C.STOP_KILL_MARGIN_S))
    env = {**environment, C.STOP_FILE_ENV: str(announcement)}

    def spawn() -> subprocess.Popen:
        return subprocess.Popen(list(command), env=env, start_new_session=True, preexec_fn=parent_death_signal)

    def cleanup(process: subprocess.Popen) -> None:
        # Stubs of a killed server (its process group) and their /dev/shm regions:
        # what the next server would otherwise find in its way.
        pid = getattr(process, "pid", None)
        if pid:
            end_process_group(pid, log=log)
        remove_shm_regions(shm_prefix)

    def kill(process: subprocess.Popen) -> None:
        kill_process_group(process.pid)

    runner = ServerRunner(spawn, policy=policy, cleanup=cleanup, log=log, stop_timeout_s=stop_timeout_s, kill=kill)
    supervisor = supervise(lambda: runner.pid) if supervise is not None else None

    def stop(signum, _frame):
        if supervisor is not None:  # no reload may start while the models unload
            supervisor.request_stop()
        announce_stop(announcement)  # the stubs take no new stream and end their open ones...
        # ...before tritonserver hears of it: 2.51 unloads models whose streams still send.
        runner.request_stop(signum, drain=lambda: wait_for_open_work(announcement, limit_s=drain_limit_s, log=log))

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        code = runner.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if supervisor is not None:
            supervisor.stop()
        remove_shm_regions(shm_prefix)
    if runner.killed_after_stop:
        return 1
    return code if code >= 0 else 128 - code
