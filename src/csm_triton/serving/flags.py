"""tritonserver's flags: the one source for every deployment.

The deployment-independent flags come from `tritonserver.args` beside this module
(package data, so an installed wheel has them too); `server_arguments` adds the
deployment's own. The embedded launcher (`csm-triton-server serve`), `args` and the
container's launch (docker/serve.sh: `csm-triton-server run`) all use it.

Closed by default: HTTP, gRPC and metrics listen on 127.0.0.1 unless a listen address
is given, and Triton's administrative APIs (C.RESTRICTED_APIS: loading a model whose
model.py arrives in the request, among others) answer only callers that send the
model-control key in the C.MODEL_CONTROL_KEY_HEADER header (over gRPC:
`triton-grpc-protocol-<header>`, see `model_control_headers`). The key is on
tritonserver's command line (2.51 reads it nowhere else): print argv with `redact`.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from csm_triton import constants as C

__all__ = [
    "DEFAULT_ARGS_FILE",
    "MODEL_CONTROL_MODES",
    "client_host",
    "gpu_available",
    "is_loopback",
    "listen_warning",
    "model_control_headers",
    "model_control_key",
    "new_model_control_key",
    "read_args_file",
    "redact",
    "restriction_flags",
    "server_arguments",
]

MODEL_CONTROL_MODES = ("none", "poll", "explicit")
DEFAULT_ARGS_FILE = Path(__file__).resolve().parent / "tritonserver.args"

# Flags that depend on the deployment: server_arguments sets them, the args file must not.
_DEPLOYMENT_FLAGS = {
    "--model-repository",
    "--model-store",
    "--http-port",
    "--grpc-port",
    "--metrics-port",
    "--backend-directory",
    "--model-control-mode",
    "--load-model",
    "--strict-readiness",
    "--exit-on-error",
    "--allow-gpu-metrics",
    "--pinned-memory-pool-byte-size",
    "--cache-directory",
    "--log-verbose",
    "--log-file",
    "--repository-poll-secs",
    "--exit-timeout-secs",
    "--http-address",
    "--grpc-address",
    "--metrics-address",
    "--http-restricted-api",
    "--grpc-restricted-protocol",
}
_RESTRICTION_FLAGS = ("--http-restricted-api", "--grpc-restricted-protocol")
# A restriction flag's value up to its key: what `redact` keeps of it (the key is hidden).
_RESTRICTION_VALUE = re.compile(r"^((?:{})=[^=]*=).*".format("|".join(map(re.escape, _RESTRICTION_FLAGS))))
# What a user-chosen key may hold: Triton splits the flag at ':' and '=', and the
# value travels in an HTTP header and gRPC metadata.
_KEY_FORM = re.compile(r"[A-Za-z0-9._~+/-]{16,256}")


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
            raise ValueError(
                f"{path}:{number}: {line.split('=', 1)[0]} depends on the deployment; server_arguments sets it"
            )
        flags.append(line)
    for flag in ("--http-header-forward-pattern", "--grpc-header-forward-pattern"):
        values = [f.split("=", 1)[1] for f in flags if f.split("=", 1)[0] == flag]
        if values != [C.HEADER_FORWARD_PATTERN]:
            raise ValueError(
                f"{path}: {flag} must be given once as {C.HEADER_FORWARD_PATTERN!r} (constants), got {values}"
            )
    return flags


# --- who may reach the server, and its administrative APIs ----------------------------------
def new_model_control_key() -> str:
    return secrets.token_urlsafe(32)


def model_control_key(environ: Mapping[str, str] | None = None) -> str:
    """This start's key: $CSM_MODEL_CONTROL_KEY when set (for operators and tools that
    load and unload models), else a new random one that only this process knows."""
    given = (os.environ if environ is None else environ).get(C.MODEL_CONTROL_KEY_ENV, "")
    if not given:
        return new_model_control_key()
    if not _KEY_FORM.fullmatch(given):  # the message never repeats the key
        raise ValueError(
            f"${C.MODEL_CONTROL_KEY_ENV} must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ + / - "
            "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return given


def restriction_flags(key: str) -> list[str]:
    apis = ",".join(C.RESTRICTED_APIS)
    # The colon form: 2.51 rejects the comma form its --help shows.
    return [f"{flag}={apis}:{C.MODEL_CONTROL_KEY_HEADER}={key}" for flag in _RESTRICTION_FLAGS]


def model_control_headers(key: str, protocol: str = "http") -> dict[str, str]:
    """The headers of a load/unload/index call: tritonclient's `headers=` argument."""
    if protocol not in ("http", "grpc"):
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    prefix = "triton-grpc-protocol-" if protocol == "grpc" else ""
    return {f"{prefix}{C.MODEL_CONTROL_KEY_HEADER}": key}


def redact(argv: Iterable[str]) -> list[str]:
    """argv fit for a log: the values of restricted-API flags (keys) hidden."""
    return [_RESTRICTION_VALUE.sub(r"\1<hidden>", arg) for arg in argv]


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def client_host(listen_address: str) -> str:
    """Where a client on this machine reaches a server listening on listen_address."""
    if listen_address in ("", "0.0.0.0", "localhost") or listen_address == C.DEFAULT_LISTEN_ADDRESS:
        return "localhost"
    if listen_address in ("::", "::1"):
        return "[::1]"
    return f"[{listen_address}]" if ":" in listen_address else listen_address


def listen_warning(address: str) -> str | None:
    """The one line to print when the server is opened beyond this machine."""
    if is_loopback(address):
        return None
    return (
        f"warning: HTTP, gRPC and metrics listen on {address}: inference, health and metrics are open "
        f"to anyone who reaches these ports (model control still needs the key)"
    )


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
    exit_timeout: int = C.DEFAULT_EXIT_TIMEOUT_S,
    listen_address: str = C.DEFAULT_LISTEN_ADDRESS,
    model_control_key: str | None = None,
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
    shutdown for the whole timeout). listen_address: HTTP, gRPC and metrics bind there.
    model_control_key: restricts C.RESTRICTED_APIS to callers sending it (None: open to
    all, for a server nobody else can reach); `csm-triton-server serve` and `args`
    always pass one.
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
        f"--http-address={listen_address}",
        f"--grpc-address={listen_address}",
        f"--metrics-address={listen_address}",
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
    if model_control_key is not None:
        flags += restriction_flags(model_control_key)
    if backend_directory is not None:
        flags.append(f"--backend-directory={Path(backend_directory).resolve()}")
    if cache_directory is not None:
        flags.append(f"--cache-directory={Path(cache_directory).resolve()}")
    if not gpu:
        flags += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
    flags += read_args_file(args_file)
    flags += list(extra)
    return flags
