"""The engine's numbers in bf16: rotary tables from fp32 frequencies (what transformers'
own bf16 load keeps), logits in fp32, and float16 refused (CSM was trained in bf16)."""

from __future__ import annotations

import pytest
import torch

from csm_triton import constants as C

ROPE_POSITIONS = 2048
# bf16 keeps 8 significant bits: a value in [-1, 1] is stored within 2**-8 / 2 = 0.002
# (0.004 between 0.5 and 1); the bound below leaves room for the fp32 arithmetic's own ulps.
BF16_STORAGE_ERROR = 0.008


def _csm1b_rope_config():
    """CSM-1B's head dim (64) and rope settings (the real model's llama3 scaling), at a
    width and depth that build in milliseconds: the tables depend on nothing else."""
    from transformers import CsmConfig, CsmDepthDecoderConfig

    from export import tiny_checkpoint as tiny

    depth = CsmDepthDecoderConfig(
        backbone_hidden_size=128,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        num_codebooks=C.NUM_CODEBOOKS,
        vocab_size=C.LM_AUDIO_VOCAB_SIZE,
        max_position_embeddings=C.NUM_CODEBOOKS + 1,
        rope_parameters=tiny.DEPTH_DECODER_ROPE,
    )
    return CsmConfig(
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=ROPE_POSITIONS,
        num_codebooks=C.NUM_CODEBOOKS,
        vocab_size=C.LM_AUDIO_VOCAB_SIZE,
        text_vocab_size=64,
        bos_token_id=1,
        pad_token_id=2,
        audio_token_id=2,
        audio_eos_token_id=3,
        rope_parameters=tiny.BACKBONE_ROPE,
        depth_decoder_config=depth,
        codec_config={
            "hidden_size": 64,
            "num_filters": 8,
            "codebook_dim": 32,
            "num_hidden_layers": 1,
            "upsample_groups": 64,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
    )


def build_csm1b_rope_model():
    """A random model of that config, fp32, without its codec (the GPU test builds it too)."""
    from transformers import CsmForConditionalGeneration

    torch.manual_seed(0)
    model = CsmForConditionalGeneration(_csm1b_rope_config())
    model.codec_model = None
    return model.eval()


@pytest.fixture(scope="module")
def csm1b_rope_model():
    return build_csm1b_rope_model()


def _fp32_reference(rotary_emb, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotary module, its inverse frequencies in fp32, at every position."""
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary_emb(x, torch.arange(positions)[None])
    return cos[0], sin[0]


def rotary_table_errors(lm, model) -> dict[str, float]:
    """The largest difference of each of the engine's rotary tables (on any device) from
    transformers' fp32 tables of `model`, whose rotary frequencies are still fp32."""
    backbone = _fp32_reference(model.backbone_model.rotary_emb, lm.backbone.cos.shape[0])
    depth = _fp32_reference(model.depth_decoder.model.rotary_emb, lm.depth.cos.shape[0])
    tables = {
        "backbone cos": (lm.backbone.cos, backbone[0]),
        "backbone sin": (lm.backbone.sin, backbone[1]),
        "depth cos": (lm.depth.cos, depth[0]),
        "depth sin": (lm.depth.sin, depth[1]),
    }
    return {name: (table.float().cpu() - reference).abs().max().item() for name, (table, reference) in tables.items()}


def assert_loaded_as_transformers_bf16(model, loaded_bf16) -> None:
    """`model` converted as `from_pretrained(dtype=bfloat16)` loads it: the rotary
    frequencies kept in fp32 and equal, the weights in bf16."""
    for ours, theirs in [
        (model.backbone_model.rotary_emb, loaded_bf16.backbone_model.rotary_emb),
        (model.depth_decoder.model.rotary_emb, loaded_bf16.depth_decoder.model.rotary_emb),
    ]:
        assert ours.inv_freq.dtype == theirs.inv_freq.dtype == torch.float32
        assert torch.equal(ours.inv_freq, theirs.inv_freq)
    assert model.backbone_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_bf16_rotary_tables_at_csm1b_head_dim_are_the_fp32_tables_rounded_once(csm1b_rope_model):
    from csm_triton.engine import CsmLM

    model = csm1b_rope_model
    assert model.backbone_model.rotary_emb.inv_freq.dtype == torch.float32
    import copy

    lm = CsmLM(copy.deepcopy(model), device="cpu", dtype=torch.bfloat16, max_batch=1, cpu_kernels="mkl")
    assert lm.backbone.head_dim == 64 and lm.backbone.cos.shape == (ROPE_POSITIONS, 64)
    assert lm.depth.cos.shape[0] == C.NUM_CODEBOOKS + 1
    assert lm.backbone.cos.dtype == torch.bfloat16
    for name, error in rotary_table_errors(lm, model).items():
        assert error <= BF16_STORAGE_ERROR, f"{name} off by {error:.3f} (bf16 storage: {BF16_STORAGE_ERROR})"
    # What the tables were before: from inv_freq rounded to bf16 by `model.to(bfloat16)`.
    rounded = copy.deepcopy(model).to(torch.bfloat16).backbone_model.rotary_emb
    assert rounded.inv_freq.dtype == torch.bfloat16
    cos32, _ = _fp32_reference(model.backbone_model.rotary_emb, ROPE_POSITIONS)
    old_cos, _ = _fp32_reference(rounded, ROPE_POSITIONS)
    assert (old_cos - cos32).abs().max().item() > 0.5  # the bug this guards against is real at this head dim


def test_a_model_already_rounded_to_bf16_still_gets_fp32_rotary_tables(csm1b_rope_model):
    """A caller's model converted with `.to(bfloat16)` before it reaches the engine: its
    inv_freq is rounded already, so the tables are recomputed from the rope config."""
    import copy

    from csm_triton.engine.layers import rotary_tables

    reference = _fp32_reference(csm1b_rope_model.backbone_model.rotary_emb, ROPE_POSITIONS)
    rounded = copy.deepcopy(csm1b_rope_model).to(torch.bfloat16).backbone_model.rotary_emb
    cos, sin = rotary_tables(rounded, ROPE_POSITIONS, torch.device("cpu"), torch.bfloat16)
    assert (cos.float() - reference[0]).abs().max().item() <= BF16_STORAGE_ERROR
    assert (sin.float() - reference[1]).abs().max().item() <= BF16_STORAGE_ERROR
    # In fp32 the tables are transformers' own, bit for bit (the fp32 token anchor needs it).
    cos32, sin32 = rotary_tables(
        csm1b_rope_model.backbone_model.rotary_emb, ROPE_POSITIONS, torch.device("cpu"), torch.float32
    )
    assert torch.equal(cos32, reference[0]) and torch.equal(sin32, reference[1])


def test_the_engine_leaves_the_model_it_converts_as_transformers_bf16_load_does(tiny_checkpoint):
    """CsmLM converts the model it is given in place; afterwards its rotary buffers are
    those of `from_pretrained(dtype=bfloat16)`: fp32, so transformers' own forward on
    that model (the reference the bf16 checks compare with) is not the rounded one."""
    from transformers import CsmForConditionalGeneration

    from csm_triton.engine import CsmLM

    loaded_bf16 = CsmForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.bfloat16)
    converted = CsmForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    converted.codec_model = None
    lm = CsmLM(converted, device="cpu", dtype=torch.bfloat16, max_batch=1, cpu_kernels="mkl")
    assert_loaded_as_transformers_bf16(converted, loaded_bf16)
    # The engine's tables are transformers' bf16 model's own tables.
    positions = torch.arange(lm.max_context)[None]
    cos, sin = loaded_bf16.backbone_model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), positions)
    assert torch.equal(lm.backbone.cos, cos[0]) and torch.equal(lm.backbone.sin, sin[0])


