"""The embedded tritonserver's install: the 2.51.0 build bundled in nvidia-pytriton.

`prepare` assembles `<home>/backends/python` (the python backend and the stub for
this interpreter), `<home>/backends/onnxruntime` (a Python-based backend, so configs
with `platform: "onnxruntime_onnx"` load unchanged) and tritonclient 2.51.0's
perf_analyzer (the last one that runs on glibc 2.36) in `<home>/bin`. The home is
`$CSM_TRITON_HOME`, else `<project root>/.triton` in a checkout, else
`$XDG_CACHE_HOME/csm-triton` (an installed wheel has no project root).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from csm_triton.core.files import atomic_copy, atomic_write

__all__ = [
    "EmbeddedInstall",
    "PrepareError",
    "default_home",
    "locate_pytriton",
    "perf_analyzer_command",
    "prepare",
    "server_environment",
]

PERF_ANALYZER_TRITONCLIENT = "2.51.0"  # later wheels' perf_analyzer needs glibc 2.38
ONNXRUNTIME_BACKEND_SOURCE = Path(__file__).resolve().parent / "onnxruntime" / "model.py"


def _project_root() -> Path | None:
    root = Path(__file__).resolve().parents[3]  # src/csm_triton/serving/install.py -> checkout
    return root if (root / "pyproject.toml").is_file() else None


PROJECT_ROOT = _project_root()


class PrepareError(RuntimeError):
    """The embedded server cannot be set up on this machine (the message says why)."""


def default_home() -> Path:
    env = os.environ.get("CSM_TRITON_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if PROJECT_ROOT is not None:
        return PROJECT_ROOT / ".triton"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "csm-triton").resolve()


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
    name = (
        sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    )
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
    atomic_copy(source, target, mode=mode)
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
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            f"tritonclient=={PERF_ANALYZER_TRITONCLIENT}",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(wheels),
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
        with atomic_write(binary, durable=False) as out, archive.open(members[0]) as data:
            shutil.copyfileobj(data, out)
            os.fchmod(out.fileno(), 0o755)
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
