"""The one module of BLS calls: every request one of our models sends another model of
the same server, as `forward_<model>` functions of plain numpy (the calls themselves,
their deadlines and their errors are adapter.call_model / stream_model's).

csm_tts_stream's pipeline stages, csm_generate's whole generations and the voice
models' encoder all come from here, so a model module never imports another's.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from csm_triton import constants as C
from csm_triton.core import validation
from csm_triton.core.prepare_request import CLIENT_INPUTS
from csm_triton.core.segments import SEGMENT_OUTPUTS
from csm_triton.triton import adapter as triton
from csm_triton.triton.calls import ModelCallError, ModelUnavailable, server_stopping

__all__ = [
    "PREPARE_INPUTS",
    "cancel_lm_request",
    "forward_lm",
    "forward_lm_whole",
    "forward_mimi_decoder",
    "forward_mimi_encoder",
    "forward_prepare",
    "forward_watermark",
]

PREPARE_INPUTS = CLIENT_INPUTS  # what csm_tts_stream forwards of its request to csm_prepare
PREPARE_OUTPUTS = (
    "input_ids",
    "prompt_codes",
    *SEGMENT_OUTPUTS,
    "normalized_text",
    "rest_pieces",
    "rest_spoken_pieces",
)
LM_OUTPUTS = ["codes", "finish_reason", "error"]
# csm_lm's failures, told on its final response: the server's (retry elsewhere) and its own.
LM_UNAVAILABLE_REASONS = ("shutdown", "device_failure")


def forward_prepare(prepare_inputs):
    return triton.call_model("csm_prepare", prepare_inputs, list(PREPARE_OUTPUTS))


def _lm_chunks(lm_inputs, request_id: str = "") -> Iterator[np.ndarray]:
    """csm_lm's code chunks; returns (StopIteration's value) its finish reason."""
    reason = None
    for chunk in triton.stream_model("csm_lm", lm_inputs, LM_OUTPUTS, request_id=request_id):
        if "codes" in chunk:
            yield chunk["codes"]
        if "finish_reason" in chunk:  # on csm_lm's final response
            reason = validation.decode_utf8(chunk["finish_reason"], "finish_reason")[0]
            if "error" in chunk:
                message = validation.decode_utf8(chunk["error"], "error")[0]
                error_type = ModelUnavailable if reason in LM_UNAVAILABLE_REASONS else ModelCallError
                failure = error_type(f"csm_lm: {message}")
                failure.generation_ended = True  # nothing left to cancel (stream_pipeline)
                raise failure
    return reason


def forward_lm(lm_inputs, stream_id: str):
    """csm_lm's code chunks as they come; returns (StopIteration's value) its finish
    reason. The stream id is csm_lm's request id, so that a cancel request can name it."""
    return _lm_chunks(lm_inputs, stream_id)


def forward_lm_whole(lm_inputs) -> tuple[np.ndarray, str | None]:
    """One csm_lm generation, whole: its codes and its finish reason."""
    chunks = _lm_chunks(lm_inputs)
    generated = []
    while True:
        try:
            generated.append(next(chunks))
        except StopIteration as stop:
            reason = stop.value
            break
    codes = np.concatenate(generated) if generated else np.zeros((0, C.NUM_CODEBOOKS), np.int64)
    return codes, reason


def cancel_lm_request(stream_id: str) -> None:
    # csm_lm cannot see that its BLS caller stopped reading (a decoupled BLS request
    # cannot be cancelled in Triton 2.51), so it is asked to free the slot. Not on a
    # stop: csm_lm then ends every stream itself, and a new call would be one more BLS
    # request in flight while Triton unloads.
    if server_stopping(0.0):
        return
    request = {"cancel_request_id": np.array([stream_id.encode()], dtype=object)}
    for _ in triton.stream_model("csm_lm", request, ["cancelled"]):
        pass


def forward_mimi_decoder(codes: np.ndarray) -> np.ndarray:
    """Codes [frames, 32] -> 24 kHz float32 [samples], through `mimi_decoder`."""
    audio = triton.call_model("mimi_decoder", {"audio_codes": np.ascontiguousarray(codes.T[None])}, ["audio_values"])[
        "audio_values"
    ]
    return audio[0, 0]


def forward_mimi_encoder(audio: np.ndarray) -> np.ndarray:
    """24 kHz float32 [samples] -> Mimi codes [frames, 32] int64, through `mimi_encoder`."""
    outputs = triton.call_model("mimi_encoder", {"input_values": audio[None, None]}, ["audio_codes"])
    return outputs["audio_codes"][0].T  # [1, 32, frames] -> [frames, 32]


def forward_watermark(audio: np.ndarray) -> np.ndarray:
    return triton.call_model("watermark", {"audio_values": audio[None, None]}, ["AUDIO"])["AUDIO"]
