"""A CUDA error in a served csm_lm, end to end: the stream in flight is answered
UNAVAILABLE, the stub ends, csm_lm reports not ready while the model supervisor reloads
it, and the reloaded model serves again. `python -m csm_triton.serving serve` as `make
serve` runs it, on free ports.

No GPU here: the copied repository's csm_lm/1/model.py is the real model class whose
engine raises what torch raises after a device-side assert, once (a marker file keeps
the reloaded model healthy). Everything else is the shipped code."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import tritonclient.http as httpclient

from tests.security.serve_process import Serve
from tests.security.test_server_shutdown import Stream

pytestmark = pytest.mark.security

START_TIMEOUT_S = 240
RELOADED_WITHIN_S = 120

FAULTY_LM = '''from pathlib import Path

from csm_triton.triton.models.lm import LanguageModel

MARKER = Path({marker!r})


class TritonPythonModel(LanguageModel):
    """csm_lm whose first frame step after the marker's absence fails as a broken CUDA context does."""

    def initialize_model(self, args, model_config):
        super().initialize_model(args, model_config)
        frame_step = self.engine._launch_frame_step

        def failing(slots):
            if not MARKER.exists():
                MARKER.write_text("injected")
                raise RuntimeError("CUDA error: device-side assert triggered")
            return frame_step(slots)

        self.engine._launch_frame_step = failing
'''


@pytest.mark.timeout(600)
def test_a_device_error_answers_unavailable_then_the_model_is_not_ready_until_reloaded(model_repository, tmp_path):
    repository = tmp_path / "model_repository"
    shutil.copytree(model_repository, repository)
    marker = tmp_path / "fault-injected"
    (repository / "csm_lm" / "1" / "model.py").write_text(FAULTY_LM.format(marker=str(marker)))
    models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    serve = Serve(repository, tmp_path / "serve.log", ["--supervise-interval", "1"])
    readiness: list[tuple[float, bool]] = []
    watching = threading.Event()
    try:
        serve.wait_ready(models, START_TIMEOUT_S)
        marker.unlink(missing_ok=True)  # (the warm-up runs no frame step on the CPU; to be sure)

        def watch() -> None:
            client = httpclient.InferenceServerClient(serve.http_url, connection_timeout=1.0, network_timeout=2.0)
            try:
                while watching.is_set():
                    try:
                        readiness.append((time.monotonic(), client.is_model_ready("csm_lm")))
                    except Exception:  # noqa: BLE001 - a refused poll is "not ready" too
                        readiness.append((time.monotonic(), False))
                    time.sleep(0.05)
            finally:
                client.close()

        watching.set()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        failed = Stream(serve.grpc_url, seconds=5.0)
        assert failed.ended.wait(60), "the stream hit by the device error never ended"
        assert marker.exists(), "the fault was never injected"
        kind, message = failed.outcome
        assert kind == "error" and "unavailable" in message.lower() and "device failed" in message, failed.outcome

        deadline = time.monotonic() + RELOADED_WITHIN_S
        while time.monotonic() < deadline:
            went_down = any(not ready for _, ready in readiness)
            if went_down and readiness[-1][1]:
                break
            time.sleep(0.2)
        watching.clear()
        watcher.join(5)
        down = [t for t, ready in readiness if not ready]
        assert down, "csm_lm never reported not ready after its device failed"
        assert readiness[-1][1], f"csm_lm not ready again within {RELOADED_WITHIN_S} s\n{serve.log()[-3000:]}"
        print(f"\n[device failure] csm_lm not ready for {down[-1] - down[0]:.1f} s, then reloaded", flush=True)

        serve.wait_ready(models, RELOADED_WITHIN_S)  # the models reloaded with it (the ensembles over csm_lm)
        served = Stream(serve.grpc_url, seconds=2.0)
        assert served.ended.wait(120) and served.outcome[0] == "done" and served.outcome[1] > 0, served.outcome
        log = serve.log()
        assert "device failure, the engine stops" in log and "model csm_lm recovered" in log, log[-3000:]
    finally:
        watching.clear()
        serve.close()
