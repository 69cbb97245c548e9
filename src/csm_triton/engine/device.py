"""Which CUDA device the engine's work runs on.

A model instance on `cuda:N` allocates every tensor with an explicit device, but the
CUDA "current device" is per thread and starts at 0: anything that takes the current
device (a stream made without a device, torch.cuda.graph's default capture stream,
library handles, kernels launched on the current stream) would land on GPU 0. So the
load, the warm-up, the engine thread and each graph capture run inside
`device_context(device)`.
"""

from __future__ import annotations

import contextlib

import torch


def device_context(device: torch.device | str) -> contextlib.AbstractContextManager:
    """`torch.cuda.device(N)` for a CUDA device (the current one when it names no index),
    a no-op anywhere else (the CPU has no current device, and nothing touches torch.cuda)."""
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device.index if device.index is not None else torch.cuda.current_device())


def host_to_device(array, device: torch.device) -> torch.Tensor:
    """A host array on `device` without waiting for the device: from pageable memory a copy
    to a GPU synchronises the stream, so it is staged in pinned memory and copied
    asynchronously (torch keeps the pinned block until the copy is done). Elsewhere the
    array as a tensor."""
    tensor = torch.as_tensor(array)
    if torch.device(device).type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


__all__ = ["device_context", "host_to_device"]
