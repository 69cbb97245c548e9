"""A fine-tuned voice, served: train a LoRA adapter on espeak-ng speech, merge it, build a
repository from the merged checkpoint exactly as `make repository` does, and have a real
tritonserver answer csm_tts with it (no reference clip: the trained speaker 0)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.serving.process import TritonServer

pytestmark = [pytest.mark.integration, pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")]
SENTENCES = (
    "Hello there.",
    "How are you today?",
    "Good morning.",
    "See you soon.",
    "Thank you kindly.",
    "The fox jumps.",
    "It might rain.",
    "Nine o'clock.",
    "Where is the station?",
    "One, two, three.",
)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def merged_checkpoint(tiny_checkpoint, tmp_path_factory):
    from finetune.train import parse_args, train

    root = tmp_path_factory.mktemp("finetune-serving")
    data = root / "speech"
    data.mkdir()
    for index, sentence in enumerate(SENTENCES):
        subprocess.run(["espeak-ng", "-v", "en+f3", "-w", str(data / f"{index:02d}.wav"), sentence], check=True)
        (data / f"{index:02d}.txt").write_text(sentence)
    args = parse_args(
        [
            "--data",
            str(data),
            "--out",
            str(root / "run"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--cache-dir",
            str(root / "cache"),
            "--steps",
            "6",
            "--grad-accum",
            "1",
            "--lr",
            "5e-3",
            "--eval-every",
            "6",
            "--merge",
            "--no-progress",
            "--threads",
            "2",
        ]
    )
    args.quiet = True
    train(args)
    return root / "run" / "merged"


def test_merged_checkpoint_builds_and_csm_tts_speaks_with_it(merged_checkpoint, tiny_checkpoint, tmp_path):
    import tritonclient.http as http

    from export.build_repository import build_repository

    repository = build_repository(str(merged_checkpoint), "cpu", tmp_path / "model_repository")
    served_weights = repository / "csm_lm" / "1" / "checkpoint" / "model.safetensors"
    assert _sha256(served_weights) == _sha256(merged_checkpoint / "model.safetensors")
    assert _sha256(served_weights) != _sha256(tiny_checkpoint / "model.safetensors")

    models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    server = TritonServer(
        repository,
        load_models=models,
        strict_readiness=False,
        ready_models=models,
        log_path=tmp_path / "tritonserver.log",
        environment={"CSM_ADMIN_TOKEN": "finetune-test"},
    )
    with server:
        client = http.InferenceServerClient(server.http_url)
        inputs = []
        for name, value, dtype in (
            ("TEXT", np.array([b"Hello from the fine-tuned voice."], dtype=object), "BYTES"),
            ("MAX_AUDIO_SECONDS", np.array([1.0], np.float32), "FP32"),
            ("SEED", np.array([3], np.int64), "INT64"),
        ):
            item = http.InferInput(name, list(value.shape), dtype)
            item.set_data_from_numpy(value)
            inputs.append(item)
        result = client.infer("csm_tts", inputs)
        audio = result.as_numpy("AUDIO")
        client.close()
    frames = int(np.ceil(1.0 * C.FRAME_RATE_HZ))
    assert audio.shape == (frames * C.SAMPLES_PER_FRAME,) and np.isfinite(audio).all() and np.abs(audio).max() > 0
    assert int(result.as_numpy("SAMPLE_RATE")[0]) == C.SAMPLE_RATE
