"""CSM's language model (backbone + depth decoder + embeddings + heads) as the
engine runs it: batched over cache rows, one frame at a time.

Weights come from transformers' `CsmForConditionalGeneration`; the codec is not
kept (Mimi runs as ONNX models in Triton).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from csm_triton import constants as C
from csm_triton.engine import fused, kernels
from csm_triton.engine.device import device_context, host_to_device
from csm_triton.engine.layers import Geometry, KVCache, Linear, TransformerStack


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves the weight traffic that bounds a frame step on GPU; CPU stays fp32
    # so that tokens match transformers exactly (bf16 on CPU is a documented choice:
    # `dtype: bfloat16`, docs/performance.md for its speed and token agreement).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_dtype(dtype: torch.dtype, *, allow_float16: bool = False) -> None:
    """CSM was trained in bf16: fp16's 5-bit exponent overflows where bf16 does not, and
    its tokens were never compared with the model's. Refused unless asked for by name."""
    if dtype == torch.float16 and not allow_float16:
        raise ValueError(
            "dtype float16 is not supported: CSM was trained in bfloat16, use bfloat16 (GPU) or "
            "float32 (exact tokens); float16 runs only with the explicit opt-in allow_float16"
        )
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}: use bfloat16 or float32")


def to_compute_dtype(hf_model, device: torch.device, dtype: torch.dtype):
    """`hf_model.to(device, dtype)` as transformers' own bf16 load leaves it: the rotary
    modules' inverse frequencies stay fp32 (`.to` alone rounds them, which shifts the
    rotary angles of later positions; layers.rotary_tables)."""
    rotaries = [module for module in hf_model.modules() if hasattr(module, "inv_freq")]
    kept = [
        {
            name: buffer.float().clone()
            for name, buffer in module.named_buffers(recurse=False)
            if name in ("inv_freq", "original_inv_freq") and buffer.dtype == torch.float32
        }
        for module in rotaries
    ]
    hf_model = hf_model.to(device=device, dtype=dtype)
    for module, buffers in zip(rotaries, kept):
        for name, buffer in buffers.items():
            setattr(module, name, buffer.to(device))
    return hf_model


