"""A model instance on cuda:N runs its CUDA work on GPU N, not on the thread's default
GPU 0: the load, the warm-up, the engine thread and each graph capture enter
`torch.cuda.device(N)`, and graphs are captured on a stream made on that device.

CPU-runnable: torch.cuda's device, stream and graph entry points are replaced by
recorders; the engine's own code (device_context, the engine loop, FrameStep._capture)
runs unchanged and decides which device to enter."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from csm_triton.engine import EngineConfig, GenerationEngine
from csm_triton.engine.device import device_context
from csm_triton.engine.frame_step import FrameStep


class CudaRecorder:
    """Stands in for torch.cuda's device/stream/graph calls; tracks each thread's current
    device as CUDA does (0 until set) and records what was entered or made where."""

    def __init__(self, monkeypatch):
        self.current: dict[str, list[int]] = {}
        self.entered: list[tuple[int, str]] = []  # (device index, thread name)
        self.streams: list[tuple[object, torch.device | None, int]] = []  # (stream, its device, current then)
        self.captures: list[tuple[object, int]] = []  # (capture stream, current device during capture)
        recorder = self

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                recorder._stack().append(self.index)
                recorder.entered.append((self.index, threading.current_thread().name))

            def __exit__(self, *exc):
                recorder._stack().pop()

        class Stream:
            def __init__(self, device=None):
                recorder.streams.append((self, device, recorder.now()))

            def wait_stream(self, other):
                pass

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None):
            recorder.captures.append((stream, recorder.now()))
            yield

        monkeypatch.setattr(torch.cuda, "device", Device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: recorder.now())
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
        monkeypatch.setattr(torch.cuda, "graph", graph)

    def _stack(self) -> list[int]:
        return self.current.setdefault(threading.current_thread().name, [0])

    def now(self) -> int:
        return self._stack()[-1]


def test_device_context_enters_the_instance_gpu_and_nothing_on_the_cpu(monkeypatch):
    cuda = CudaRecorder(monkeypatch)
    with device_context("cuda:1"):
        assert cuda.now() == 1
    with device_context(torch.device("cuda", 2)):
        assert cuda.now() == 2
    assert cuda.now() == 0 and cuda.entered == [(1, "MainThread"), (2, "MainThread")]
    with device_context("cpu"):
        pass
    assert len(cuda.entered) == 2  # the CPU touches no CUDA state
    with device_context(torch.device("cuda")):  # no index: the current device, stated
        pass
    assert cuda.entered[-1] == (0, "MainThread")


def test_the_engine_thread_and_warm_up_run_on_the_instance_gpu(lm, monkeypatch):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1, max_context=64))
    cuda = CudaRecorder(monkeypatch)
    monkeypatch.setattr(lm, "device", torch.device("cuda:1"))  # an instance on GPU 1 (KIND_GPU, device id 1)
    seen_in_loop = []
    # A probe in the loop itself (on_stats runs on the delivery thread, which touches no device).
    engine._report_stats = lambda force=False: seen_in_loop.append((threading.current_thread().name, cuda.now()))
    engine.start()
    try:
        for _ in range(200):
            if seen_in_loop:
                break
            threading.Event().wait(0.01)
    finally:
        engine.stop()
    assert (1, "MainThread") in cuda.entered, "the warm-up (graph captures at load) did not enter GPU 1"
    assert (1, "csm-engine") in cuda.entered, "the engine thread did not enter GPU 1"
    # The engine thread's work happens with GPU 1 current, not its default GPU 0.
    assert seen_in_loop and seen_in_loop[0] == ("csm-engine", 1)
    assert all(index == 1 for index, _ in cuda.entered)


def test_graphs_are_captured_on_a_stream_of_the_instance_gpu(lm, monkeypatch):
    engine = GenerationEngine(lm, EngineConfig(max_slots=2, max_context=64, warm_up=False))
    step = FrameStep(lm, engine.cache, engine.depth_cache, engine.hidden, batch=2, attend_len=64)
    assert step.device == lm.device  # the engine's FrameSteps run on its model's device
    cuda = CudaRecorder(monkeypatch)
    step.device = torch.device("cuda:1")  # (the step's arithmetic still runs on the CPU here)
    step._capture(graph_pool=None)  # on the caller's thread, whose current device is 0
    assert cuda.entered == [(1, "MainThread")]
    assert len(cuda.captures) == 1
    capture_stream, current_during_capture = cuda.captures[0]
    assert current_during_capture == 1
    made = {id(stream): (device, current) for stream, device, current in cuda.streams}
    assert capture_stream is not None, "captured on torch.cuda.graph's process-wide default stream"
    assert made[id(capture_stream)] == (torch.device("cuda:1"), 1)


def test_the_language_model_loads_inside_the_instance_device(tiny_checkpoint, monkeypatch):
    """CsmLM's load (the .to(device), the tables, the kernel choice) runs inside
    device_context of the device it was given."""
    import csm_triton.engine.lm as lm_module

    entered = []

    def recording(device):
        entered.append(torch.device(device))
        return contextlib.nullcontext()

    monkeypatch.setattr(lm_module, "device_context", recording)
    lm_module.CsmLM.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=1, cpu_kernels="mkl")
    assert entered == [torch.device("cpu")]


@pytest.mark.parametrize("args, device", [({"model_instance_kind": "GPU", "model_instance_device_id": "1"}, 1)])
def test_the_triton_instance_device_reaches_device_context(args, device, monkeypatch):
    from csm_triton.triton.parameters import instance_device

    cuda = CudaRecorder(monkeypatch)
    with device_context(instance_device(args)):
        assert cuda.now() == device
