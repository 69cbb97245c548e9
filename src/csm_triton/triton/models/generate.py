"""csm_generate: the offline generation step of the csm_tts ensemble.

An ensemble that contains a decoupled step becomes decoupled itself and loses plain
HTTP /infer, so this non-decoupled step drives the decoupled csm_lm through BLS and
returns the whole utterance's codes in one response, shaped for mimi_decoder.
"""

from __future__ import annotations

import numpy as np

from csm_triton.triton import adapter as triton
from csm_triton.core import validation

LM_MODEL = "csm_lm"


def lm_inputs(request) -> dict[str, np.ndarray]:
    """csm_lm's inputs from this request: the prompt and whichever sampling inputs came,
    checked here first so that a bad value is the caller's error, not a failed call."""
    inputs = {name: triton.input_array(request, name) for name in ("input_ids", "prompt_codes")}
    inputs.update(triton.present_inputs(request, validation.SAMPLING_INPUTS))
    validation.sampling_from_inputs(inputs)
    return inputs


class GenerateModel(triton.PythonModel):
    def initialize_model(self, args, model_config):
        pass

    def handle(self, request):
        chunks = [out["codes"] for out in triton.stream_model(LM_MODEL, lm_inputs(request), ["codes"])]
        codes = np.concatenate(chunks) if chunks else np.zeros((0, 32), np.int64)
        if not len(codes):
            raise RuntimeError("the model ended the utterance before producing any audio")
        return {"audio_codes": np.ascontiguousarray(codes.T[None])}  # [1, 32, frames]
