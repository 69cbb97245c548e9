"""csm_tts_stream: the streaming twin of csm_tts (decoupled, BLS).

Per request, a worker thread runs csm_prepare, streams codes from csm_lm, decodes
each chunk through mimi_decoder with left context (csm_triton.core.stream_decoder), watermarks
it, and sends it as soon as it is ready: a small first chunk (time to first audio),
then larger ones. A client that goes away stops the worker and frees its KV slot.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from csm_triton import constants as C
from csm_triton.triton import adapter as triton
from csm_triton.core import validation
from csm_triton.core.stream_decoder import StreamDecoder

PREPARE_INPUTS = ("TEXT", "VOICE_ID", "REFERENCE_AUDIO", "REFERENCE_SAMPLE_RATE", "REFERENCE_TEXT")
SAMPLE_RATE = np.array([C.SAMPLE_RATE], dtype=np.int32)


def decode_with_mimi(codes: np.ndarray) -> np.ndarray:
    audio = triton.call_model("mimi_decoder", {"audio_codes": np.ascontiguousarray(codes.T[None])},
                              ["audio_values"])["audio_values"]
    return audio[0, 0]


def watermark(audio: np.ndarray) -> np.ndarray:
    return triton.call_model("watermark", {"audio_values": audio[None, None]}, ["AUDIO"])["AUDIO"]


class StreamingModel(triton.DecoupledModel):
    def initialize_model(self, args, model_config):
        parameters = self.parameters
        self.first_chunk_frames = parameters.integer("first_chunk_frames", C.STREAM_FIRST_CHUNK_FRAMES, minimum=1)
        self.chunk_frames = parameters.integer("chunk_frames", C.STREAM_CHUNK_FRAMES, minimum=1)
        self.context_frames = parameters.integer("left_context_frames", C.STREAM_LEFT_CONTEXT_FRAMES, minimum=0)
        self.workers = ThreadPoolExecutor(parameters.integer("max_concurrent_streams", 256, minimum=1),
                                          thread_name_prefix="csm-stream")

    def start(self, request, sender):
        if triton.input_array(request, "TEXT", required=False) is None:
            raise validation.InvalidInput("missing required input 'TEXT'")
        prepare_inputs = triton.present_inputs(request, PREPARE_INPUTS)
        sampling = triton.present_inputs(request, validation.SAMPLING_INPUTS)
        validation.sampling_from_inputs(sampling)
        self.workers.submit(self._stream, prepare_inputs, sampling, sender)

    def _stream(self, prepare_inputs, sampling, sender) -> None:
        stream_id = f"csm-stream-{uuid.uuid4().hex}"
        finished = False
        try:
            prompt = triton.call_model("csm_prepare", prepare_inputs, ["input_ids", "prompt_codes"])
            lm_inputs = {
                **prompt, **sampling,
                "first_chunk_frames": np.array([self.first_chunk_frames], np.int32),
                "chunk_frames": np.array([self.chunk_frames], np.int32),
            }
            decoder = StreamDecoder(decode_with_mimi, self.context_frames)
            for chunk in triton.stream_model("csm_lm", lm_inputs, ["codes"], request_id=stream_id):
                if sender.is_cancelled():
                    break
                sender.send({"AUDIO": watermark(decoder.push(chunk["codes"])), "SAMPLE_RATE": SAMPLE_RATE})
            else:
                finished = True
                sender.finish()
        except Exception as error:  # noqa: BLE001 - every failure ends the stream with a message
            sender.fail(error)
        finally:
            if not finished:
                self._cancel_generation(stream_id)
                sender.finish()

    @staticmethod
    def _cancel_generation(stream_id: str) -> None:
        try:
            for _ in triton.stream_model("csm_lm", {"cancel_request_id": np.array([stream_id.encode()], dtype=object)},
                                         ["cancelled"]):
                pass
        except Exception as error:  # noqa: BLE001 - best effort; the frame cap ends it anyway
            triton.log_error(f"csm_tts_stream: could not cancel {stream_id}: {error}")

    def finalize(self):
        self.workers.shutdown(wait=True, cancel_futures=True)
