"""csm_lm: the decoupled Triton model around the generation engine.

One engine (one thread, in-flight batching over KV slots) per model instance;
`execute` only validates and enqueues. Each request's frames come back through its
response sender as chunks of codes; the final flag is always sent (error, cancel,
shutdown included). A client that goes away is noticed within a few frames and its
slot freed.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from csm_triton import constants as C
from csm_triton.core import validation
from csm_triton.engine import CsmLM, EngineConfig, FinishReason, FrameChunk, GenerationEngine, GenerationRequest
from csm_triton.engine.faults import DeviceFailure
from csm_triton.engine.kernels import MODES as CPU_KERNEL_MODES
from csm_triton.engine.lora import LoraWeights
from csm_triton.triton import adapter as triton
from csm_triton.triton.calls import ModelUnavailable
from csm_triton.triton.parameters import ParameterError, Parameters, instance_device, voice_directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CSM was trained in bf16; fp16 (a narrower exponent, tokens never checked) loads only
# with `allow_float16: true` (docs/model_config.md).
# From a warm GPU engine with a cached voice (tens of ms) to a long queue or a CPU.
TIME_TO_FIRST_FRAME_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
# After a device failure the stub exits (engine.faults); the in-flight requests were
# answered already, this is for the log line to reach the server before the process goes.
DEVICE_FAILURE_EXIT_DELAY_S = 1.0
DEVICE_FAILURE_EXIT_CODE = 70  # EX_SOFTWARE: tells this exit from a kill in the server's log
_ENGINE_STOP = threading.Lock()  # on_server_stop and finalize both stop the engine, on two threads


def engine_from_config(
    model_dir: Path, parameters: Parameters, device: str, voice_dir: Path | None = None
) -> GenerationEngine:
    """voice_dir: the voice store, where adapter voices are read from (lora_slots > 0)."""
    dtype_name = parameters.choice("dtype", ("auto", *DTYPES), "auto")
    dtype = DTYPES.get(dtype_name)  # None: bf16 on GPU, fp32 on CPU
    allow_float16 = parameters.boolean("allow_float16", False)
    if dtype == torch.float16 and not allow_float16:
        raise ParameterError(
            f"model '{parameters.model_name}': config parameter 'dtype' float16 is not supported: "
            "CSM was trained in bfloat16; use 'bfloat16' (GPU) or 'float32' (exact tokens), "
            "or set 'allow_float16' to \"true\" to run float16 anyway"
        )
    checkpoint = model_dir / parameters.text("checkpoint_dir", "checkpoint")
    max_slots = parameters.integer("max_slots", None, minimum=1)
    cpu_kernels = parameters.choice("cpu_kernels", CPU_KERNEL_MODES, "measure")  # engine/kernels.py
    lm = CsmLM.from_checkpoint(
        checkpoint,
        device=torch.device(device),
        dtype=dtype,
        max_batch=max_slots,
        cpu_kernels=cpu_kernels,
        allow_float16=allow_float16,
    )
    engine_config = EngineConfig(
        max_slots=max_slots,
        max_context=parameters.integer("max_context", None, minimum=1),
        gpu_memory_fraction=parameters.number(
            "gpu_memory_fraction", C.DEFAULT_GPU_MEMORY_FRACTION, minimum=0.01, maximum=1.0
        ),
        prefix_cache_bytes=parameters.integer("prefix_cache_mib", 256, minimum=0) << 20,
        lora_slots=parameters.integer("lora_slots", 0, minimum=0, maximum=C.MAX_LORA_SLOTS),
        lora_max_rank=parameters.integer("lora_max_rank", 32, minimum=1, maximum=C.MAX_LORA_RANK),
        max_prefills_per_step=parameters.integer(
            "max_prefills_per_step", EngineConfig.max_prefills_per_step, minimum=1, maximum=1024
        ),
        prefill_tokens_per_step=parameters.integer(
            "prefill_tokens_per_step", EngineConfig.prefill_tokens_per_step, minimum=1, maximum=1 << 20
        ),
        # auto: overlapped with CUDA graphs; "false" is the switch back to one step at a time.
        overlap_steps={"auto": None, "true": True, "false": False}[
            parameters.choice("overlap_steps", ("auto", "true", "false"), "auto")
        ],
    )
    loader = adapter_loader(voice_dir, lm) if engine_config.lora_slots and voice_dir is not None else None
    return GenerationEngine(lm, engine_config, adapter_loader=loader)


def adapter_loader(voice_dir: Path, lm: CsmLM):
    """An adapter voice id -> its LoraWeights, read from the voice store (core.adapters
    checks it against this base model before a tensor is kept)."""
    from csm_triton.core.adapters import load_lora_adapter
    from csm_triton.core.voice_store import VoiceStore

    store = VoiceStore(voice_dir)

    def load(voice_id: str) -> LoraWeights:
        # Each registration has a folder of its own (removed with the voice): its path tells
        # a voice deleted and registered again under the same id from the one resident.
        folder = store.adapter_dir(voice_id)
        adapter = load_lora_adapter(folder, lm.config)
        return LoraWeights(adapter.matrices, adapter.scale, adapter.rank, source=folder)

    return load


class LanguageModel(triton.DecoupledModel):
    def initialize_model(self, args, model_config):
        self.engine = engine_from_config(
            Path(triton.model_directory(args)),
            self.parameters,
            instance_device(args),
            voice_directory(args, self.parameters),
        )
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
            "csm_prefix_cache_hits_total", "Prefills whose leading context turn(s) came from the prefix cache"
        )
        self.prefix_misses = metrics.running_total(
            "csm_prefix_cache_misses_total", "Prefills with context turns, none of them in the prefix cache"
        )
        self.prefix_reused = metrics.running_total(
            "csm_prefix_cache_reused_tokens_total", "Prompt tokens copied from the prefix cache, not prefilled"
        )
        self.time_to_first_frame = metrics.histogram(
            "csm_time_to_first_frame_seconds",
            "From a request's arrival (queueing included) to its first frame",
            TIME_TO_FIRST_FRAME_BUCKETS,
        )
        self.slots_total.set(self.engine.max_slots)
        # Live gauges: the engine thread reports its counts while it works (a few times a
        # second) and when it goes idle, not only when a request arrives or ends.
        self._gauge_lock = threading.Lock()
        self._gauges: tuple[int, int] | None = None
        self.engine.on_stats = self._update_engine_metrics
        self.engine.on_fatal = self._end_stub
        self.engine.start()  # captures the CUDA graphs of every bucket first (warm-up)
        warm_up = self.engine.warm_up_report
        triton.log_info(
            f"{self.model_name}: engine on {self.engine.lm.device} ({self.engine.lm.dtype}), "
            f"{self.engine.max_slots} KV slots of {self.engine.max_context} positions"
            + (f"; warm-up: {warm_up.summary()}" if warm_up else "")
        )
        for line in self.engine.lm.kernel_report.lines():  # which kernel each weight shape runs, and why
            triton.log_info(f"{self.model_name}: kernels: {line}")

    def _end_stub(self, error: BaseException) -> None:
        """The device is broken for this process (a CUDA error is sticky): a model that
        stayed ready would fail every request. Ending the stub lets the model supervisor
        (csm_triton.serving.supervisor) reload the model with a fresh CUDA context."""
        triton.log_error(
            f"{self.model_name}: device failure, stub {os.getpid()} exits so that the model is "
            f"reloaded: {type(error).__name__}: {error}"
        )
        time.sleep(DEVICE_FAILURE_EXIT_DELAY_S)
        os._exit(DEVICE_FAILURE_EXIT_CODE)

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
                # How it ended rides on the final response, a failure too (with its message):
                # Triton 2.51 never delivers an error response that a decoupled model sends
                # after execute returned to a BLS caller (it waited for it until the stop
                # deadline). The caller raises on a failure's reason (forward._lm_chunks).
                final = {"finish_reason": np.array([chunk.reason.value.encode()], dtype=object)}
                if chunk.reason in (FinishReason.DEVICE_FAILURE, FinishReason.SHUTDOWN, FinishReason.ERROR):
                    final["error"] = np.array([(chunk.error or chunk.reason.value).encode()], dtype=object)
                sender.finish({**(outputs or {}), **final})
                self._record(frames[0], time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001 - the final flag must still go out
                sender.fail(error)
            finally:
                if chunk.finished:
                    self._update_engine_metrics()

        try:
            self.engine.submit(generation, callback=deliver)  # the engine thread reports the new counts
        except DeviceFailure as error:  # between the failure and the stub's exit
            raise ModelUnavailable(str(error)) from error

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
        prompt_codes = validation.audio_codes(prompt_codes, "prompt_codes")
        sampling = validation.sampling_from_inputs(triton.present_inputs(request, validation.SAMPLING_INPUTS))
        counts = {
            name: validation.count(triton.input_array(request, name, required=False), name)
            for name in ("first_chunk_frames", "chunk_frames", "prefix_cache_turns")
        }
        adapter = triton.input_texts(request, "ADAPTER_ID", required=False)
        adapter = validation.voice_id(validation.single_text(adapter, "ADAPTER_ID"), "ADAPTER_ID") if adapter else None
        return GenerationRequest(
            input_ids=input_ids,  # its ids are checked against the vocabulary by the engine
            audio_codes=prompt_codes,
            max_frames=sampling.max_frames,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            seed=sampling.seed,
            stream_every=counts["chunk_frames"] or 0,
            first_chunk_frames=counts["first_chunk_frames"] or 0,
            prefix_cache_turns=counts["prefix_cache_turns"],
            adapter=adapter,
            request_id=request.request_id(),
            is_cancelled=sender.is_cancelled,
        )

    def has_open_work(self):
        # The engine's work, and final responses still queued for delivery.
        return self.engine.has_work() or super().has_open_work()

    def on_server_stop(self):
        # Streams still generating end now, their final response saying "shutdown"; serve
        # forwards the stop to Triton once they have (2.51 would unload this model meanwhile).
        with _ENGINE_STOP:
            self.engine.stop()

    def finalize(self):
        with _ENGINE_STOP:  # the last final response sent by on_server_stop can start finalize
            self.engine.stop()
