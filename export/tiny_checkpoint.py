"""A tiny, random-weight CSM checkpoint in the exact Hugging Face layout of `sesame/csm-1b`.

    python -m export.tiny_checkpoint --out DIR [--seed N]

Tests and dev machines use it instead of the gated 1B weights: every structural
feature is real (32 codebooks of 2051 LM entries, grouped-query attention, llama3
rope, the depth decoder's projection, Mimi's full geometry), only the widths and
layer counts shrink. Mimi keeps its real kernels and strides because
`CsmProcessor` hardcodes them to count `<|AUDIO|>` tokens (1 s -> 13 frames).
The same seed gives a byte-identical `model.safetensors`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CsmConfig,
    CsmDepthDecoderConfig,
    CsmForConditionalGeneration,
    CsmProcessor,
    EncodecFeatureExtractor,
    MimiConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.mimi.modeling_mimi import MimiEuclideanCodebook

from csm_triton import constants as C

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
# Trained before any merge, the specials take ids 0..3 in this order.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, C.AUDIO_TOKEN, C.AUDIO_EOS_TOKEN)
TOKENIZER_VOCAB_SIZE = 400

# Enough varied English for ~140 BPE merges above the 256 byte symbols.
TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly.",
    "Hello there, how are you doing today? I am doing well, thank you for asking.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "A conversational speech model turns text into natural sounding speech for each speaker.",
    "We walked along the river in the morning and talked about the weather and the news.",
    "Numbers like one, two, three, four, five, six, seven, eight, nine and ten are common.",
    "Please remember to bring your umbrella, because it might rain later this afternoon.",
    "The library opens at nine o'clock and closes at six in the evening on weekdays.",
    "Could you tell me where the nearest station is? It is just around the corner.",
    "Every speaker has a voice of their own, with its pitch, rhythm, accent and tone.",
)

# From transformers' CSM conversion script (models/csm/convert_csm.py): roles are
# speaker ids as strings, every turn but the last carries one text and one audio.
CHAT_TEMPLATE = """
{%- for message in messages %}
    {#-- Validate role is a stringified integer --#}
    {%- if not message['role'] is string or not message['role'].isdigit() %}
        {{- raise_exception("The role must be an integer or a stringified integer (e.g. '0') designating the speaker id") }}
    {%- endif %}

    {#-- Validate content is a list --#}
    {%- set content = message['content'] %}
    {%- if content is not iterable or content is string %}
        {{- raise_exception("The content must be a list") }}
    {%- endif %}

    {#-- Collect content types --#}
    {%- set content_types = content | map(attribute='type') | list %}
    {%- set is_last = loop.last %}

    {#-- Last message validation --#}
    {%- if is_last %}
        {%- if 'text' not in content_types %}
            {{- raise_exception("The last message must include one item of type 'text'") }}
        {%- elif (content_types | select('equalto', 'text') | list | length > 1) or (content_types | select('equalto', 'audio') | list | length > 1) %}
            {{- raise_exception("At most two items are allowed in the last message: one 'text' and one 'audio'") }}
        {%- endif %}

    {#-- All other messages validation --#}
    {%- else %}
        {%- if content_types | select('equalto', 'text') | list | length != 1
              or content_types | select('equalto', 'audio') | list | length != 1 %}
            {{- raise_exception("Each message (except the last) must contain exactly one 'text' and one 'audio' item") }}
        {%- elif content_types | reject('in', ['text', 'audio']) | list | length > 0 %}
            {{- raise_exception("Only 'text' and 'audio' types are allowed in content") }}
        {%- endif %}
    {%- endif %}
{%- endfor %}

{%- for message in messages %}
    {{- bos_token }}
    {{- '[' + message['role'] + ']' }}
    {{- message['content'][0]['text'] }}
    {{- eos_token }}
    {%- if message['content']|length > 1 %}
        {{- '<|AUDIO|><|audio_eos|>' }}
    {%- endif %}
{%- endfor %}
"""

# Widths only shrink (real: backbone 2048, depth decoder 1024, Mimi 512).
BACKBONE_HIDDEN_SIZE = 64
DEPTH_DECODER_HIDDEN_SIZE = 32  # narrower than the backbone, as in the real model, so its projection is exercised
CODEC_HIDDEN_SIZE = 64

# The real model's rope scaling, rewritten by the conversion script into values that
# hold at max_position_embeddings 2048 (backbone) and 33 (depth decoder).
BACKBONE_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "high_freq_factor": 0.5,
    "low_freq_factor": 0.125,
    "original_max_position_embeddings": 1024,
}
DEPTH_DECODER_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "high_freq_factor": 0.0078125,
    "low_freq_factor": 0.001953125,
    "original_max_position_embeddings": 16,
}
# Codes 2048..2050 exist only in the LM's vocabulary; sampled, Mimi's decoder would
# index out of range. Random weights would sample them, so both heads suppress them.
SUPPRESSED_CODES = list(range(C.CODEBOOK_SIZE, C.LM_AUDIO_VOCAB_SIZE))
MAX_NEW_FRAMES = 125  # the real generation_config's default (10 s)
# Random init decodes to a standard deviation of ~5 (peaks ~50), where real audio
# stays within [-1, 1]; scaling the codec's last convolution brings it to speech
# level, so int16 conversion and watermarking downstream see plausible signals.
DECODER_OUTPUT_GAIN = 1 / 64


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A ByteLevel BPE shaped like Llama 3's: specials by the same names, and
    `<bos> text <eos>` added around every encoded text as Sesame's generator does."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        TOKENIZER_CORPUS,
        trainers.BpeTrainer(
            vocab_size=TOKENIZER_VOCAB_SIZE,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0 {EOS_TOKEN}:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {EOS_TOKEN}:0 {BOS_TOKEN}:1 $B:1 {EOS_TOKEN}:1",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[C.AUDIO_TOKEN, C.AUDIO_EOS_TOKEN],
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> CsmConfig:
    # Everything not named keeps MimiConfig's defaults, which are kyutai/mimi's real
    # geometry: ratios [8, 6, 5, 4], kernels 7/3/3, causal convs, 24 kHz, 32 x 2048
    # codes, 1 semantic quantizer, sliding window 250.
    codec = MimiConfig(
        hidden_size=CODEC_HIDDEN_SIZE,
        num_filters=8,
        codebook_dim=32,
        vector_quantization_hidden_dimension=32,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        upsample_groups=CODEC_HIDDEN_SIZE,  # depthwise, as in the real codec
    )
    audio_id = tokenizer.convert_tokens_to_ids(C.AUDIO_TOKEN)
    depth_decoder = CsmDepthDecoderConfig(
        num_codebooks=C.NUM_CODEBOOKS,
        vocab_size=C.LM_AUDIO_VOCAB_SIZE,
        backbone_hidden_size=BACKBONE_HIDDEN_SIZE,
        hidden_size=DEPTH_DECODER_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,  # 4:1 grouped-query attention like the real 8:2
        max_position_embeddings=C.NUM_CODEBOOKS + 1,
        rope_parameters=DEPTH_DECODER_ROPE,
    )
    return CsmConfig(
        num_codebooks=C.NUM_CODEBOOKS,
        vocab_size=C.LM_AUDIO_VOCAB_SIZE,
        text_vocab_size=len(tokenizer),
        hidden_size=BACKBONE_HIDDEN_SIZE,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,  # 4:1 like the real 32:8
        codebook_eos_token_id=C.END_OF_SPEECH_CODE,
        codebook_pad_token_id=C.AUDIO_PAD_CODE,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=audio_id,  # the real config pads with the audio token id too
        audio_token_id=audio_id,
        audio_eos_token_id=tokenizer.convert_tokens_to_ids(C.AUDIO_EOS_TOKEN),
        rope_parameters=BACKBONE_ROPE,
        depth_decoder_config=depth_decoder,
        codec_config=codec,
    )


def randomize_codebooks(model: CsmForConditionalGeneration, generator: torch.Generator) -> None:
    """Mimi's init zeroes every codebook, so a fresh codec encodes everything to code 0
    (the end-of-speech code) and decodes every code alike; distinct random centroids
    make encoder and decoder behave like a trained codec's in shape."""
    for module in model.codec_model.modules():
        if isinstance(module, MimiEuclideanCodebook):
            module.embed_sum.copy_(torch.randn(module.embed_sum.shape, generator=generator))
            module.cluster_usage.fill_(1.0)
            module._embed = None  # cached embed_sum / cluster_usage, now stale


def quiet_decoder(model: CsmForConditionalGeneration) -> None:
    """Scales Mimi's last convolution by DECODER_OUTPUT_GAIN (see there)."""
    final_conv = model.codec_model.decoder.decoder_seanet.layers[-1].conv
    final_conv.weight.mul_(DECODER_OUTPUT_GAIN)
    final_conv.bias.mul_(DECODER_OUTPUT_GAIN)


def configure_generation(model: CsmForConditionalGeneration) -> None:
    """Sesame's sampling defaults for both heads, as in the real generation_config."""
    for config in (model.generation_config, model.depth_decoder.generation_config):
        # Left True, reload treats the file as derived from config.json and drops
        # every depth_decoder_* key: the depth decoder would silently turn greedy.
        config._from_model_config = False
        config.do_sample = True
        config.temperature = C.DEFAULT_TEMPERATURE
        config.top_k = C.DEFAULT_TOP_K
        config.suppress_tokens = SUPPRESSED_CODES
    model.generation_config.max_new_tokens = MAX_NEW_FRAMES


@torch.no_grad()
def build_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes a random-init tiny CSM (model, generation config, tokenizer, processor) to
    `out_dir` in the layout of `sesame/csm-1b`; returns the folder."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    # A private RNG state: the caller's torch RNG is left as it was, and the weights
    # depend on the seed alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CsmForConditionalGeneration(config)
        generator = torch.Generator().manual_seed(seed)
        randomize_codebooks(model, generator)
    quiet_decoder(model)
    model.eval()
    configure_generation(model)
    model.save_pretrained(out_dir)
    processor = CsmProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=C.SAMPLE_RATE, padding_value=0.0),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="weights depend on this alone")
    args = parser.parse_args(argv)
    print(build_tiny_checkpoint(args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
