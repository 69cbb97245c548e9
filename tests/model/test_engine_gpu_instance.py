"""The engine on a GPU as a Triton model instance meets it (`pytest -m gpu`; skipped
without CUDA): an instance on a second GPU while the process's current device is GPU 0,
a real device-side error and what the engine's fault classifier makes of it, and seeded
sampling as docs/api.md ("Seeds and determinism") states it for a GPU.

`loadtest.gpu_check` runs this file with test_engine_gpu.py; figures go to the same
report (the gpu_report fixture, tests/model/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from csm_triton import constants as C
from csm_triton.engine import CsmLM, EngineConfig, GenerationEngine, GenerationRequest
from export.tiny_checkpoint import TOKENIZER_VOCAB_SIZE
from tests.model.test_engine_gpu import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]

ROOT = Path(__file__).resolve().parents[2]
NO_AUDIO = np.zeros((0, C.NUM_CODEBOOKS), np.int64)


def greedy(prompt: np.ndarray, frames: int) -> GenerationRequest:
    return GenerationRequest(prompt, NO_AUDIO, max_frames=frames, greedy=True)


# --- an instance on cuda:1 -------------------------------------------------------------------
def served_codes(tiny_checkpoint, device: str, prompts: list[np.ndarray], frames: int) -> list[np.ndarray]:
    """The codes an instance on `device` serves, loaded and started as csm_lm's initialize
    does it (warm-up captures on this thread) and stepped by the engine thread."""
    lm = CsmLM.from_checkpoint(tiny_checkpoint, device=device, dtype=torch.bfloat16)
    engine = GenerationEngine(lm, EngineConfig(max_slots=len(prompts), max_context=256))
    engine.start()
    try:
        handles = [engine.submit(greedy(prompt, frames)) for prompt in prompts]
        return [handle.result(timeout=120).codes for handle in handles]
    finally:
        engine.stop()
        del engine, lm
        torch.cuda.empty_cache()


def test_an_instance_on_the_second_gpu_serves_what_one_on_the_first_serves(tiny_checkpoint):
    """Triton starts one instance per GPU in one process whose current device is GPU 0:
    work an instance on cuda:1 launched on GPU 0's streams would not be in its graphs,
    which would replay nothing, leave the codes zero and end every request at frame 0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU: an instance on cuda:1 needs a second")
    if torch.cuda.get_device_name(0) != torch.cuda.get_device_name(1):
        pytest.skip("two GPU models: their kernels may round differently, so codes may differ")
    torch.cuda.set_device(0)
    prompts = random_prompts(TOKENIZER_VOCAB_SIZE, [40, 60, 80, 100])
    first = served_codes(tiny_checkpoint, "cuda:0", prompts, 16)
    second = served_codes(tiny_checkpoint, "cuda:1", prompts, 16)
    assert torch.cuda.current_device() == 0, "loading an instance on cuda:1 left cuda:1 current for the caller"
    for index, (a, b) in enumerate(zip(first, second)):
        assert len(b) and b.any(), f"request {index}: no codes on cuda:1"
        # The same GPU model, kernels and shapes on both: greedy codes equal bit for bit.
        np.testing.assert_array_equal(b, a, err_msg=f"request {index}: cuda:1 differs from cuda:0")


