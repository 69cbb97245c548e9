"""csm_generate: the offline generation step of the csm_tts ensemble.

An ensemble that contains a decoupled step becomes decoupled itself and loses plain
HTTP /infer, so this non-decoupled step drives the decoupled csm_lm through BLS and
returns the whole utterance's codes in one response, shaped for mimi_decoder.

A long TEXT arrives from csm_prepare as segments (core.segments.SegmentChain): each is
generated in turn with the previous segment's codes as context, and the codes are
joined, so the ensemble's one mimi_decoder call decodes the whole without seams. How
each segment ended (csm_lm's finish reason, told apart from the client's cap) and its
frame count leave as `finish_reasons` / `segment_frames`, csm_tts's FINISH_REASONS and
SEGMENT_FRAMES.
"""

from __future__ import annotations

import numpy as np

from csm_triton import constants as C
from csm_triton.core import segments, validation
from csm_triton.errors import InvalidInput
from csm_triton.triton import adapter as triton
from csm_triton.triton.forward import forward_lm_whole


def lm_inputs(request) -> dict[str, np.ndarray]:
    """csm_lm's inputs from this request: the prompt and whichever sampling inputs came,
    checked here first so that a bad value is the caller's error, not a failed call."""
    inputs = {name: triton.input_array(request, name) for name in ("input_ids", "prompt_codes")}
    inputs.update(triton.present_inputs(request, segments.SEGMENT_OUTPUTS))
    inputs.update(triton.present_inputs(request, validation.SAMPLING_INPUTS))
    validation.sampling_from_inputs(inputs)
    return inputs


class GenerateModel(triton.PythonModel):
    def initialize_model(self, args, model_config):
        # The family must outlive its metrics: kept on the model. Every instance adds to
        # the same series (Triton counts the references).
        self.metrics = triton.Metrics(self.model_name)
        self.segments_total = self.metrics.labelled_counters(
            *segments.SEGMENTS_METRIC, "reason", segments.FINISH_REASONS
        )

    def handle(self, request):
        inputs = lm_inputs(request)
        sampling = {name: inputs[name] for name in validation.SAMPLING_INPUTS if name in inputs}
        max_frames = validation.sampling_from_inputs(sampling).max_frames
        chain = segments.SegmentChain.from_prepared(inputs)
        generated = []

        def generate(index: int, lm_request) -> tuple[np.ndarray, str | None]:
            codes, reason = forward_lm_whole(lm_request)
            generated.append(codes)
            if sum(map(len, generated)) > C.MAX_CODEC_FRAMES:  # mimi_decoder's limit: one response holds no more
                raise InvalidInput(
                    f"the text makes more than {C.MAX_CODEC_SECONDS:g} s of audio, the most csm_tts returns "
                    "in one response; use csm_tts_stream for longer texts"
                )
            return codes, reason

        chain.speak(sampling, max_frames, generate)
        codes = np.concatenate(generated)
        if not len(codes):
            raise RuntimeError("the model ended the utterance before producing any audio")
        self.segments_total.count(chain.finish_reasons())
        final = chain.final_outputs()
        return {
            "audio_codes": np.ascontiguousarray(codes.T[None]),  # [1, 32, frames]
            "finish_reasons": final["FINISH_REASONS"],
            "segment_frames": final["SEGMENT_FRAMES"],
            "segment_times": final["SEGMENT_TIMES"],
        }
