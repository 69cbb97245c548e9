"""The transformer arithmetic of CSM's backbone and depth decoder, over weights taken
from transformers' modules, with a static KV cache addressed by row and position.

Why not call transformers' modules directly: their per-call cache objects, mask
construction and module dispatch cost more than the arithmetic at batch 1, and a
static cache addressed by rows is what lets requests join and leave a running batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from csm_triton.engine import fused, kernels


class Linear:
    """`y = x @ W.T (+ b)` with, on CPU, a kernel per row bucket (engine/kernels.py).

    Built with the plain weight and `F.linear`; `use({rows: kernel})` then prepares the
    copy each bucket's kernel reads (oneDNN's packed layout depends on the rows it is
    packed for) and drops the plain weight unless a bucket reads it. A call with r rows
    uses the smallest bucket >= r (the largest beyond that).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.detach().contiguous()
        self.out_features, self.in_features = self.weight.shape
        self.dtype = self.weight.dtype
        self.bias = None if bias is None else bias.detach().contiguous()
        self.buckets: list[tuple[int, str, torch.Tensor]] = []  # (rows, kernel, the copy it reads)

    def use(self, choice: dict[int, str]) -> None:
        plain = self.weight
        if plain is None:
            raise RuntimeError("Linear.use: the kernels were already chosen (the plain weight is gone)")
        self.buckets = [(rows, kernel, kernels.prepare(kernel, plain, rows)) for rows, kernel in sorted(choice.items())]
        # Only the copies some bucket reads stay: a second copy of CSM-1B is ~4.4 GB.
        self.weight = plain if any(kernel == "mkl" for _, kernel, _ in self.buckets) else None

    @property
    def packings(self) -> list[tuple[int, torch.Tensor]]:
        """The oneDNN-packed copies, by the rows they are packed for."""
        return [(rows, copy) for rows, kernel, copy in self.buckets if kernel == "onednn"]

    def copies(self) -> list[torch.Tensor]:
        """Every weight copy this Linear keeps (the plain weight counted once)."""
        kept = {id(copy): copy for _, _, copy in self.buckets}
        if self.weight is not None:
            kept[id(self.weight)] = self.weight
        return list(kept.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.buckets:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        _, kernel, weight = next((bucket for bucket in self.buckets if bucket[0] >= rows), self.buckets[-1])
        return kernels.apply(kernel, flat, weight, self.bias).reshape(*x.shape[:-1], self.out_features)


# On a GPU the attention must never fall back to SDPA's math kernel (an fp32 upcast of
# the whole score matrix, keys and values repeated per query head: ~10x slower, and a
# graph pool of gigabytes). Grouped query heads are folded into the query rows so head
# counts match, which the fused kernels need; with the math kernel left out, a shape no
# fused kernel takes fails at warm-up (load) instead of running 10x slower in service.
FUSED_ATTENTION = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)


def attention_backends(device: torch.device) -> tuple[SDPBackend, ...] | None:
    """The SDPA kernels allowed on `device`; None: any (the CPU's own are all fine)."""
    return FUSED_ATTENTION if torch.device(device).type == "cuda" else None


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    backends = attention_backends(device)
    return contextlib.nullcontext() if backends is None else sdpa_kernel(list(backends))


class Geometry(NamedTuple):
    """What every layer of one forward call shares (computed once per call, or once per
    frame step for the depth decoder's fixed positions)."""

    cos: torch.Tensor  # [B, T, 1, head_dim] at each token's position
    sin: torch.Tensor  # the same, sign-folded for rotate_halves
    mask: torch.Tensor  # [B, 1, groups*T or 1, attend_len]: True where a query row may attend
    item: torch.Tensor  # [B, T]: each token's batch index, for the cache writes
    positions: torch.Tensor  # [B, T]
    attend_len: int


