"""Training examples -> the model's inputs, with transformers' own CSM labels.

`CsmProcessor(..., output_labels=True)` lays out the prompt and the labels: -100 on text,
the audio token / audio-eos ids on frames, -101 on frames the depth decoder skips
(`depth_decoder_labels_ratio`). The processor would have the model run Mimi on every
step; here the cached codes take its place: each `<|AUDIO|>` position gets its frame's
code embedding and the labels are expanded to the 32 codebooks exactly as
`CsmForConditionalGeneration._merge_input_ids_with_input_values` does. A context turn
(the speaker's previous utterance) is input only: its labels are -100.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from csm_triton import constants as C

IGNORE = -100
DEPTH_DECODER_SKIP = -101  # CsmProcessor's mark: backbone label only


@dataclasses.dataclass(frozen=True)
class Turn:
    speaker: int
    text: str
    codes: np.ndarray  # [frames, 32]


@dataclasses.dataclass(frozen=True)
class Example:
    target: Turn
    context: Turn | None = None

    @property
    def turns(self) -> list[Turn]:
        return [self.context, self.target] if self.context is not None else [self.target]


def build_batch(processor, model, examples: list[Example], *, depth_decoder_labels_ratio: float) -> dict:
    """inputs_embeds, attention_mask and [batch, seq, 32] labels for `model` (the bare
    CsmForConditionalGeneration). The processor's frame sampling uses torch's global RNG:
    seed it before calling for a reproducible batch."""
    config = model.config
    texts, placeholders, codes = [], [], []
    for example in examples:
        conversation = [
            {"role": str(turn.speaker), "content": [{"type": "text", "text": turn.text}, {"type": "audio"}]}
            for turn in example.turns
        ]
        texts.append(processor.apply_chat_template(conversation, tokenize=False))
        for turn in example.turns:
            # Only the length matters: the processor counts <|AUDIO|> tokens from it.
            placeholders.append(np.zeros(turn.codes.shape[0] * C.SAMPLES_PER_FRAME, dtype=np.float32))
            codes.append(torch.from_numpy(turn.codes.astype(np.int64)))
    encoded = processor(
        text=texts,
        audio=placeholders,
        output_labels=True,
        depth_decoder_labels_ratio=depth_decoder_labels_ratio,
        return_tensors="pt",
    )
    input_ids, labels = encoded["input_ids"], encoded["labels"]
    device = next(model.parameters()).device
    input_ids, labels = input_ids.to(device), labels.to(device)
    frames = torch.cat(codes).to(device)  # every turn's frames, in prompt order
    audio_mask = input_ids == config.audio_token_id
    eos_mask = input_ids == config.audio_eos_token_id
    if int(audio_mask.sum()) != frames.shape[0]:
        raise ValueError(f"{int(audio_mask.sum())} audio positions for {frames.shape[0]} cached frames")
    eos_frame = torch.full((1, config.num_codebooks), config.codebook_eos_token_id, dtype=torch.long, device=device)

    embeds = model.embed_text_tokens(input_ids)
    # The embedding sums over codebooks on dim 2: it wants [batch, frames, 32].
    embeds[audio_mask] = model.backbone_model.embed_tokens(frames.unsqueeze(0))[0].to(embeds.dtype)
    embeds[eos_mask] = (
        model.backbone_model.embed_tokens(eos_frame.unsqueeze(0))[0].to(embeds.dtype).expand(int(eos_mask.sum()), -1)
    )

    expanded = labels.unsqueeze(-1).repeat(1, 1, config.num_codebooks)
    expanded[audio_mask] = frames
    expanded[eos_mask] = eos_frame
    expanded[..., 1:][labels == DEPTH_DECODER_SKIP] = IGNORE
    # The target turn starts at the last <bos> of its row; everything before is context.
    bos = (input_ids == config.bos_token_id).int()
    positions = torch.arange(input_ids.shape[1], device=device)
    target_start = (bos * positions).max(dim=1).values
    expanded[positions.unsqueeze(0) < target_start.unsqueeze(1)] = IGNORE
    return {"inputs_embeds": embeds, "attention_mask": encoded["attention_mask"].to(device), "labels": expanded}
