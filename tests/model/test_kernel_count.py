"""The GPU frame step's kernel launches at CSM-1B's layer counts (loadtest/kernel_count.py's
count, the method in its docstring): under the issue's bound of 1,600 per frame, with one
fused kernel per norm, rotary-and-cache write, SiLU·mul and codebook draw."""

from __future__ import annotations

import torch

from loadtest import kernel_count  # sets TRITON_INTERPRET before Triton is imported


def test_a_frame_step_launches_at_most_1600_kernels():
    model = kernel_count.csm_1b_structure()
    lm = kernel_count.CsmLM(model, device=torch.device("cpu"), dtype=torch.bfloat16, max_batch=4, cpu_kernels="mkl")
    counted = kernel_count.count(4, lm)
    layer_calls = 16 + 31 * 4
    assert counted["kernels"] <= 1600, counted["by_op"]
    ops = counted["by_op"]
    assert ops["csm::add_rms_norm"] == 2 * layer_calls  # every residual add is fused into a norm
    assert ops["csm::rotary_write_kv"] == ops["csm::silu_mul"] == layer_calls
    # One new token per row: the decode kernel; SDPA only where a call has two tokens (the
    # depth decoder's first call of a frame: the backbone state and codebook 0, 4 layers).
    assert ops["scaled_dot_product_attention"] == 4 and ops["csm::decode_attention"] == layer_calls - 4
    assert ops["csm::sample"] == 32
    assert not {"flip", "index_put_", "silu", "topk"} & set(ops)  # what the fused kernels replaced