def test_bf16_heads_give_fp32_logits_from_fp32_weights(tiny_checkpoint):
    from csm_triton.engine import CsmLM

    lm = CsmLM.from_checkpoint(tiny_checkpoint, device="cpu", dtype=torch.bfloat16, max_batch=1, cpu_kernels="mkl")
    assert lm.backbone_head.dtype == torch.float32
    assert {head.dtype for head in lm.depth_heads} == {torch.float32}
    assert lm.backbone.layers[0].qkv.dtype == torch.bfloat16  # the rest stays bf16
    # The checkpoint's fp32 weights themselves, not bf16-rounded ones widened again.
    from transformers import CsmForConditionalGeneration

    checkpoint = CsmForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    # Only the 2,048 codes Mimi decodes: the LM's specials (2048..2050) have no logits to mask.
    assert torch.equal(lm.backbone_head.weight, checkpoint.lm_head.weight.detach()[: C.CODEBOOK_SIZE])
    assert torch.equal(
        lm.depth_heads[3].weight, checkpoint.depth_decoder.codebooks_head.weight.detach()[3].T[: C.CODEBOOK_SIZE]
    )
    hidden = torch.randn(2, lm.backbone_hidden_size).to(torch.bfloat16)
    logits = lm.codebook0_logits(hidden)
    assert logits.dtype == torch.float32
    # The matmul itself ran in fp32 (not bf16 logits cast afterwards).
    expected = hidden.float() @ lm.backbone_head.weight.T
    torch.testing.assert_close(logits[:, : C.CODEBOOK_SIZE], expected[:, : C.CODEBOOK_SIZE], rtol=1e-5, atol=1e-5)
    cache = lm.new_depth_cache(2)
    step_input = torch.randn(2, 2, lm.backbone_hidden_size).to(torch.bfloat16)
    depth_logits = lm.depth_logits(step_input, cache, 1)
    assert depth_logits.dtype == torch.float32 and depth_logits.shape == (2, C.CODEBOOK_SIZE)


