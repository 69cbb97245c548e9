"""Shared fixtures: the tiny random CSM checkpoint (single-file and sharded), built once per test session, and the real tritonserver the integration and security suites share."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton (the frame step's fused kernels, tests/model/test_triton_kernels.py)
# can only run in its interpreter, and that is chosen once, when Triton is first imported:
# set it before any test module imports something that imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from csm_triton.serving.process import TritonServer, free_ports


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    # Imported here: torch and transformers take seconds, and many tests need neither.
    from export.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-csm") / "checkpoint", seed=0)


@pytest.fixture(scope="session")
def sharded_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint re-saved in the real model's sharded layout
    (model.safetensors.index.json + several model-0000X-of-0000N.safetensors)."""
    from transformers import CsmForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny-csm-sharded") / "checkpoint"
    CsmForConditionalGeneration.from_pretrained(tiny_checkpoint).save_pretrained(folder, max_shard_size="10MB")
    for source in tiny_checkpoint.iterdir():  # tokenizer, processor, chat template
        if not (folder / source.name).exists() and not source.name.startswith("model"):
            (folder / source.name).symlink_to(source)
    return folder


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    """The engine's language model over the tiny checkpoint, on the CPU (fp32)."""
    from csm_triton.engine import CsmLM

    return CsmLM.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def builder(tiny_checkpoint):
    """csm_prepare's prompt builder over the tiny checkpoint's tokenizer."""
    from csm_triton.core.prompt import PromptBuilder

    return PromptBuilder(tiny_checkpoint)


# --- one real tritonserver, shared by tests/integration and tests/security -------------------
# It serves every model of a repository built from the tiny checkpoint exactly as `make serve`
# builds it (cpu profile); models added to `model_repository/` are served here without changes.
BROKEN_MODEL = "broken_codec"
ADMIN_TOKEN = "integration-test-token"


@pytest.fixture(scope="session")
def model_repository(tiny_checkpoint, tmp_path_factory):
    from export.build_repository import build_repository

    return build_repository(str(tiny_checkpoint), "cpu", tmp_path_factory.mktemp("repo") / "model_repository")


@pytest.fixture(scope="session")
def served_models(model_repository):
    return sorted(p.name for p in model_repository.iterdir() if (p / "config.pbtxt").is_file())


@pytest.fixture(scope="session")
def served_repository(model_repository, tmp_path_factory):
    # A copy, so tests may add models (a broken one) without touching the built one.
    served = tmp_path_factory.mktemp("served") / "repository"
    shutil.copytree(model_repository, served)
    return served


@pytest.fixture(scope="session")
def triton_server(served_repository, served_models, tmp_path_factory):
    server = TritonServer(
        served_repository,
        load_models=served_models,
        strict_readiness=False,  # a failed load on purpose must not make the server "unready"
        ready_models=served_models,
        log_path=tmp_path_factory.mktemp("logs") / "tritonserver.log",
        environment={"CSM_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def http_client(triton_server):
    import tritonclient.http as http

    client = http.InferenceServerClient(triton_server.http_url, concurrency=8)
    yield client
    client.close()


@pytest.fixture(scope="session")
def grpc_client(triton_server):
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(triton_server.grpc_url)
    yield client
    client.close()


@pytest.fixture()
def broken_model(served_repository):
    """A codec model whose ONNX file is missing, placed beside the served ones."""
    target = served_repository / BROKEN_MODEL
    (target / "1").mkdir(parents=True, exist_ok=True)
    text = (served_repository / "mimi_decoder" / "config.pbtxt").read_text()
    (target / "config.pbtxt").write_text(text.replace('name: "mimi_decoder"', f'name: "{BROKEN_MODEL}"'))
    yield BROKEN_MODEL
    shutil.rmtree(target, ignore_errors=True)


@contextlib.contextmanager
def kserve_front_process(triton_http: str, *options: str, log_path: Path | None = None):
    """`python -m csm_servers.gateway.kserve_front` on a free port, as a deployment runs it;
    yields its URL once /v2/health/live answers (whatever Triton's state), stops it after."""
    port = free_ports(1)[0]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "csm_servers.gateway.kserve_front",
            "--triton-http",
            triton_http,
            "--port",
            str(port),
            *options,
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/v2/health/live", timeout=1)
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline, "the front did not start"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        if log_path:
            log.close()