def rotary_tables(rotary_emb, max_positions: int, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, head_dim] of transformers' rotary module, from fp32
    inverse frequencies, in fp32 arithmetic (as its forward does), cast once to `dtype`.

    Why not the module's buffer as it comes: `model.to(bfloat16)` rounds `inv_freq` to
    bf16 too (transformers' own bf16 load, `from_pretrained(dtype=bfloat16)`, keeps it
    fp32). With CSM's llama3 rope and 64-dim heads that rounding moves the tables by
    0.09 at position 100 and up to 1.6 by position 2047; bf16 storage of the values
    themselves is off by at most 0.004. So a rounded buffer is recomputed from the
    module's config with the module's own init function."""
    inv_freq, scaling = rotary_emb.inv_freq, rotary_emb.attention_scaling
    if inv_freq.dtype != torch.float32:
        rope_type = rotary_emb.config.rope_parameters["rope_type"]
        init = rotary_emb.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
        inv_freq, scaling = init(rotary_emb.config)
    inv_freq = inv_freq.to(device=device, dtype=torch.float32)
    # The same operations as CsmRotaryEmbedding.forward, so fp32 tables equal its own.
    freqs = torch.arange(max_positions, device=device)[:, None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


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

    def __init__(self, hf_model):
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
                    ),
                    o_proj=Linear(attention.o_proj.weight, attention.o_proj.bias),
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    gate_up=Linear(
                        torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                        _cat_bias(mlp.gate_proj, mlp.up_proj),
                    ),
                    down=Linear(mlp.down_proj.weight, mlp.down_proj.bias),
                )
            )
        self.final_norm = hf_model.norm.weight.detach()
        self.intermediate_size = config.intermediate_size
        # cos/sin for every position, computed once in fp32 and cast to the compute dtype;
        # sin's first half negated for rotate_halves.
        self.cos, self.sin = rotary_tables(
            hf_model.rotary_emb, self.max_positions, self.final_norm.device, self.final_norm.dtype
        )  # [max_positions, head_dim]
        half = self.head_dim // 2
        self.sin_folded = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)
        self.groups = self.num_heads // self.num_kv_heads

    def named_linears(self, prefix: str) -> list[tuple[str, Linear]]:
        return [
            (f"{prefix} {name}", getattr(layer, name))
            for layer in self.layers
            for name in ("qkv", "o_proj", "gate_up", "down")
        ]

    def cache_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V of every layer for one position of one row (new_cache's layout)."""
        return 2 * len(self.layers) * self.num_kv_heads * self.head_dim * dtype.itemsize

    def new_cache(self, rows: int, max_len: int, device, dtype) -> KVCache:
        shape = (len(self.layers), rows, self.num_kv_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def geometry(self, positions: torch.Tensor, attend_len: int) -> Geometry:
        """positions [B, T] (each row's tokens) attending keys 0..attend_len-1."""
        batch, tokens = positions.shape
        cos, sin = self.cos[positions][:, :, None], self.sin_folded[positions][:, :, None]
        key_positions = torch.arange(attend_len, device=positions.device)
        mask = (key_positions[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, attend_len]
        if tokens > 1:  # folded query rows are (group member, token): each member repeats the tokens' mask
            mask = mask.repeat(1, 1, self.groups, 1)
        item = torch.arange(batch, device=positions.device)[:, None].expand(batch, tokens)
        return Geometry(cos, sin, mask, item, positions, attend_len)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache,
        first_row: int,
        positions: torch.Tensor | None = None,
        attend_len: int | None = None,
        *,
        geometry: Geometry | None = None,
        lora=None,
    ) -> torch.Tensor:
        """x [B, T, hidden] for cache rows first_row..first_row+B-1; positions [B, T];
        attend_len: keys 0..attend_len-1 are read. Or a precomputed `geometry` instead.
        lora: the rows' adapters (engine.lora.LoraRows), added to every fused linear."""

        lora = lora.prepared() if lora is not None and lora.masks is None else lora

        def linear(index: int, name: str, inputs: torch.Tensor) -> torch.Tensor:
            out = getattr(self.layers[index], name)(inputs)
            return out if lora is None else out + lora.delta(index, name, inputs)

        batch, tokens, _ = x.shape
        g = geometry if geometry is not None else self.geometry(positions, attend_len)
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        rows = slice(first_row, first_row + batch)
        with attention_kernels(x.device):
            # Each layer's residual add is fused into the norm after it (the next layer's
            # input norm, or the final one): `delta` waits to be added to `residual`.
            residual, delta = x, None
            for index, layer in enumerate(self.layers):
                if delta is None:
                    normed = fused.rms_norm(residual, layer.input_norm, self.eps)
                else:
                    normed, residual = fused.add_rms_norm(delta, residual, layer.input_norm, self.eps)
                qkv = linear(index, "qkv", normed).view(batch, tokens, heads + 2 * kv_heads, head_dim)
                keys, values = cache.k[index, rows], cache.v[index, rows]  # views [B, kv_heads, max_len, head_dim]
                # Rotary on the query and key heads, this step's keys and values written to
                # the cache; attention then reads a view of it.
                q = fused.rotary_write_kv(qkv, g, keys, values, heads, kv_heads)
                # Query heads j*G..j*G+G-1 share key head j: fold them into the query rows
                # ([B, kv_heads, G*T, D]), so head counts match without repeating keys.
                q = q.unflatten(2, (kv_heads, self.groups)).permute(0, 2, 3, 1, 4)
                q = q.reshape(batch, kv_heads, self.groups * tokens, head_dim)
                attended = fused.attention(q, keys, values, g)
                attended = attended.unflatten(2, (self.groups, tokens)).permute(0, 3, 1, 2, 4)
                delta = linear(index, "o_proj", attended.reshape(batch, tokens, heads * head_dim))
                normed, residual = fused.add_rms_norm(delta, residual, layer.post_norm, self.eps)
                delta = linear(index, "down", fused.silu_mul(linear(index, "gate_up", normed)))
        if delta is None:  # a stack without layers
            return fused.rms_norm(residual, self.final_norm, self.eps)
        return fused.add_rms_norm(delta, residual, self.final_norm, self.eps)[0]


@dataclass
class KVCache:
    k: torch.Tensor  # [layers, rows, kv_heads, max_len, head_dim]
    v: torch.Tensor


def _cat_bias(*linears) -> torch.Tensor | None:
    biases = [linear.bias for linear in linears]
    if all(bias is None for bias in biases):
        return None
    return torch.cat(
        [
            bias if bias is not None else torch.zeros(linear.out_features, device=linear.weight.device)
            for bias, linear in zip(biases, linears)
        ]
    ).detach()