def test_float16_is_refused_naming_bf16_and_fp32_unless_opted_in(tiny_checkpoint):
    from csm_triton.engine import CsmLM

    with pytest.raises(ValueError, match="trained in bfloat16, use bfloat16 .* or float32") as refused:
        CsmLM.from_checkpoint(tiny_checkpoint, device="cpu", dtype=torch.float16)
    assert "allow_float16" in str(refused.value)
    lm = CsmLM.from_checkpoint(
        tiny_checkpoint, device="cpu", dtype=torch.float16, max_batch=1, cpu_kernels="mkl", allow_float16=True
    )
    assert lm.dtype == torch.float16 and lm.backbone_head.dtype == torch.float32


def test_the_csm_lm_dtype_float16_parameter_fails_the_load_unless_opted_in(tiny_checkpoint):
    from csm_triton.triton.models.lm import engine_from_config
    from csm_triton.triton.parameters import ParameterError, Parameters

    def parameters(**values):
        return Parameters(
            {
                "name": "csm_lm",
                "parameters": {
                    "checkpoint_dir": {"string_value": tiny_checkpoint.name},
                    "max_slots": {"string_value": "1"},
                    "cpu_kernels": {"string_value": "mkl"},
                    **{k: {"string_value": v} for k, v in values.items()},
                },
            }
        )

    with pytest.raises(
        ParameterError,
        match="'dtype' float16 is not supported: CSM was trained in bfloat16; use 'bfloat16' \\(GPU\\) or 'float32'",
    ):
        engine_from_config(tiny_checkpoint.parent, parameters(dtype="float16"), "cpu")
    engine = engine_from_config(tiny_checkpoint.parent, parameters(dtype="float16", allow_float16="true"), "cpu")
    assert engine.lm.dtype == torch.float16
    assert engine_from_config(tiny_checkpoint.parent, parameters(dtype="bfloat16"), "cpu").lm.dtype == torch.bfloat16


def test_the_engine_benchmark_compares_with_transformers_own_bf16_model(tiny_checkpoint):
    """engine_bench's `generate` baseline (and so its tokens-identical column) runs on the
    model as `from_pretrained(dtype=bfloat16)` loads it, not on a `.to(bfloat16)` copy
    whose rotary frequencies are rounded; and it offers no fp16, which the engine refuses."""
    from transformers import CsmForConditionalGeneration

    from loadtest import engine_bench

    args = engine_bench.arguments().parse_args(["--tiny", "--dtype", "bf16"])
    model = engine_bench.bench_model(args, torch.device("cpu"), engine_bench.DTYPES[args.dtype])
    loaded = CsmForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.bfloat16)
    assert_loaded_as_transformers_bf16(model, loaded)
    with pytest.raises(SystemExit):
        engine_bench.arguments().parse_args(["--dtype", "fp16"])
