"""`csm-triton-server` (also `python -m csm_triton.serving`): the embedded tritonserver's CLI.

    csm-triton-server prepare [--home DIR]
    csm-triton-server serve --model-repository DIR [--http-port 8000 ...]
    csm-triton-server args --model-repository DIR [--gpu ...]
    csm-triton-server run --model-repository DIR [--gpu ...]
    csm-triton-server check [--url localhost:8000] [--stop-server-on-dead-stub]
    csm-triton-server perf-analyzer -- -m MODEL -u localhost:8000 ...

`args` prints the flags `serve` would use, one per line, without the embedded
install. `run` starts the tritonserver found on PATH (the NGC image's: docker/serve.sh
is `run`) with exactly those flags and stops it as `serve` does, without restarts or a
model supervisor (a container's restart policy and healthcheck own those). `serve`
supervises the server it runs (see csm_triton.serving.supervisor): tritonserver is
started again when it dies, and models whose python stub died are reloaded. `check` is
the container's healthcheck.

`serve`, `args` and `run` listen on 127.0.0.1 unless --listen-address (or
$CSM_TRITON_LISTEN_ADDRESS) opens them, and restrict Triton's model control (load,
unload, repository index; also shared memory, logging and trace settings) to callers
sending $CSM_MODEL_CONTROL_KEY in the `csm-model-control-key` header; without that
variable each start makes a random key that only it knows, so only the model
supervisor can load and unload. On SIGTERM/SIGINT `serve` and `run` stop the
supervisor, tell the stubs (no new stream; csm_lm's open streams end after
C.STREAM_STOP_GRACE_S), forward the signal once the stubs' open work has ended (at most
C.STOP_DRAIN_LIMIT_S later), and kill tritonserver's process group (stubs included) when
it is still running --stop-timeout seconds after the signal (csm_triton.serving.foreground).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from csm_triton import constants as C
from csm_triton.serving.flags import (
    MODEL_CONTROL_MODES,
    client_host,
    listen_warning,
    model_control_key,
    redact,
    server_arguments,
)
from csm_triton.serving.foreground import run_until_stopped
from csm_triton.serving.install import PrepareError, perf_analyzer_command, prepare, server_environment
from csm_triton.serving.restart import RestartPolicy
from csm_triton.serving.stubs import check_server, find_tritonserver
from csm_triton.serving.supervisor import ModelSupervisor
from csm_triton.serving.teardown import shm_region_flag, unique_shm_prefix


# --- CLI --------------------------------------------------------------------------------
def _server_flags(
    args: argparse.Namespace,
    *,
    backend_directory: Path | None,
    key: str,
    cache_directory: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """server_arguments for the options `serve` and `args` share (_add_server_options)."""
    return server_arguments(
        args.model_repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        backend_directory=backend_directory,
        model_control=args.model_control,
        load_models=args.load_model,
        strict_readiness=args.strict_readiness,
        exit_on_error=args.exit_on_error,
        gpu=args.gpu,
        cache_directory=cache_directory,
        log_verbose=args.log_verbose,
        exit_timeout=args.exit_timeout,
        listen_address=args.listen_address,
        model_control_key=key,
        extra=[*extra, *args.extra],
    )


def _log(message: str) -> None:
    print(f"csm-triton-server: {message}", file=sys.stderr, flush=True)


def _warn_if_open(args: argparse.Namespace) -> None:
    warning = listen_warning(args.listen_address)
    if warning:
        _log(warning)


def _stop_timeout(args: argparse.Namespace) -> float:
    if args.stop_timeout is not None:
        return args.stop_timeout
    return args.exit_timeout + C.STOP_KILL_MARGIN_S + C.STOP_DRAIN_LIMIT_S


def _serve(args: argparse.Namespace) -> int:
    key = model_control_key()
    install = prepare(args.home, perf_analyzer=False)
    shm_prefix = unique_shm_prefix()
    command = [str(install.tritonserver)] + _server_flags(
        args,
        backend_directory=install.backend_directory,
        key=key,
        cache_directory=install.cache_directory,
        extra=[shm_region_flag(shm_prefix)],
    )
    print("$ " + " ".join(redact(command)), file=sys.stderr, flush=True)
    _warn_if_open(args)

    def supervise(server_pid) -> ModelSupervisor:
        return ModelSupervisor.for_embedded(
            install,
            args.http_port,
            server_pid,
            interval_s=args.supervise_interval,
            log=_log,
            host=client_host(args.listen_address),
            model_control_key=key,
        ).start()

    return run_until_stopped(
        command,
        server_environment(install),
        shm_prefix=shm_prefix,
        policy=RestartPolicy(
            args.restart_delay, args.restart_max_delay, healthy_s=60.0, max_restarts=None if args.restart else 0
        ),
        stop_timeout_s=_stop_timeout(args),
        log=_log,
        supervise=supervise if args.supervise_models and args.model_control == "explicit" else None,
    )


def _run(args: argparse.Namespace) -> int:
    # No restarts and no model supervisor: the container's restart policy and healthcheck
    # (or the kubelet) own those, and its repository is static. The argv is exactly
    # `args`'s output (no shm prefix flag), what tests/deploy checks against compose and Helm.
    tritonserver = shutil.which("tritonserver")
    if tritonserver is None:
        raise FileNotFoundError("no tritonserver on PATH (the NGC image has /opt/tritonserver/bin)")
    command = [tritonserver, *_server_flags(args, backend_directory=args.backend_directory, key=model_control_key())]
    print("$ " + " ".join(redact(command)), file=sys.stderr, flush=True)
    _warn_if_open(args)
    return run_until_stopped(
        command,
        os.environ,
        # Names the stop file only: removed after the run like a region, no region uses it.
        shm_prefix=unique_shm_prefix(),
        policy=RestartPolicy(max_restarts=0),
        stop_timeout_s=_stop_timeout(args),
        log=_log,
    )


def _check(args: argparse.Namespace) -> int:
    url = args.url if "//" in args.url else f"http://{args.url}"
    address = urlsplit(url)
    server_pid = args.server_pid or find_tritonserver(address.port)
    ready, problems = check_server(address.netloc, server_pid, python_based=args.python_based_backend)
    if not problems:
        print("ready" if ready else "not ready")
        return 0 if ready else 1
    print("; ".join(problems))
    if args.stop_server_on_dead_stub and server_pid is not None:
        # Nothing can reload a model of a static repository (--model-control none):
        # the container's restart policy brings up a server with live stubs.
        print(f"stopping tritonserver (pid {server_pid}) so that it is restarted")
        os.kill(server_pid, signal.SIGTERM)
    return 1


def _args(args: argparse.Namespace) -> int:
    # Printed for a launcher to exec, key included: it must never log this output
    # (docker/serve.sh prints it redacted).
    print("\n".join(_server_flags(args, backend_directory=args.backend_directory, key=model_control_key())))
    _warn_if_open(args)
    return 0


def _perf_analyzer(args: argparse.Namespace) -> int:
    prepare(args.home)
    argv0, env = perf_analyzer_command(args.home)
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return subprocess.call([argv0, *rest], env=env)


def _prepare(args: argparse.Namespace) -> int:
    began = time.monotonic()
    install = prepare(args.home, perf_analyzer=not args.no_perf_analyzer)
    print(json.dumps(install.to_json(), indent=2))
    print(f"prepared in {time.monotonic() - began:.2f} s", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csm-triton-server", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home",
        type=Path,
        default=None,
        help="install folder (default: $CSM_TRITON_HOME, else <checkout>/.triton, else ~/.cache/csm-triton)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", parents=[common], help="assemble backends and perf_analyzer (idempotent)")
    p.add_argument("--no-perf-analyzer", action="store_true", help="skip downloading tritonclient's perf_analyzer")
    p.set_defaults(run=_prepare)

    server = argparse.ArgumentParser(add_help=False)  # the options serve and args share
    server.add_argument("--model-repository", type=Path, required=True)
    server.add_argument("--http-port", type=int, default=C.DEFAULT_HTTP_PORT)
    server.add_argument("--grpc-port", type=int, default=C.DEFAULT_GRPC_PORT)
    server.add_argument("--metrics-port", type=int, default=C.DEFAULT_METRICS_PORT)
    server.add_argument("--model-control", choices=MODEL_CONTROL_MODES, default="explicit")
    server.add_argument(
        "--load-model",
        action="append",
        default=None,
        metavar="NAME",
        help="with --model-control explicit: load this model (repeatable; default: all)",
    )
    server.add_argument("--strict-readiness", action=argparse.BooleanOptionalAction, default=True)
    server.add_argument("--exit-on-error", action=argparse.BooleanOptionalAction, default=None)
    server.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPU metrics and pinned memory on (default: when this machine has a GPU)",
    )
    server.add_argument("--log-verbose", type=int, default=0)
    server.add_argument(
        "--exit-timeout",
        type=int,
        default=C.DEFAULT_EXIT_TIMEOUT_S,
        help="on SIGTERM, Triton's seconds for open HTTP connections, in-flight requests and unloading, together",
    )
    server.add_argument(
        "--listen-address",
        default=os.environ.get(C.LISTEN_ADDRESS_ENV) or C.DEFAULT_LISTEN_ADDRESS,
        help=f"where HTTP, gRPC and metrics listen (default: ${C.LISTEN_ADDRESS_ENV}, else "
        f"{C.DEFAULT_LISTEN_ADDRESS}; 0.0.0.0 opens them to the network)",
    )
    server.add_argument("extra", nargs="*", help="further tritonserver flags, after --")

    stopping = argparse.ArgumentParser(add_help=False)  # the options serve and run share
    stopping.add_argument(
        "--stop-timeout",
        type=float,
        default=None,
        help="seconds after SIGTERM/SIGINT before tritonserver and its stubs are killed "
        f"(default: --exit-timeout + {C.STOP_KILL_MARGIN_S} + {C.STOP_DRAIN_LIMIT_S:g}, the streams' drain)",
    )
    external = argparse.ArgumentParser(add_help=False)  # the options args and run share
    external.add_argument(
        "--backend-directory",
        type=Path,
        default=None,
        help="default: none, i.e. tritonserver's own (/opt/tritonserver/backends in NGC images)",
    )

    s = commands.add_parser(
        "serve", parents=[common, server, stopping], help="run tritonserver in the foreground, supervised"
    )
    s.add_argument(
        "--restart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start tritonserver again when it dies without being asked to stop",
    )
    s.add_argument(
        "--restart-delay",
        type=float,
        default=1.0,
        help="seconds before the first restart, doubled after each one (reset after a healthy minute)",
    )
    s.add_argument("--restart-max-delay", type=float, default=30.0)
    s.add_argument(
        "--supervise-models",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --model-control explicit: reload models whose python stub died or stopped",
    )
    s.add_argument("--supervise-interval", type=float, default=2.0, help="seconds between two looks at the stubs")
    s.set_defaults(run=_serve)

    c = commands.add_parser(
        "check",
        help="healthcheck: exit 0 when the server is ready and every loaded model's python stubs live",
    )
    c.add_argument("--url", default=f"localhost:{C.DEFAULT_HTTP_PORT}", help="Triton's HTTP address")
    c.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="tritonserver's pid (default: the tritonserver process of this machine serving --url)",
    )
    c.add_argument(
        "--python-based-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="a backend that runs as python stubs (the embedded server's onnxruntime); repeatable",
    )
    c.add_argument(
        "--stop-server-on-dead-stub",
        action="store_true",
        help="send tritonserver SIGTERM when a stub is dead, for a restart policy to act on",
    )
    c.set_defaults(run=_check)

    g = commands.add_parser(
        "args",
        parents=[server, external],
        help="print the flags serve would pass to tritonserver, one per line (for other launchers)",
    )
    g.set_defaults(run=_args)

    r = commands.add_parser(
        "run",
        parents=[server, external, stopping],
        help="run the tritonserver on PATH with the flags of args, stopped as serve stops (the container's launch)",
    )
    r.set_defaults(run=_run)

    a = commands.add_parser(
        "perf-analyzer", parents=[common], help="run the bundled perf_analyzer 2.51: perf-analyzer -- ARGS"
    )
    a.add_argument("args", nargs=argparse.REMAINDER)
    a.set_defaults(run=_perf_analyzer)

    args = parser.parse_args(argv)
    if getattr(args, "home", None) is not None:
        args.home = args.home.expanduser().resolve()
    try:
        return args.run(args)
    except (PrepareError, ValueError, OSError) as error:  # one line, never a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
