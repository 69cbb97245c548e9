"""What a user gets from `pip install csm-triton` (the server distribution): the wheel
holds its two packages (csm_triton, the servers in csm_servers) and their data files and
nothing of the checkout, and depends on the thin client's distribution instead of
holding it (tests/integration/test_client_distribution.py installs that one alone); its
CLI runs in an empty environment; export/ and loadtest/ are not importable there but run
from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS_FILE = ROOT / "src" / "csm_triton" / "serving" / "tritonserver.args"


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH/PYTHONHOME: nothing but the target environment's site-packages on sys.path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(command: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


def _checkout_copy(target: Path) -> Path:
    """The checkout's tracked and not-ignored files, so the build writes build/ and
    *.egg-info into the copy, not into a checkout that other commands use."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # skip files deleted in the work tree
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    return target


def build_wheel(source: Path, dist: Path, name: str) -> Path:
    """The wheel of the project in `source` (setuptools>=70.1 has its own bdist_wheel: no
    `wheel` package, nothing downloaded)."""
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            ".",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(dist),
        ],
        cwd=source,
        timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob(f"{name}-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, an empty venv with only that wheel installed, no dependencies); ~2 s."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = _checkout_copy(tmp / "source")
    wheel = build_wheel(source, tmp / "dist", "csm_triton")

    venv = tmp / "venv"
    # `python -m venv` run by .venv's python makes a venv of the base interpreter.
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    assert made.returncode == 0, made.stderr
    install = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            str(wheel),
        ],
        cwd=tmp,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return wheel, venv


@pytest.mark.slow
def test_the_wheel_holds_both_packages_and_their_data_and_nothing_of_the_checkout(installed):
    wheel, _ = installed
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert "csm_triton/serving/tritonserver.args" in names
    assert "csm_servers/gateway/page.html" in names
    assert "csm_triton/serving/onnxruntime/model.py" in names  # `prepare` copies it into the backends
    top_level = {name.split("/", 1)[0] for name in names if ".dist-info/" not in name}
    # No csm_clients (the client's own distribution), no export/, loadtest/, tests/.
    assert top_level == {"csm_triton", "csm_servers"}, top_level
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [line for line in archive.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
    assert "Requires-Dist: csm-tts-client[pipe,speed]==0.1.0" in requires, requires
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "csm-tts" not in archive.read(entry_points).decode()  # the client's script, in the client's wheel


@pytest.mark.slow
def test_the_installed_cli_prints_the_shared_flags_with_only_the_standard_library(installed, tmp_path):
    _, venv = installed
    where = _run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sys, csm_triton; print(csm_triton.__file__); print('\\n'.join(sys.path))",
        ],
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    module, *path = where.stdout.splitlines()
    assert Path(module).is_relative_to(venv), module
    assert not [p for p in path if p and Path(p).resolve().is_relative_to(ROOT)], path
    # The venv is empty: no numpy, no tritonclient, no torch. `args` needs none of them.
    bare = _run([str(venv / "bin" / "python"), "-c", "import numpy"], cwd=tmp_path)
    assert "ModuleNotFoundError" in bare.stderr

    result = _run(
        [str(venv / "bin" / "csm-triton-server"), "args", "--model-repository", "/m", "--no-gpu"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    flags = result.stdout.splitlines()
    assert "--http-header-forward-pattern=x-csm-.*" in flags
    assert "--model-repository=/m" in flags and "--allow-gpu-metrics=false" in flags
    shared = [
        line.strip() for line in ARGS_FILE.read_text().splitlines() if line.strip() and not line.strip().startswith("#")
    ]
    assert shared and all(flag in flags for flag in shared), (shared, flags)


@pytest.mark.slow
def test_a_failing_command_prints_one_error_line_and_exits_2(installed, tmp_path):
    """`serve` in an environment without nvidia-pytriton: main's error handling, no traceback."""
    _, venv = installed
    result = _run(
        [
            str(venv / "bin" / "csm-triton-server"),
            "serve",
            "--model-repository",
            str(tmp_path),
            "--home",
            str(tmp_path / "home"),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nvidia-pytriton" in lines[0], result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["export", "loadtest"])
def test_checkout_folders_are_not_importable_from_the_wheel(installed, tmp_path, folder):
    _, venv = installed
    result = _run([str(venv / "bin" / "python"), "-c", f"import {folder}"], cwd=tmp_path)
    assert result.returncode != 0
    assert f"ModuleNotFoundError: No module named '{folder}'" in result.stderr, result.stderr


def test_export_runs_from_the_checkout():
    result = _run([sys.executable, "-m", "export.build_repository", "--help"], cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_the_client_distributions_pins_are_the_servers():
    """Both distributions install into one environment (make setup): every package the
    client pins, its extras' included, is pinned the same by the server."""
    import tomllib

    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]

    def pins(requirements: list[str]) -> dict[str, str]:
        return {r.split("==")[0].split("[")[0].lower(): r.split("==")[1] for r in requirements if "==" in r}

    client_requirements = client["dependencies"] + [
        r for extra in client["optional-dependencies"].values() for r in extra
    ]
    assert all("==" in r for r in client_requirements), client_requirements  # exact pins
    assert pins(client_requirements).items() <= pins(server["dependencies"]).items()
    assert f"csm-tts-client[pipe,speed]=={client['version']}" in [
        r.replace("[speed,pipe]", "[pipe,speed]") for r in server["dependencies"]
    ]
    assert client["scripts"] == {"csm-tts": "csm_clients.cli:main"}
    assert "csm-tts" not in server["scripts"]
