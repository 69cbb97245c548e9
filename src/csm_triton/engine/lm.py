"""CSM's language model (backbone + depth decoder + embeddings + heads) as the
engine runs it: batched over cache rows, one frame at a time.

Weights come from transformers' `CsmForConditionalGeneration`; the codec is not
kept (Mimi runs as ONNX models in Triton).
"""

from __future__ import annotations

from pathlib import Path

import torch

from csm_triton import constants as C
from csm_triton.engine import kernels
from csm_triton.engine.layers import KVCache, Linear, TransformerStack

NEG_INF = float("-inf")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves the weight traffic that bounds a frame step on GPU; CPU stays fp32
    # so that tokens match transformers exactly (bf16 on CPU is a documented choice:
    # `dtype: bfloat16`, docs/performance.md for its speed and token agreement).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class CsmLM:
    def __init__(self, hf_model, *, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 max_batch: int | None = None, cpu_kernels: str = "measure"):
        """max_batch: the most requests a frame step will carry (the engine's slots);
        on CPU it decides the row buckets each weight is prepared for (kernels.row_buckets).
        cpu_kernels: "measure" times the kernels per weight shape at load and keeps the
        fastest; "mkl" or "onednn" forces one (engine/kernels.py)."""
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        hf_model = hf_model.to(device=device, dtype=dtype).eval()
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
            # The bound every prompt id is checked against (GenerationEngine._check): the
            # rows the embedding really has, whatever the config says.
            self.text_vocab_size = self.text_embedding.shape[0]
            self.audio_embedding = hf_model.backbone_model.embed_tokens.embed_audio_tokens.weight.detach()
            self.audio_offsets = torch.arange(self.num_codebooks, device=device) * config.codebook_size
            self.backbone_head = Linear(hf_model.lm_head.weight)
            self.depth_embedding = depth.model.embed_tokens.weight.detach()
            self.depth_vocab_size = depth.config.vocab_size
            self.depth_projector = Linear(depth.model.inputs_embeds_projector.weight)
            # One head per depth position (codebooks 1..31): logits = h @ W[p-1].
            self.depth_heads = [Linear(weight.T.contiguous()) for weight in depth.codebooks_head.weight.detach()]
            self.kernel_report = kernels.choose_kernels(
                self.named_linears(), buckets=kernels.row_buckets(max_batch), mode=cpu_kernels,
                device=device, dtype=dtype)
        self.backbone_hidden_size = config.hidden_size
        self.max_context = self.backbone.max_positions

    def named_linears(self) -> list[tuple[str, Linear]]:
        return [*self.backbone.named_linears("backbone"), ("backbone head", self.backbone_head),
                *self.depth.named_linears("depth"), ("depth projector", self.depth_projector),
                *(("depth head", head) for head in self.depth_heads)]

    def weight_bytes_per_frame(self) -> int:
        """Weight bytes one frame step reads (one copy of each, at any batch): the
        backbone and its head once, the depth decoder and its projector once per
        codebook 1..31, each depth head once. The memory-bandwidth floor's numerator."""
        def size(linears) -> int:
            return sum(linear.out_features * linear.in_features for linear in linears)

        element = torch.empty((), dtype=self.dtype).element_size()
        backbone = size(linear for _, linear in self.backbone.named_linears("")) + size([self.backbone_head])
        depth = size(linear for _, linear in self.depth.named_linears("")) + size([self.depth_projector])
        return element * (backbone + (self.num_codebooks - 1) * depth + size(self.depth_heads))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, *, device=None, dtype=None,
                        max_batch: int | None = None, cpu_kernels: str = "measure") -> "CsmLM":
        from transformers import CsmForConditionalGeneration

        hf_model = CsmForConditionalGeneration.from_pretrained(str(checkpoint_dir), dtype=torch.float32)
        hf_model.codec_model = None  # Mimi is served by the ONNX models
        return cls(hf_model, device=device, dtype=dtype, max_batch=max_batch, cpu_kernels=cpu_kernels)

    # --- embeddings -------------------------------------------------------------------
    def embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., 32] -> the sum of the codebooks' embeddings [..., hidden]."""
        return self.audio_embedding[codes + self.audio_offsets].sum(dim=-2)

    def embed_prompt(self, input_ids: torch.Tensor, audio_codes: torch.Tensor) -> torch.Tensor:
        """input_ids [T] with AUDIO placeholders, audio_codes [placeholders, 32] -> [T, hidden]."""
        embeds = self.text_embedding[input_ids]
        audio_positions = input_ids == self.audio_token_id
        if audio_positions.any():
            embeds[audio_positions] = self.embed_frames(audio_codes).to(embeds.dtype)
        eos_positions = input_ids == self.audio_eos_token_id
        if eos_positions.any():
            eos_frame = torch.full((self.num_codebooks,), self.codebook_eos_token_id, device=self.device)
            embeds[eos_positions] = self.embed_frames(eos_frame).to(embeds.dtype)
        return embeds

    # --- caches -----------------------------------------------------------------------
    def new_backbone_cache(self, rows: int, max_len: int | None = None) -> KVCache:
        return self.backbone.new_cache(rows, max_len or self.max_context, self.device, self.dtype)

    def new_depth_cache(self, rows: int) -> KVCache:
        return self.depth.new_cache(rows, self.num_codebooks + 1, self.device, self.dtype)

    def backbone_bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.backbone.layers) * self.backbone.num_kv_heads * self.backbone.head_dim * element

    # --- steps ------------------------------------------------------------------------
    def backbone_forward(self, embeds: torch.Tensor, cache: KVCache, first_row: int,
                         positions: torch.Tensor) -> torch.Tensor:
        """embeds [B, T, hidden] for cache rows first_row.. at positions [B, T] -> last
        hidden state per item [B, hidden]."""
        attend_len = int(positions.max()) + 1
        hidden = self.backbone.forward(embeds, cache, first_row, positions, attend_len)
        return hidden[:, -1]

    def codebook0_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._masked(self.backbone_head(hidden))

    def depth_logits(self, step_input: torch.Tensor, cache: KVCache, position: int) -> torch.Tensor:
        """One depth-decoder call for the whole batch at `position` (all items in lockstep).

        step_input [B, T, backbone_hidden] holds the already-embedded inputs; returns the
        logits of codebook `position` [B, vocab].
        """
        batch, tokens, _ = step_input.shape
        positions = torch.arange(position - tokens + 1, position + 1, device=self.device).expand(batch, tokens)
        hidden = self.depth.forward(self.depth_projector(step_input), cache, 0, positions, position + 1)
        return self._masked(self.depth_heads[position - 1](hidden[:, -1]))

    def depth_embed(self, codes: torch.Tensor, codebook: int) -> torch.Tensor:
        """Embedding of codebook `codebook`'s codes [B] as depth-decoder input [B, 1, hidden]."""
        return self.depth_embedding[codes + codebook * self.depth_vocab_size][:, None]

    def _masked(self, logits: torch.Tensor) -> torch.Tensor:
        # Codes >= 2048 are the LM's specials: never sampled (Mimi cannot decode them).
        logits = logits.float()
        logits[..., C.CODEBOOK_SIZE:] = NEG_INF
        return logits
