"""The real tritonserver without Docker: the 2.51.0 build bundled in nvidia-pytriton.

Everything a fresh machine needs is done here, by code:

    python -m csm_triton.embedded prepare [--home DIR]
    python -m csm_triton.embedded serve --model-repository DIR [--http-port 8000 ...]
    python -m csm_triton.embedded args --model-repository DIR [--gpu ...]
    python -m csm_triton.embedded perf-analyzer -- -m MODEL -u localhost:8000 ...

`prepare` assembles `<home>/backends/python` (the python backend and the stub for
this interpreter), `<home>/backends/onnxruntime` (a Python-based backend, so configs
with `platform: "onnxruntime_onnx"` load unchanged) and tritonclient 2.51.0's
perf_analyzer (the last one that runs on glibc 2.36) in `<home>/bin`. The home is
`<project root>/.triton` unless CSM_TRITON_HOME says otherwise.

`server_arguments` is the one source of the server's flags; the deployment-
independent ones come from `deploy/tritonserver.args`. `args` prints the flags
`serve` would use, one per line, without the embedded install: the container's
launch (docker/serve.sh) starts the NGC image's tritonserver with them.
`TritonServer` runs a server for tests and tools and always stops it.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import fcntl
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from csm_triton import constants as C

__all__ = [
    "EmbeddedInstall",
    "PrepareError",
    "TritonServer",
    "TritonStartError",
    "default_home",
    "gpu_available",
    "locate_pytriton",
    "main",
    "perf_analyzer_command",
    "prepare",
    "read_args_file",
    "server_arguments",
    "server_environment",
]

_ENDPOINT_FAILURE = re.compile(r"failed to start (HTTP|GRPC|Metrics) service[^\n]*")
PERF_ANALYZER_TRITONCLIENT = "2.51.0"  # later wheels' perf_analyzer needs glibc 2.38
SHM_PREFIX = "triton_python_backend_shm_region_"
MODEL_CONTROL_MODES = ("none", "poll", "explicit")
PACKAGE_DIR = Path(__file__).resolve().parent
ONNXRUNTIME_BACKEND_SOURCE = PACKAGE_DIR / "backends" / "onnxruntime" / "model.py"


def _project_root() -> Path | None:
    root = PACKAGE_DIR.parent.parent  # src/csm_triton -> project root (editable install)
    return root if (root / "pyproject.toml").is_file() else None


PROJECT_ROOT = _project_root()
DEFAULT_ARGS_FILE = (PROJECT_ROOT or Path.cwd()) / "deploy" / "tritonserver.args"

# Flags that depend on the deployment: server_arguments sets them, the args file must not.
_DEPLOYMENT_FLAGS = {
    "--model-repository", "--model-store", "--http-port", "--grpc-port", "--metrics-port",
    "--backend-directory", "--model-control-mode", "--load-model", "--strict-readiness",
    "--exit-on-error", "--allow-gpu-metrics", "--pinned-memory-pool-byte-size", "--cache-directory",
    "--log-verbose", "--log-file", "--repository-poll-secs", "--exit-timeout-secs",
}


class PrepareError(RuntimeError):
    """The embedded server cannot be set up on this machine (the message says why)."""


class TritonStartError(RuntimeError):
    """The server did not become ready; the message ends with the tail of its log."""


def default_home() -> Path:
    env = os.environ.get("CSM_TRITON_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return (PROJECT_ROOT or Path.cwd()) / ".triton"


# --- the pieces inside the venv ---------------------------------------------------------
@dataclass(frozen=True)
class PytritonLayout:
    site_packages: Path
    tritonserver: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for the running Python
    libs: Path  # nvidia_pytriton.libs
    caches: Path
    version: str


def locate_pytriton() -> PytritonLayout:
    spec = importlib.util.find_spec("pytriton")  # does not import pytriton
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError("nvidia-pytriton is not installed in this environment (pip install nvidia-pytriton==0.7.0)")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    site_packages = package.parent
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    layout = PytritonLayout(
        site_packages=site_packages,
        tritonserver=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / python / "triton_python_backend_stub",
        libs=site_packages / "nvidia_pytriton.libs",
        caches=root / "caches",
        version=importlib.metadata.version("nvidia-pytriton"),
    )
    required = [
        layout.tritonserver,
        layout.python_backend / "libtriton_python.so",
        layout.python_backend / "triton_python_backend_utils.py",
        layout.libs,
    ]
    missing = [str(p) for p in required if not p.exists()]
    if missing:
        raise PrepareError(f"nvidia-pytriton {layout.version} is incomplete, missing: {', '.join(missing)}")
    if not layout.stub.is_file():
        have = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise PrepareError(f"nvidia-pytriton has no python backend stub for Python {python} (it has {', '.join(have)})")
    return layout


def _lib_named(libs: Path, stem: str, suffix: str) -> Path:
    """A vendored library in nvidia_pytriton.libs: auditwheel adds a hash, e.g. libb64-98cb6333.so.0d."""
    found = sorted(libs.glob(f"{stem}-*.so.{suffix}*"))
    if not found:
        raise PrepareError(f"no {stem}*.so.{suffix} in {libs}")
    return found[0]


def _python_libdir() -> Path:
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise PrepareError(
            f"{sys.executable} was built without --enable-shared: the python backend stub needs libpython"
        )
    libdir = Path(sysconfig.get_config_var("LIBDIR"))
    name = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    if not (libdir / name).exists():
        raise PrepareError(f"{name} not found in {libdir} (sysconfig LIBDIR)")
    return libdir


def _check_numpy() -> None:
    try:
        version = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        raise PrepareError("numpy is not installed; the python backend stub needs numpy 1.x") from None
    if int(version.split(".")[0]) >= 2:
        raise PrepareError(
            f"numpy {version} installed: the embedded stub is built against the numpy 1.x ABI "
            "(every python-model output fails with numpy 2); install numpy<2"
        )


# --- prepare ----------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddedInstall:
    home: Path
    tritonserver: Path
    backend_directory: Path
    cache_directory: Path
    perf_analyzer: Path | None
    lib_directory: Path  # symlinks perf_analyzer needs
    pytriton_libs: Path
    python_libdir: Path
    venv_bin: Path
    pytriton_version: str

    def to_json(self) -> dict:
        return {key: str(value) if value is not None else None for key, value in self.__dict__.items()}


def _same_file(source: Path, target: Path) -> bool:
    try:
        a, b = source.stat(), target.stat()
    except FileNotFoundError:
        return False
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def _install_file(source: Path, target: Path, mode: int | None = None) -> bool:
    """Copy unless an identical copy is there; atomic (a running server keeps its mapped copy)."""
    if _same_file(source, target) and (mode is None or (target.stat().st_mode & 0o777) == mode):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        shutil.copy2(source, temporary)
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


def _install_symlink(target: Path, link: Path) -> bool:
    if link.is_symlink() and os.readlink(link) == str(target):
        return False
    link.parent.mkdir(parents=True, exist_ok=True)
    temporary = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
    os.symlink(target, temporary)
    os.replace(temporary, link)
    return True


def _prepare_perf_analyzer(home: Path, libs: Path) -> tuple[Path, Path]:
    lib_directory = home / "lib"
    _install_symlink(_lib_named(libs, "libb64", "0d"), lib_directory / "libb64.so.0d")
    _install_symlink(_lib_named(libs, "libcudart", "12"), lib_directory / "libcudart.so.12")

    binary = home / "bin" / "perf_analyzer"
    stamp = home / "bin" / ".perf_analyzer.verified"
    if binary.is_file() and stamp.is_file() and stamp.read_text().strip() == PERF_ANALYZER_TRITONCLIENT:
        return binary, lib_directory
    if platform.machine() != "x86_64":
        raise PrepareError(f"perf_analyzer {PERF_ANALYZER_TRITONCLIENT} is only published for x86_64")

    wheels = home / "wheels"
    wheel = next(iter(sorted(wheels.glob(f"tritonclient-{PERF_ANALYZER_TRITONCLIENT}-*.whl"))), None)
    if wheel is None:
        wheels.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", f"tritonclient=={PERF_ANALYZER_TRITONCLIENT}",
            "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(wheels),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = next(iter(sorted(wheels.glob(f"tritonclient-{PERF_ANALYZER_TRITONCLIENT}-*.whl"))), None)
        if result.returncode != 0 or wheel is None:
            raise PrepareError(
                f"could not download tritonclient {PERF_ANALYZER_TRITONCLIENT} (for perf_analyzer): "
                f"{' '.join(command)}\n{result.stdout}{result.stderr}"
            )
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith("/bin/perf_analyzer")]
        if not members:
            raise PrepareError(f"{wheel.name} holds no bin/perf_analyzer")
        binary.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=binary.parent, prefix=".perf_analyzer.")
        try:
            with os.fdopen(handle, "wb") as out, archive.open(members[0]) as data:
                shutil.copyfileobj(data, out)
            os.chmod(temporary, 0o755)
            os.replace(temporary, binary)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    # perf_analyzer 2.51 rejects --help (exit 99, usage on stderr); --version exits 0.
    argv0, env = perf_analyzer_command(home)
    check = subprocess.run([argv0, "--version"], env=env, capture_output=True, text=True, timeout=60)
    if check.returncode != 0 or PERF_ANALYZER_TRITONCLIENT not in check.stdout + check.stderr:
        raise PrepareError(f"{binary} does not run here (exit {check.returncode}):\n{check.stdout}{check.stderr}")
    stamp.write_text(PERF_ANALYZER_TRITONCLIENT + "\n")
    return binary, lib_directory


def prepare(home: Path | str | None = None, *, perf_analyzer: bool = True) -> EmbeddedInstall:
    """Assemble the embedded server under `home`; idempotent and fast when nothing changed.

    Safe to run from several processes at once (a lock file serialises them).
    """
    home = Path(home).expanduser().resolve() if home is not None else default_home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".prepare.lock", "a") as lock:  # "a": no truncation, mtime kept
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_locked(home, perf_analyzer)


def _prepare_locked(home: Path, perf_analyzer: bool) -> EmbeddedInstall:
    layout = locate_pytriton()
    python_libdir = _python_libdir()
    _check_numpy()
    if not ONNXRUNTIME_BACKEND_SOURCE.is_file():
        raise PrepareError(f"missing {ONNXRUNTIME_BACKEND_SOURCE}")

    backends = home / "backends"
    python_backend = backends / "python"
    _install_file(layout.python_backend / "libtriton_python.so", python_backend / "libtriton_python.so")
    _install_file(
        layout.python_backend / "triton_python_backend_utils.py", python_backend / "triton_python_backend_utils.py"
    )
    _install_file(layout.stub, python_backend / "triton_python_backend_stub", mode=0o755)
    # A Python-based backend needs only model.py in its folder: Triton finds
    # libtriton_python.so, the stub and the utils in backends/python.
    _install_file(ONNXRUNTIME_BACKEND_SOURCE, backends / "onnxruntime" / "model.py")

    binary = None
    lib_directory = home / "lib"
    if perf_analyzer:
        binary, lib_directory = _prepare_perf_analyzer(home, layout.libs)
    elif (home / "bin" / "perf_analyzer").is_file():
        binary = home / "bin" / "perf_analyzer"

    install = EmbeddedInstall(
        home=home,
        tritonserver=layout.tritonserver,
        backend_directory=backends,
        cache_directory=layout.caches,
        perf_analyzer=binary,
        lib_directory=lib_directory,
        pytriton_libs=layout.libs,
        python_libdir=python_libdir,
        venv_bin=Path(sys.prefix) / "bin" if (Path(sys.prefix) / "bin").is_dir() else Path(sys.executable).parent,
        pytriton_version=layout.version,
    )
    record = json.dumps(install.to_json(), indent=2) + "\n"
    if not (home / "install.json").is_file() or (home / "install.json").read_text() != record:
        (home / "install.json").write_text(record)
    return install


def perf_analyzer_command(home: Path | str | None = None) -> tuple[str, dict[str, str]]:
    """(path of the bundled perf_analyzer, environment to run it with)."""
    home = Path(home).expanduser().resolve() if home is not None else default_home()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = _join_paths([home / "lib"], env.get("LD_LIBRARY_PATH"))
    return str(home / "bin" / "perf_analyzer"), env


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


def _join_paths(first: Iterable[Path | str], rest: str | None) -> str:
    parts = [str(p) for p in first]
    if rest:
        parts += [p for p in rest.split(os.pathsep) if p and p not in parts]
    return os.pathsep.join(parts)


def server_environment(install: EmbeddedInstall, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver and its stubs need.

    The stub's embedded interpreter finds `python3` on PATH (so the venv's bin goes
    first) and loads libpython from LD_LIBRARY_PATH (so the base interpreter's LIBDIR
    is there, next to nvidia_pytriton.libs).
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = _join_paths([install.venv_bin], env.get("PATH"))
    env["LD_LIBRARY_PATH"] = _join_paths([install.pytriton_libs, install.python_libdir], env.get("LD_LIBRARY_PATH"))
    return env


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


try:  # resolved here, not in the forked child (no dlopen between fork and exec)
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None


def _parent_death_signal() -> None:
    """preexec_fn: the server gets SIGTERM when the thread that started it ends
    (a killed test run leaves no tritonserver behind)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


