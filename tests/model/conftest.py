"""Fixtures of the model tests' GPU files (test_engine_gpu*.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gpu_report():
    """The GPU tests' figures, one JSON file for all of them at the session's end: written
    to CSM_GPU_TEST_REPORT (loadtest.gpu_check sets it; its summary reads the file), so
    each test adds its keys and no file's figures overwrite another's."""
    figures: dict = {}
    yield figures
    path = os.environ.get("CSM_GPU_TEST_REPORT")
    if path and figures:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")
