"""tritonserver's flags: the one source for every deployment.

The deployment-independent flags come from `tritonserver.args` beside this module
(package data, so an installed wheel has them too); `server_arguments` adds the
deployment's own. The embedded launcher and the container's launch
(docker/serve.sh, through `csm-triton-server args`) both use it.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable, Sequence

from csm_triton import constants as C

__all__ = ["DEFAULT_ARGS_FILE", "MODEL_CONTROL_MODES", "gpu_available", "read_args_file", "server_arguments"]

MODEL_CONTROL_MODES = ("none", "poll", "explicit")
DEFAULT_ARGS_FILE = Path(__file__).resolve().parent / "tritonserver.args"

# Flags that depend on the deployment: server_arguments sets them, the args file must not.
_DEPLOYMENT_FLAGS = {
    "--model-repository", "--model-store", "--http-port", "--grpc-port", "--metrics-port",
    "--backend-directory", "--model-control-mode", "--load-model", "--strict-readiness",
    "--exit-on-error", "--allow-gpu-metrics", "--pinned-memory-pool-byte-size", "--cache-directory",
    "--log-verbose", "--log-file", "--repository-poll-secs", "--exit-timeout-secs",
}


# --- flags and environment --------------------------------------------------------------
def read_args_file(path: Path | str = DEFAULT_ARGS_FILE) -> list[str]:
    """The flags of an args file: one per line, `#` comments and blank lines skipped."""
    flags = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("--"):
            raise ValueError(f"{path}:{number}: expected a --flag, got {line!r}")
        if line.split("=", 1)[0] in _DEPLOYMENT_FLAGS:
            raise ValueError(f"{path}:{number}: {line.split('=', 1)[0]} depends on the deployment; server_arguments sets it")
        flags.append(line)
    for flag in ("--http-header-forward-pattern", "--grpc-header-forward-pattern"):
        values = [f.split("=", 1)[1] for f in flags if f.split("=", 1)[0] == flag]
        if values != [C.HEADER_FORWARD_PATTERN]:
            raise ValueError(f"{path}: {flag} must be given once as {C.HEADER_FORWARD_PATTERN!r} (constants), got {values}")
    return flags


def gpu_available() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _flag(value: bool) -> str:
    return "true" if value else "false"


def server_arguments(
    model_repository: Path | str,
    *,
    http_port: int = C.DEFAULT_HTTP_PORT,
    grpc_port: int = C.DEFAULT_GRPC_PORT,
    metrics_port: int = C.DEFAULT_METRICS_PORT,
    backend_directory: Path | str | None = None,
    model_control: str = "explicit",
    load_models: Sequence[str] | None = None,
    strict_readiness: bool = True,
    exit_on_error: bool | None = None,
    gpu: bool | None = None,
    cache_directory: Path | str | None = None,
    log_verbose: int = 0,
    exit_timeout: int = 30,
    args_file: Path | str = DEFAULT_ARGS_FILE,
    extra: Iterable[str] = (),
) -> list[str]:
    """tritonserver's flags (without the program name).

    model_control: "explicit" loads `load_models` (None: every model, `--load-model=*`;
    empty: none) and allows load/unload at runtime; "poll" and "none" load the whole
    repository. exit_on_error defaults to True only for "none" (a static repository
    should fail fast); in explicit and poll mode a bad model must not take the others
    down. gpu=None asks the machine; without one the GPU metrics and the pinned memory
    pool are switched off. exit_timeout: on SIGTERM, how long Triton waits for in-flight
    requests AND open HTTP connections (a client's idle keep-alive connection holds the
    shutdown for the whole timeout).
    """
    if model_control not in MODEL_CONTROL_MODES:
        raise ValueError(f"model_control must be one of {MODEL_CONTROL_MODES}, got {model_control!r}")
    if load_models is not None and model_control != "explicit" and list(load_models):
        raise ValueError("load_models needs model_control='explicit'")
    if gpu is None:
        gpu = gpu_available()
    if exit_on_error is None:
        exit_on_error = model_control == "none"
    flags = [
        f"--model-repository={Path(model_repository).resolve()}",
        f"--http-port={int(http_port)}",
        f"--grpc-port={int(grpc_port)}",
        f"--metrics-port={int(metrics_port)}",
        f"--model-control-mode={model_control}",
    ]
    if model_control == "explicit":
        flags += [f"--load-model={name}" for name in (["*"] if load_models is None else load_models)]
    flags += [
        f"--strict-readiness={_flag(strict_readiness)}",
        f"--exit-on-error={_flag(exit_on_error)}",
        f"--log-verbose={int(log_verbose)}",
        f"--exit-timeout-secs={int(exit_timeout)}",
    ]
    if backend_directory is not None:
        flags.append(f"--backend-directory={Path(backend_directory).resolve()}")
    if cache_directory is not None:
        flags.append(f"--cache-directory={Path(cache_directory).resolve()}")
    if not gpu:
        flags += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
    flags += read_args_file(args_file)
    flags += list(extra)
    return flags

