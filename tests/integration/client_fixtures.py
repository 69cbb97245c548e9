"""Fixtures the client, CLI, gateway and README tests share (imported by those modules):
real speech from espeak-ng, and the REST gateway served by uvicorn in a thread."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile

from csm_triton.serving.process import free_ports

from .conftest import ADMIN_TOKEN

TRANSCRIPT = "The quick brown fox jumps over the lazy dog."
GATEWAY_API_KEY = "integration-gateway-key"  # what the gateway fixture's voice writes need


@dataclass(frozen=True)
class Clip:
    path: Path
    transcript: str


def speak(text: str, path: Path) -> Path:
    """espeak-ng speech (22050 Hz, 16-bit WAV) made on the spot."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: run make setup-test")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "170", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def speech_clip(tmp_path_factory) -> Clip:
    return Clip(speak(TRANSCRIPT, tmp_path_factory.mktemp("clips") / "fox.wav"), TRANSCRIPT)


@pytest.fixture(scope="session")
def long_clip(tmp_path_factory) -> Path:
    """Over the server's reference limit (30 s today): 40 s of quiet noise, as FLAC."""
    path = tmp_path_factory.mktemp("clips") / "long.flac"
    noise = 0.05 * np.random.default_rng(0).standard_normal(40 * 16_000)
    soundfile.write(path, noise.astype(np.float32), 16_000)
    return path


class Gateway:
    """The gateway app under uvicorn in a thread, on a free port; always stopped."""

    def __init__(self, triton_grpc_url: str, **options):
        import uvicorn

        from csm_servers.gateway import create_app

        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(triton_grpc_url, **options), host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"gateway-{self.port}", daemon=True)

    def __enter__(self) -> Gateway:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def gateway(triton_server):
    with Gateway(triton_server.grpc_url, admin_token=ADMIN_TOKEN, api_keys=[GATEWAY_API_KEY]) as running:
        yield running
