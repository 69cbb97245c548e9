"""`csm-triton-server` (also `python -m csm_triton.serving`): the embedded tritonserver's CLI.

    csm-triton-server prepare [--home DIR]
    csm-triton-server serve --model-repository DIR [--http-port 8000 ...]
    csm-triton-server args --model-repository DIR [--gpu ...]
    csm-triton-server perf-analyzer -- -m MODEL -u localhost:8000 ...

`args` prints the flags `serve` would use, one per line, without the embedded
install: the container's launch (docker/serve.sh) starts the NGC image's
tritonserver with them.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from csm_triton import constants as C
from csm_triton.serving.flags import MODEL_CONTROL_MODES, server_arguments
from csm_triton.serving.install import PrepareError, perf_analyzer_command, prepare, server_environment
from csm_triton.serving.process import parent_death_signal, remove_shm_regions, shm_region_flag, unique_shm_prefix

# --- CLI --------------------------------------------------------------------------------
def _server_flags(args: argparse.Namespace, *, backend_directory: Path | None,
                  cache_directory: Path | None = None, extra: Sequence[str] = ()) -> list[str]:
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
        extra=[*extra, *args.extra],
    )


def _serve(args: argparse.Namespace) -> int:
    install = prepare(args.home, perf_analyzer=False)
    shm_prefix = unique_shm_prefix()
    command = [str(install.tritonserver)] + _server_flags(
        args,
        backend_directory=install.backend_directory,
        cache_directory=install.cache_directory,
        extra=[shm_region_flag(shm_prefix)],
    )
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    process = subprocess.Popen(
        command, env=server_environment(install), start_new_session=True, preexec_fn=parent_death_signal
    )

    def forward(signum, _frame):
        if process.poll() is None:
            process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                code = process.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover - the handler replaces it
                forward(signal.SIGINT, None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        remove_shm_regions(shm_prefix)
    return code if code >= 0 else 128 - code


def _args(args: argparse.Namespace) -> int:
    print("\n".join(_server_flags(args, backend_directory=args.backend_directory)))
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
        "--home", type=Path, default=None, help="install folder (default: $CSM_TRITON_HOME, else <checkout>/.triton, else ~/.cache/csm-triton)"
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
        "--load-model", action="append", default=None, metavar="NAME",
        help="with --model-control explicit: load this model (repeatable; default: all)",
    )
    server.add_argument("--strict-readiness", action=argparse.BooleanOptionalAction, default=True)
    server.add_argument("--exit-on-error", action=argparse.BooleanOptionalAction, default=None)
    server.add_argument(
        "--gpu", action=argparse.BooleanOptionalAction, default=None,
        help="GPU metrics and pinned memory on (default: when this machine has a GPU)",
    )
    server.add_argument("--log-verbose", type=int, default=0)
    server.add_argument("--exit-timeout", type=int, default=30, help="seconds to drain on SIGTERM")
    server.add_argument("extra", nargs="*", help="further tritonserver flags, after --")

    s = commands.add_parser("serve", parents=[common, server], help="run tritonserver in the foreground")
    s.set_defaults(run=_serve)

    g = commands.add_parser(
        "args", parents=[server],
        help="print the flags serve would pass to tritonserver, one per line (for other launchers)",
    )
    g.add_argument(
        "--backend-directory", type=Path, default=None,
        help="default: none, i.e. tritonserver's own (/opt/tritonserver/backends in NGC images)",
    )
    g.set_defaults(run=_args)

    a = commands.add_parser("perf-analyzer", parents=[common], help="run the bundled perf_analyzer 2.51: perf-analyzer -- ARGS")
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
