"""csm_tts_stream: the streaming twin of csm_tts (decoupled, BLS).

The work of one stream (csm_prepare, codes streamed from csm_lm, each chunk decoded
through mimi_decoder with left context, watermarked and sent as soon as it is ready)
is csm_triton.core.stream_pipeline.StreamPipeline; this module gives it its stages as
BLS calls and runs it on a worker thread per request. It also keeps the tails of texts
that arrive in pieces (CONTINUE_FROM / CONTINUATION, core.continuation): in this
process, which is why the model has one instance.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from csm_triton import constants as C
from csm_triton.core import validation
from csm_triton.core.continuation import DEFAULT_MAX_ENTRIES, DEFAULT_TTL_S, ContinuationStore
from csm_triton.core.segments import FINISH_REASONS, SEGMENTS_METRIC
from csm_triton.core.stream_pipeline import StreamPipeline
from csm_triton.errors import InvalidInput
from csm_triton.triton import adapter as triton
from csm_triton.triton.forward import (
    PREPARE_INPUTS,
    cancel_lm_request,
    forward_lm,
    forward_mimi_decoder,
    forward_prepare,
    forward_watermark,
)


class StreamingModel(triton.DecoupledModel):
    def initialize_model(self, args, model_config):
        parameters = self.parameters
        # The family must outlive its metrics: kept on the model.
        self.metrics = triton.Metrics(self.model_name)
        self.segments_total = self.metrics.labelled_counters(*SEGMENTS_METRIC, "reason", FINISH_REASONS)
        self.pipeline = StreamPipeline(
            prepare=forward_prepare,
            generate=forward_lm,
            decode=forward_mimi_decoder,
            watermark=forward_watermark,
            cancel_generation=cancel_lm_request,
            first_chunk_frames=parameters.integer("first_chunk_frames", C.STREAM_FIRST_CHUNK_FRAMES, minimum=1),
            chunk_frames=parameters.integer("chunk_frames", C.STREAM_CHUNK_FRAMES, minimum=1),
            left_context_frames=parameters.integer("left_context_frames", C.STREAM_LEFT_CONTEXT_FRAMES, minimum=0),
            log_error=triton.log_error,
            segments_ended=self.segments_total.count,
            continuations=ContinuationStore(
                parameters.integer("max_continuations", DEFAULT_MAX_ENTRIES, minimum=1),
                parameters.number("continuation_ttl_s", DEFAULT_TTL_S, minimum=1.0, maximum=3600.0),
            ),
        )
        self.workers = ThreadPoolExecutor(
            parameters.integer("max_concurrent_streams", 256, minimum=1), thread_name_prefix="csm-stream"
        )

    def start(self, request, sender):
        # Refused before the stream starts: what is cheap to tell. TEXT is only checked
        # for presence (config.pbtxt requires it too, but a missing one must never become
        # an error mid-stream); csm_prepare validates its content and the voice, and its
        # InvalidInput still reaches the client as a client error.
        prepare_inputs = triton.present_inputs(request, PREPARE_INPUTS)
        if "TEXT" not in prepare_inputs:
            raise InvalidInput("missing required input 'TEXT'")
        sampling = triton.present_inputs(request, validation.SAMPLING_INPUTS)
        validation.sampling_from_inputs(sampling)
        continue_from = validation.single_string(
            triton.input_texts(request, "CONTINUE_FROM", required=False), "CONTINUE_FROM", required=False
        )
        if continue_from is not None:  # a piece of a longer text: every segment budgeted as a long text's
            prepare_inputs["budget_every_segment"] = np.array([True])
        self.workers.submit(self.pipeline.run, prepare_inputs, sampling, sender, None, continue_from)

    def finalize(self):
        self.workers.shutdown(wait=True, cancel_futures=True)
        self.pipeline.rest_workers.shutdown(wait=False, cancel_futures=True)