# --- a real device-side error ----------------------------------------------------------------
# In its own process: a device-side assert breaks the CUDA context for the rest of the
# process, so it would fail every later GPU test here. An out-of-range index read as the
# engine reads embeddings (a tensor indexed by a CUDA index tensor); then an ordinary
# kernel, which the broken context fails too. Prints what torch raised and the verdict.
DEVICE_ERROR_PROBE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from csm_triton.engine.faults import is_fatal_device_error

    def attempt(work):
        try:
            work()
            torch.cuda.synchronize()
        except Exception as error:
            return {
                "raised": True,
                "type": f"{type(error).__module__}.{type(error).__qualname__}",
                "is_runtime_error": isinstance(error, RuntimeError),
                "message": str(error)[:800],
                "fatal": is_fatal_device_error(error),
            }
        return {"raised": False}

    table = torch.zeros(16, 8, device="cuda")
    index = torch.tensor([1, 5_000_000], device="cuda")
    out_of_range = attempt(lambda: table[index].sum().item())
    later = attempt(lambda: (torch.ones(4, device="cuda") * 2).sum().item())
    print(json.dumps({"torch": torch.__version__, "out_of_range": out_of_range, "later": later}))
    sys.stdout.flush()
    os._exit(0)  # no teardown on a broken context (freeing may raise again)
    """
)


def test_a_real_device_side_assert_is_judged_fatal_by_the_engine(gpu_report):
    """engine.faults decides on the error text and type; this checks them against what
    this torch raises for a real device-side assert (not a hand-made RuntimeError)."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT), *filter(None, [environment.get("PYTHONPATH")])]
    )
    environment.pop("CUDA_LAUNCH_BLOCKING", None)  # raised where the engine meets it: at the next sync
    run = subprocess.run(
        [sys.executable, "-c", DEVICE_ERROR_PROBE],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = run.stdout.strip().splitlines()
    assert lines, f"the probe printed nothing (exit {run.returncode}): {run.stderr[-3000:]}"
    verdicts = json.loads(lines[-1])
    gpu_report["device_error"] = verdicts
    print(json.dumps(verdicts, indent=2))
    first, later = verdicts["out_of_range"], verdicts["later"]
    assert first["raised"], "an out-of-range index on CUDA raised nothing"
    assert first["fatal"], f"the engine would serve on after {first['type']}: {first['message']}"
    # The premise of ending the stub: the context stays broken for every later kernel.
    assert later["raised"], "a kernel after the device-side assert ran: the context was not sticky-broken"
    assert later["fatal"], f"the error of the broken context is not judged fatal: {later['type']}: {later['message']}"


# --- seeds -----------------------------------------------------------------------------------
SEED_BATCH = 32
SEED_FRAMES = 16


def sampled(prompt: np.ndarray, seed: int) -> GenerationRequest:
    # The default temperature and top-k: what a client that sends only a seed gets.
    return GenerationRequest(prompt, NO_AUDIO, max_frames=SEED_FRAMES, seed=seed)


def test_a_seeded_request_repeats_alone_and_its_codes_in_a_batch_are_measured(tiny_checkpoint, gpu_report):
    """docs/api.md: on a GPU the logits depend on the batch bucket (cuBLAS tiling, bf16
    rounding), so a seeded request is promised to repeat only in the same bucket, e.g.
    alone on an idle server. Asserted: alone twice gives the same codes (the same captured
    graph replayed: the same kernels on the same shapes, one stream, which cuBLAS documents
    as bit-wise repeatable for one toolkit on one GPU model). Measured, not asserted:
    whether a batch of 32 gives them too."""
    lm = CsmLM.from_checkpoint(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    engine = GenerationEngine(lm, EngineConfig(max_slots=SEED_BATCH, max_context=256, max_prefills_per_step=SEED_BATCH))
    prompts = random_prompts(TOKENIZER_VOCAB_SIZE, [40 + 2 * index for index in range(SEED_BATCH)], seed=1)

    def run(count: int) -> list[np.ndarray]:
        # All admitted in the first step: the request runs in the batch from its first frame.
        handles = [engine.submit(sampled(prompt, 1234 + index)) for index, prompt in enumerate(prompts[:count])]
        engine.run_until_idle()
        return [handle.result().codes for handle in handles]

    alone = run(1)[0]
    again = run(1)[0]
    in_batch = run(SEED_BATCH)[0]
    assert len(alone), "the seeded request produced no frame"
    np.testing.assert_array_equal(again, alone, err_msg="a seeded request alone did not repeat on this GPU")
    frames = min(len(alone), len(in_batch))
    differing = np.flatnonzero((alone[:frames] != in_batch[:frames]).any(axis=1))
    # The first frame that differs (a shorter run's end counts: one ended where the other did not).
    first_difference = int(differing[0]) if len(differing) else None if len(alone) == len(in_batch) else frames
    gpu_report["seeded_sampling"] = {
        "batch": SEED_BATCH,
        "frames": SEED_FRAMES,
        "alone_repeats": True,
        "in_batch_equals_alone": first_difference is None,
        "first_different_frame_in_batch": first_difference,
    }
    in_batch_says = "the same codes" if first_difference is None else f"other codes from frame {first_difference}"
    print(
        f"seeded request on {torch.cuda.get_device_name()}: repeats alone; in a batch of {SEED_BATCH}: {in_batch_says}"
    )