class CsmLM:
    def __init__(
        self,
        hf_model,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_batch: int | None = None,
        cpu_kernels: str = "measure",
        allow_float16: bool = False,
    ):
        """max_batch: the most requests a frame step will carry (the engine's slots);
        on CPU it decides the row buckets each weight is prepared for (kernels.row_buckets).
        cpu_kernels: "measure" times the kernels per weight shape at load and keeps the
        fastest; "mkl" or "onednn" forces one (engine/kernels.py). allow_float16: run
        fp16 all the same (check_dtype)."""
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        check_dtype(dtype, allow_float16=allow_float16)
        with device_context(device):  # cuda:N: whatever takes the current device takes N
            self._load(hf_model, device, dtype, max_batch, cpu_kernels)

    def _load(
        self, hf_model, device: torch.device, dtype: torch.dtype, max_batch: int | None, cpu_kernels: str
    ) -> None:
        # The heads keep the checkpoint's precision: their logits feed top-k in fp32, and
        # they are under 2 % of a frame's weight bytes in bf16, under 3 % in fp32.
        heads = hf_model.lm_head.weight.detach(), hf_model.depth_decoder.codebooks_head.weight.detach()
        hf_model = to_compute_dtype(hf_model, device, dtype).eval()
        config = hf_model.config
        self.config = config
        self.device, self.dtype = device, dtype
        self.num_codebooks = config.num_codebooks
        self.audio_vocab_size = config.vocab_size  # per codebook in the backbone head: 2051
        self.audio_token_id = config.audio_token_id
        self.audio_eos_token_id = config.audio_eos_token_id
        self.codebook_eos_token_id = config.codebook_eos_token_id
        with torch.no_grad():
            self.backbone = TransformerStack(hf_model.backbone_model)
            depth = hf_model.depth_decoder
            self.depth = TransformerStack(depth.model)
            self.text_embedding = hf_model.embed_text_tokens.weight.detach()
            # The bound every prompt id is checked against (engine.admission.check_request): the
            # rows the embedding really has, whatever the config says.
            self.text_vocab_size = self.text_embedding.shape[0]
            self.audio_embedding = hf_model.backbone_model.embed_tokens.embed_audio_tokens.weight.detach()
            self.audio_offsets = torch.arange(self.num_codebooks, device=device) * config.codebook_size
            # The heads keep only the 2,048 codes Mimi decodes: 2049..2051 are the LM's specials, never
            # sampled, so their logits need not exist (no masked fill per codebook).
            self.backbone_head = Linear(heads[0][: C.CODEBOOK_SIZE].to(device=device, dtype=torch.float32))
            self.depth_embedding = depth.model.embed_tokens.weight.detach()
            self.depth_vocab_size = depth.config.vocab_size
            self.depth_projector = Linear(depth.model.inputs_embeds_projector.weight)
            # One head per depth position (codebooks 1..31): logits = h @ W[p-1].
            self.depth_heads = [
                Linear(weight.T[: C.CODEBOOK_SIZE].to(device=device, dtype=torch.float32).contiguous())
                for weight in heads[1]
            ]
            self.kernel_report = kernels.choose_kernels(
                self.named_linears(), buckets=kernels.row_buckets(max_batch), mode=cpu_kernels, device=device
            )
            # On a GPU, before any CUDA graph is captured: the fused kernels run only where they
            # compile and agree with their eager forms at this model's shapes.
            self.fused_report = fused.check_kernels([self.backbone, self.depth], C.CODEBOOK_SIZE, device, dtype)
        self.backbone_hidden_size = config.hidden_size
        self.max_context = self.backbone.max_positions

    def named_linears(self) -> list[tuple[str, Linear]]:
        return [
            *self.backbone.named_linears("backbone"),
            ("backbone head", self.backbone_head),
            *self.depth.named_linears("depth"),
            ("depth projector", self.depth_projector),
            *(("depth head", head) for head in self.depth_heads),
        ]

    def weight_bytes_per_frame(self) -> int:
        """Weight bytes one frame step reads (one copy of each, at any batch): the
        backbone and its head once, the depth decoder and its projector once per
        codebook 1..31, each depth head once. The memory-bandwidth floor's numerator."""

        def size(linears) -> int:  # each in its own dtype (the heads are fp32)
            return sum(linear.out_features * linear.in_features * linear.dtype.itemsize for linear in linears)

        backbone = size(linear for _, linear in self.backbone.named_linears("")) + size([self.backbone_head])
        depth = size(linear for _, linear in self.depth.named_linears("")) + size([self.depth_projector])
        return backbone + (self.num_codebooks - 1) * depth + size(self.depth_heads)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | Path,
        *,
        device=None,
        dtype=None,
        max_batch: int | None = None,
        cpu_kernels: str = "measure",
        allow_float16: bool = False,
    ) -> CsmLM:
        from transformers import CsmForConditionalGeneration

        if dtype is not None:
            check_dtype(dtype, allow_float16=allow_float16)  # before seconds of loading
        hf_model = CsmForConditionalGeneration.from_pretrained(str(checkpoint_dir), dtype=torch.float32)
        hf_model.codec_model = None  # Mimi is served by the ONNX models
        return cls(
            hf_model,
            device=device,
            dtype=dtype,
            max_batch=max_batch,
            cpu_kernels=cpu_kernels,
            allow_float16=allow_float16,
        )

    # --- embeddings -------------------------------------------------------------------
    def embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., 32] -> the sum of the codebooks' embeddings [..., hidden]."""
        return self.audio_embedding[codes + self.audio_offsets].sum(dim=-2)

    def embed_prompt(self, input_ids: np.ndarray, audio_codes: np.ndarray) -> torch.Tensor:
        """input_ids [T] with AUDIO placeholders, audio_codes [placeholders, 32] (host
        arrays) -> [T, hidden]. The placeholders are found on the host, so nothing waits
        for the device (a boolean mask on the device would read its count back)."""
        device = self.device
        embeds = self.text_embedding[host_to_device(input_ids, device)]
        audio_positions = np.flatnonzero(input_ids == self.audio_token_id)
        if audio_positions.size:
            frames = self.embed_frames(host_to_device(audio_codes, device))
            embeds[host_to_device(audio_positions, device)] = frames.to(embeds.dtype)
        eos_positions = np.flatnonzero(input_ids == self.audio_eos_token_id)
        if eos_positions.size:
            eos_frame = torch.full((self.num_codebooks,), self.codebook_eos_token_id, device=device)
            embeds[host_to_device(eos_positions, device)] = self.embed_frames(eos_frame).to(embeds.dtype)
        return embeds

    # --- caches -----------------------------------------------------------------------
    def new_backbone_cache(self, rows: int, max_len: int | None = None) -> KVCache:
        return self.backbone.new_cache(rows, max_len or self.max_context, self.device, self.dtype)

    def new_depth_cache(self, rows: int) -> KVCache:
        return self.depth.new_cache(rows, self.num_codebooks + 1, self.device, self.dtype)

    def backbone_bytes_per_token(self) -> int:
        return self.backbone.cache_bytes_per_token(self.dtype)

    def slot_bytes(self, max_context: int) -> int:
        """One engine slot's buffers: its backbone KV rows, depth-decoder KV row and hidden
        state (the engine allocates them per slot)."""
        return (
            self.backbone_bytes_per_token() * max_context
            + self.depth.cache_bytes_per_token(self.dtype) * (self.num_codebooks + 1)
            + self.backbone_hidden_size * self.dtype.itemsize
        )

    # --- steps ------------------------------------------------------------------------
    def backbone_forward(
        self,
        embeds: torch.Tensor,
        cache: KVCache,
        first_row: int,
        positions: torch.Tensor,
        lora=None,
        *,
        last: torch.Tensor | None = None,
        attend_len: int | None = None,
    ) -> torch.Tensor:
        """embeds [B, T, hidden] for cache rows first_row.. at positions [B, T] -> each
        item's hidden state at token `last` [B] (default: the last token) [B, hidden].
        attend_len: keys 0..attend_len-1 are read (default: from positions, which reads
        them back to the host). lora: the rows' adapters (engine.lora)."""
        if attend_len is None:
            attend_len = int(positions.max()) + 1
        hidden = self.backbone.forward(embeds, cache, first_row, positions, attend_len, lora=lora)
        if last is None:
            return hidden[:, -1]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def codebook0_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, 2048] fp32: the codes Mimi decodes."""
        return self.backbone_head(hidden.float())

    def depth_geometry(self, batch: int, position: int, tokens: int) -> Geometry:
        """The depth decoder's geometry for a call at `position` with `tokens` inputs: the
        same at every frame, so a frame step computes it once."""
        positions = torch.arange(position - tokens + 1, position + 1, device=self.device).expand(batch, tokens)
        return self.depth.geometry(positions, position + 1)

    def depth_logits(
        self, step_input: torch.Tensor, cache: KVCache, position: int, geometry: Geometry | None = None, lora=None
    ) -> torch.Tensor:
        """One depth-decoder call for the whole batch at `position` (all items in lockstep).

        step_input [B, T, backbone_hidden] holds the already-embedded inputs; returns the
        logits of codebook `position` [B, 2048].
        """
        batch, tokens, _ = step_input.shape
        geometry = geometry if geometry is not None else self.depth_geometry(batch, position, tokens)
        hidden = self.depth.forward(self.depth_projector(step_input), cache, 0, geometry=geometry, lora=lora)
        return self.depth_heads[position - 1](hidden[:, -1].float())

    def depth_embed(self, codes: torch.Tensor, codebook: int) -> torch.Tensor:
        """Embedding of codebook `codebook`'s codes [B] as depth-decoder input [B, 1, hidden]."""
        # The codebook's rows as a view, then one lookup (no offset added per call).
        table = self.depth_embedding[codebook * self.depth_vocab_size : (codebook + 1) * self.depth_vocab_size]
        return table[codes][:, None]
