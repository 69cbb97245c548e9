"""A CUDA error in csm_lm's engine no longer leaves a ready model that fails every batch:
the requests in flight are answered UNAVAILABLE (retry: the model is being reloaded)
and the stub exits, so the model supervisor reloads it on a fresh CUDA context.

No GPU here: a CUDA-style error is injected into the engine's frame step, and csm_lm's
model class runs against a fake triton_python_backend_utils (os._exit recorded, not
called)."""

from __future__ import annotations

import threading
import types
from unittest import mock

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.engine import EngineConfig, GenerationEngine
from csm_triton.triton import adapter
from csm_triton.triton.models import lm as lm_model

pytestmark = pytest.mark.security


class TritonError:
    INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"

    def __init__(self, message, code=INTERNAL):
        self.message, self.code = message, code


class Sender:
    def __init__(self):
        self.responses, self.done = [], threading.Event()

    def send(self, response=None, flags=0):
        self.responses.append(response)
        if flags:
            self.final = response
            self.done.set()

    def is_cancelled(self):
        return False


class Request:
    def __init__(self, inputs, request_id):
        self.inputs, self.id, self.sender = inputs, request_id, Sender()

    def request_id(self):
        return self.id

    def get_response_sender(self):
        return self.sender


FAKE_PB_UTILS = types.SimpleNamespace(
    TritonError=TritonError,
    TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
    Tensor=lambda name, value: (name, value),
    InferenceResponse=lambda output_tensors=None, error=None: types.SimpleNamespace(
        outputs=output_tensors, error=error
    ),
    get_input_tensor_by_name=lambda request, name: (
        types.SimpleNamespace(as_numpy=lambda: request.inputs[name]) if name in request.inputs else None
    ),
)


@pytest.fixture()
def model(lm, monkeypatch):
    """csm_lm's model class around a CPU engine, its metrics mocked, os._exit recorded."""
    monkeypatch.setattr(adapter, "pb_utils", FAKE_PB_UTILS)
    exits = []
    monkeypatch.setattr(lm_model.os, "_exit", exits.append)
    monkeypatch.setattr(lm_model.time, "sleep", lambda seconds: None)
    model = lm_model.LanguageModel()  # initialize() (the engine from a model directory) left out
    model.model_name = "csm_lm"
    for metric in ("time_to_first_frame", "audio_seconds", "generation_seconds", "last_rtf"):
        setattr(model, metric, mock.Mock())
    model._update_engine_metrics = lambda stats=None: None
    model.engine = GenerationEngine(lm, EngineConfig(max_slots=2, warm_up=False))
    model.engine.on_fatal = model._end_stub
    model.exits = exits
    yield model
    model.engine.stop()


def prompt_inputs(builder, text="Hello there.", frames=40):
    prompt = builder.prepare(text)
    return {
        "input_ids": np.asarray(prompt.input_ids, np.int64),
        "prompt_codes": np.asarray(prompt.audio_codes),
        "MAX_AUDIO_SECONDS": np.array([frames / C.FRAME_RATE_HZ], np.float32),
        "SEED": np.array([1], np.int64),
    }


def test_a_cuda_error_answers_the_requests_unavailable_then_ends_the_stub(model, builder):
    step = model.engine._launch_frame_step
    calls = [0]

    def breaks_on_the_third(slots):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return step(slots)

    model.engine._launch_frame_step = breaks_on_the_third
    requests = [Request(prompt_inputs(builder), f"r{i}") for i in range(3)]  # 2 in the batch, 1 waiting
    model.execute(requests)
    model.engine.start()
    for request in requests:
        assert request.sender.done.wait(60), "every request in flight gets its final response"
        # Told on a final response, not an error one: 2.51 never delivers an error response
        # sent after execute returned to a BLS caller (forward._lm_chunks raises UNAVAILABLE).
        final = request.sender.final
        assert final.error is None, final.error.message
        outputs = dict(final.outputs)
        assert outputs["finish_reason"][0] == b"device_failure"
        message = outputs["error"][0].decode()
        assert message.startswith("the generation device failed") and "retry" in message, message
    model.engine._thread.join(10)
    assert model.exits == [lm_model.DEVICE_FAILURE_EXIT_CODE], "the stub exits once, after answering"
    late = Request(prompt_inputs(builder), "late")  # between the failure and the exit
    model.execute([late])
    assert late.sender.final.error.code == TritonError.UNAVAILABLE


def test_a_bad_id_is_invalid_arg_before_the_engine_sees_it(model, builder):
    inputs = prompt_inputs(builder)
    inputs["input_ids"][3] = 4_000_000_000
    bad, good = Request(inputs, "bad"), Request(prompt_inputs(builder, frames=2), "good")
    model.execute([bad, good])
    assert bad.sender.final.error.code == TritonError.INVALID_ARG
    assert (
        f"input 'input_ids' must lie in [0, {model.engine.lm.text_vocab_size}), got 4000000000 at position 3"
        in bad.sender.final.error.message
    )
    model.engine.start()
    assert good.sender.done.wait(60) and good.sender.final.error is None, "its batch mate is served"
    assert model.exits == []