_RUNNING: set["TritonServer"] = set()
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _RUNNING_LOCK:
        servers = list(_RUNNING)
    for server in servers:
        server.stop()


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


class TritonServer:
    """A tritonserver process: free ports, log to a file, wait until ready, always stopped.

        with TritonServer(repository, model_control="explicit", load_models=["m"]) as server:
            client = tritonclient.http.InferenceServerClient(server.http_url)

    Readiness is `/v2/health/ready`, and then the readiness of each model in
    `ready_models` (with strict_readiness=False, when bad models are loaded on purpose,
    the server is "ready" as soon as it is up, so list the models that must load).
    `stop()` sends SIGTERM, then SIGKILL to the whole process group after `stop_grace`
    seconds, and removes the /dev/shm regions of this server's python stubs.
    exit_timeout is short here (5 s): close HTTP clients, Triton waits for their idle
    keep-alive connections that long. die_with_parent: Linux delivers SIGTERM to the
    server when the *thread* that started it ends, so start long-lived servers from the
    main thread or pass False.
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
        self.shm_prefix = f"{SHM_PREFIX}csm{os.getpid()}x{uuid.uuid4().hex[:8]}_"
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None
        self.returncode: int | None = None

    # --- addresses ----------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"localhost:{self.metrics_port}"

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
            # One prefix per server: its stubs' /dev/shm regions are known exactly.
            extra=[f"--backend-config=shm-region-prefix-name={self.shm_prefix}", *self.extra_args],
        )

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> "TritonServer":
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
                    self._wait_ready(started)
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
        return self

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.command()
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(("$ " + " ".join(command) + "\n").encode())
            log.flush()
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**server_environment(self._install), **self.environment},
                cwd=str(self._install.home),
                start_new_session=True,  # its own process group: stubs included in a SIGKILL
                preexec_fn=_parent_death_signal if self.die_with_parent else None,
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

    @property
    def _last_endpoint(self) -> str:
        """The log line of the endpoint Triton starts last (gRPC, HTTP, then metrics)."""
        metrics_off = any(flag in ("--allow-metrics=false", "--allow-metrics=0") for flag in self.extra_args)
        return "Started HTTPService" if metrics_off else "Started Metrics Service"

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.startup_timeout
        base = f"http://127.0.0.1:{self.http_port}"
        pending = list(self.ready_models)
        while True:
            code = self.process.poll()
            if code is not None:
                raise TritonStartError(f"tritonserver exited with code {code} while starting{self._log_excerpt()}")
            log = self._new_log()
            # Endpoints start after the startup loads, metrics last. Until Triton says so,
            # a 200 could come from someone else's server on a clashing port.
            failure = _ENDPOINT_FAILURE.search(log)
            if failure:
                raise TritonStartError(f"tritonserver {failure.group(0)}{self._log_excerpt()}")
            if self._last_endpoint in log and _http_status(f"{base}/v2/health/ready") == 200:
                pending = [m for m in pending if _http_status(f"{base}/v2/models/{m}/ready") != 200]
                if not pending:
                    return
            if time.monotonic() > deadline:
                waiting = f"models {pending} not ready" if pending else "/v2/health/ready not 200"
                raise TritonStartError(
                    f"tritonserver not ready after {self.startup_timeout:.0f} s ({waiting}){self._log_excerpt()}"
                )
            time.sleep(0.1)

    def _log_excerpt(self, lines: int = 60) -> str:
        return f"\n--- last lines of {self.log_path} ---\n{self.log_tail(lines)}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def model_ready(self, name: str) -> bool:
        return _http_status(f"http://127.0.0.1:{self.http_port}/v2/models/{name}/ready") == 200

    def stop(self) -> int | None:
        """SIGTERM, SIGKILL after the grace period; idempotent. Returns the exit code."""
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
                    self._kill_group(process.pid)
                    process.wait(timeout=30)
        finally:
            self._reap(process)

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self, process: subprocess.Popen) -> None:
        """After tritonserver exited: stray stubs of its process group, its shm regions."""
        self.returncode = process.poll()
        deadline = time.monotonic() + 5
        while True:  # stubs notice that their parent is gone by themselves; give them a moment
            try:
                os.killpg(process.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            if time.monotonic() > deadline:
                self._kill_group(process.pid)
                break
            time.sleep(0.1)
        for path in glob.glob(f"/dev/shm/{self.shm_prefix}*"):
            try:
                os.unlink(path)
            except OSError:
                pass
        self.process = None
        with _RUNNING_LOCK:
            _RUNNING.discard(self)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TritonServer({self.model_repository}, http={self.http_url}, pid={self.pid})"


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
    shm_prefix = f"{SHM_PREFIX}csm{os.getpid()}x{uuid.uuid4().hex[:8]}_"
    command = [str(install.tritonserver)] + _server_flags(
        args,
        backend_directory=install.backend_directory,
        cache_directory=install.cache_directory,
        extra=[f"--backend-config=shm-region-prefix-name={shm_prefix}"],
    )
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    process = subprocess.Popen(
        command, env=server_environment(install), start_new_session=True, preexec_fn=_parent_death_signal
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
        for path in glob.glob(f"/dev/shm/{shm_prefix}*"):
            Path(path).unlink(missing_ok=True)
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
    parser = argparse.ArgumentParser(prog="python -m csm_triton.embedded", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home", type=Path, default=None, help="install folder (default: $CSM_TRITON_HOME or <project>/.triton)"
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
    except (PrepareError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
