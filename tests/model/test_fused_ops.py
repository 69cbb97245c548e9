"""Each operator the frame step was rewritten with, against its eager reference
(transformers' own modules and functions): RMSNorm as one fused operator, rotary on
query and key heads together with the sign folded into the sin table, grouped query
heads folded into the query rows instead of SDPA's enable_gqa, the depth decoder's
geometry made once per frame step, and the GPU's attention kernels fenced off the math
fallback (the deciding logic; the fence itself acts only on CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from transformers.models.csm.modeling_csm import CsmRMSNorm, apply_rotary_pos_emb

from csm_triton.engine.fused import rms_norm, rotate_halves
from csm_triton.engine.layers import attention_backends

SHAPES = [(1, 1, 2048), (64, 1, 2048), (8, 1, 1024), (2, 37, 2048)]


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_is_transformers_rmsnorm_bit_for_bit_in_fp32(shape):
    torch.manual_seed(0)
    module = CsmRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.2)
    x = torch.randn(shape) * 3
    assert torch.equal(rms_norm(x, module.weight.detach(), 1e-5), module(x).detach())


def test_rms_norm_in_bf16_is_within_one_ulp_of_transformers_and_no_further_from_fp32():
    torch.manual_seed(1)
    module = CsmRMSNorm(2048, eps=1e-5)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.2)
    x32 = torch.randn(64, 1, 2048) * 3
    reference = module(x32).detach()  # fp32
    module_bf16 = module.to(torch.bfloat16)
    theirs = module_bf16(x32.bfloat16()).detach().float()
    ours = rms_norm(x32.bfloat16(), module_bf16.weight.detach(), 1e-5).float()
    ulp = torch.finfo(torch.bfloat16).eps * theirs.abs().clamp_min(2**-126)
    assert ((ours - theirs).abs() <= ulp * 1.0001).all()
    assert (ours - reference).abs().mean() <= (theirs - reference).abs().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_with_the_folded_sin_is_transformers_rotary_exactly(dtype):
    torch.manual_seed(2)
    batch, tokens, heads, kv_heads, head_dim = 3, 5, 8, 2, 64
    q = torch.randn(batch, heads, tokens, head_dim).to(dtype)
    k = torch.randn(batch, kv_heads, tokens, head_dim).to(dtype)
    angles = torch.rand(batch, tokens, head_dim // 2) * 100
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)  # [B, heads, T, D]

    half = head_dim // 2
    sin_folded = torch.cat([-sin[..., :half], sin[..., half:]], -1)
    qk = torch.cat(
        [q.transpose(1, 2), k.transpose(1, 2)], dim=2
    )  # [B, T, heads + kv_heads, D], as the engine holds them
    rotated = qk * cos[:, :, None] + rotate_halves(qk) * sin_folded[:, :, None]
    assert torch.equal(rotated[:, :, :heads].transpose(1, 2), q_ref)
    assert torch.equal(rotated[:, :, heads:].transpose(1, 2), k_ref)


def folded_attention(q, keys, values, mask, groups):
    """The engine's fold (layers.TransformerStack.forward): q [B, T, heads, D]."""
    batch, tokens, heads, head_dim = q.shape
    kv_heads = heads // groups
    folded = (
        q.unflatten(2, (kv_heads, groups)).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, groups * tokens, head_dim)
    )
    if tokens > 1:
        mask = mask.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask)
    return out.unflatten(2, (groups, tokens)).permute(0, 3, 1, 2, 4).reshape(batch, tokens, heads * head_dim)


@pytest.mark.parametrize("tokens", [1, 6])
@pytest.mark.parametrize("heads, kv_heads", [(32, 8), (8, 2)])  # CSM-1B's backbone and depth decoder
def test_folded_query_heads_attend_exactly_as_enable_gqa_does(tokens, heads, kv_heads):
    torch.manual_seed(3)
    batch, head_dim, attend_len = 4, 64, 256
    positions = torch.randint(tokens - 1, attend_len, (batch, 1)) - torch.arange(tokens - 1, -1, -1)[None]
    q = torch.randn(batch, tokens, heads, head_dim)
    keys, values = (
        torch.randn(batch, kv_heads, attend_len, head_dim),
        torch.randn(batch, kv_heads, attend_len, head_dim),
    )
    mask = (torch.arange(attend_len)[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, L]
    reference = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
    reference = reference.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    ours = folded_attention(q, keys, values, mask, heads // kv_heads)
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6)  # (CPU kernels may block differently)
    # And the eager definition: each query head j*G+g attends key head j.
    repeated_k = keys.repeat_interleave(heads // kv_heads, dim=1)
    repeated_v = values.repeat_interleave(heads // kv_heads, dim=1)
    eager = (
        torch.softmax(
            (q.transpose(1, 2) @ repeated_k.transpose(-1, -2)) / head_dim**0.5 + torch.where(mask, 0.0, float("-inf")),
            dim=-1,
        )
        @ repeated_v
    )
    torch.testing.assert_close(
        ours, eager.transpose(1, 2).reshape(batch, tokens, heads * head_dim), rtol=1e-5, atol=1e-5
    )


def test_the_gpu_never_falls_back_to_the_math_kernel_and_the_cpu_keeps_its_own():
    assert attention_backends(torch.device("cpu")) is None
    allowed = attention_backends(torch.device("cuda", 1))
    assert SDPBackend.MATH not in allowed and SDPBackend.EFFICIENT_ATTENTION in allowed
    assert attention_backends(torch.device("cuda")) == allowed


def test_the_depth_geometry_made_once_is_the_one_each_call_would_make(lm):
    for position, tokens in [(1, 2), (2, 1), (17, 1), (31, 1)]:
        made_once = lm.depth_geometry(4, position, tokens)
        positions = torch.arange(position - tokens + 1, position + 1).expand(4, tokens)
        per_call = lm.depth.geometry(positions, position + 1)
        for ours, theirs in zip(made_once, per_call):
            assert ours == theirs if isinstance(ours, int) else torch.equal(ours, theirs)
        assert made_once.mask.shape[2] == (tokens * lm.depth.groups if tokens > 1 else 1)
