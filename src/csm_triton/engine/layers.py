"""The transformer arithmetic of CSM's backbone and depth decoder, over weights taken
from transformers' modules, with a static KV cache addressed by row and position.

Why not call transformers' modules directly: their per-call cache objects, mask
construction and module dispatch cost more than the arithmetic at batch 1, and a
static cache addressed by rows is what lets requests join and leave a running batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.csm.modeling_csm import apply_rotary_pos_emb


class Linear:
    """`y = x @ W.T (+ b)`. On CPU in fp32 the weight is pre-packed for oneDNN once:
    the frame loop reads every weight each step, and oneDNN's packed layout reads them
    nearly twice as fast as MKL's GEMM at small batch (docs/performance.md).

    oneDNN's packed layout depends on the batch it is packed for: packed for one row
    it is the fastest at one row but ~1.5x slower at eight, where a layout packed for
    eight is the fastest (and at two to seven rows too). So a weight is packed once per
    size in `pack_batch_sizes`, and a call uses the packing for the smallest size that
    holds its rows (the largest packing beyond that).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 pack_batch_sizes: tuple[int, ...] = ()):
        weight = weight.detach().contiguous()
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.detach().contiguous()
        self.packings: list[tuple[int, torch.Tensor]] = []
        if weight.device.type == "cpu" and weight.dtype == torch.float32:  # oneDNN's fp32 CPU kernels only
            self.packings = [
                (rows, torch.ops.mkldnn._reorder_linear_weight(weight, rows)) for rows in sorted(set(pack_batch_sizes))
            ]
        self.weight = None if self.packings else weight  # only the packed copies are kept

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packings:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        weight = next((packed for rows, packed in self.packings if rows >= flat.shape[0]), self.packings[-1][1])
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as CsmRMSNorm, so fp32 results match bit for bit.
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    o_proj: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class TransformerStack:
    """A Llama-style decoder stack (CSM's backbone or depth decoder) with a static cache.

    Cache layout: one K and one V tensor per layer, [rows, kv_heads, max_len, head_dim].
    A call processes `x` [batch, tokens, hidden] whose batch item b lives in cache row
    `first_row + b` at positions `positions[b]`; each token attends to its row's
    positions 0..own position. The rows of a call are contiguous so that attention reads
    a view of the cache (`k[first_row:first_row + batch, :, :attend_len]`): gathering
    scattered rows would copy every item's keys and values, per layer and step.
    """

    def __init__(self, hf_model, *, pack_batch_sizes: tuple[int, ...] = ()):
        config = hf_model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.max_positions = config.max_position_embeddings
        self.layers = []
        for layer in hf_model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if config.hidden_act != "silu":
                raise ValueError(f"unsupported activation {config.hidden_act!r}")
            self.layers.append(
                LayerWeights(
                    input_norm=layer.input_layernorm.weight.detach(),
                    qkv=Linear(
                        torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),
                        _cat_bias(attention.q_proj, attention.k_proj, attention.v_proj),
                        pack_batch_sizes=pack_batch_sizes,
                    ),
                    o_proj=Linear(attention.o_proj.weight, attention.o_proj.bias, pack_batch_sizes=pack_batch_sizes),
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    gate_up=Linear(
                        torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                        _cat_bias(mlp.gate_proj, mlp.up_proj),
                        pack_batch_sizes=pack_batch_sizes,
                    ),
                    down=Linear(mlp.down_proj.weight, mlp.down_proj.bias, pack_batch_sizes=pack_batch_sizes),
                )
            )
        self.final_norm = hf_model.norm.weight.detach()
        self.intermediate_size = config.intermediate_size
        # cos/sin for every position, computed once by transformers' own rotary module.
        device = self.final_norm.device
        positions = torch.arange(self.max_positions, device=device)[None]
        cos, sin = hf_model.rotary_emb(self.final_norm[None, None], positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_positions, head_dim]

    def new_cache(self, rows: int, max_len: int, device, dtype) -> "KVCache":
        shape = (len(self.layers), rows, self.num_kv_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cache: "KVCache", first_row: int, positions: torch.Tensor,
                attend_len: int) -> torch.Tensor:
        """x [B, T, hidden] for cache rows first_row..first_row+B-1; positions [B, T];
        attend_len: keys 0..attend_len-1 are read."""
        batch, tokens, _ = x.shape
        cos, sin = self.cos[positions], self.sin[positions]  # [B, T, head_dim]
        key_positions = torch.arange(attend_len, device=x.device)
        mask = (key_positions[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, attend_len]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        rows = slice(first_row, first_row + batch)
        item = torch.arange(batch, device=x.device)[:, None].expand(batch, tokens)
        for index, layer in enumerate(self.layers):
            residual = x
            h = rms_norm(x, layer.input_norm, self.eps)
            q, k, v = layer.qkv(h).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys, values = cache.k[index, rows], cache.v[index, rows]  # views [B, kv_heads, max_len, head_dim]
            # Write this step's keys/values at each item's positions (B x T vectors), then
            # attend over a view: nothing of the earlier context is copied.
            keys[item, :, positions] = k.transpose(1, 2)
            values[item, :, positions] = v.transpose(1, 2)
            attended = F.scaled_dot_product_attention(q, keys[:, :, :attend_len], values[:, :, :attend_len],
                                                      attn_mask=mask, enable_gqa=True)
            x = residual + layer.o_proj(attended.transpose(1, 2).reshape(batch, tokens, q_size))
            residual = x
            gate, up = layer.gate_up(rms_norm(x, layer.post_norm, self.eps)).split(self.intermediate_size, dim=-1)
            x = residual + layer.down(F.silu(gate) * up)
        return rms_norm(x, self.final_norm, self.eps)


@dataclass
class KVCache:
    k: torch.Tensor  # [layers, rows, kv_heads, max_len, head_dim]
    v: torch.Tensor


def _cat_bias(*linears) -> torch.Tensor | None:
    biases = [linear.bias for linear in linears]
    if all(bias is None for bias in biases):
        return None
    return torch.cat([
        bias if bias is not None else torch.zeros(linear.out_features, device=linear.weight.device)
        for bias, linear in zip(biases, linears)
    ]).detach()
