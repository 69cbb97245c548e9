"""Which engine failures the process cannot survive.

Most exceptions in a frame step concern that batch (a bug met by one request's shape,
say): the engine fails the batch and serves the next. A CUDA error is different: after
a device-side assert or an illegal memory access the CUDA context is sticky-broken, so
every later kernel launch fails too, while the model still reports ready. Only a new
process gets a working context, so such an error ends the python stub, and the model
supervisor (csm_triton.serving.supervisor) reloads the model.
"""

from __future__ import annotations

import torch

__all__ = ["DeviceFailure", "device_failure_message", "is_fatal_device_error"]

# Words of the errors that leave the CUDA context unusable (torch raises most of them as
# a plain RuntimeError; torch.AcceleratorError since 2.8). cuBLAS/cuDNN failures are
# counted in: after one, the library's handle state is not to be trusted either.
FATAL_DEVICE_MARKS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "CUBLAS_STATUS_",
    "CUDNN_STATUS_",
    "cuDNN error",
)


class DeviceFailure(RuntimeError):
    """The engine's device failed: this request (and every later one in this process)
    cannot be served; a reloaded model can. Answered as UNAVAILABLE, so clients retry."""


def is_fatal_device_error(error: BaseException) -> bool:
    """True for an error (or one it was raised from) that breaks the device for the
    process. An out-of-memory error is not: the allocator frees, the context lives."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.OutOfMemoryError):
            return False
        accelerator_error = getattr(torch, "AcceleratorError", None)
        if accelerator_error is not None and isinstance(error, accelerator_error):
            return True
        if isinstance(error, RuntimeError) and any(mark in str(error) for mark in FATAL_DEVICE_MARKS):
            return True
        error = error.__cause__ or error.__context__
    return False


def device_failure_message(error: BaseException) -> str:
    """What every request in flight at a device failure, and every later one, is told."""
    return f"the generation device failed ({type(error).__name__}: {error}); the model is being reloaded, retry shortly"
