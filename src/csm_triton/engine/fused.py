"""The frame step's fused operations: one Triton kernel each on CUDA, eager PyTorch elsewhere.

Inside a CUDA graph each kernel is a node that costs ~2-3 µs whatever it computes, so a
frame's 140 transformer layer calls are paid per kernel (loadtest/kernel_count.py). The
functions here do in one kernel (engine/triton_kernels.py) what eager PyTorch does in
several; the eager form below is what the CPU runs, exactly the arithmetic it always ran
(fp32 tokens equal transformers'), and the reference the kernels are tested against.

Which runs: the kernels for CUDA tensors when Triton imports (torch's CUDA wheels bring
it; without it the eager form runs and a warning says so once) and they passed
`check_kernels` at load; the eager form for CPU tensors, unless `kernels_on_cpu()` asks
for the kernels under Triton's interpreter (the numerics tests and the kernel count).
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
_failed: str | None = None  # why check_kernels turned the kernels off in this process


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


def kernels_run_on(device: torch.device) -> bool:
    """Whether tensors on `device` go through the Triton kernels (now, in this process)."""
    on_device = torch.device(device).type == "cuda" or _on_cpu
    return on_device and not _eager_only and _failed is None and _kernels() is not None


def _fused(tensor: torch.Tensor) -> bool:
    return kernels_run_on(tensor.device)


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
        return _kernels().add_rms_norm(x, residual, weight, eps)
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
        return _kernels().rotary_write_kv(qkv, g.cos, g.sin, g.positions, keys, values, heads, kv_heads)
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
        return _kernels().silu_mul(gate_up)
    return _silu_mul_eager(gate_up)


def _silu_mul_eager(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, geometry) -> torch.Tensor:
    """query [B, kv_heads, G*T, D] (query heads folded per key head), keys, values: the call's
    cache rows [B, kv_heads, max_len, D]; geometry: the call's layers.Geometry -> [B,
    kv_heads, G*T, D]. One token per row (the frame step) runs the decode kernel where the
    kernels run: each row over its own keys 0..position, read on the device."""
    if geometry.positions.shape[1] == 1 and _fused(query):
        return _kernels().decode_attention(query, keys, values, geometry.positions)
    length = geometry.attend_len
    return F.scaled_dot_product_attention(query, keys[:, :, :length], values[:, :, :length], attn_mask=geometry.mask)


def _decode_attention_eager(query, keys, values, positions):
    length = int(positions.max()) + 1  # the eager form may read back: the count substitutes it for the interpreter
    mask = (torch.arange(length, device=positions.device)[None, :] <= positions)[:, None, None, :]
    return F.scaled_dot_product_attention(query, keys[:, :, :length], values[:, :, :length], attn_mask=mask)


def sample_codes(
    logits: torch.Tensor, temperature: torch.Tensor, kth_index: torch.Tensor, log_draws: torch.Tensor, top_k_bound: int
):
    """sampling.sample (its arguments), as one kernel where the kernels run."""
    if _fused(logits) and logits.shape[-1] & (logits.shape[-1] - 1) == 0:
        return _kernels().sample(logits, temperature, kth_index, log_draws)
    return sample(logits, temperature, kth_index, log_draws, top_k_bound)


# Each torch.ops.csm operator's eager form, with the operator's arguments (the kernel count
# substitutes these for the interpreter, which would take many minutes at CSM-1B's sizes).
EAGER_FORMS = {
    "add_rms_norm": _add_rms_norm_eager,
    "rotary_write_kv": _rotary_write_kv_eager,
    "silu_mul": _silu_mul_eager,
    "sample": lambda logits, temperature, kth_index, log_draws: sample(logits, temperature, kth_index, log_draws),
    "decode_attention": _decode_attention_eager,
}


def check_kernels(stacks, vocab: int, device: torch.device, dtype: torch.dtype) -> str:
    """Each kernel once at the model's shapes (its layer stacks, `vocab` codes) against its
    eager form, before any CUDA graph is captured. A kernel that does not compile, fails to
    launch or disagrees on this GPU turns the kernels off for the process: the eager forms
    run (correct, ~2x the launches per frame) and the reason is logged as an error. (A
    kernel that faults on the device leaves CUDA's sticky error behind: then the load fails,
    as any device fault does, engine/faults.py.) Returns the line for the load log."""
    global _failed
    if not (torch.device(device).type == "cuda" or _on_cpu) or _kernels() is None or _failed is not None:
        return "fused kernels: not used on this device" if _failed is None else f"fused kernels: off ({_failed})"
    try:
        _check_all(stacks, vocab, torch.device(device), dtype)
    except Exception as error:  # noqa: BLE001 - a compile error, a failed launch, a disagreement: all "not here"
        _failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        LOG.error("fused kernels off, the frame step runs the eager forms: %s", _failed)
        return f"fused kernels: off ({_failed})"
    LOG.info("fused kernels: checked against their eager forms at this model's shapes")
    return "fused kernels: on, checked against their eager forms"


def _check_all(stacks, vocab: int, device: torch.device, dtype: torch.dtype) -> None:
    # bf16: the kernels round once where eager rounds each step, a few ulps apart.
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    generator = torch.Generator(device=device).manual_seed(0)

    def random(*shape, kind=dtype):
        return torch.randn(shape, generator=generator, device=device).to(kind)

    def agree(ours, theirs, what):
        for one, other in zip(ours, theirs, strict=True):
            torch.testing.assert_close(one.float(), other.float(), **tolerance, msg=lambda m: f"{what}: {m}")

    for stack in stacks:
        x, residual = random(2, 1, stack.final_norm.shape[0]), random(2, 1, stack.final_norm.shape[0])
        agree(
            add_rms_norm(x, residual, stack.final_norm, stack.eps),
            _add_rms_norm_eager(x, residual, stack.final_norm, stack.eps),
            "add_rms_norm",
        )
        gate_up = random(2, 1, 2 * stack.intermediate_size)
        agree([silu_mul(gate_up)], [_silu_mul_eager(gate_up)], "silu_mul")
        heads, kv_heads = stack.num_heads, stack.num_kv_heads
        qkv = random(2, 1, heads + 2 * kv_heads, stack.head_dim)
        # Positions as the frame step has them: a strided view (a column of its row buffer).
        g = stack.geometry(torch.tensor([[1, 0], [3, 0]], device=device)[:, :1], 4)
        fused_cache, eager_cache = (
            torch.zeros(2, 2, kv_heads, 4, stack.head_dim, device=device, dtype=dtype) for _ in "ab"
        )
        query = rotary_write_kv(qkv, g, fused_cache[0], fused_cache[1], heads, kv_heads)
        expected = _rotary_write_kv_eager(
            qkv, g.cos, g.sin, g.positions, eager_cache[0], eager_cache[1], heads, kv_heads
        )
        agree([query, fused_cache], [expected, eager_cache], "rotary_write_kv")
        # Decode attention on two rows at different lengths (one past a block of 32 keys).
        length = min(40, stack.max_positions)
        cache = random(2, 2, kv_heads, length, stack.head_dim)
        folded = random(2, kv_heads, stack.groups, stack.head_dim)
        positions = torch.tensor([[length - 1, 0], [3, 0]], device=device)[:, :1]
        agree(
            [attention(folded, cache[0], cache[1], stack.geometry(positions, length))],
            [_decode_attention_eager(folded, cache[0], cache[1], positions)],
            "decode_attention",
        )
    logits = random(4, vocab, kind=torch.float32) * 3
    temperature = torch.tensor([1.0, 0.7, 0.9, 1.3], device=device)
    kth = torch.tensor([[0], [4], [49], [63]], device=device)
    draws = torch.log(torch.empty(4, vocab, device=device).exponential_(generator=generator))
    codes = sample_codes(logits, temperature, kth, draws, 64)
    if not torch.equal(codes, sample(logits, temperature, kth, draws, 64)):
        raise AssertionError(f"sample: codes {codes.tolist()} differ from the eager draws")
