"""The frame step's fused operations: one Triton kernel each on CUDA, eager PyTorch elsewhere.

Inside a CUDA graph each kernel is a node that costs ~2-3 µs whatever it computes, so a
frame's 140 transformer layer calls are paid per kernel (loadtest/kernel_count.py). The
functions here do in one kernel (engine/triton_kernels.py) what eager PyTorch does in
several; the eager form below is what the CPU runs, exactly the arithmetic it always ran
(fp32 tokens equal transformers'), and the reference the kernels are tested against.

Which runs: the kernels for CUDA tensors when Triton imports (torch's CUDA wheels bring
it; without it the eager form runs and a warning says so once); the eager form for CPU
tensors, unless `kernels_on_cpu()` asks for the kernels under Triton's interpreter (the
numerics tests and the kernel count).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
import torch.nn.functional as F

from csm_triton.engine.sampling import sample

LOG = logging.getLogger(__name__)
_on_cpu = False


@functools.cache
def _kernels():
    """engine.triton_kernels, or None where Triton does not import."""
    try:
        from csm_triton.engine import triton_kernels
    except ImportError as error:
        LOG.warning("Triton is not importable (%s): the frame step runs unfused eager kernels", error)
        return None
    return triton_kernels


@contextlib.contextmanager
def kernels_on_cpu():
    """Run the Triton kernels on CPU tensors too, under Triton's interpreter."""
    global _on_cpu
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels_on_cpu needs TRITON_INTERPRET=1 set before Triton is imported")
    kernels = _kernels()
    if kernels is None or not kernels.interpreted():
        raise RuntimeError("kernels_on_cpu: Triton is missing or was imported without TRITON_INTERPRET=1")
    _on_cpu, previous = True, _on_cpu
    try:
        yield
    finally:
        _on_cpu = previous


_eager_only = False


@contextlib.contextmanager
def eager_forms_only():
    """The eager forms even for CUDA tensors (the GPU tests compare the two)."""
    global _eager_only
    _eager_only, previous = True, _eager_only
    try:
        yield
    finally:
        _eager_only = previous


def _fused(tensor: torch.Tensor) -> bool:
    return (tensor.is_cuda or _on_cpu) and not _eager_only and _kernels() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """CsmRMSNorm as one fused operator: in fp32 it equals transformers' module bit for
    bit (tests/unit/test_layers.py); in bf16 it multiplies the weight before the one rounding
    (transformers rounds, then multiplies), at most one bf16 ulp apart, closer to fp32."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): a layer's residual add and the norm after it."""
    if _fused(x):
        return torch.ops.csm.add_rms_norm(x, residual, weight, eps)
    return _add_rms_norm_eager(x, residual, weight, eps)


def _add_rms_norm_eager(x, residual, weight, eps):
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [x2, x1] (one copy kernel); with the sign folded into the sin table,
    x*cos + rotate_halves(x)*sin is transformers' x*cos + rotate_half(x)*sin exactly
    ((-a)*b == a*(-b) in IEEE arithmetic)."""
    return x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)


def rotary_write_kv(
    qkv: torch.Tensor, geometry, keys: torch.Tensor, values: torch.Tensor, heads: int, kv_heads: int
) -> torch.Tensor:
    """qkv [B, T, heads + 2*kv_heads, D]; geometry: the call's layers.Geometry (cos, sign-folded
    sin, item, positions); keys, values: the call's cache rows [B, kv_heads, max_len, D],
    written in place at each token's position (rotated keys, values as they are) -> the
    rotated queries [B, T, heads, D]."""
    g = geometry
    if _fused(qkv):
        return torch.ops.csm.rotary_write_kv(qkv, g.cos, g.sin, g.positions, keys, values, heads, kv_heads)
    return _rotary_write_kv_eager(qkv, g.cos, g.sin, g.positions, keys, values, heads, kv_heads, item=g.item)


def _rotary_write_kv_eager(qkv, cos, sin, positions, keys, values, heads, kv_heads, item=None):
    if item is None:
        batch, tokens = positions.shape
        item = torch.arange(batch, device=positions.device)[:, None].expand(batch, tokens)
    # Rotary on the query and key heads together: 4 kernels for both.
    qk = qkv[:, :, : heads + kv_heads]
    qk = qk * cos + rotate_halves(qk) * sin
    # Written at each item's positions (B x T vectors); attention then reads a view of
    # the cache: nothing of the earlier context is copied.
    keys[item, :, positions] = qk[:, :, heads:]
    values[item, :, positions] = qkv[:, :, heads + kv_heads :]
    return qk[:, :, :heads]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2*I] (gate, then up) -> SiLU(gate) * up [..., I]."""
    if _fused(gate_up):
        return torch.ops.csm.silu_mul(gate_up)
    return _silu_mul_eager(gate_up)


def _silu_mul_eager(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def sample_codes(
    logits: torch.Tensor, temperature: torch.Tensor, kth_index: torch.Tensor, log_draws: torch.Tensor, top_k_bound: int
):
    """sampling.sample (its arguments), as one kernel where the kernels run."""
    if _fused(logits) and logits.shape[-1] & (logits.shape[-1] - 1) == 0:
        return torch.ops.csm.sample(logits, temperature, kth_index, log_draws)
    return sample(logits, temperature, kth_index, log_draws, top_k_bound)


# Each torch.ops.csm operator's eager form, with the operator's arguments (the kernel count
# substitutes these for the interpreter, which would take many minutes at CSM-1B's sizes).
EAGER_FORMS = {
    "add_rms_norm": _add_rms_norm_eager,
    "rotary_write_kv": _rotary_write_kv_eager,
    "silu_mul": _silu_mul_eager,
    "sample": lambda logits, temperature, kth_index, log_draws: sample(logits, temperature, kth_index, log_draws),
}
