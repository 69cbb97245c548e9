"""The layers stay layers: core/ and engine/ know nothing of Triton, tritonclient,
FastAPI or the served tree; the thin client never pulls in torch, the server packages,
FastAPI or PyAV (its `speed` extra, imported when a stretch is made); the servers
(gateway, KServe front) load no torch and nothing of the models' side; one module
imports triton_python_backend_utils; every model.py is a one-line import; no module
grows past 400 lines."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "src", ROOT / "clients", ROOT / "servers"]
MAX_LINES = 400

# In a fresh interpreter: import every module under each package (walk_packages, so a
# new module is covered without editing this test; __main__ modules would run), then
# print the modules imported and which of `forbidden` ended up in sys.modules.
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
packages, forbidden = json.loads(sys.argv[1]), json.loads(sys.argv[2])
imported = []
def fail(name):
    raise ImportError(f"cannot import {name}")
for package in packages:
    root = importlib.import_module(package)
    imported.append(package)
    for info in pkgutil.walk_packages(root.__path__, package + ".", onerror=fail):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            importlib.import_module(info.name)
            imported.append(info.name)
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(json.dumps({"imported": imported, "forbidden_loaded": loaded}))
"""


def _import_everything(packages: list[str], forbidden: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, json.dumps(packages), json.dumps(forbidden)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_core_and_engine_import_nothing_of_triton_the_clients_or_the_served_tree():
    report = _import_everything(
        ["csm_triton.core", "csm_triton.engine"],
        [
            "tritonclient",
            "fastapi",
            "triton_python_backend_utils",
            "csm_triton.triton",
            "csm_triton.serving",
            "csm_clients",
            "csm_servers",
        ],
    )
    assert {"csm_triton.core.voices", "csm_triton.engine.engine"} <= set(report["imported"]), report["imported"]
    assert report["forbidden_loaded"] == []


def test_the_clients_import_neither_torch_nor_the_server_packages():
    """csm_clients is its own distribution (clients/pyproject.toml: tritonclient, numpy,
    soundfile, soxr). Every module of it imported (the text stream's client too, which
    needs the `pipe` extra's websockets) loads nothing of the server side."""
    report = _import_everything(
        ["csm_clients"],
        [
            "torch",
            "csm_triton",
            "csm_servers",
            "transformers",
            "fastapi",
            "uvicorn",
            "starlette",
            "httpx",
            "av",
            "sentencex",
        ],
    )
    assert {"csm_clients.cli", "csm_clients.batch", "csm_clients.timestretch"} <= set(report["imported"])
    assert report["forbidden_loaded"] == []


def test_the_servers_load_no_torch_and_nothing_of_the_models_side():
    """The gateway and the KServe front call Triton over the network (csm_clients, httpx)."""
    report = _import_everything(
        ["csm_servers"],
        [
            "torch",
            "transformers",
            "triton_python_backend_utils",
            "csm_triton.triton",
            "csm_triton.engine",
            "csm_triton.serving",
        ],
    )
    assert {"csm_servers.gateway.app", "csm_servers.gateway.kserve_front", "csm_servers.gateway.encoding"} <= set(
        report["imported"]
    )
    assert report["forbidden_loaded"] == []


def _python_files() -> list[Path]:
    return sorted(p for source in SOURCES for p in source.rglob("*.py") if "__pycache__" not in p.parts)


def test_only_the_adapter_imports_triton_python_backend_utils():
    importer = re.compile(r"^\s*(?:import|from)\s+triton_python_backend_utils\b", re.MULTILINE)
    importers = [p.relative_to(ROOT).as_posix() for p in _python_files() if importer.search(p.read_text())]
    assert importers == ["src/csm_triton/triton/adapter.py"]


MODEL_FILES = sorted(ROOT.glob("model_repository/*/1/model.py")) + [
    ROOT / "src" / "csm_triton" / "serving" / "onnxruntime" / "model.py"
]


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_model_py_is_one_import_of_TritonPythonModel(path):
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and text.strip() == lines[0], text
    (statement,) = ast.parse(text).body
    assert isinstance(statement, ast.ImportFrom) and statement.module.startswith("csm_triton."), lines[0]
    assert [alias.asname or alias.name for alias in statement.names] == ["TritonPythonModel"], lines[0]


def test_the_model_repository_has_model_files():
    assert len(MODEL_FILES) >= 5


def test_no_module_is_over_400_lines():
    long = {
        p.relative_to(ROOT).as_posix(): n for p in _python_files() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
