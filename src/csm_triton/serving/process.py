"""A tritonserver process for tests and tools: free ports, a log file, readiness
waited for, and always stopped (its python stubs and their /dev/shm regions too).
Closed as `csm-triton-server serve` is: loopback only, model control behind a key."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from csm_triton import constants as C
from csm_triton.serving.flags import client_host, model_control_headers, new_model_control_key, redact, server_arguments
from csm_triton.serving.install import EmbeddedInstall, prepare, server_environment
from csm_triton.serving.readiness import TritonStartError, last_endpoint, wait_until_ready
from csm_triton.serving.supervisor import ModelSupervisor, log_to_file

# Re-exported: tests and tools import the teardown helpers from here too.
from csm_triton.serving.teardown import (
    SHM_PREFIX,
    announce_stop,
    end_process_group,
    kill_process_group,
    parent_death_signal,
    remove_shm_regions,
    shm_region_flag,
    stop_file,
    unique_shm_prefix,
)

__all__ = [
    "SHM_PREFIX",
    "TritonServer",
    "announce_stop",
    "end_process_group",
    "free_ports",
    "kill_process_group",
    "parent_death_signal",
    "stop_file",
    "remove_shm_regions",
    "shm_region_flag",
    "unique_shm_prefix",
]


# --- running a server -------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


_RUNNING: set[TritonServer] = set()
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _RUNNING_LOCK:
        servers = list(_RUNNING)
    for server in servers:
        server.stop()


class TritonServer:
    """A tritonserver process: free ports, log to a file, wait until ready, always stopped.

        with TritonServer(repository, model_control="explicit", load_models=["m"]) as server:
            client = tritonclient.http.InferenceServerClient(server.http_url)

    Readiness (readiness.py) is `/v2/health/ready`, and then the readiness of each model in
    `ready_models` (with strict_readiness=False, when bad models are loaded on purpose,
    the server is "ready" as soon as it is up, so list the models that must load).
    `stop()` sends SIGTERM, then SIGKILL to the whole process group after `stop_grace`
    seconds, and removes the /dev/shm regions of this server's python stubs.
    exit_timeout is short here (5 s): close HTTP clients, Triton waits for their idle
    keep-alive connections that long. die_with_parent: Linux delivers SIGTERM to the
    server when the *thread* that started it ends, so start long-lived servers from the
    main thread or pass False. supervise_models: once ready, a ModelSupervisor
    (csm_triton.serving.supervisor) reloads models whose python stub died, every
    `supervise_interval` seconds, as `csm-triton-server serve` does; it is
    `self.supervisor` and writes its lines into the server's log. Like `serve`, it
    listens on `listen_address` (loopback) and refuses model control (load, unload,
    index) without `model_control_key` (a random one unless given; None: unrestricted):
    send `model_control_headers` (HTTP) or `grpc_model_control_headers`.
    """

    def __init__(
        self,
        model_repository: Path | str,
        *,
        install: EmbeddedInstall | None = None,
        home: Path | str | None = None,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        model_control: str = "explicit",
        load_models: Sequence[str] | None = None,
        strict_readiness: bool = True,
        ready_models: Sequence[str] | None = None,
        exit_on_error: bool | None = None,
        gpu: bool | None = None,
        log_verbose: int = 0,
        log_path: Path | str | None = None,
        startup_timeout: float = 120.0,
        exit_timeout: int = 5,
        stop_grace: float | None = None,
        die_with_parent: bool = True,
        extra_args: Sequence[str] = (),
        environment: Mapping[str, str] | None = None,
        supervise_models: bool = False,
        supervise_interval: float = 2.0,
        listen_address: str = C.DEFAULT_LISTEN_ADDRESS,
        model_control_key: str | None = "",
    ) -> None:
        self.environment = dict(environment or {})
        self.model_repository = Path(model_repository).resolve()
        self._install = install
        self._home = home
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self.model_control = model_control
        self.load_models = load_models
        self.strict_readiness = strict_readiness
        self.ready_models = list(ready_models or [])
        self.exit_on_error = exit_on_error
        self.gpu = gpu
        self.log_verbose = log_verbose
        self._log_path = Path(log_path) if log_path is not None else None
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout
        # Triton spends up to exit_timeout draining, then unloads the models.
        self.stop_grace = stop_grace if stop_grace is not None else exit_timeout + 20.0
        self.die_with_parent = die_with_parent
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None
        self._log_offset = 0
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.shm_prefix = unique_shm_prefix()
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None
        self.returncode: int | None = None
        self.supervise_models = supervise_models
        self.supervise_interval = supervise_interval
        self.supervisor = None
        self.listen_address = listen_address
        # "": a new random key; None: no restriction at all.
        self.model_control_key = new_model_control_key() if model_control_key == "" else model_control_key

    # --- addresses ----------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{client_host(self.listen_address)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{client_host(self.listen_address)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{client_host(self.listen_address)}:{self.metrics_port}"

    @property
    def model_control_headers(self) -> dict[str, str] | None:
        """`headers=` of an HTTP load_model / unload_model / get_model_repository_index."""
        key = self.model_control_key
        return None if key is None else model_control_headers(key, "http")

    @property
    def grpc_model_control_headers(self) -> dict[str, str] | None:
        key = self.model_control_key
        return None if key is None else model_control_headers(key, "grpc")

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            install = self._install or prepare(self._home, perf_analyzer=False)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self._log_path = install.home / "logs" / f"tritonserver-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}.log"
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        install = self._install
        assert install is not None
        return [str(install.tritonserver)] + server_arguments(
            self.model_repository,
            http_port=self.http_port,
            grpc_port=self.grpc_port,
            metrics_port=self.metrics_port,
            backend_directory=install.backend_directory,
            model_control=self.model_control,
            load_models=self.load_models,
            strict_readiness=self.strict_readiness,
            exit_on_error=self.exit_on_error,
            gpu=self.gpu,
            cache_directory=install.cache_directory,
            log_verbose=self.log_verbose,
            exit_timeout=self.exit_timeout,
            listen_address=self.listen_address,
            model_control_key=self.model_control_key,
            extra=[shm_region_flag(self.shm_prefix), *self.extra_args],
        )

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> TritonServer:
        if self.process is not None:
            raise RuntimeError("server already started")
        if self._install is None:
            self._install = prepare(self._home, perf_analyzer=False)
        started = time.monotonic()
        picked = all(port is None for port in self._fixed_ports)
        attempts = 3 if picked else 1  # a picked port can be taken before Triton binds it
        try:
            for attempt in range(attempts):
                ports = free_ports(3)
                self.http_port, self.grpc_port, self.metrics_port = [
                    fixed or free for fixed, free in zip(self._fixed_ports, ports)
                ]
                self._spawn()
                try:
                    wait_until_ready(
                        self.process,
                        self.http_url,
                        self.ready_models,
                        started=started,
                        timeout=self.startup_timeout,
                        endpoint=last_endpoint(self.extra_args),
                        new_log=self._new_log,
                        log_excerpt=self._log_excerpt,
                    )
                    break
                except TritonStartError:
                    if attempt + 1 < attempts and "already in use" in self._new_log():
                        self._shutdown()
                        continue
                    raise
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        if self.supervise_models:
            self.supervisor = ModelSupervisor.for_embedded(
                self._install,
                self.http_port,
                lambda: self.pid,
                interval_s=self.supervise_interval,
                host=client_host(self.listen_address),
                model_control_key=self.model_control_key,
                log=log_to_file(self.log_path),
            ).start()
        return self

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.command()
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(("$ " + " ".join(redact(command)) + "\n").encode())
            log.flush()
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**server_environment(self._install), **self.environment},
                cwd=str(self._install.home),
                start_new_session=True,  # its own process group: stubs included in a SIGKILL
                preexec_fn=parent_death_signal if self.die_with_parent else None,
            )
        with _RUNNING_LOCK:
            _RUNNING.add(self)

    def _new_log(self) -> str:
        """What this start wrote to the log (the file may hold earlier runs)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_excerpt(self, lines: int = 60) -> str:
        return f"\n--- last lines of {self.log_path} ---\n{self.log_tail(lines)}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM, SIGKILL after the grace period; idempotent. Returns the exit code."""
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if self.process is None:
            return self.returncode
        began = time.monotonic()
        self._shutdown()
        self.stop_seconds = time.monotonic() - began
        return self.returncode

    def _shutdown(self) -> None:
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                try:
                    process.send_signal(signal.SIGTERM)
                    process.wait(timeout=self.stop_grace)
                except subprocess.TimeoutExpired:
                    log_to_file(self.log_path, "csm-triton-server")(
                        f"tritonserver (pid {process.pid}) still running {self.stop_grace:g} s after SIGTERM: "
                        "killing it and its python stubs (SIGKILL)"
                    )
                    kill_process_group(process.pid)
                    process.wait(timeout=30)
        finally:
            self._reap(process)

    def _reap(self, process: subprocess.Popen) -> None:
        """After tritonserver exited: stray stubs of its process group, its shm regions."""
        self.returncode = process.poll()
        end_process_group(process.pid, grace_s=5.0, log=log_to_file(self.log_path, "csm-triton-server"))
        remove_shm_regions(self.shm_prefix)
        self.process = None
        with _RUNNING_LOCK:
            _RUNNING.discard(self)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TritonServer({self.model_repository}, http={self.http_url}, pid={self.pid})"
