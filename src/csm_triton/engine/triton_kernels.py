"""The frame step's fused kernels in Triton, registered as torch operators (`torch.ops.csm.*`).

Each operator is one kernel launch where eager PyTorch launches several (engine/fused.py
has the eager form of each, which the CPU runs and the tests compare against):

- `add_rms_norm`: the residual add and the RMSNorm after it (2 kernels -> 1);
- `rotary_write_kv`: rotary on the query and key heads, the new key and value written to
  the cache at each token's position, the rotated queries returned (6 kernels -> 1);
- `silu_mul`: SiLU(gate) * up of the fused gate/up projection (2 kernels -> 1);
- `sample`: temperature, top-k filter and the exponential race of one codebook (7 -> 1);
- `decode_attention`: one new token per row attending that row's own keys 0..position,
  read from the position on the device, so one CUDA graph serves every context length
  and a short or padding row reads only its own keys (SDPA reads every row up to the
  bucket's attention length, a mask hiding the rest).

They run on CUDA, where the frame step is one CUDA graph and every launch is a graph node
(~2-3 µs each). On the CPU they run only under Triton's interpreter (TRITON_INTERPRET=1,
set before this module is imported): that is how the tests check their numerics and how
loadtest/kernel_count.py counts what the GPU launches. Arithmetic is fp32 inside a
kernel with one rounding to the tensor's dtype at each store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["interpreted"]


def _require_contiguous(**tensors: torch.Tensor) -> None:
    """Inputs the kernels read as dense rows. Refused rather than copied: a copy would be a
    kernel of its own in every layer call (and uncounted by loadtest/kernel_count.py)."""
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (shape {tuple(tensor.shape)}, strides {tensor.stride()})")


def interpreted() -> bool:
    """True when these kernels, and Triton's own library functions they call (tl.sum...),
    run under Triton's CPU interpreter: both are chosen when they are defined, so Triton
    must have been imported with TRITON_INTERPRET=1 already set."""
    return not isinstance(_add_rms_norm_kernel, triton.runtime.JITFunction) and not isinstance(
        tl.sum, triton.runtime.JITFunction
    )


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, normed_ptr, summed_ptr, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + row * n + offsets, mask=inside, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + row * n + offsets, mask=inside, other=0.0).to(tl.float32)
    # The sum is rounded to the stream's dtype before it is normalised, as the eager add is.
    summed = (x + residual).to(summed_ptr.dtype.element_ty)
    tl.store(summed_ptr + row * n + offsets, summed, mask=inside)
    value = summed.to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.sum(value * value, axis=0) / n + eps)
    weight = tl.load(weight_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    tl.store(normed_ptr + row * n + offsets, (value * scale * weight).to(normed_ptr.dtype.element_ty), mask=inside)


@torch.library.custom_op("csm::add_rms_norm", mutates_args=(), device_types=("cuda", "cpu"))
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _require_contiguous(x=x, residual=residual, weight=weight)
    n = x.shape[-1]
    summed, normed = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm_kernel[(x.numel() // n,)](
        x, residual, weight, normed, summed, n, eps, BLOCK=triton.next_power_of_2(n)
    )
    return normed, summed


@triton.jit
def _rotary_write_kv_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    query_ptr,
    keys_ptr,
    values_ptr,
    tokens,
    positions_item_stride,
    positions_token_stride,
    cache_row_stride,
    cache_head_stride,
    cache_position_stride,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    # One program per (token, head) of qkv [B, T, HEADS + 2 * KV_HEADS, HEAD_DIM].
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    item = token // tokens
    half = tl.arange(0, HEAD_DIM // 2)
    source = qkv_ptr + (token * (HEADS + 2 * KV_HEADS) + head) * HEAD_DIM
    first = tl.load(source + half).to(tl.float32)
    second = tl.load(source + HEAD_DIM // 2 + half).to(tl.float32)
    if head < HEADS + KV_HEADS:
        # x*cos + rotate_halves(x)*sin, the sin table's first half already negated.
        cos = cos_ptr + token * HEAD_DIM
        sin = sin_ptr + token * HEAD_DIM
        rotated_first = first * tl.load(cos + half).to(tl.float32) + second * tl.load(sin + half).to(tl.float32)
        rotated_second = second * tl.load(cos + HEAD_DIM // 2 + half).to(tl.float32) + first * tl.load(
            sin + HEAD_DIM // 2 + half
        ).to(tl.float32)
        first, second = rotated_first, rotated_second
    position = tl.load(positions_ptr + item * positions_item_stride + (token % tokens) * positions_token_stride)
    offset = item * cache_row_stride + ((head - HEADS) % KV_HEADS) * cache_head_stride
    offset += position * cache_position_stride
    if head < HEADS:
        target = query_ptr + (token * HEADS + head) * HEAD_DIM
    elif head < HEADS + KV_HEADS:
        target = keys_ptr + offset
    else:
        target = values_ptr + offset
    tl.store(target + half, first.to(query_ptr.dtype.element_ty))
    tl.store(target + HEAD_DIM // 2 + half, second.to(query_ptr.dtype.element_ty))


@torch.library.custom_op("csm::rotary_write_kv", mutates_args=("keys", "values"), device_types=("cuda", "cpu"))
def rotary_write_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """qkv [B, T, heads + 2*kv_heads, D]; cos, sin [B, T, 1, D] at each token's position;
    positions [B, T] (any strides: the frame step's are views); keys, values: the call's cache rows [B, kv_heads, max_len, D] (strided
    views of the cache, written in place) -> the rotated queries [B, T, heads, D]."""
    batch, tokens, _, head_dim = qkv.shape
    if keys.stride() != values.stride() or keys.stride(-1) != 1:
        raise ValueError("rotary_write_kv: keys and values must share a layout with contiguous head_dim")
    query = torch.empty((batch, tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _require_contiguous(qkv=qkv, cos=cos, sin=sin)
    _rotary_write_kv_kernel[(batch * tokens, heads + 2 * kv_heads)](
        qkv,
        cos,
        sin,
        positions,
        query,
        keys,
        values,
        tokens,
        positions.stride(0),
        positions.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        HEADS=heads,
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
    )
    return query


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < width
    gate = tl.load(gate_up_ptr + row * 2 * width + columns, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * width + width + columns, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + columns, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=inside)


SILU_BLOCK = 1024


@torch.library.custom_op("csm::silu_mul", mutates_args=(), device_types=("cuda", "cpu"))
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2*I] (gate, then up) -> SiLU(gate) * up [..., I]."""
    _require_contiguous(gate_up=gate_up)
    width = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], width))
    _silu_mul_kernel[(gate_up.numel() // (2 * width), triton.cdiv(width, SILU_BLOCK))](
        gate_up, out, width, BLOCK=SILU_BLOCK
    )
    return out


@triton.jit
def _sample_kernel(logits_ptr, temperature_ptr, kth_ptr, draws_ptr, draws_row_stride, codes_ptr, VOCAB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    codes = tl.arange(0, VOCAB)
    # + 0.0 turns -0.0 into +0.0, so that the integer keys below order like the floats.
    # div_rn: IEEE division as torch's (Triton's `/` on fp32 may be the 2-ulp approximation).
    scores = tl.math.div_rn(tl.load(logits_ptr + row * VOCAB + codes), tl.load(temperature_ptr + row)) + 0.0
    kth = tl.load(kth_ptr + row)
    # The k-th largest score without a sort: order-preserving integer keys, whose k-th
    # largest is built bit by bit from the top (32 counting passes over the row).
    bits = scores.to(tl.int32, bitcast=True)
    keys = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648
    threshold = kth * 0  # an int64 scalar
    for bit in tl.static_range(31, -1, -1):
        candidate = threshold | (1 << bit)
        at_least = tl.sum((keys >= candidate).to(tl.int32), axis=0)
        threshold = tl.where(at_least > kth, candidate, threshold)
    draws = tl.load(draws_ptr + row * draws_row_stride + codes)
    race = tl.where(keys < threshold, float("-inf"), scores) - draws
    tl.store(codes_ptr + row, tl.argmax(race, axis=0).to(tl.int64))


@torch.library.custom_op("csm::sample", mutates_args=(), device_types=("cuda", "cpu"))
def sample(
    logits: torch.Tensor, temperature: torch.Tensor, kth_index: torch.Tensor, log_draws: torch.Tensor
) -> torch.Tensor:
    """sampling.sample in one kernel: logits [B, V] fp32 (V a power of two), temperature [B],
    kth_index [B, 1], log_draws [B, V] (rows may be strided) -> codes [B] int64."""
    batch, vocab = logits.shape
    if vocab & (vocab - 1) or log_draws.stride(-1) != 1:
        raise ValueError("sample: the vocabulary must be a power of two and draws contiguous per row")
    _require_contiguous(logits=logits, temperature=temperature, kth_index=kth_index)
    codes = torch.empty(batch, dtype=torch.long, device=logits.device)
    _sample_kernel[(batch,)](
        logits,
        temperature,
        kth_index,
        log_draws,
        log_draws.stride(0),
        codes,
        VOCAB=vocab,
    )
    return codes


@triton.jit
def _decode_attention_kernel(
    query_ptr,
    keys_ptr,
    values_ptr,
    positions_ptr,
    out_ptr,
    positions_stride,
    cache_row_stride,
    cache_head_stride,
    cache_position_stride,
    scale,
    GROUPS: tl.constexpr,
    GROUPS_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per (row, key head): the GROUPS query heads that share the key head,
    # over the row's own keys 0..position (a padding row at position 0 reads one).
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    length = tl.load(positions_ptr + row * positions_stride) + 1
    groups = tl.arange(0, GROUPS_PADDED)
    dims = tl.arange(0, HEAD_DIM)
    in_group = groups < GROUPS
    heads = tl.num_programs(1)
    query_rows = query_ptr + ((row * heads + head) * GROUPS + groups[:, None]) * HEAD_DIM + dims[None, :]
    query = tl.load(query_rows, mask=in_group[:, None], other=0.0).to(tl.float32) * scale
    base = row * cache_row_stride + head * cache_head_stride
    best = tl.full((GROUPS_PADDED,), float("-inf"), tl.float32)
    total = tl.zeros((GROUPS_PADDED,), tl.float32)
    acc = tl.zeros((GROUPS_PADDED, HEAD_DIM), tl.float32)
    for start in range(0, length, BLOCK):
        keys_at = start + tl.arange(0, BLOCK)
        inside = keys_at < length
        offsets = base + keys_at[:, None] * cache_position_stride + dims[None, :]
        keys = tl.load(keys_ptr + offsets, mask=inside[:, None], other=0.0).to(tl.float32)
        values = tl.load(values_ptr + offsets, mask=inside[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(query[:, None, :] * keys[None, :, :], axis=2)  # [groups, BLOCK], fp32 throughout
        scores = tl.where(inside[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_best[:, None])
        rescale = tl.exp(best - new_best)
        total = total * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
        best = new_best
    out_rows = out_ptr + ((row * heads + head) * GROUPS + groups[:, None]) * HEAD_DIM + dims[None, :]
    tl.store(out_rows, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=in_group[:, None])


DECODE_BLOCK = 32


@torch.library.custom_op("csm::decode_attention", mutates_args=(), device_types=("cuda", "cpu"))
def decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One new token per row: query [B, kv_heads, G, D] (G query heads folded per key head),
    keys, values: the rows' cache [B, kv_heads, max_len, D] (strided views), positions [B, 1]
    (any strides) -> softmax(q k^T / sqrt(D)) v over each row's keys 0..position [B, kv_heads, G, D].
    Each row reads only its own keys: no attention-length bucket, no padding reads."""
    batch, kv_heads, groups, head_dim = query.shape
    if keys.stride() != values.stride() or keys.stride(-1) != 1 or head_dim & (head_dim - 1):
        raise ValueError("decode_attention: keys and values must share a layout, head_dim contiguous, a power of two")
    _require_contiguous(query=query)
    out = torch.empty_like(query)
    _decode_attention_kernel[(batch, kv_heads)](
        query,
        keys,
        values,
        positions,
        out,
        positions.stride(0),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        head_dim**-0.5,
        GROUPS=groups,
        GROUPS_PADDED=triton.next_power_of_2(groups),
        HEAD_DIM=head_dim,
        BLOCK=DECODE_BLOCK,
    )
    return out


@decode_attention.register_fake
def _(query, keys, values, positions):
    return torch.empty_like(query)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@rotary_write_kv.register_fake
def _(qkv, cos, sin, positions, keys, values, heads, kv_heads):
    return qkv.new_empty((*qkv.shape[:2], heads, qkv.shape[-1]))


@silu_mul.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@sample.register_fake
def _(logits, temperature, kth_index, log_draws):
    return logits.new_empty(logits.shape[0], dtype=torch.long)
