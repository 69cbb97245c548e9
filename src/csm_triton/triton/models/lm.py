"""csm_lm: the decoupled Triton model around the generation engine.

One engine (one thread, in-flight batching over KV slots) per model instance;
`execute` only validates and enqueues. Each request's frames come back through its
response sender as chunks of codes; the final flag is always sent (error, cancel,
shutdown included). A client that goes away is noticed within a few frames and its
slot freed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch

from csm_triton import constants as C
from csm_triton.triton import adapter as triton
from csm_triton.core import validation
from csm_triton.engine import CsmLM, EngineConfig, FinishReason, FrameChunk, GenerationEngine, GenerationRequest
from csm_triton.engine.kernels import MODES as CPU_KERNEL_MODES
from csm_triton.errors import InvalidInput
from csm_triton.triton.parameters import Parameters, instance_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# From a warm GPU engine with a cached voice (tens of ms) to a long queue or a CPU.
TIME_TO_FIRST_FRAME_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


def engine_from_config(model_dir: Path, parameters: Parameters, device: str) -> GenerationEngine:
    dtype_name = parameters.choice("dtype", ("auto", *DTYPES), "auto")
    dtype = DTYPES.get(dtype_name)  # None: bf16 on GPU, fp32 on CPU
    checkpoint = model_dir / parameters.text("checkpoint_dir", "checkpoint")
    max_slots = parameters.integer("max_slots", None, minimum=1)
    cpu_kernels = parameters.choice("cpu_kernels", CPU_KERNEL_MODES, "measure")  # engine/kernels.py
    lm = CsmLM.from_checkpoint(checkpoint, device=torch.device(device), dtype=dtype, max_batch=max_slots,
                               cpu_kernels=cpu_kernels)
    engine_config = EngineConfig(
        max_slots=max_slots,
        max_context=parameters.integer("max_context", None, minimum=1),
        gpu_memory_fraction=parameters.number("gpu_memory_fraction", C.DEFAULT_GPU_MEMORY_FRACTION,
                                              minimum=0.01, maximum=1.0),
        prefix_cache_bytes=parameters.integer("prefix_cache_mib", 256, minimum=0) << 20,
    )
    return GenerationEngine(lm, engine_config)


class LanguageModel(triton.DecoupledModel):
    def initialize_model(self, args, model_config):
        self.engine = engine_from_config(Path(triton.model_directory(args)), self.parameters, instance_device(args))
        # The families must outlive their metrics: keep them on the model.
        self.metrics = metrics = triton.Metrics(self.model_name, device=str(self.engine.lm.device))
        self.active_streams = metrics.gauge("csm_active_streams", "Requests being generated or waiting")
        self.slots_in_use = metrics.gauge("csm_kv_slots_in_use", "KV-cache slots holding a request")
        self.requests_waiting = metrics.gauge("csm_requests_waiting", "Requests waiting for a free KV-cache slot")
        self.slots_total = metrics.gauge("csm_kv_slots_total", "KV-cache slots of the engine")
        self.audio_seconds = metrics.counter("csm_audio_seconds_total", "Seconds of audio generated")
        self.generation_seconds = metrics.counter(
            "csm_generation_seconds_total", "Wall time of finished requests (real-time factor = this / audio)"
        )
        self.last_rtf = metrics.gauge("csm_last_real_time_factor", "Generation time / audio duration, last request")
        self.prefix_hits = metrics.running_total(
            "csm_prefix_cache_hits_total", "Prefills whose leading context turn(s) came from the prefix cache")
        self.prefix_misses = metrics.running_total(
            "csm_prefix_cache_misses_total", "Prefills with context turns, none of them in the prefix cache")
        self.prefix_reused = metrics.running_total(
            "csm_prefix_cache_reused_tokens_total", "Prompt tokens copied from the prefix cache, not prefilled")
        self.time_to_first_frame = metrics.histogram(
            "csm_time_to_first_frame_seconds", "From a request's arrival (queueing included) to its first frame",
            TIME_TO_FIRST_FRAME_BUCKETS)
        self.slots_total.set(self.engine.max_slots)
        # Live gauges: the engine thread reports its counts while it works (a few times a
        # second) and when it goes idle, not only when a request arrives or ends.
        self._gauge_lock = threading.Lock()
        self._gauges: tuple[int, int] | None = None
        self.engine.on_stats = self._update_engine_metrics
        self.engine.start()  # captures the CUDA graphs of every bucket first (warm-up)
        warm_up = self.engine.warm_up_report
        triton.log_info(f"{self.model_name}: engine on {self.engine.lm.device} ({self.engine.lm.dtype}), "
                        f"{self.engine.max_slots} KV slots of {self.engine.max_context} positions"
                        + (f"; warm-up: {warm_up.summary()}" if warm_up else ""))
        for line in self.engine.lm.kernel_report.lines():  # which kernel each weight shape runs, and why
            triton.log_info(f"{self.model_name}: kernels: {line}")

    def _update_engine_metrics(self, stats: dict | None = None) -> None:
        stats = stats or self.engine.stats()
        gauges = (stats["slots_in_use"], stats["waiting"])
        with self._gauge_lock:  # called by the engine thread and by a finishing request
            if gauges != self._gauges:  # each set is an IPC call to the server: only changes
                self._gauges = gauges
                self.active_streams.set(sum(gauges))
                self.slots_in_use.set(gauges[0])
                self.requests_waiting.set(gauges[1])
        self.prefix_hits.update(stats["prefix_cache_hits"])
        self.prefix_misses.update(stats["prefix_cache_misses"])
        self.prefix_reused.update(stats["prefix_cache_tokens_reused"])

    def start(self, request, sender):
        cancel = triton.input_texts(request, "cancel_request_id", required=False)
        if cancel is not None:
            # A control request (sent by csm_tts_stream, whose own BLS stream to this
            # model cannot be cancelled in Triton 2.51): free that request's slot now.
            found = self.engine.cancel(validation.single_text(cancel, "cancel_request_id"))
            sender.finish({"cancelled": np.array([found])})
            return
        generation = self.parse(request, sender)
        started = time.perf_counter()
        frames = [0]

        def deliver(chunk: FrameChunk) -> None:
            try:
                if not frames[0] and len(chunk.codes):  # prefilled: the prefix cache was consulted
                    self.time_to_first_frame.observe(chunk.time_to_first_frame)
                    self._update_engine_metrics()
                frames[0] += len(chunk.codes)
                outputs = {"codes": chunk.codes} if len(chunk.codes) else None
                if not chunk.finished:
                    sender.send(outputs)
                    return
                if chunk.reason in (FinishReason.ERROR, FinishReason.SHUTDOWN):
                    sender.fail(RuntimeError(chunk.error or chunk.reason.value))
                else:  # how it ended rides on the final response (a BLS caller asks for it by name)
                    reason = np.array([chunk.reason.value.encode()], dtype=object)
                    sender.finish({**(outputs or {}), "finish_reason": reason})
                self._record(frames[0], time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001 - the final flag must still go out
                sender.fail(error)
            finally:
                if chunk.finished:
                    self._update_engine_metrics()

        self.engine.submit(generation, callback=deliver)  # the engine thread reports the new counts

    def _record(self, frames: int, seconds: float) -> None:
        audio = frames / C.FRAME_RATE_HZ
        self.audio_seconds.increment(audio)
        self.generation_seconds.increment(seconds)
        if audio:
            self.last_rtf.set(seconds / audio)

    @staticmethod
    def parse(request, sender) -> GenerationRequest:
        input_ids = triton.input_array(request, "input_ids")
        prompt_codes = triton.input_array(request, "prompt_codes")
        if input_ids.ndim != 1 or not len(input_ids):
            raise InvalidInput("input 'input_ids' must be a non-empty 1-D tensor")
        prompt_codes = validation.audio_codes(prompt_codes, "prompt_codes")
        sampling = validation.sampling_from_inputs(triton.present_inputs(request, validation.SAMPLING_INPUTS))
        first_chunk = triton.input_array(request, "first_chunk_frames", required=False)
        chunk = triton.input_array(request, "chunk_frames", required=False)
        cache_turns = triton.input_array(request, "prefix_cache_turns", required=False)
        if cache_turns is not None and (cache_turns.size != 1 or int(cache_turns.reshape(-1)[0]) < 0):
            raise InvalidInput("input 'prefix_cache_turns' must be one integer of at least 0")
        return GenerationRequest(
            input_ids=input_ids.astype(np.int64),
            audio_codes=prompt_codes,
            max_frames=sampling.max_frames,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            seed=sampling.seed,
            stream_every=int(chunk.reshape(-1)[0]) if chunk is not None else 0,
            first_chunk_frames=int(first_chunk.reshape(-1)[0]) if first_chunk is not None else 0,
            prefix_cache_turns=int(cache_turns.reshape(-1)[0]) if cache_turns is not None else None,
            request_id=request.request_id(),
            is_cancelled=sender.is_cancelled,
        )

    def finalize(self):
        self.engine.stop()
