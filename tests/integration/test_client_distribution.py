"""The thin client installs alone: its wheel (clients/pyproject.toml, csm-tts-client)
built from the checkout and installed with its pinned dependencies into an empty venv
(pip fetches them from the index), where `csm-tts` prints its help and speaks through the
real tritonserver over gRPC and HTTP, torch and the server's packages are absent, and
the optional extras' features (--speed, `pipe`) say which extra to install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import soundfile

from tests.deploy.test_packaging import build_wheel

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients"
# Fresh index downloads on a CI machine: ~60 s with a cold pip cache, a few seconds warm.
INSTALL_TIMEOUT_S = 600


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH/PYTHONHOME, no active venv: only the target venv's site-packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(command: list[str], cwd: Path, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def _pip(venv: Path, *arguments: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "--disable-pip-version-check",
            *arguments,
        ],
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """An empty venv with the client's wheel and its dependencies, nothing else."""
    tmp = tmp_path_factory.mktemp("client-distribution")
    # A copy of clients/, so the build writes build/ and *.egg-info there, not in the checkout.
    source = tmp / "clients"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    wheel = build_wheel(source, tmp / "dist", "csm_tts_client")
    top_level = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in name}
    assert top_level == {"csm_clients"}, top_level

    venv = tmp / "venv"
    # `python -m venv` run by .venv's python makes a venv of the base interpreter; this
    # pip installs into it (--python), so the venv holds only what the wheel brings.
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    assert made.returncode == 0, made.stderr
    began = time.monotonic()
    install = _pip(venv, "install", "-q", str(wheel), cwd=tmp, timeout=INSTALL_TIMEOUT_S)
    assert install.returncode == 0, install.stdout + install.stderr
    print(f"csm-tts-client and its dependencies installed in {time.monotonic() - began:.1f} s")
    return venv


def test_the_client_alone_has_no_torch_and_nothing_of_the_server(client_venv, tmp_path):
    python = str(client_venv / "bin" / "python")
    for module in ("torch", "csm_triton", "csm_servers", "transformers", "fastapi", "av", "websockets"):
        result = _run([python, "-c", f"import {module}"], cwd=tmp_path)
        assert f"ModuleNotFoundError: No module named '{module}'" in result.stderr, (module, result.stderr)
    where = _run([python, "-c", "import csm_clients; print(csm_clients.__file__)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(client_venv), where.stdout  # the wheel's, not the checkout's
    # Every module imports with the base dependencies alone (PyAV only when a stretch is
    # made), but the text stream's client, which names its extra.
    every = _run(
        [
            python,
            "-c",
            "import importlib, pkgutil, csm_clients\n"
            "for m in pkgutil.walk_packages(csm_clients.__path__, 'csm_clients.'):\n"
            "    if m.name != 'csm_clients.text_stream': importlib.import_module(m.name)",
        ],
        cwd=tmp_path,
    )
    assert every.returncode == 0, every.stderr
    text_stream = _run([python, "-c", "import csm_clients.text_stream"], cwd=tmp_path)
    assert "MissingExtra" in text_stream.stderr and "csm-tts-client[pipe]" in text_stream.stderr, text_stream.stderr
    listed = _pip(client_venv, "list", "--format=freeze", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert {"csm-tts-client", "tritonclient", "numpy", "soundfile", "soxr"} <= names, names
    assert not names & {"torch", "csm-triton", "nvidia-pytriton", "fastapi", "uvicorn", "av", "websockets"}, names


def test_csm_tts_help_and_a_call_to_the_real_server(client_venv, triton_server, tmp_path):
    csm_tts = str(client_venv / "bin" / "csm-tts")
    help_text = _run([csm_tts, "--help"], cwd=tmp_path)
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("usage: csm-tts") and "say" in help_text.stdout

    said = _run(
        [
            csm_tts,
            "--url",
            triton_server.grpc_url,
            "say",
            "Hello from the thin client.",
            "-o",
            "said.wav",
            "--max-audio-seconds",
            "0.5",
            "--seed",
            "1",
        ],
        cwd=tmp_path,
        timeout=180,
    )
    assert said.returncode == 0, said.stdout + said.stderr
    info = soundfile.info(str(tmp_path / "said.wav"))
    assert info.samplerate == 24_000 and info.frames > 0
    # HTTP too: tritonclient's [http] extra (geventhttpclient) is in the client's dependencies.
    listed = _run([csm_tts, "--url", triton_server.http_url, "--protocol", "http", "voices", "list"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr


def test_the_optional_extras_are_named_when_missing(client_venv, triton_server, tmp_path):
    """--speed needs PyAV (the `speed` extra), `pipe` websockets (the `pipe` extra): refused
    before anything is sent, exit 2, one line naming the extra."""
    csm_tts = str(client_venv / "bin" / "csm-tts")
    fast = _run(
        [csm_tts, "--url", triton_server.grpc_url, "say", "Faster.", "-o", "fast.wav", "--speed", "1.5"], cwd=tmp_path
    )
    assert fast.returncode == 2, fast.stdout + fast.stderr
    assert "pip install 'csm-tts-client[speed]'" in fast.stderr and len(fast.stderr.splitlines()) == 1, fast.stderr
    assert not (tmp_path / "fast.wav").exists()
    piped = _run([csm_tts, "pipe", "-o", "piped.wav"], cwd=tmp_path, input="Hello.\n")
    assert piped.returncode == 2, piped.stdout + piped.stderr
    assert "pip install 'csm-tts-client[pipe]'" in piped.stderr and len(piped.stderr.splitlines()) == 1, piped.stderr
