"""`python -m csm_triton.serving serve` (what `make serve` runs), or docker/serve.sh (the
container's launch), as a test starts it: free ports, a log file, readiness of named
models, and a stop that never hangs the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from csm_triton import constants as C
from csm_triton.serving.install import prepare, server_environment
from csm_triton.serving.process import free_ports
from csm_triton.serving.stubs import find_tritonserver

SERVE_COMMAND = (sys.executable, "-m", "csm_triton.serving", "serve")
SERVE_SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "serve.sh"


def add_python_model(repository: Path, name: str, model_py: str) -> None:
    """A python model `name` (FP32 x -> FP32 y, one CPU instance) whose model.py is `model_py`."""
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(f"""name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "x", data_type: TYPE_FP32, dims: [ -1 ] }} ]
output [ {{ name: "y", data_type: TYPE_FP32, dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
""")
    (repository / name / "1" / "model.py").write_text(model_py)


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without a model-control key or listen address of the
    developer's shell, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in (C.MODEL_CONTROL_KEY_ENV, C.LISTEN_ADDRESS_ENV)}
    return {**env, **extra}


class Serve:
    """`launcher` with the repository, free ports and `options`: `serve`, or anything that
    takes its server options (docker/serve.sh takes those of `csm-triton-server args`)."""

    def __init__(
        self,
        repository: Path,
        log_path: Path,
        options: Sequence[str] = (),
        env: dict | None = None,
        launcher: Sequence[str] = SERVE_COMMAND,
    ):
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.http_url, self.grpc_url = f"localhost:{self.http_port}", f"localhost:{self.grpc_port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [
                *launcher,
                "--model-repository",
                str(repository),
                "--http-port",
                str(self.http_port),
                "--grpc-port",
                str(self.grpc_port),
                "--metrics-port",
                str(self.metrics_port),
                "--no-gpu",
                *options,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or clean_environment(),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def triton_pid(self) -> int | None:
        return find_tritonserver(self.http_port)

    def wait_ready(self, models: Sequence[str], timeout: float) -> int:
        """tritonserver's pid, once every model of `models` is ready."""
        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=1.0, network_timeout=2.0)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"serve exited\n{self.log()[-3000:]}"
                try:
                    pid = self.triton_pid()
                    if pid and all(client.is_model_ready(m) for m in models):
                        return pid
                except (InferenceServerException, OSError, ConnectionError):
                    pass
                time.sleep(0.2)
        finally:
            client.close()  # an idle keep-alive connection would hold Triton's shutdown
        raise AssertionError(f"not ready after {timeout:.0f} s\n{self.log()[-3000:]}")

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code, seconds it took), or (None, timeout) when it still runs."""
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None, timeout
        return code, time.monotonic() - began

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.triton_pid() or self.process.pid, signal.SIGKILL)
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def container_serve(repository: Path, log_path: Path, bin_directory: Path, options: Sequence[str] = ()) -> Serve:
    """docker/serve.sh as the container runs it (a static repository), with the embedded
    tritonserver 2.51 standing in for the image's: the `tritonserver` on PATH, given the
    environment and the backends of the embedded install (the image has its own)."""
    install = prepare()
    bin_directory.mkdir(parents=True, exist_ok=True)
    (bin_directory / "tritonserver").symlink_to(install.tritonserver)
    env = server_environment(install, clean_environment())
    env["PATH"] = os.pathsep.join([str(bin_directory), env["PATH"]])
    embedded = [f"--backend-directory={install.backend_directory}", "--model-control", "none", *options]
    # The install's cache libraries: a flag after `--` reaches tritonserver as it is.
    return Serve(
        repository,
        log_path,
        [*embedded, "--", f"--cache-directory={install.cache_directory}"],
        env=env,
        launcher=[str(SERVE_SCRIPT)],
    )
