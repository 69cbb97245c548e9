"""Build-time checks of the GPU image (run by docker/Dockerfile; a failure fails the build).

Each check is something that would otherwise surface only on a GPU host, minutes
into a start: the python backend's stub embedding another Python than the one the
packages went into, a CPU-only torch, no Triton for the fused kernels, Perth silently running without torchaudio, a
numpy 2 ABI, an args file the launcher cannot read; and a base image older than
Triton's 2026 fixes or without the unprivileged user the image runs as.

    python3 docker/check_image.py [--no-triton]   (--no-triton: outside the image)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import pwd
import subprocess
import sys
import sysconfig
from pathlib import Path

TRITON_HOME = Path("/opt/tritonserver")
SUPPORTED_PYTHONS = ((3, 11), (3, 12))  # pyproject's requires-python
CUDA_MAJOR = "13"  # torch 2.13.0's PyPI wheels and the 26.07 image
# Triton 2.71 = NGC 26.07: the huge-shape abort fixed (2.59), the iterative JSON parser
# (2.69), the denial-of-service CVEs of 26.06-26.07 (docker/Dockerfile, docs/deploy.md).
MIN_TRITON_VERSION = (2, 71)
RUN_AS_USER, RUN_AS_UID = "triton-server", 1000  # docker/Dockerfile's USER, the chart's runAsUser


def check_python() -> str:
    if sys.version_info[:2] not in SUPPORTED_PYTHONS:
        raise SystemExit(f"Python {sys.version.split()[0]}: the project supports {SUPPORTED_PYTHONS}")
    return f"Python {sys.version.split()[0]}"


def check_numpy() -> str:
    version = importlib.metadata.version("numpy")
    if int(version.split(".")[0]) >= 2:
        raise SystemExit(f"numpy {version}: the project pins numpy 1.x")
    return f"numpy {version}"


def check_torch() -> str:
    import torch

    if not (torch.version.cuda or "").startswith(CUDA_MAJOR + "."):
        raise SystemExit(f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, expected {CUDA_MAJOR}.x")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda})"


def check_torchaudio() -> str:
    from csm_triton.core.torchaudio_standin import _real_torchaudio_imports

    if not _real_torchaudio_imports():
        raise SystemExit("the real torchaudio does not import: Perth would run on the stand-in")
    return f"torchaudio {importlib.metadata.version('torchaudio')}"


def check_fused_kernels() -> str:
    # The frame step's fused kernels need Triton (torch's CUDA wheels depend on it); without
    # it the engine would fall back to unfused kernels, ~2x the launches per frame.
    from csm_triton.engine import triton_kernels  # noqa: F401

    return f"triton {importlib.metadata.version('triton')} (the frame step's fused kernels)"


def check_watermark() -> str:
    from csm_triton.core.watermark import load_perth

    load_perth("cpu")  # raises when Perth's imports fail (it hides them otherwise)
    return f"resemble-perth {importlib.metadata.version('resemble-perth')}"


def check_libraries() -> str:
    import onnxruntime
    from transformers import CsmForConditionalGeneration  # noqa: F401

    return f"transformers {importlib.metadata.version('transformers')}, onnxruntime {onnxruntime.__version__}"


def check_gateway() -> str:
    from csm_servers.gateway import create_app

    routes = {route.path for route in create_app("triton:8001").routes}
    return f"REST gateway with {len(routes)} routes"


def check_server_arguments() -> str:
    from csm_triton.serving.flags import server_arguments

    flags = server_arguments("/models/model_repository", model_control="none", gpu=True)
    return f"{len(flags)} tritonserver flags from src/csm_triton/serving/tritonserver.args"


def check_triton() -> str:
    server = TRITON_HOME / "bin" / "tritonserver"
    for path in (
        server,
        TRITON_HOME / "backends" / "python" / "libtriton_python.so",
        TRITON_HOME / "backends" / "onnxruntime",
    ):
        if not path.exists():
            raise SystemExit(f"{path} is missing from the base image")
    stub = TRITON_HOME / "backends" / "python" / "triton_python_backend_stub"
    libpython = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info.major}.{sys.version_info.minor}"
    linked = subprocess.run(["ldd", str(stub)], capture_output=True, text=True).stdout
    if libpython.split(".so")[0] not in linked:
        raise SystemExit(f"{stub} does not embed this Python ({libpython}); packages were installed for the wrong one")
    return f"tritonserver in {TRITON_HOME}, stub embeds {libpython}"


def triton_version() -> tuple[int, ...]:
    """The base image's Triton release: NGC images set TRITON_SERVER_VERSION and write
    /opt/tritonserver/TRITON_VERSION."""
    text = os.environ.get("TRITON_SERVER_VERSION") or ""
    if not text and (TRITON_HOME / "TRITON_VERSION").exists():
        text = (TRITON_HOME / "TRITON_VERSION").read_text()
    try:
        return tuple(int(part) for part in text.strip().split(".")[:3])
    except ValueError:
        raise SystemExit(f"cannot read the base image's Triton version from {text.strip()[:40]!r}") from None


def check_triton_release() -> str:
    version = triton_version()
    if version[:2] < MIN_TRITON_VERSION:
        raise SystemExit(
            f"Triton {'.'.join(map(str, version)) or '(unknown)'} predates the 2026 fixes: "
            f"the image needs {'.'.join(map(str, MIN_TRITON_VERSION))} (NGC 26.07) or later"
        )
    return f"Triton {'.'.join(map(str, version))}"


def check_user() -> str:
    try:
        user = pwd.getpwnam(RUN_AS_USER)
    except KeyError:
        raise SystemExit(f"the base image has no user {RUN_AS_USER!r} to run as") from None
    if user.pw_uid != RUN_AS_UID:
        raise SystemExit(f"{RUN_AS_USER} is uid {user.pw_uid}; the chart and KServe manifests run as {RUN_AS_UID}")
    return f"runs as {RUN_AS_USER} (uid {RUN_AS_UID})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-triton", action="store_true", help="skip the checks of /opt/tritonserver")
    args = parser.parse_args(argv)
    checks = [
        check_python,
        check_numpy,
        check_torch,
        check_fused_kernels,
        check_torchaudio,
        check_watermark,
        check_libraries,
        check_gateway,
        check_server_arguments,
    ]
    if not args.no_triton:
        checks += [check_triton, check_triton_release, check_user]
    for check in checks:
        print(f"ok: {check()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
